"""Evaluating a composition with the tools people already use: EleutherAI's lm-evaluation-harness
(`harness.py`: a model class registered with lm_eval as `calm`; `python -m calm_pytorch.evaluation`
is lm_eval's command line with it registered). Importing this room imports nothing else;
`harness.py` needs `lm_eval` installed (docs/ecosystem.md).

May import: calm_pytorch.helpers, calm_pytorch.calm
"""
