from __future__ import annotations

from typing import Any

from beartype import BeartypeConf, beartype

# a type violation at the public boundary is a TypeError naming the parameter,
# so users can catch it like any other bad argument

typecheck = beartype(conf = BeartypeConf(violation_param_type = TypeError))

def exists(v: Any) -> bool:
    return v is not None

def default(v: Any, d: Any) -> Any:
    return v if exists(v) else d

def cast_tuple(v: Any, length: int = 1) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else ((v,) * length)
