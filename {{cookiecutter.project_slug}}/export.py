"""Write a trained policy as a Hugging Face model folder: `python export.py CHECKPOINT OUT_DIR`.

LoRA adapters are merged into the base model; the folder loads with `from_pretrained`.
"""

from {{ cookiecutter.package_name }}.runs.export import main

if __name__ == "__main__":
    main()
