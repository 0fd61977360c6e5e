"""End-to-end training throughput, and the same run with TRL's RLOOTrainer when TRL is installed.

    python benchmarks/samples_per_second.py --steps 60
    python benchmarks/samples_per_second.py --vocab 50257     # the built-in words padded to GPT-2's size
    pip install trl && python benchmarks/samples_per_second.py   # adds the TRL row

Identical settings on both sides: the built-in tiny GPT-2 (2 layers x 64; with --vocab N its
word vocabulary padded with filler words to N entries; saved to a temporary folder and loaded
with from_pretrained), CPU, 8 prompts x k = 4 samples per step, 12 new tokens, beta 0.05,
lr 3e-4, a keyword reward, pure sampling (temperature 1, top-k 0, top-p 1), metrics logged every
step. Ours also computes every KL estimator (mc, k2, k3, cv, rb) on every step; TRL computes one.
Both are timed the same way: the wall time of each optimizer step, from the start of the step to
its end, the first `--warmup` steps dropped (allocator, kernels, lazy imports), then the median;
samples/s = samples per step / median step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from step import quiet_trainer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from {{ cookiecutter.package_name }}.kl.objective import Objective
from {{ cookiecutter.package_name }}.models.loading import load_causal_lm, tiny_gpt2
from {{ cookiecutter.package_name }}.models.vocabulary import EOS, TRAIN_PROMPTS, UNK, builtin_tokenizer, vocabulary
from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Optimization, Sampling
from {{ cookiecutter.package_name }}.training.rewards import KeywordReward

PROMPTS, K, NEW_TOKENS, BETA, LR, WORDS = 8, 4, 12, 0.05, 3e-4, ["good", "great"]


class StepTimes(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def steady_rate(times: list[float], warmup: int) -> float:
    if len(times) <= warmup:
        raise ValueError(f"{len(times)} steps timed: need more than --warmup={warmup}")
    return PROMPTS * K / statistics.median(times[warmup:])


def ours(model_dir: Path, steps: int, kl_gradient: str, log_dir: Path, warmup: int) -> float:
    L.seed_everything(0)
    module = RBKLModule(
        policy=str(model_dir),
        reward=KeywordReward(WORDS),
        objective=Objective(beta=BETA, kl_gradient=kl_gradient),
        sampling=Sampling(samples_per_prompt=K, max_new_tokens=NEW_TOKENS),
        optimization=Optimization(lr=LR),
    )
    timer = StepTimes()
    trainer = quiet_trainer(max_steps=steps, logger=CSVLogger(log_dir), log_every_n_steps=1, callbacks=[timer])
    trainer.fit(module, PromptDataModule(batch_size=PROMPTS, epoch_repeats=steps))
    return steady_rate(timer.times, warmup)


def trl(model_dir: Path, steps: int, out_dir: Path, warmup: int) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    class TRLStepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    L.seed_everything(0)
    words = set(WORDS)

    def reward(prompts, completions, **kwargs):
        return [float(sum(w in words for w in c.split())) for c in completions]

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    args = RLOOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=PROMPTS * K,
        num_generations=K,
        max_completion_length=NEW_TOKENS,
        beta=BETA,
        learning_rate=LR,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    trainer = RLOOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS * steps}),
        processing_class=tokenizer,
        callbacks=[timer := TRLStepTimes()],
    )
    trainer.train()
    return steady_rate(timer.times, warmup)


def save_model(folder: Path, vocab: int | None) -> None:
    """The built-in tiny GPT-2 and its tokenizer; with `vocab`, the word list padded with fillers."""
    if vocab is None:
        load_causal_lm("builtin:tiny-gpt2").save_pretrained(folder)
        builtin_tokenizer().save_pretrained(folder)
        return
    words = vocabulary()
    if vocab < len(words):
        raise ValueError(f"--vocab must be at least the {len(words)} built-in words")
    words += [f"filler{i}" for i in range(vocab - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, unk_token=UNK, pad_token=EOS, padding_side="left"
    )
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(folder)
    tiny_gpt2(vocab, tokenizer.eos_token_id, seed=0).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of the median")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the built-in words)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-gpt2"
        save_model(model_dir, args.vocab)
        for gradient in ("rb", "mc"):
            results[f"ours_{gradient}"] = ours(model_dir, args.steps, gradient, Path(tmp) / "logs", args.warmup)
        try:
            results["trl_rloo"] = trl(model_dir, args.steps, Path(tmp) / "trl", args.warmup)
        except ImportError as err:
            print(f"TRL not measured ({err}); pip install trl to compare")
    for name, rate in results.items():
        print(f"{name:<9} {rate:8.1f} samples/s")
    if "trl_rloo" in results:
        print(f"ours (rb) / TRL RLOO: {results['ours_rb'] / results['trl_rloo']:.2f}x samples per second")
    summary = {"benchmark": "samples_per_second", "steps": args.steps, "warmup": args.warmup, "vocab": args.vocab}
    summary["samples_per_s"] = results
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
