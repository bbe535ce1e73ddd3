"""argparse types of the examples' command lines: a count of nothing (no seeds, no steps) or a
fraction outside (0, 1) is refused by argparse itself, naming the flag, rather than failing later
(a division by zero, an empty table) or running a plausible-looking nothing."""

from __future__ import annotations

import argparse

def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {text}')
    return value

def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {text}')
    return value

def fraction(text: str) -> float:
    value = float(text)
    if not 0. < value < 1.:
        raise argparse.ArgumentTypeError(f'must be between 0 and 1, got {text}')
    return value
