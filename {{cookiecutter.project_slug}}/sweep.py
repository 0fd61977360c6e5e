"""Sweep a grid of options with seeds: `python sweep.py --config configs/default.yaml --grid ... --name NAME`.

`python sweep.py --help` lists the options; docs/experiments.md ("Sweeps") explains how to read the result.
"""

import sys
from pathlib import Path

from {{ cookiecutter.package_name }}.reports.sweep import main

if __name__ == "__main__":
    sys.exit(main(train=Path(__file__).with_name("train.py")))
