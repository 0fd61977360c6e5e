"""{{ cookiecutter.description | docstring }}"""

from .estimators import GRADIENT_ESTIMATORS, VALUE_ESTIMATORS, kl_grad_surrogate, sequence_kl

__all__ = ["GRADIENT_ESTIMATORS", "VALUE_ESTIMATORS", "kl_grad_surrogate", "sequence_kl"]
