"""Two CPU processes with gloo, through the real CLI in a subprocess (never strategy=ddp in pytest)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import free_port, gloo_group

PROJECT = Path(__file__).resolve().parents[1]


def ddp_train(tmp: Path, fused: bool, *args: str) -> None:
    paths = [str(PROJECT / "src"), str(PROJECT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [
        sys.executable,
        str(PROJECT / "train.py"),
        "fit",
        "--config",
        str(PROJECT / "configs/default.yaml"),
        "--config",
        str(PROJECT / "configs/trainer/ddp.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy.init_args.timeout=0:05:00",  # a hang becomes a failure, a loaded machine does not
        # Every update path at once: 2 epochs x 2 minibatches, each in 2 micro-batches (only the
        # last one's backward all-reduces), clipped: 4 optimizer steps per batch.
        "--model.init_args.updates.ppo_epochs=2",
        "--model.init_args.updates.minibatches=2",
        "--model.init_args.updates.micro_batches=2",
        "--model.init_args.objective.clip_range=0.2",
        "--model.init_args.updates.gradient_clip_val=1.0",
        # The statistics from materialised logits, or from hidden states through the fused head.
        f"--model.init_args.updates.fused_lm_head={str(fused).lower()}",
        "--trainer.max_steps=16",
        "--data.epoch_repeats=1",  # 16 prompts / (8 per device x 2) = 1 batch an epoch: 4 validations
        "--trainer.callbacks+=ddp_probe.RankProbe",
        f"--trainer.callbacks.out_dir={tmp / 'probe'}",
        *args,
    ]
    result = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (tmp / "stderr.txt").write_text(result.stderr)


@pytest.fixture(scope="module")
def ddp_runs() -> dict[bool, Path]:
    """The DDP run of `ddp_train`, with the statistics from logits (False) and the fused head (True)."""
    return {}


def made(ddp_runs: dict[bool, Path], tmp_path_factory, fused: bool) -> Path:
    if fused not in ddp_runs:
        ddp_runs[fused] = tmp_path_factory.mktemp("ddp")
        ddp_train(ddp_runs[fused], fused)
    return ddp_runs[fused]


@pytest.fixture(scope="module", params=[False, True], ids=["logits", "fused_lm_head"])
def ddp_run(tmp_path_factory, request, ddp_runs) -> Path:
    return made(ddp_runs, tmp_path_factory, request.param)


def probes(run: Path) -> list[dict]:
    return [json.loads((run / "probe" / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_a_ddp_run_resumed_mid_epoch_repeats_each_ranks_samples(tmp_path):
    # 2 batches an epoch, 4 optimizer steps each: the step save at 4 lies in the first epoch's middle.
    options = ["--data.epoch_repeats=2", "--last_checkpoint.every_n_train_steps=4"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    whole.mkdir()
    ddp_train(whole, False, *options, "--last_checkpoint.save_top_k=-1")  # every step save kept
    shutil.copytree(whole, resumed)
    folder = resumed / "logs" / "default" / "version_0" / "checkpoints"
    middle = folder / "epoch=0-step=4.ckpt"
    assert torch.load(middle, map_location="cpu", weights_only=False)["global_step"] == 4
    for other in folder.glob("*.ckpt"):
        if other != middle:
            other.unlink()
    middle.rename(folder / "last.ckpt")  # as a run killed after that save leaves it
    ddp_train(resumed, False, *options, "--ckpt_path", "last")
    uninterrupted, again = probes(whole), probes(resumed)
    for rank in range(2):
        # Each rank continues its own share of the data order and its own sampling stream.
        assert again[rank]["steps"] == uninterrupted[rank]["steps"][1:], rank
    assert again[0]["policy_sha256"] == again[1]["policy_sha256"] == uninterrupted[0]["policy_sha256"]


@pytest.mark.slow
def test_policy_weights_are_identical_on_both_ranks(ddp_run):
    ranks = probes(ddp_run)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["policy_sha256"] == ranks[1]["policy_sha256"]
    assert ranks[0]["steps"][0]["rewards"] != ranks[1]["steps"][0]["rewards"], "ranks must see different prompts"


@pytest.mark.slow
def test_logged_metrics_equal_one_process_on_the_union_of_samples(ddp_run):
    ranks = probes(ddp_run)
    rows = [r for r in csv.DictReader(open(next(ddp_run.rglob("metrics.csv")))) if r.get("train/kl/rb/mean")]
    assert len(rows) == len(ranks[0]["steps"]) == 4
    for step, row in enumerate(rows):
        for key, column in (("kl/rb", "train/kl/rb"), ("kl/mc", "train/kl/mc"), ("rewards", "train/reward")):
            # Each rank's samples, 4 per prompt (configs/default.yaml), prompts never split.
            groups = np.concatenate([np.array(r["steps"][step][key]).reshape(-1, 4) for r in ranks])
            assert float(row[f"{column}/mean"]) == pytest.approx(groups.mean(1).mean(), rel=1e-5, abs=1e-6)
            if key != "rewards":
                w = groups.var(1, ddof=1).mean()
                assert float(row[f"{column}/within_prompt_var"]) == pytest.approx(w, rel=1e-5, abs=1e-6)
        assert float(row["train/global_batch"]) == 8 * 2 * 4


@pytest.mark.slow
def test_the_fused_head_takes_the_steps_the_logits_take_under_ddp(ddp_runs, tmp_path_factory):
    logits, fused = (probes(made(ddp_runs, tmp_path_factory, f)) for f in (False, True))
    for rank in range(2):
        assert len(logits[rank]["steps"]) == len(fused[rank]["steps"]) == 4
        for a, b in zip(logits[rank]["steps"], fused[rank]["steps"], strict=True):
            # The same samples (weights a float rounding apart sample the same tokens) and the same
            # KL estimates, after up to 16 optimizer steps on all-reduced gradients of either path.
            # MC sums 64 sampled log-ratios that cancel to ~1e-3: float32 rounding of each log-prob
            # leaves ~1e-6 absolute, hence the absolute tolerance.
            assert a["rewards"] == b["rewards"], rank
            for key in ("kl/rb", "kl/mc"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=f"{key}, rank {rank}")


@pytest.mark.slow
def test_lightning_advice_that_does_not_apply_is_not_printed(ddp_run):
    # The logged values are merged across ranks by their torchmetrics states, not by sync_dist.
    stderr = (ddp_run / "stderr.txt").read_text()
    assert "sync_dist" not in stderr and "weights_only" not in stderr, stderr[-5000:]


@pytest.mark.slow
def test_plots_and_checkpoints_are_written_once(ddp_run):
    runs = list((ddp_run / "logs").glob("*/version_*"))
    assert len(runs) == 1, runs
    pngs = sorted(p.name for p in (runs[0] / "plots").iterdir())
    assert pngs == ["estimator_spread.png", "reward_vs_kl.png", "training_curves.png"]
    checkpoints = sorted(p.name for p in ddp_run.rglob("*.ckpt"))
    assert checkpoints == ["epoch=3-step=16.ckpt", "last.ckpt"], "one of each, written by rank 0 only"


def _generation_worker(rank: int, port: int, synced: bool, sampler: str, out_dir: str) -> None:

    import torch

    from {{ cookiecutter.package_name }}.models.loading import load_causal_lm
    from {{ cookiecutter.package_name }}.models.sampler import sample_fast, sample_responses, sampling_config

    with gloo_group(rank, 2, port):
        model = load_causal_lm("builtin:tiny-gpt2").eval()
        calls = []

        def force_length(module, args, logits):
            calls.append(1)
            # Rank 0 always ends at once with EOS (id 0); rank 1 never does, so it runs to the limit.
            logits[..., 0] = 100.0 if rank == 0 else -100.0
            return logits

        model.lm_head.register_forward_hook(force_length)
        torch.manual_seed(rank)
        prompt, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.bool)
        if sampler == "fast":
            samples = sample_fast(model, prompt, mask, 2, 10, [0], 0, synced_gpus=synced)
        else:
            samples = sample_responses(model, prompt, mask, 2, sampling_config(10, 0, 0), synced_gpus=synced)
        record = {"forwards": len(calls), "lengths": samples.response_mask.sum(1).tolist()}
        (Path(out_dir) / f"gen{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["fast", "hf"])
@pytest.mark.parametrize("synced", [True, False])
def test_synced_generation_keeps_finished_ranks_stepping(tmp_path, synced, sampler):
    # Under FSDP every forward gathers weights from all ranks: a rank that stops generating early
    # would leave the others waiting forever. With synced_gpus, both ranks run the same forwards.
    import torch.multiprocessing as mp

    mp.spawn(_generation_worker, args=(free_port(), synced, sampler, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"gen{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["lengths"] == [1, 1] and ranks[1]["lengths"] == [10, 10]
    if synced:
        assert ranks[0]["forwards"] == ranks[1]["forwards"] == 10
    else:
        assert ranks[0]["forwards"] < ranks[1]["forwards"]  # the situation that deadlocks FSDP


@pytest.mark.slow
def test_kl_evaluation_counts_every_prompt_once_over_two_processes(tmp_path):
    # 5 prompts over 2 ranks: Lightning's own sampler would pad rank 1 with a repeated prompt.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\na film with\nthe acting\ni loved the\nwhat a\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        str(PROJECT / "train.py"),
        "test",
        "--config",
        str(PROJECT / "configs/kl_eval.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--data.test_path",
        str(prompts),
        "--data.batch_size=2",
        "--model.init_args.sampling.test_samples_per_prompt=3",
        "--model.init_args.sampling.max_new_tokens=4",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = list(tmp_path.rglob("kl_report.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    assert report["prompts"] == 5 and report["samples_per_prompt"] == 3
