"""Composition checkpoints: the learned weights and the wiring in one safetensors file, nothing of
the frozen models (docs/checkpoints.md).

- `contents.py`: what a checkpoint holds; `file_format.py`: reading and verifying its bytes
- `fingerprint.py`: the identity of the frozen models saved with it; `matching.py`: refusing a
  checkpoint that does not fit the composition it is loaded into
- `save_load.py`: saving and loading; `atomic.py`: writes that never leave half a file
- `pretrained.py`: the composition as a directory (config.json, model card from `model_card.py`,
  tokenizers) and on the Hub: `save_pretrained`, `from_pretrained`, `push_to_hub` (docs/sharing.md)
- `mixin.py`: `calm.save`, `calm.load`, `calm.composition_state_dict`, and the three above

May import: calm_pytorch.helpers, calm_pytorch.composition
"""
