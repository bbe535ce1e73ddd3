from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor
from torch.nn import Module
from torch.utils.hooks import RemovableHandle

HiddenPosition = Literal['input', 'output']

# a site is the place where a hidden state can be read or changed: the input or the output of a
# module. Hooks there must return what the module gave, with only the hidden state replaced

@dataclass(frozen = True, eq = False)
class Site:
    module: Module
    position: HiddenPosition

    @property
    def key(self) -> tuple[int, str]:
        # modules compare by identity: two sites on one module and position are one site
        return (id(self.module), self.position)

# block outputs: a tensor, or a tuple / list whose first element is the hidden state

def output_hidden(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output

    if isinstance(output, (tuple, list)) and len(output) > 0 and isinstance(output[0], Tensor):
        return output[0]

    raise TypeError(f'expected a block to return a tensor or a tuple starting with the hidden state, got {type(output).__name__}')

def replace_output_hidden(output: Any, hidden: Tensor) -> Any:
    if isinstance(output, Tensor):
        return hidden

    rest = output[1:]

    if isinstance(output, list):
        return [hidden, *rest]

    if hasattr(output, '_fields'):  # namedtuple
        return type(output)(hidden, *rest)

    return type(output)((hidden, *rest))

# block inputs: the first positional argument, or `hidden_states` given by keyword

def input_hidden(args: tuple, kwargs: dict) -> Tensor:
    if len(args) > 0 and isinstance(args[0], Tensor):
        return args[0]

    if isinstance(kwargs.get('hidden_states'), Tensor):
        return kwargs['hidden_states']

    raise TypeError('expected a block to take its hidden state as the first positional argument or as `hidden_states`')

def replace_input_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if len(args) > 0 and isinstance(args[0], Tensor):
        return (hidden, *args[1:]), kwargs

    return args, {**kwargs, 'hidden_states': hidden}

# hooks are small callable objects rather than closures, so that `copy.deepcopy` of a composition
# gives hooks that call the copied recorder or injector, not the original one

class ReadOutputHook:
    def __init__(self, fn: Callable[[Tensor], None]):
        self.fn = fn

    def __call__(self, module, args, output):
        self.fn(output_hidden(output))

class ReadInputHook:
    def __init__(self, fn: Callable[[Tensor], None]):
        self.fn = fn

    def __call__(self, module, args, kwargs):
        self.fn(input_hidden(args, kwargs))

class WriteOutputHook:
    def __init__(self, fn: Callable[[Tensor], Tensor | None]):
        self.fn = fn

    def __call__(self, module, args, output):
        new = self.fn(output_hidden(output))
        return None if new is None else replace_output_hidden(output, new)

class WriteInputHook:
    def __init__(self, fn: Callable[[Tensor], Tensor | None]):
        self.fn = fn

    def __call__(self, module, args, kwargs):
        new = self.fn(input_hidden(args, kwargs))
        return None if new is None else replace_input_hidden(args, kwargs, new)

def register_read_hook(site: Site, fn: Callable[[Tensor], None]) -> RemovableHandle:
    """Calls fn(hidden) each time the site is passed. Prepended, so that hidden states recorded by
    other hooks (e.g. HF's output_hidden_states) see what we changed at this site."""

    if site.position == 'output':
        return site.module.register_forward_hook(ReadOutputHook(fn), prepend = True)

    return site.module.register_forward_pre_hook(ReadInputHook(fn), with_kwargs = True, prepend = True)

def register_write_hook(site: Site, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """fn(hidden) returns the new hidden state, or None to leave the call untouched."""

    if site.position == 'output':
        return site.module.register_forward_hook(WriteOutputHook(fn), prepend = True)

    return site.module.register_forward_pre_hook(WriteInputHook(fn), with_kwargs = True, prepend = True)
