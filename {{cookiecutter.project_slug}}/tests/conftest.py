"""Shared fixtures: tiny random Hugging Face checkpoints saved to disk, loaded like hub models;
the checks of a figure's labels and legend (`drawn_clashes`) and of its Pareto frontier."""

from __future__ import annotations

import functools
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from matplotlib.collections import PathCollection
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2TokenizerFast,
    PreTrainedTokenizerFast,
)

from {{ cookiecutter.package_name }}.models.loading import tiny_gpt2
from {{ cookiecutter.package_name }}.training.rewards import Reward

PROJECT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts (train.py, export.py, ...) as a user would, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(PROJECT / script), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_kl_evaluation(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`train.py test --config configs/kl_eval.yaml` on the CPU, its run folders under cwd/logs."""
    kl_eval = ["test", "--config", str(PROJECT / "configs/kl_eval.yaml"), "--trainer.accelerator=cpu"]
    return run_script("train.py", *kl_eval, "--trainer.logger.init_args.save_dir", str(cwd / "logs"), *args, cwd=cwd)


CORPUS = [
    "this movie was great and the acting was wonderful",
    "a terrible film with a boring plot and bad actors",
    "i loved the music but the ending was weak",
    "the story is moving, the cast is excellent",
    "worst movie ever, a waste of time",
    "what a fantastic and beautiful film",
] * 20


def _gpt2_tokenizer() -> GPT2TokenizerFast:
    # A byte-level BPE trained here, with GPT-2's quirks: one special token, no pad token.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"]))
    eos = "<|endoftext|>"
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def save_tiny_gpt2(folder: Path, dropout: float = 0.0, vocab_extra: int = 0, seed: int = 0) -> Path:
    tokenizer = _gpt2_tokenizer()
    model = tiny_gpt2(
        len(tokenizer) + vocab_extra,
        tokenizer.eos_token_id,
        seed,
        n_embd=32,
        pad_token_id=None,  # like GPT-2
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_sentiment_classifier(folder: Path) -> Path:
    tokenizer = _bert_tokenizer()
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    torch.manual_seed(0)
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "gpt2": save_tiny_gpt2(root / "gpt2"),
        "gpt2_dropout": save_tiny_gpt2(root / "gpt2-dropout", dropout=0.3),
        "gpt2_other_vocab": save_tiny_gpt2(root / "gpt2-other-vocab", vocab_extra=7),
        "classifier": save_tiny_sentiment_classifier(root / "distilbert"),
    }


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    train, val = root / "train.txt", root / "val.jsonl"
    train.write_text("\n".join(["this movie was", "the acting", "a film with", "i loved the"] * 2) + "\n")
    val.write_text('{"prompt": "the story is"}\n{"prompt": "what a"}\n')
    return {"train": train, "val": val}


def make_trainer(root: Path, **overrides) -> L.Trainer:
    """A CPU Trainer for tests: a CSV logger in `root`, no bar, no summary, no sanity check, metrics
    every step; keyword arguments override any of these."""
    settings = {
        "accelerator": "cpu",
        "logger": CSVLogger(root, name="run"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "default_root_dir": root,
    }
    return L.Trainer(**{**settings, **overrides})


class Characters(Reward):
    """Differs from sample to sample, so the reward term has a gradient from the first step (a
    keyword reward can be 0 for every sample, and RB's KL gradient is 0 while policy == reference)."""

    def __call__(self, prompts, responses):
        return torch.tensor([len(r) / 10 for r in responses])


class Gradients(L.Callback):
    """The policy's gradient as the optimizer is about to use it (after any clipping)."""

    def __init__(self):
        self.gradients = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.flatten() for p in pl_module.policy.parameters() if p.grad is not None]
        self.gradients.append(torch.cat(grads).clone())


@pytest.fixture
def tiny_trainer(tmp_path):
    """make_trainer in the test's tmp_path."""
    return functools.partial(make_trainer, tmp_path)


# Tiny random decoders of other architectures, over the built-in vocabulary (tokenizer="builtin:tiny-gpt2").
ARCHITECTURE_SETTINGS = {
    "llama": {"num_key_value_heads": 2, "tie_word_embeddings": False},
    "qwen2": {"num_key_value_heads": 1, "tie_word_embeddings": True},  # GQA and a tied head, as Qwen2-0.5B
    "gemma2": {"num_key_value_heads": 2, "head_dim": 8, "final_logit_softcapping": 2.0, "sliding_window": 32},
}


def save_tiny_causal_lm(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A random 2-layer `model_type` model saved with save_pretrained, to load by path as a hub model is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from {{ cookiecutter.package_name }}.models.vocabulary import builtin_tokenizer

    tokenizer = builtin_tokenizer()
    if model_type == "gpt2":
        model = tiny_gpt2(len(tokenizer), tokenizer.eos_token_id, seed, n_embd=32)
    else:
        eos = tokenizer.eos_token_id
        config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            eos_token_id=eos,
            bos_token_id=eos,
            pad_token_id=eos,
            **ARCHITECTURE_SETTINGS[model_type],
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


def drawn_clashes(fig) -> list[str]:
    """What is wrong with a figure's point labels and legend, as rendered into a PNG.

    Labels (the axes' texts) must not overlap each other or any marker, must stay inside the
    axes, and the legend must lie outside the axes, where it hides no data. Markers are taken
    from the drawn lines and scatters, at the size they are drawn.
    """
    fig.savefig(io.BytesIO(), format="png")
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    frame = ax.get_window_extent(renderer)
    labels = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts]
    markers = []
    for line in ax.lines:
        if line.get_marker() not in (None, "None", "", " "):
            half = line.get_markersize() * fig.dpi / 72 / 2
            markers += [(xy, half) for xy in line.get_transform().transform(line.get_xydata())]
    for collection in ax.collections:
        if isinstance(collection, PathCollection):
            half = math.sqrt(collection.get_sizes()[0]) * fig.dpi / 72 / 2
            markers += [(xy, half) for xy in collection.get_offset_transform().transform(collection.get_offsets())]
    clashes = []
    for i, (text, box) in enumerate(labels):
        if not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
            clashes.append(f"label {text!r} leaves the axes")
        clashes += [f"labels {text!r} and {other!r} overlap" for other, b in labels[i + 1 :] if box.overlaps(b)]
        for (x, y), half in markers:
            if box.overlaps(Bbox.from_extents(x - half, y - half, x + half, y + half)):
                clashes.append(f"label {text!r} covers the marker at pixel ({x:.0f}, {y:.0f})")
    for legend in fig.legends + ([ax.get_legend()] if ax.get_legend() else []):
        if legend.get_window_extent(renderer).overlaps(frame):
            clashes.append("the legend overlaps the axes")
    return clashes


def non_dominated(points: list[tuple[float, float]]) -> set[int]:
    """Found independently of `pareto_frontier`: i is on the frontier when its reward beats every point
    of smaller KL and ties or beats every point of equal KL."""
    front = set()
    for i, (kl, reward) in enumerate(points):
        smaller = [r for k, r in points if k < kl]
        equal = [r for k, r in points if k == kl]
        if all(reward > r for r in smaller) and reward >= max(equal):
            front.add(i)
    return front


def frontier_line(fig) -> set[tuple[float, float]]:
    """The points of the figure's frontier step line."""
    (line,) = [line for line in fig.axes[0].lines if line.get_label() == "Pareto frontier"]
    assert line.get_drawstyle() == "steps-post", "reward reached within a KL: a step after each point"
    return {tuple(xy) for xy in line.get_xydata()}
