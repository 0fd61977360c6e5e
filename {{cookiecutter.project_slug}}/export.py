"""Write a trained policy as a Hugging Face model folder: `python export.py CHECKPOINT OUT_DIR [--replace]`.

LoRA adapters are merged into the base model; the folder loads with `from_pretrained`. OUT_DIR must be
new or empty; `--replace` swaps an earlier export for the new one whole.
"""

from {{ cookiecutter.package_name }}.runs.export import main

if __name__ == "__main__":
    main()
