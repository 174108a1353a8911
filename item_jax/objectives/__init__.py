"""Pre-training objectives: on-device masking and the five ITEm losses."""

from item_jax.objectives.losses import (TASKS, MaskedBatch, ObjectiveConfig,
                                        TokenSpec, mask_batch,
                                        normalized_patch_targets,
                                        pretraining_loss)
from item_jax.objectives.masking import (example_keys, mask_patches, mask_tokens,
                                         pair_for_itm)

__all__ = ["TASKS", "MaskedBatch", "ObjectiveConfig", "TokenSpec", "mask_batch",
           "normalized_patch_targets", "pretraining_loss", "example_keys",
           "mask_patches", "mask_tokens", "pair_for_itm"]
