"""The module paths of calm-compose 0.1.0, whose package was one flat folder, kept working: `import
calm_pytorch.hf_trainer`, `from calm_pytorch.fsdp import local_and_global_numel` and a pickle that
names `calm_pytorch.adapters.HFAdapter` find the names where they live now. An old path is a module
made on first import from the modules that now hold its names (no file of that name exists).

May import: nothing
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

PACKAGE = 'calm_pytorch'

# old module -> the modules that now hold its names
MOVED = {
    'adapters': ('models.adapter', 'models.xtransformers', 'models.factory', 'composition.build'),
    'atomic': ('checkpoints.atomic',),
    'capture': ('composition.capture',),
    'checkpoint': ('checkpoints.contents', 'checkpoints.file_format', 'checkpoints.matching', 'checkpoints.save_load'),
    'checkpointing': ('composition.activation_checkpointing',),
    'composed': ('generation.composed_anchor',),
    'cross_attention': ('composition.cross_attention',),
    'data': ('training.data',),
    'distributed': ('training.distributed',),
    'fingerprint': ('checkpoints.fingerprint',),
    'fsdp': ('training.fsdp',),
    'hf': ('models.hf_discovery', 'models.hf_adapter'),
    'hf_forward': ('composition.hf_interface', 'composition.inputs', 'composition.loss'),
    'hf_trainer': ('training.hf_trainer',),
    'injection': ('composition.injection',),
    'loss': ('composition.loss',),
    'meta': ('models.precision', 'composition.cross_attention'),
    'names': ('models.block_names',),
    'params': ('composition.params', 'models.sites'),
    'precision': ('models.precision', 'composition.build', 'composition.contexts'),
    'recurrent': ('models.recurrent',),
    'schedule': ('training.schedule',),
    'sites': ('models.sites',),
    'summary': ('composition.summary',),
    'tokenizer_alignment': ('text.tokenizers', 'text.commit', 'text.alignment', 'composition.contexts', 'generation.kv_buffers', 'generation.text_stream'),
    'trainable': ('composition.freezing', 'models.factory'),
    'trainer': ('training.finetuner',),
    'training_state': ('training.step_checkpoints',),
    'wiring': ('composition.wiring',),
}

class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `calm_pytorch.<old name>` when no file of that name does (it is asked last)."""

    def find_spec(self, fullname: str, path = None, target = None):
        package, _, name = fullname.rpartition('.')

        if package != PACKAGE or name not in MOVED:
            return None

        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a plain module

    def exec_module(self, module):
        sources = [importlib.import_module(f'{PACKAGE}.{new}') for new in MOVED[module.__name__.rpartition('.')[2]]]

        # a name a source defines wins over the same name another source merely imports
        for source in sources:
            for key, value in vars(source).items():
                if key.startswith('__'):
                    continue

                if getattr(value, '__module__', None) == source.__name__:
                    module.__dict__[key] = value
                else:
                    module.__dict__.setdefault(key, value)

        exported = [name for source in sources for name in getattr(source, '__all__', ())]

        if len(exported) > 0:
            module.__all__ = exported

        module.__doc__ = f'Moved: its names now live in {", ".join(source.__name__ for source in sources)}.'

def install():
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
