"""Text and tokenizers: aligned mode across tokenizers, where an augment reads the text the anchor
has read, tokenized its own way (docs/tokenizers.md).

- `tokenizers.py`: the anchor's tokenizer as `decode`, the augment's as `encode`
- `commit.py`: the committed text, which no later text can re-tokenize
- `alignment.py`: the rule, and which augment tokens each anchor position may read

Pure token and text logic: no model runs here (the composition runs the augment on what this computes).

May import: calm_pytorch.helpers
"""
