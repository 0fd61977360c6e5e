"""Write a trained policy as a Hugging Face model folder: `python export.py CHECKPOINT OUT_DIR [--replace]`.

The folder holds the policy's weights (a LoRA adapter merged into its base model), its config,
generation config and tokenizer, so `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it and
`train.py test --model.init_args.policy=OUT_DIR` evaluates it. The policy is rebuilt from the
checkpoint's own hyperparameters; neither the reference nor the reward is loaded. OUT_DIR must be
new or empty; `--replace` swaps an earlier export for the new one whole.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..models.loading import build_policy, load_tokenizer, trained_weight_names
from ..training.options import LoRA, as_group


def load_policy(checkpoint: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The trained policy (LoRA merged) and its tokenizer, from a checkpoint of RBKLModule."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    h = saved.get("hyper_parameters", {})
    if "policy" not in h:
        raise ValueError(f"{checkpoint} was not written by RBKLModule: its hyperparameters name no policy")
    lora = None if h.get("lora") is None else as_group(LoRA, h["lora"], "lora")
    policy = build_policy(h["policy"], h.get("dtype", "float32"), h.get("trust_remote_code", False), lora)
    weights = {k.removeprefix("policy."): v for k, v in saved["state_dict"].items() if k.startswith("policy.")}
    missing, _ = policy.load_state_dict(weights, strict=False)
    lacking = sorted(set(trained_weight_names(policy, lora is not None)) & set(missing))
    if lacking:
        raise ValueError(f"{checkpoint} lacks {len(lacking)} of the policy's trained weights (e.g. {lacking[0]!r})")
    if lora is not None:
        untie_adapted_output_embeddings(policy.get_base_model())
        policy = policy.merge_and_unload()
    tokenizer = load_tokenizer(h.get("tokenizer") or h["policy"], h.get("trust_remote_code", False))
    return policy.eval(), tokenizer


def untie_adapted_output_embeddings(model: nn.Module) -> None:
    """Give the input embeddings their own copy when an adapter sits on tied output embeddings.

    Merging a LoRA adapter of the LM head into a weight shared with the input embeddings would
    change the input embeddings too: a different model from the one trained.
    """
    output = model.get_output_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or not hasattr(output, "base_layer"):
        return
    inputs = model.get_input_embeddings()
    inputs.weight = nn.Parameter(inputs.weight.detach().clone(), requires_grad=inputs.weight.requires_grad)
    model.config.tie_word_embeddings = False


def follow_umask(folder: Path) -> None:
    """Give the exported folder and files the modes a plain `mkdir` and `open` would (safetensors
    writes 0600 files, a temporary folder is 0700), so that a group on a shared cluster can read the
    model as it reads the rest of the folder."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def check_out_dir(out_dir: Path, checkpoint: Path, replace: bool) -> None:
    """Refuse a folder the export would mix with (files of an earlier export beside the new ones
    make a folder that does not load) or one that `replace` must not delete."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: name a folder to export into")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not held:
        return
    if not replace:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(
            f"{out_dir} is not empty ({shown}) and the export's files would mix with them: name a new "
            "folder, or pass --replace to replace this one with the export"
        )
    folders = [p.name for p in out_dir.iterdir() if p.is_dir()]
    if folders or checkpoint.resolve().is_relative_to(out_dir.resolve()):
        # An export is a folder of files: one holding folders (or the checkpoint) is not an earlier export.
        raise ValueError(
            f"--replace would delete {out_dir}, which holds "
            + (f"folders ({', '.join(sorted(folders)[:4])})" if folders else f"the checkpoint {checkpoint}")
            + " and is no earlier export: name a new folder"
        )


def export(checkpoint: Path, out_dir: Path, replace: bool = False) -> Path:
    """Write the policy into a new folder beside `out_dir`, then put it in `out_dir`'s place: nothing
    of an earlier export stays beside the new one, and a failed export leaves `out_dir` as it was."""
    check_out_dir(Path(out_dir), checkpoint, replace)
    policy, tokenizer = load_policy(checkpoint)
    target = Path(out_dir).absolute()  # renamed below: "." or "out/" name it as well
    target.parent.mkdir(parents=True, exist_ok=True)
    written = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        policy.save_pretrained(written)
        tokenizer.save_pretrained(written)
        follow_umask(written)
        if target.exists():  # empty, or an earlier export with --replace: moved aside, then deleted
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent)) / target.name
            target.rename(aside)
            try:
                written.rename(target)
            except OSError:
                aside.rename(target)
                raise
            shutil.rmtree(aside.parent)
        else:
            written.rename(target)
    finally:
        shutil.rmtree(written, ignore_errors=True)  # still there only when the export failed
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", type=Path, help="a .ckpt written by train.py fit (e.g. .../checkpoints/last.ckpt)"
    )
    parser.add_argument("out_dir", type=Path, help="the folder to write (created; it must be empty unless --replace)")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="replace OUT_DIR, an earlier export, with this one as a whole (no earlier file is left beside the new)",
    )
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        sys.exit(f"error: {args.checkpoint}: no such checkpoint file")
    try:
        out = export(args.checkpoint, args.out_dir, args.replace)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {out}: " + "  ".join(sorted(p.name for p in out.iterdir())))
