"""Small helpers every room uses: `exists`, `default`, `cast_tuple`, the `typecheck` of the public
boundary, `warn_user`, and `PerThread` state for hook objects.

May import: nothing
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from functools import wraps
from typing import Any, Callable

import torch
from beartype import BeartypeConf, beartype

# a type violation at the public boundary is a TypeError naming the parameter, so users can catch
# it like any other bad argument. An int is taken where a float is asked (PEP 484's numeric
# tower): `temperature = 0` is as good as `0.`

check_types = beartype(conf = BeartypeConf(violation_param_type = TypeError, is_pep484_tower = True))

def typecheck(fn: Callable) -> Callable:
    checked = check_types(fn)

    @wraps(fn)
    def inner(*args, **kwargs):
        # under torch.compile the checks are skipped: beartype samples one random item of a
        # sequence to check (random.getrandbits), which dynamo cannot trace, so every compiled
        # call with a list of prompts would break the graph at the very top of CALM.forward
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)

        return checked(*args, **kwargs)

    return inner

# frames a warning looks past to find the user's line: this package, its type checks' generated
# wrappers, and the context managers and decorators between them (contextlib's, torch's no_grad
# in torch/utils/_contextlib.py)
PASSED_THROUGH = (os.path.dirname(os.path.abspath(__file__)), '<@beartype', 'contextlib.py')

def warn_user(message: str, category: type[Warning] = UserWarning):
    """warnings.warn at the user's line, however deep in the package it is raised: its filename and
    module are the user's (so `warnings.filterwarnings(module = ...)` on their own module matches)."""

    frame, level = sys._getframe(1), 2

    while exists(frame) and any(part in frame.f_code.co_filename for part in PASSED_THROUGH):
        frame, level = frame.f_back, level + 1

    warnings.warn(message, category, stacklevel = level)

def exists(v: Any) -> bool:
    return v is not None

def default(v: Any, d: Any) -> Any:
    return v if exists(v) else d

def cast_tuple(v: Any, length: int = 1) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else ((v,) * length)

class PerThread(threading.local):
    """Per-call state of a hook object (the contexts an injection reads, the hidden states a
    recorder collects): each thread sees its own attributes, so one composition may serve several
    threads at once. A subclass sets its attributes' idle values in `__init__` (run once per thread)."""

    def __reduce__(self):
        # deepcopy and pickle give a fresh, idle state: outside a call there is nothing to carry
        return type(self), ()
