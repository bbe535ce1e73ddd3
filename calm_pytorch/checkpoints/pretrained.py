from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.nn import Module

from calm_pytorch.checkpoints.atomic import atomic_write_bytes
from calm_pytorch.checkpoints.contents import library_version
from calm_pytorch.checkpoints.matching import CompositionMismatchError
from calm_pytorch.checkpoints.model_card import model_card
from calm_pytorch.checkpoints.save_load import load_composition, save_composition
from calm_pytorch.composition.params import AugmentParams
from calm_pytorch.composition.protocol import Composition
from calm_pytorch.helpers import exists, warn_user

# A composition as a directory, the way transformers models are shared:
#   composition.safetensors  what was trained, with the wiring and the identity of the frozen models (calm.save)
#   config.json              `calm.config`: how to rebuild the whole composition, each frozen model's
#                            source (hub id or local path), revision, class and dtype, the wiring, attn_kwargs
#   README.md                a model card
#   tokenizer files          the anchor's tokenizer at the top (AutoTokenizer.from_pretrained(dir)
#                            reads it), an augment's own in augment_<i>_tokenizer/
# `from_pretrained` rebuilds the frozen models through transformers from their sources and loads
# the composition, whose fingerprint check refuses frozen models other than those it was trained over.
# Models that transformers cannot rebuild (x-transformers, custom modules, models built from a
# config) are passed in by the user; the config records what it can of them.

COMPOSITION_FILE = 'composition.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'

# tokenizers

def save_tokenizer(tokenizer: Any, directory: Path, folder: str) -> dict[str, Any]:
    record = dict(tokenizer_class = type(tokenizer).__name__, source = getattr(tokenizer, 'name_or_path', None) or None, path = folder, kind = None)
    target = directory / folder

    if callable(getattr(tokenizer, 'save_pretrained', None)):
        tokenizer.save_pretrained(str(target))
        record['kind'] = 'transformers'
    elif callable(getattr(tokenizer, 'to_str', None)):
        # a `tokenizers.Tokenizer`: one JSON holds it whole
        atomic_write_bytes(target / 'tokenizer.json', tokenizer.to_str().encode())
        record['kind'] = 'tokenizers'

    return record

def load_tokenizer(record: dict[str, Any], directory: Path, what: str) -> Any:
    path = directory / record['path']

    if record['kind'] == 'transformers':
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path))

    if record['kind'] == 'tokenizers':
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(path / 'tokenizer.json'))

    raise ValueError(f'{what} ({record["tokenizer_class"]}) could not be saved with the composition (it is neither a transformers nor a `tokenizers` tokenizer); pass it to from_pretrained')

def tokenizer_records(calm: Composition, directory: Path, tokenizer: Any) -> dict[str, Any]:
    anchor_tokenizer = calm.anchor_text.tokenizer if exists(calm.anchor_text) else None
    anchor_tokenizer = tokenizer if exists(tokenizer) else anchor_tokenizer

    records = dict(anchor = None, augments = [None] * len(calm.augments))

    if exists(anchor_tokenizer):
        records['anchor'] = save_tokenizer(anchor_tokenizer, directory, '.') | dict(used_by_calm = exists(calm.anchor_text))

    for index, text in enumerate(calm.augment_texts):
        if exists(text):
            records['augments'][index] = save_tokenizer(text.tokenizer, directory, f'augment_{index}_tokenizer')

    return records

# saving

def local_sources(config: dict[str, Any]):
    # a model loaded from a local directory is found again from anywhere: its path made absolute
    for source in (config['anchor'], *config['augments']):
        if exists(source.get('source')) and Path(source['source']).is_dir():
            source['source'] = str(Path(source['source']).resolve())

def recipe(calm: Composition):
    """`calm.config` as a composition directory saves it: local sources made absolute."""

    try:
        from calm_pytorch.composition.hf_config import cached_revisions, composition_config
    except ImportError as error:
        raise ImportError(f'a composition directory holds a transformers config.json: install transformers (pip install -e ".[hf]"), or save the composition alone with calm.save(path); {error}') from error

    config = composition_config(calm)
    local_sources(dict(anchor = config.anchor, augments = config.augments))

    for what, source in (('the anchor', config.anchor), *((f'augment {index}', source) for index, source in enumerate(config.augments))):
        revisions = cached_revisions(source.get('source')) if source.get('library') == 'transformers' else []
        if len(revisions) > 1:
            warn_user(
                f'the hub cache holds {len(revisions)} revisions of {source["source"]} ({what}), and transformers does not record which one a model '
                f'was loaded from: config.json names the default branch\'s, {source["revision"]}. If {what} came from another, '
                'from_pretrained will refuse the default one by its fingerprint; pass the right one in (`anchor = ...`, `augments = [...]`)'
            )

    return config

def save_pretrained(calm: Composition, directory: str | os.PathLike, tokenizer: Any = None, name: str | None = None, training: list[str] | None = None) -> Path:
    """Writes the composition directory (see the module comment); each file atomically."""

    directory = Path(directory)
    config = recipe(calm)  # first: without transformers, no directory is left behind
    directory.mkdir(parents = True, exist_ok = True)
    config.tokenizers = tokenizer_records(calm, directory, tokenizer)
    config.calm_version = library_version()

    save_composition(calm, directory / COMPOSITION_FILE)
    atomic_write_bytes(directory / CONFIG_FILE, config.to_json_string().encode())
    write_model_card(calm, directory, name, training)
    return directory

def write_model_card(calm: Composition, directory: Path, name: str | None = None, training: list[str] | None = None) -> Path:
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text()) if path.is_file() else recipe(calm).to_dict()
    card = model_card(calm, config, name or str(directory), training)
    return atomic_write_bytes(directory / CARD_FILE, card.encode())

def push_to_hub(calm: Composition, repo_id: str, *, tokenizer: Any = None, private: bool | None = None, token: str | bool | None = None, revision: str | None = None, commit_message: str = 'Upload composition', create_pr: bool = False):
    """save_pretrained into a temporary directory, then huggingface_hub's create_repo and upload_folder."""

    from huggingface_hub import HfApi

    api = HfApi(token = token)

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(calm, tmp, tokenizer = tokenizer, name = repo_id)
        repo = api.create_repo(repo_id, private = private, exist_ok = True)
        return api.upload_folder(repo_id = repo.repo_id, folder_path = tmp, revision = revision, commit_message = commit_message, create_pr = create_pr)

# loading

def composition_directory(path_or_repo_id: str | os.PathLike, revision: str | None, hub_kwargs: dict[str, Any]) -> Path:
    path = Path(path_or_repo_id)

    if path.is_dir():
        return path

    if path.exists() or str(path_or_repo_id).count('/') != 1:
        raise FileNotFoundError(f'{path_or_repo_id} is neither a composition directory (written by calm.save_pretrained) nor a hub repo id (`org/name`)')

    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path_or_repo_id), revision = revision, **hub_kwargs))

def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE

    if not path.is_file() or not (directory / COMPOSITION_FILE).is_file():
        raise FileNotFoundError(f'{directory} holds no {CONFIG_FILE} and {COMPOSITION_FILE}: it is not a composition directory written by calm.save_pretrained')

    config = json.loads(path.read_text())

    if config.get('model_type') != 'calm':
        raise ValueError(f'{path} is the config of a {config.get("model_type")!r} model, not of a composition (model_type "calm")')

    return config

def load_frozen(source: dict[str, Any], what: str, dtype: torch.dtype | str | None, model_kwargs: dict[str, Any]) -> tuple[Module, bool]:
    """A frozen model rebuilt from its recorded source through transformers, and whether it was
    cast to another dtype than the one it was saved in."""

    how = f'pass it: CALM.from_pretrained(..., {"anchor = model" if what == "the anchor" else "augments = [...]"})'

    if source.get('library') != 'transformers':
        raise ValueError(f'{what} is a {source.get("model_class")} from {source.get("library")}, which only you can build; {how}')

    if not exists(source.get('source')):
        raise ValueError(f'{what} ({source.get("model_class")}) was built from a config, not loaded from a hub id or a directory, so nothing says where its weights are; {how}')

    import transformers

    model_class = getattr(transformers, source['model_class'], None)

    if not exists(model_class):
        raise ValueError(f'{what} is a {source["model_class"]}, which this transformers ({transformers.__version__}) does not have; {how}')

    saved_dtype = getattr(torch, source['dtype']) if exists(source.get('dtype')) else None
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != 'auto' else dtype
    kwargs = dict(model_kwargs, dtype = dtype if exists(dtype) else saved_dtype)

    if exists(source.get('revision')) and not Path(source['source']).is_dir():
        kwargs['revision'] = source['revision']

    try:
        model = model_class.from_pretrained(source['source'], **kwargs)
    except OSError as error:
        # a directory moved or deleted, a hub id not reachable, or a model transformers loaded from
        # another file than its weights (a GGUF), which no config records
        raise OSError(f'{what} ({source["model_class"]}) could not be loaded from its recorded source {source["source"]}: {error}\nIf it lives elsewhere now, or was loaded otherwise (e.g. from a GGUF file), load it yourself and {how}') from error

    return model, exists(dtype) and dtype != saved_dtype

def augment_params(given: AugmentParams | Module | None, model: Module, wiring: dict[str, Any], tokenizer: Any) -> AugmentParams:
    # the saved wiring, over the user's own options (blocks, mask keyword, ...) when they gave AugmentParams
    positions = ['output'] * wiring['num_layers']
    for (augment_layer, _), position in zip(wiring['connections'], wiring['hidden_positions']):
        positions[augment_layer - 1] = position

    params = given if isinstance(given, AugmentParams) else AugmentParams(model = model)

    return replace(
        params,
        connections = tuple(tuple(pair) for pair in wiring['connections']),
        connect_every_num_layers = None,
        hidden_position = tuple(positions),
        recurrent_context = wiring['recurrent_context'],
        same_tokenizer = params.same_tokenizer or wiring.get('same_tokenizer', False),
        tokenizer = params.tokenizer if exists(params.tokenizer) else tokenizer
    )

def from_pretrained(
    build: Callable[..., Composition],
    path_or_repo_id: str | os.PathLike,
    *,
    anchor: Module | None = None,
    augments: AugmentParams | Module | Sequence[AugmentParams | Module | None] | None = None,
    anchor_tokenizer: Any = None,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    strict_models: bool = True,
    hub_kwargs: dict[str, Any] | None = None,
    calm_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None
) -> Composition:
    hub_kwargs = {key: value for key, value in (hub_kwargs or {}).items() if exists(value)}
    directory = composition_directory(path_or_repo_id, revision, hub_kwargs)
    config = read_config(directory)
    description = config['composition']
    num_augments = len(config['augments'])
    model_kwargs = hub_kwargs | (model_kwargs or {})

    augments = [augments] if isinstance(augments, (Module, AugmentParams)) else list(augments) if exists(augments) else [None] * num_augments

    if len(augments) != num_augments:
        raise ValueError(f'{directory} composes {num_augments} augment(s); `augments` holds {len(augments)} (None where it is to be loaded from its source)')

    cast = False
    anchor_given, augments_given = exists(anchor), [given.model if isinstance(given, AugmentParams) else given for given in augments]

    if not exists(anchor):
        anchor, cast = load_frozen(config['anchor'], 'the anchor', dtype, model_kwargs)

    models = []
    for index, given in enumerate(augments):
        model = given.model if isinstance(given, AugmentParams) else given

        if not exists(model):
            model, cast_here = load_frozen(config['augments'][index], f'augment {index}', dtype, model_kwargs)
            cast = cast or cast_here

        models.append(model)

    tokenizers = config.get('tokenizers') or dict(anchor = None, augments = [None] * num_augments)
    anchor_record = tokenizers['anchor']

    if not exists(anchor_tokenizer) and exists(anchor_record) and anchor_record.get('used_by_calm'):
        anchor_tokenizer = load_tokenizer(anchor_record, directory, "the anchor's tokenizer")

    params = [
        augment_params(given, model, wiring, load_tokenizer(record, directory, f"augment {index}'s tokenizer") if exists(record) else None)
        for index, (given, model, wiring, record) in enumerate(zip(augments, models, description['augments'], tokenizers['augments']))
    ]

    try:
        calm = build(
            anchor,
            params,
            attn_kwargs = description['attn_kwargs'],
            anchor_hidden_position = tuple(description['anchor_hidden_position']),
            pad_id = description['pad_id'],
            composition_dtype = getattr(torch, description['composition_dtype']),
            anchor_tokenizer = anchor_tokenizer,
            **(calm_kwargs or {})
        )
    except (ValueError, TypeError) as error:
        # the saved wiring over other models: the error would name arguments the user never passed
        raise CompositionMismatchError(f'{directory} cannot be built over the models given: it composes {saved_models(config)}.\n{error}') from error

    try:
        load_composition(calm, directory / COMPOSITION_FILE, strict_models = strict_models, cast = cast)
    except CompositionMismatchError as error:
        loaded = [what for what, given in (('the anchor', anchor_given), *((f'augment {index}', exists(model)) for index, model in enumerate(augments_given))) if not given]
        if len(loaded) == 0:
            raise
        raise CompositionMismatchError(
            f'{error}\n{", ".join(loaded)} came from the recorded source(s) in {directory / CONFIG_FILE}; if the composition was trained over '
            'another revision or file of a model, load that one and pass it in (`anchor = ...`, `augments = [...]`)'
        ) from error

    return calm

def saved_models(config: dict[str, Any]) -> str:
    layers = [augment['num_layers'] for augment in config['composition']['augments']]
    augments = ', '.join(f'{source.get("model_class")} ({count} layers)' for source, count in zip(config['augments'], layers))
    return f'the anchor {config["anchor"].get("model_class")} ({config.get("num_hidden_layers")} layers) with {augments}'
