"""The composition itself: what `CALM` is built from and the one path data takes through it,
augment inputs -> recorded hidden states -> projected keys / values -> anchor hooks -> logits -> loss.

- `params.py`, `build.py`, `wiring.py`: the user's options, and what construction derives from
  them (which augment layer feeds which anchor layer, at which sites and widths)
- `capture.py`: recording the connected augment layers; `cross_attention.py`: the trained block;
  `injection.py`: adding its delta to the anchor's hidden states
- `contexts.py`: running the augments (context mode, aligned mode, aligned across tokenizers);
  `forward.py`: one composed forward; `hf_interface.py`: the same called as a transformers model,
  and the attributes tools read (`.device`, `.dtype`, `.config`: `hf_config.py`, which imports transformers);
  `inputs.py`: checks of what a user passes; `loss.py`: the next-token loss
- `freezing.py`, `activation_checkpointing.py`, `summary.py`: what is trained, what is recomputed,
  and a readable account
- `protocol.py`: what the rooms below `CALM` read of a composition (they never import `CALM`)

May import: calm_pytorch.helpers, calm_pytorch.models, calm_pytorch.text
"""
