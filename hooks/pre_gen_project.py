"""Refuse names that would bake a broken project, with one clear sentence."""

import keyword
import re
import sys

# Values arrive as JSON literals so that quotes in a name cannot inject code into this hook.
SLUG = {{ cookiecutter.project_slug | tojson }}
PACKAGE = {{ cookiecutter.package_name | tojson }}
MODELS = {"policy_model": {{ cookiecutter.policy_model | tojson }}, "reward_model": {{ cookiecutter.reward_model | tojson }}}

# Importing the package under one of these names would shadow a dependency or a project file.
RESERVED = {
    "torch", "lightning", "pytorch_lightning", "lightning_fabric", "transformers", "tokenizers",
    "torchmetrics", "omegaconf", "jsonargparse", "matplotlib", "numpy", "vadersentiment",
    "rich", "datasets", "safetensors", "huggingface_hub", "accelerate", "pytest", "ruff",
    "yaml", "tests", "train", "configs", "benchmarks", "src",
}


def problem() -> str | None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", SLUG):
        return (
            f"project_slug {SLUG!r} is not valid: use lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit."
        )
    if not PACKAGE.isidentifier() or not PACKAGE.isascii():
        return f"package_name {PACKAGE!r} is not a valid Python identifier."
    if keyword.iskeyword(PACKAGE):
        return f"package_name {PACKAGE!r} is a Python keyword."
    if PACKAGE.lower() in RESERVED:
        return f"package_name {PACKAGE!r} would shadow the dependency or project file of that name."
    for key, name in MODELS.items():
        if not name or re.search(r"[\s'\"`]", name):
            return f"{key} {name!r} is not a hub name or a path: no spaces, quotes or backticks."
    return None


if __name__ == "__main__":
    message = problem()
    if message:
        print(f"ERROR: {message}", file=sys.stderr)
        sys.exit(1)
