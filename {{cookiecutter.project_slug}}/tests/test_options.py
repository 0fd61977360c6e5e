"""The option groups: each checks itself once, and the module takes them as objects or dicts."""

import dataclasses

import pytest

from {{ cookiecutter.package_name }}.kl.objective import Objective
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import LoRA, Optimization, Sampling, Updates, as_group


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Sampling(samples_per_prompt=1), "samples_per_prompt must be >= 2 for the leave-one-out baseline"),
        (lambda: Sampling(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (lambda: Updates(kl_chunk_rows=0), "kl_chunk_rows must be >= 1"),
        (lambda: Optimization(warmup_steps=-1), "warmup_steps must be >= 0"),
        (lambda: Optimization(lr_decay="step"), "lr_decay must be one of constant, linear, cosine"),
        (lambda: Optimization(lr=0.0), "lr must be > 0"),
        (lambda: LoRA(r=0), "lora r must be >= 1"),
        (lambda: Objective(advantage="ppo"), "advantage must be one of rloo, grpo"),
    ],
)
def test_every_group_refuses_a_value_out_of_range_when_it_is_made(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_group_comes_from_itself_a_dict_or_none_and_unknown_keys_name_the_valid_ones():
    assert as_group(Updates, {"ppo_epochs": 3}, "updates") == Updates(ppo_epochs=3)
    assert as_group(Updates, None, "updates") == Updates()
    with pytest.raises(ValueError, match="unknown sampling setting.s. samples; valid ones are samples_per_prompt"):
        as_group(Sampling, {"samples": 4}, "sampling")


def test_the_module_keeps_each_group_and_its_hyperparameters_hold_plain_dicts():
    module = RBKLModule(objective=Objective(beta=0.3), updates={"ppo_epochs": 2}, lora=LoRA(r=2))
    assert module.objective.beta == 0.3 and module.updates == Updates(ppo_epochs=2)
    assert module.hparams["objective"] == dataclasses.asdict(Objective(beta=0.3))
    assert module.hparams["updates"]["ppo_epochs"] == 2 and module.hparams["lora"]["r"] == 2
    assert module.hparams_initial["sampling"] == dataclasses.asdict(Sampling()), "hparams.yaml is written from these"
    # What load_from_checkpoint does: the saved dicts back into the constructor.
    again = RBKLModule(**{k: v for k, v in module.hparams.items() if k != "reward"})
    assert again.objective == module.objective and again.lora == module.lora
