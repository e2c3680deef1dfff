"""Training: ``TrainConfig`` (every setting, declared once), recipes, and the ``Trainer`` that runs them.

cfg = resolve_config(load_recipe("digits"), {"epochs": 5})
summary = train(cfg, "digits")
"""

from .config import (
    TRAIN_ENGINES,
    TrainConfig,
    flag_specs,
    load_recipe,
    merge,
    parse_set,
    recipe_names,
    resolve_config,
    scaled_lr,
)
from .loop import Trainer, train

__all__ = [
    "TRAIN_ENGINES",
    "TrainConfig",
    "Trainer",
    "flag_specs",
    "load_recipe",
    "merge",
    "parse_set",
    "recipe_names",
    "resolve_config",
    "scaled_lr",
    "train",
]
