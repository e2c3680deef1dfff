"""Sequencer networks: the model family, its registry of variants and the factory."""

from .factory import create_model, list_models, model_config, resolve_name
from .sequencer import VARIANTS, BiLSTM1D, BiLSTM2D, Sequencer, SequencerBlock, SequencerStage

__all__ = [
    "VARIANTS",
    "BiLSTM1D",
    "BiLSTM2D",
    "Sequencer",
    "SequencerBlock",
    "SequencerStage",
    "create_model",
    "list_models",
    "model_config",
    "resolve_name",
]
