"""Generation: the decoding loop with one cache per model (`decoding.py`, with `kv_buffers.py`; for
an augment aligned across tokenizers, `text_stream.py`; with sharded models, `lockstep.py`),
sampling (`sampling.py`), prompts (`prompts.py`), and `composed()`, in which the anchor's own
`generate()` is composed (`composed_anchor.py`). `mixin.py` gives CALM `generate` and `composed`.

May import: calm_pytorch.helpers, calm_pytorch.models, calm_pytorch.text, calm_pytorch.composition
"""

# the names of the flat module `calm_pytorch.generation` of calm-compose 0.1.0
from calm_pytorch.generation.decoding import ComposedDecoder, generate
from calm_pytorch.generation.kv_buffers import KVBuffer
from calm_pytorch.generation.prompts import check_left_padded, left_pad
from calm_pytorch.generation.sampling import check_sampling, min_p_filter, sample, top_k_filter, top_p_filter

__all__ = [
    'ComposedDecoder', 'generate', 'KVBuffer', 'check_left_padded', 'left_pad',
    'check_sampling', 'min_p_filter', 'sample', 'top_k_filter', 'top_p_filter'
]
