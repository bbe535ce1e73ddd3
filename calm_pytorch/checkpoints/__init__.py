"""Composition checkpoints: the learned weights and the wiring in one safetensors file, nothing of
the frozen models (docs/checkpoints.md).

- `contents.py`: what a checkpoint holds; `file_format.py`: reading and verifying its bytes
- `fingerprint.py`: the identity of the frozen models saved with it; `matching.py`: refusing a
  checkpoint that does not fit the composition it is loaded into
- `save_load.py`: saving and loading; `atomic.py`: writes that never leave half a file
- `mixin.py`: `calm.save`, `calm.load`, `calm.composition_state_dict`

May import: calm_pytorch.helpers, calm_pytorch.composition
"""
