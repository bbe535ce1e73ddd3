from __future__ import annotations

from dataclasses import dataclass

# bytes autograd keeps for the backward of one composed training step, tensor by tensor, as
# benchmarks/memory.py counts them (distinct storages that saved-tensor hooks see, frozen weights
# excluded). tests/plan/test_plan.py compares each sum with a real step on CPU, byte for byte.
# Frozen Linear layers keep no input (their weights get no gradient); float32 is 4 bytes.

LLAMA_SHAPED = ('llama', 'mistral', 'qwen2')

@dataclass(frozen = True)
class AnchorShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    element: int  # bytes per element of the anchor's dtype

    @classmethod
    def of(cls, config, element: int) -> AnchorShape:
        config = config.get_text_config()

        if config.model_type not in LLAMA_SHAPED or getattr(config, 'hidden_act', 'silu') != 'silu':
            raise ValueError(
                f'the plan counts the activations of Llama-shaped anchors ({", ".join(LLAMA_SHAPED)}: RMSNorm, rotary '
                f'attention, a gated SiLU MLP); got model_type {config.model_type!r} (hidden_act {getattr(config, "hidden_act", None)!r}). '
                'Measure that anchor with benchmarks/memory.py instead'
            )

        heads = config.num_attention_heads
        head_dim = getattr(config, 'head_dim', None) or config.hidden_size // heads
        kv_heads = getattr(config, 'num_key_value_heads', None) or heads
        return cls(config.hidden_size, heads, kv_heads, head_dim, config.intermediate_size, config.vocab_size, element)

    def block(self) -> int:
        """Per token, one anchor block a gradient flows through: each RMSNorm (computed in float32)
        keeps its float32 input and 1 / rms; the attention keeps q, k and v after the rotary
        embedding, its output, and its log-sum-exp (float32, one per head); the MLP keeps the
        gate, the up projection and silu(gate)."""
        norms = 2 * (4 * self.hidden + 4)
        attention = self.element * (2 * self.heads + 2 * self.kv_heads) * self.head_dim + 4 * self.heads
        return norms + attention + 3 * self.element * self.intermediate

    def rotary(self, seq_len: int) -> int:
        """The cos and sin tables, kept once for all blocks (one row of positions for the batch)."""
        return 2 * seq_len * self.head_dim * self.element

    def head(self) -> int:
        """Per token: the final RMSNorm's float32 input and 1 / rms, the log-softmax of the logits
        (in float32: the loss is computed in float32), the int64 target."""
        return 4 * self.hidden + 4 + 4 * self.vocab + 8

    def loss(self) -> int:
        """Once: the summed float32 loss and the int64 count of its tokens."""
        return 4 + 8

    def logits(self) -> int:
        """Per token, at the loss's peak: the logits, the gradient of their float32 copy, and in
        a lower precision their own gradient."""
        return (2 * self.element + 4 if self.element < 4 else 2 * self.element) * self.vocab


def cross_attention(dim: int, dim_context: int, heads: int, dim_head: int, element: int) -> int:
    """Per token, one cross-attention in aligned mode, in the composition's dtype (its inputs are
    cast to it): the augment's hidden state, its LayerNorm's mean and rstd, its normed and its
    projected form (to the anchor's width); the same three for the anchor's hidden state; keys and
    values (one tensor), queries, the attention's output and log-sum-exp (float32). The output
    projection reads the attention's output as it is (attention lays it out position-major: its
    heads-major view is a transpose), so it adds nothing."""
    inner = heads * dim_head
    return element * (2 * dim_context + 3 * dim + 4 * inner) + 4 * heads + 4 * 4

def cross_attention_mask(seq_len: int, element: int) -> int:
    """Once per cross-attention: the causal mask of aligned mode, which attention turns into a
    (seq, seq) bias in the composition's dtype, and the (seq, 1) bool of rows seeing no key."""
    return element * seq_len * seq_len + seq_len
