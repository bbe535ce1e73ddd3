"""`python -m calm_pytorch.evaluation --model calm --model_args pretrained=DIR --tasks ...`: lm_eval's
own command line, with the `calm` model registered first."""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

from calm_pytorch.evaluation import harness  # noqa: F401  (registers the `calm` model with lm_eval)

if __name__ == '__main__':
    cli_evaluate()
