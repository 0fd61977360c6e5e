"""Train with LightningCLI: `python train.py fit --config configs/default.yaml`.

`python train.py fit --help` documents every option; `--print_config` shows a resolved config.
"""

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from {{ cookiecutter.package_name }}.data import PromptDataModule
from {{ cookiecutter.package_name }}.module import RBKLModule


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Every run leaves logs/<name>/version_N/metrics.csv and plots/; a config may replace these.
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "logs"},
                },
                "trainer.callbacks": [
                    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
                    {"class_path": "{{ cookiecutter.package_name }}.callbacks.RewardVsKLPlot"},
                    {"class_path": "{{ cookiecutter.package_name }}.callbacks.EstimatorVariancePlot"},
                    {"class_path": "{{ cookiecutter.package_name }}.callbacks.EstimatorTable"},
                    {"class_path": "{{ cookiecutter.package_name }}.callbacks.SampleTable"},
                    {"class_path": "{{ cookiecutter.package_name }}.callbacks.KLReport"},
                ],
            }
        )


def main(args=None) -> CLI:
    return CLI(
        RBKLModule,
        PromptDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
    )


if __name__ == "__main__":
    main()
