"""calm_pytorch: compose frozen language models (CALM, Bansal et al. 2024). The package's rooms and
the doors between them are described in docs/architecture.md."""

from calm_pytorch import _moved
from calm_pytorch.calm import CALM
from calm_pytorch.checkpoints.file_format import CheckpointError, read_wiring
from calm_pytorch.checkpoints.matching import CompositionMismatchError
from calm_pytorch.composition.cross_attention import CrossAttentionBlock
from calm_pytorch.composition.hf_interface import CALMOutput
from calm_pytorch.composition.loss import next_token_loss
from calm_pytorch.composition.params import AugmentParams
from calm_pytorch.training.data import DataError
from calm_pytorch.training.finetuner import FineTuner

_moved.install()

__all__ = [
    'CALM', 'AugmentParams', 'CrossAttentionBlock',
    'CheckpointError', 'CompositionMismatchError', 'read_wiring',
    'FineTuner', 'DataError', 'next_token_loss', 'CALMOutput'
]
