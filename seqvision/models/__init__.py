"""Sequencer networks: the model family, its registry of variants and the factory."""

from .factory import (
    create_model,
    feature_extractor,
    guess_variant,
    list_models,
    load_pretrained,
    model_config,
    resolve_name,
)
from .sequencer import VARIANTS, BiLSTM1D, BiLSTM2D, Sequencer, SequencerBlock, SequencerStage
from .timm_registry import register_timm, timm_name

__all__ = [
    "VARIANTS",
    "BiLSTM1D",
    "BiLSTM2D",
    "Sequencer",
    "SequencerBlock",
    "SequencerStage",
    "create_model",
    "feature_extractor",
    "guess_variant",
    "list_models",
    "load_pretrained",
    "model_config",
    "register_timm",
    "resolve_name",
    "timm_name",
]
