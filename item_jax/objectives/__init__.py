"""Pre-training objectives: on-device masking, the five ITEm losses and ITC."""

from item_jax.objectives.losses import (ITC_VIEWS, PAPER_TASKS, TASKS,
                                        MaskedBatch, ObjectiveConfig,
                                        TokenSpec, contrastive_loss, mask_batch,
                                        normalized_patch_targets,
                                        pretraining_loss)
from item_jax.objectives.masking import (example_keys, mask_patches, mask_tokens,
                                         pair_for_itm)

__all__ = ["ITC_VIEWS", "PAPER_TASKS", "TASKS", "contrastive_loss", "MaskedBatch", "ObjectiveConfig", "TokenSpec", "mask_batch",
           "normalized_patch_targets", "pretraining_loss", "example_keys",
           "mask_patches", "mask_tokens", "pair_for_itm"]
