"""seqvision: Sequencer (Deep LSTM for Image Classification) in PyTorch."""

from .models import create_model, list_models, register_timm

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "register_timm", "__version__"]
