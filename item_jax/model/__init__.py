"""Flax NNX modules of the ITEm model: configuration, layers, the model and its heads."""

from item_jax.model.config import SIZE_PRESETS, ModelConfig, model_config
from item_jax.model.item import Encoded, ItemModel, patchify

__all__ = ["SIZE_PRESETS", "ModelConfig", "model_config", "Encoded",
           "ItemModel", "patchify"]
