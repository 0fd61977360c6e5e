"""Train, validate or evaluate with LightningCLI: `python train.py fit --config configs/default.yaml`.

`python train.py fit --help` documents every option; `--print_config` shows a resolved config;
`--ckpt_path last` resumes the newest run in place (docs/resume.md).
"""

from {{ cookiecutter.package_name }}.runs.cli import main

if __name__ == "__main__":
    main()
