"""The frozen models, as the composition sees them: where a model's blocks are (in execution
order), how to call it (inputs, padding mask, incremental decoding), and the sites on its blocks
where a hidden state is read or changed.

- `sites.py`: a block's input or output, and the hooks that read or replace the hidden state there
- `adapter.py`: `ModelAdapter`, any module whose blocks are given (by module, name or pattern:
  `block_names.py`); `xtransformers.py` and `hf_adapter.py` (with `hf_discovery.py`) for
  x-transformers and Hugging Face models; `factory.py` picks one (PEFT models unwrapped)
- `recurrent.py`: segment-recurrent blocks that return `(output, state)`
- `precision.py`: devices, dtypes and the meta device

May import: calm_pytorch.helpers
"""
