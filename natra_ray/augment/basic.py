"""Methods that need no generator: the Original baseline (more arrive with the baselines)."""
from __future__ import annotations

from natra_ray.augment import METHODS, AugmentContext, Augmented, Batch, one_hot


@METHODS.register("none")
def none(ctx: AugmentContext, batch: Batch) -> Augmented:
    """"Original" in the paper's tables: the clean batch, hard labels."""
    return Augmented(batch.x, one_hot(batch.y, ctx.num_classes))
