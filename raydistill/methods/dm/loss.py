"""DM's loss (Zhao & Bilen, WACV 2023): match the mean embedding of each class under a randomly initialised network.

For each class c: a real batch and the class's synthetic images get the same Siamese augmentation (one strategy, one
parameter set, drawn from the task's generator), both are embedded with `model.features`, and the loss adds the
squared L2 distance between the two mean embeddings. The network is never trained, so one task is exactly one
published iteration: a fresh network, every class, one image update.

Each class is embedded on its own (DM's ConvNet branch): with instance norm or none that equals one joint forward;
with BatchNorm (train mode) the statistics are then the class's batch statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill.config.schema import AugmentConfig
from raydistill.methods.matching import MatchingContext, present_classes, real_batch, siamese_pair, synthetic_of_class


def embedding_distance(real_emb: Tensor, syn_emb: Tensor) -> Tensor:
    """||mean(real_emb) - mean(syn_emb)||^2 over the embedding's dimensions."""
    return (real_emb.mean(0) - syn_emb.mean(0)).pow(2).sum()


def dm_loss(model: nn.Module, images: Tensor, hard_labels: Tensor, ctx: MatchingContext, batch_real: int,
            aug: AugmentConfig | None, rng: torch.Generator) -> Tensor:
    """The DM loss of `images` (differentiable with respect to them) summed over the classes present."""
    loss = images.new_zeros(())
    for c in present_classes(hard_labels):
        real = real_batch(ctx, c, batch_real, rng, images)
        real, syn = siamese_pair(real, images[synthetic_of_class(hard_labels, c)], rng, aug)
        with torch.no_grad():
            real_emb = model.features(real)
        loss = loss + embedding_distance(real_emb, model.features(syn))
    return loss
