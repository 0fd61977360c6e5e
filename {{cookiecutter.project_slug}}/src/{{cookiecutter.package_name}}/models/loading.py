"""Loading policy, reference and tokenizer, and putting frozen models in a safe state.

Models load with `from_pretrained(name_or_path)`: a hub name or a local folder. Names of the form
`builtin:tiny-gpt2[:seed=N]` build a small random GPT-2 over a built-in word vocabulary instead,
so the offline default trains with no download at all.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from .lora import LoRA, apply_lora
from .vocabulary import builtin_tokenizer

BUILTIN_PREFIX = "builtin:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_builtin(name: str) -> tuple[str, int]:
    """`builtin:tiny-gpt2:seed=3` -> ("tiny-gpt2", 3)."""
    kind, _, options = name.removeprefix(BUILTIN_PREFIX).partition(":")
    seed = 0
    if options:
        key, _, value = options.partition("=")
        if key != "seed" or not value.isdigit():
            raise ValueError(f"builtin model options must look like ':seed=N', got {name!r}")
        seed = int(value)
    if kind != "tiny-gpt2":
        raise ValueError(f"unknown builtin model {name!r}; available: builtin:tiny-gpt2[:seed=N]")
    return kind, seed


def tiny_gpt2(vocab_size: int, eos_token_id: int, seed: int, **config_overrides) -> GPT2LMHeadModel:
    """A small random GPT-2 (2 layers x 64 wide, 64 positions); `config_overrides` go to GPT2Config."""
    settings = {"n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 2, "pad_token_id": eos_token_id}
    config = GPT2Config(
        vocab_size=vocab_size,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        **{**settings, **config_overrides},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def check_local_folder(name_or_path: str, option: str) -> None:
    """A name that can only be a path must be there: the hub would answer 'Repo id must be in the form
    ...' instead of saying that the folder is missing. A hub name is 'name' or 'namespace/name'."""
    path_like = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if path_like and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(
            f"{option}: no folder {name_or_path} (a local model is a folder with config.json, as save_pretrained "
            "writes it; a hub name is 'name' or 'namespace/name')"
        )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if name_or_path.startswith(BUILTIN_PREFIX):
        parse_builtin(name_or_path)
        return builtin_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token (§6.4: masks use the first EOS)
    tokenizer.padding_side = "left"
    return tokenizer


# Files of a saved tokenizer: a folder without any holds none (transformers 5 would build an empty
# tokenizer of the config's model type from config.json alone rather than say so).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def own_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The tokenizer that comes with a model, as saved (no padding changes), or None where it has none."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        parse_builtin(name_or_path)
        return builtin_tokenizer()
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # a hub model without one, or a format this install cannot read
        warnings.warn(
            f"the tokenizer of {name_or_path!r} did not load ({str(error).splitlines()[0]}), so it was not "
            "compared with the policy's",
            UserWarning,
            stacklevel=2,
        )
        return None


def vocabulary_differences(policy: PreTrainedTokenizerBase, reference: PreTrainedTokenizerBase) -> list[str]:
    """What differs between two tokenizers' token -> id maps and special tokens, in words ([]: nothing)."""
    p, r = policy.get_vocab(), reference.get_vocab()
    moved = sorted((t for t in p if t in r and p[t] != r[t]), key=p.__getitem__)
    only_policy = sorted((t for t in p if t not in r), key=p.__getitem__)
    only_reference = sorted((t for t in r if t not in p), key=r.__getitem__)
    differences = []
    if moved:
        t = moved[0]
        differences.append(
            f"{len(moved)} of {len(p)} tokens map to other ids (e.g. {t!r}: {p[t]} for the policy, {r[t]} for the "
            "reference)"
        )
    if only_policy:
        differences.append(
            f"{len(only_policy)} of the policy's tokens are not in the reference's (e.g. {only_policy[0]!r})"
        )
    if only_reference:
        differences.append(
            f"{len(only_reference)} of the reference's tokens are not in the policy's (e.g. {only_reference[0]!r})"
        )
    # A token special to one and plain to the other: both vocabularies hold it, only one skips it in text.
    special = set(policy.all_special_tokens) ^ set(reference.all_special_tokens)
    special = sorted(t for t in special if t in p and t in r)
    if special:
        differences.append(f"{len(special)} token(s) are special to only one of them (e.g. {special[0]!r})")
    return differences


def check_same_tokenizer(
    policy: PreTrainedTokenizerBase, reference: PreTrainedTokenizerBase, policy_name: str, reference_name: str
) -> None:
    """Refuse a reference whose tokenizer gives the policy's ids other meanings: the KL would compare
    probabilities of different words, and an equal number of logits does not show it."""
    differences = vocabulary_differences(policy, reference)
    if differences:
        raise ValueError(
            f"the tokenizers of the policy ({policy_name}) and the reference ({reference_name}) differ: "
            f"{'; '.join(differences)}; KL(policy || reference) compares the two models id by id, so set "
            "model.init_args.reference to a model that uses the policy's tokenizer"
        )


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if name_or_path.startswith(BUILTIN_PREFIX):
        _, seed = parse_builtin(name_or_path)
        tokenizer = builtin_tokenizer()
        model = tiny_gpt2(len(tokenizer), tokenizer.eos_token_id, seed)
        return model.to(DTYPES[dtype])
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (adapters still injected), or the model itself."""
    # A peft model's forward takes **kwargs and hands them on; its config is the wrapped model's.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_same_vocabulary(policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Policy and reference must score the same token ids, and the tokenizer must fit in both."""
    vp, vr = output_vocab_size(policy), output_vocab_size(reference)
    if vp != vr:
        raise ValueError(
            f"policy and reference have different vocabularies ({vp} vs {vr} output logits); "
            "KL(policy || reference) needs both models to share one tokenizer and vocabulary"
        )
    if len(tokenizer) > vp:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the models only {vp} logits")


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the training forward disagree with the distribution that sampled (docs/estimators.md §6.2)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout", "dropout"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode, dropout off: for the reference and the reward model (docs/estimators.md §6.6)."""
    model.requires_grad_(False)
    disable_dropout(model)
    return model.eval()


def build_policy(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, lora: LoRA | None = None
) -> nn.Module:
    """The policy as training uses it: loaded, dropout off, wrapped in a LoRA adapter when asked."""
    policy = load_causal_lm(name_or_path, dtype, trust_remote_code)
    disable_dropout(policy)
    return policy if lora is None else apply_lora(policy, lora)


def trained_weight_names(policy: nn.Module, lora: bool) -> list[str]:
    """The policy's state-dict keys a checkpoint holds: all of them, or with LoRA only the adapter's."""
    if not lora:
        return list(policy.state_dict())
    return [name for name, p in policy.named_parameters() if p.requires_grad]
