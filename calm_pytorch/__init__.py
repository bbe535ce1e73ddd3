from calm_pytorch.calm import CALM
from calm_pytorch.checkpoint import CheckpointError, CompositionMismatchError, read_wiring
from calm_pytorch.cross_attention import CrossAttentionBlock
from calm_pytorch.hf_forward import CALMOutput
from calm_pytorch.loss import next_token_loss
from calm_pytorch.params import AugmentParams
from calm_pytorch.trainer import FineTuner

__all__ = [
    'CALM', 'AugmentParams', 'CrossAttentionBlock',
    'CheckpointError', 'CompositionMismatchError', 'read_wiring',
    'FineTuner', 'next_token_loss', 'CALMOutput'
]
