"""A memory plan: what one training step of a composition holds per process (frozen weights, the
composition's weights, gradients and optimizer state, activations) for given model configs,
before any weight is loaded. The models are built on the `meta` device and composed there, so the
composition's parameters are counted from the real construction; the activations are counted
tensor by tensor as autograd saves them (benchmarks/memory.py measures the same on CPU).

- `configs.py`: model configs (config.json files, JSON, transformers configs) and meta models
- `weights.py`: bytes of frozen weights (a dtype, int8 or 4-bit, sharded), the composition
- `activations.py`: bytes autograd keeps for the backward, per token
- `memory_plan.py`: `memory_plan()` and its table; `python -m calm_pytorch.plan` prints it

May import: calm_pytorch.helpers, calm_pytorch.models, calm_pytorch.composition, calm_pytorch.calm
"""

from calm_pytorch.plan.memory_plan import MemoryPlan, memory_plan

__all__ = ['MemoryPlan', 'memory_plan']
