from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

Schedule = Literal['cosine', 'constant']

def warmup_then(
    optimizer: Optimizer,
    *,
    warmup_steps: int,
    num_train_steps: int,
    schedule: Schedule = 'cosine',
    min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warmup from near zero to the base learning rate over `warmup_steps`, then a cosine
    decay to `min_lr_ratio` times the base rate at `num_train_steps`, or a constant rate."""

    if warmup_steps < 0 or num_train_steps < 1:
        raise ValueError(f'warmup_steps must be >= 0 and num_train_steps >= 1, got {warmup_steps} and {num_train_steps}')

    if schedule not in ('cosine', 'constant'):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")

    def factor(step: int) -> float:
        # `step` optimizer steps were taken; this is the factor for the next one, so the first
        # warmup step already moves (a zero rate would waste it)
        if step < warmup_steps:
            return (step + 1) / warmup_steps

        if schedule == 'constant':
            return 1.

        progress = min(1., (step - warmup_steps) / max(1, num_train_steps - warmup_steps))
        return min_lr_ratio + (1. - min_lr_ratio) * 0.5 * (1. + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
