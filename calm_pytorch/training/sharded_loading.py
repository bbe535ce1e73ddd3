from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import Module, Parameter

from calm_pytorch.helpers import exists
from calm_pytorch.models.precision import on_meta
from calm_pytorch.training.distributed import Distributed, setup_distributed
from calm_pytorch.training.fsdp import shard_frozen_models

# Loading a composition of big frozen models without any process ever holding a whole one:
#
#   1. the user builds the frozen models, and the CALM over them, on the `meta` device (no memory;
#      the constructor's probes need only shapes)
#   2. the composition (a few percent of the weights) is materialised whole in every process: a
#      checkpoint the user loaded before, or fresh weights (rank 0's, broadcast)
#   3. the frozen models are sharded on meta (FSDP2's `fully_shard`, training/fsdp.py), then
#      `to_empty` gives each process memory for its own shards only
#   4. each process reads its rows of every frozen tensor from the checkpoint files, one tensor at
#      a time (`safe_open(...).get_slice(name)[start:end]` reads those bytes and no others), and
#      copies them into its shard
#
# Files as transformers' `save_pretrained` writes them: a folder with `model.safetensors`, or with
# `model.safetensors.index.json` and its shards; or one `.safetensors` file (e.g.
# `safetensors.torch.save_file(model.state_dict(), path)`). Tied weights (an embedding and its
# head) are stored once under either name.
#
# Buffers a state dict does not hold (`persistent = False`: rotary tables, position ids) are
# computed, not loaded: the model is built a second time with its parameters on meta (cheap) and
# its buffers real, and those are copied. transformers models are rebuilt from their config; other
# models with such buffers need a `rebuild` function.

Rebuild = Callable[[], Module]

def checkpoint_files(path: str | os.PathLike) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""

    from safetensors import safe_open

    path = Path(path)

    if path.is_dir():
        index = path / 'model.safetensors.index.json'

        if index.is_file():
            weight_map = json.loads(index.read_text())['weight_map']
            return {name: path / file for name, file in weight_map.items()}

        single = path / 'model.safetensors'

        if not single.is_file():
            raise FileNotFoundError(f'{path} holds neither model.safetensors nor model.safetensors.index.json: save the model with `save_pretrained(path)` (safetensors), or pass the .safetensors file itself')

        path = single

    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {path}: give a folder written by `save_pretrained` or a .safetensors file')

    with safe_open(path, framework = 'pt') as file:
        return {name: path for name in file.keys()}

@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on `meta` and their buffers where they are made."""

    register = Module.register_parameter

    def on_meta_register(module, name, param):
        if exists(param):
            param = Parameter(param.to('meta'), requires_grad = param.requires_grad)
        register(module, name, param)

    Module.register_parameter = on_meta_register

    try:
        yield
    finally:
        Module.register_parameter = register

def default_rebuild(model: Module) -> Rebuild | None:
    config = getattr(model, 'config', None)

    if not exists(config) or not hasattr(type(model), 'config_class'):
        return None

    return lambda: type(model)(config)

def local_rows(tensor: Tensor) -> tuple[Tensor, int]:
    """(what this process holds of `tensor`, the index of its first row in the whole tensor). FSDP2
    shards dim 0 as `torch.chunk` does: rank r holds rows [r * ceil(n / N), ...)."""

    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor.data, 0

    placements = tuple(tensor.placements)

    if placements != (Shard(0),):
        raise NotImplementedError(f'sharded loading reads dim-0 shards (FSDP2\'s default), got placements {placements}')

    mesh = tensor.device_mesh
    rows = -(-tensor.shape[0] // mesh.size()) if tensor.ndim > 0 else 0
    return tensor.to_local(), min(mesh.get_local_rank() * rows, tensor.shape[0])

def read_rows(files: dict[str, Path], name: str, start: int, count: int) -> Tensor:
    from safetensors import safe_open

    # opened per tensor: the file's pages this process touched leave its resident set when it is closed
    with safe_open(files[name], framework = 'pt') as file:
        if len(file.get_slice(name).get_shape()) == 0:
            return file.get_tensor(name)

        return file.get_slice(name)[start:start + count]

def tied_names(model: Module) -> list[list[str]]:
    """The names of each parameter that goes by several (an embedding tied to its head)."""

    names: dict[int, list[str]] = {}

    for key, param in model.named_parameters(remove_duplicate = False):
        names.setdefault(id(param), []).append(key)

    return [keys for keys in names.values() if len(keys) > 1]

def materialise(model: Module, device: torch.device):
    # `to_empty` makes a new tensor per module: tied weights would come apart (FSDP2 keeps those
    # of one unit together); tied again as they were on meta
    ties = tied_names(model)
    model.to_empty(device = device)

    for first, *others in ties:
        param = model.get_parameter(first)

        for key in others:
            owner, _, attr = key.rpartition('.')
            module = model.get_submodule(owner)

            if getattr(module, attr) is not param:
                setattr(module, attr, param)

def load_frozen_model(model: Module, path: str | os.PathLike, rebuild: Rebuild | None = None, name: str = 'model'):
    """Fills the (materialised, possibly sharded) parameters and buffers of `model` with this
    process's rows of the checkpoint at `path`."""

    files = checkpoint_files(path)

    # every name a tensor goes by (tied weights have two), the first the checkpoint holds is read
    aliases: dict[int, tuple[Tensor, list[str]]] = {}

    for key, tensor in (*model.named_parameters(remove_duplicate = False), *model.named_buffers(remove_duplicate = False)):
        aliases.setdefault(id(tensor), (tensor, []))[1].append(key)

    state_keys = set(model.state_dict().keys())
    missing, computed = [], []

    for tensor, keys in aliases.values():
        key = next((key for key in keys if key in files), None)

        if not exists(key):
            # a buffer left out of the state dict is computed, not saved
            (missing if any(key in state_keys for key in keys) else computed).append(keys[0])
            continue

        local, start = local_rows(tensor)

        with torch.no_grad():
            local.copy_(read_rows(files, key, start, local.shape[0] if local.ndim > 0 else 0))

    if len(missing) > 0:
        raise KeyError(
            f'the checkpoint at {path} has no tensor for {len(missing)} weights of {name} ({type(model).__name__}): {", ".join(missing[:5])}'
            f'{" ..." if len(missing) > 5 else ""}. Was it saved from another model, or with other names (an older format)? '
            f'Load it once with its library and save it again (`save_pretrained`)'
        )

    if len(computed) == 0:
        return

    rebuild = rebuild or default_rebuild(model)

    if not exists(rebuild):
        raise ValueError(
            f'{name} ({type(model).__name__}) has buffers that no checkpoint holds ({", ".join(computed[:5])}): '
            f'pass a function building the model (its buffers are copied; its parameters stay on meta) as `rebuild`'
        )

    with parameters_on_meta():
        built = rebuild()

    buffers = dict(built.named_buffers(remove_duplicate = False))

    with torch.no_grad():
        for key in computed:
            model.get_buffer(key).copy_(buffers[key])

def shard_and_load(
    calm: Module,
    checkpoints: Sequence[str | os.PathLike],
    *,
    rebuild: Sequence[Rebuild | None] | None = None,
    distributed: Distributed | None = None,
    device: str | torch.device | None = None
) -> Module:
    """Shards the frozen models of a CALM built on the `meta` device over the processes (FSDP2) and
    loads each process's part of their weights straight from checkpoint files: no process holds
    more than its shards and one tensor being read.

    checkpoints: one per frozen model, the anchor's first then each augment's: a folder written by
                 transformers' `save_pretrained` (safetensors, sharded or not) or a .safetensors file
    rebuild:     per model, a function building it again (for buffers no checkpoint holds, e.g.
                 rotary tables); transformers models are rebuilt from their config
    distributed: the process group (default: joins the one torchrun describes; one process alone
                 loads the whole models)

    The composition weights are left as they are if they were materialised (a composition
    checkpoint loaded with `calm.load` after `calm.cross_attns.to_empty(device = ...)`), else
    drawn fresh (`init_composition_weights`), and every process gets rank 0's. Returns `calm`."""

    models = [calm.anchor, *calm.augments]

    if len(checkpoints) != len(models):
        raise ValueError(f'give one checkpoint per frozen model (the anchor, then {len(calm.augments)} augment(s)): {len(models)} paths, got {len(checkpoints)}')

    rebuild = list(rebuild) if exists(rebuild) else [None] * len(models)

    if len(rebuild) != len(models):
        raise ValueError(f'rebuild takes one function (or None) per frozen model: {len(models)}, got {len(rebuild)}')

    not_meta = [name for name, model in zip(('the anchor', *[f'augment {index}' for index in range(len(calm.augments))]), models) if not on_meta(model)]

    if len(not_meta) > 0:
        raise ValueError(f'shard_and_load loads frozen models built on the meta device (`with torch.device("meta"): ...`); {", ".join(not_meta)} already hold weights: shard them with FineTuner(strategy="fsdp") instead')

    distributed = distributed or setup_distributed(device)
    device = distributed.device

    if on_meta(calm.cross_attns):
        calm.cross_attns.to_empty(device = device)
        calm.init_composition_weights()  # rank 0's are broadcast by the sharding

    shard_frozen_models(calm, distributed)

    for model, path, build, name in zip(models, checkpoints, rebuild, ('anchor', *[f'augments[{index}]' for index in range(len(calm.augments))])):
        materialise(model, device)
        load_frozen_model(model, path, build, name = name)

    return calm
