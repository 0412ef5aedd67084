"""CAFE's loss (Wang et al., CVPR 2022): layer-wise feature alignment plus a discrimination term.

Feature alignment: forward hooks record the output of every matched block (ConvNormReLU, BasicBlock; the model
files stay as they are) and `model.features` gives the embedding; for each class the squared L2 distance between the
real batch's mean and the synthetic images' mean is taken at every block (weighted by `layer_weights`) and at the
embedding (weighted by `embedding_weight`). Discrimination: the real embeddings of every class are classified by the
synthetic class centres (mean synthetic embeddings) with inner-product logits; the cross-entropy, summed over the real
images, is weighted by `discrimination_weight`. The real and synthetic batch of a class share one Siamese
augmentation. CAFE's extra term, the network's cross-entropy on the real batch, does not depend on the synthetic
images and is left out.

Each class is run through the network on its own (the real side under no_grad): with instance norm or none that
equals CAFE's joint forward, and it bounds the memory of the real side by one class's batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.config.schema import AugmentConfig
from raydistill.methods.cafe.config import DEEPEST_WEIGHT, MATCHED_LAYERS, SHALLOW_WEIGHT, CafeConfig
from raydistill.methods.matching import MatchingContext, present_classes, real_batch, siamese_pair, synthetic_of_class


def matched_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MATCHED_LAYERS)]


def layer_weights(section: CafeConfig, count: int) -> list[float]:
    if section.layer_weights is not None:
        return list(section.layer_weights)
    return [SHALLOW_WEIGHT] * (count - 1) + [DEEPEST_WEIGHT] if count else []


@contextmanager
def recording(layers: list[nn.Module]) -> Iterator[list[Tensor]]:
    """Collect the output of each of `layers`, in call order, while the block runs."""
    outputs: list[Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for layer in layers]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def class_statistics(model: nn.Module, layers: list[nn.Module], x: Tensor) -> tuple[list[Tensor], Tensor]:
    """(mean output of every matched layer, then the mean embedding; the per-image embeddings) of a batch."""
    with recording(layers) as outputs:
        emb = model.features(x)
    return [o.mean(0) for o in outputs] + [emb.mean(0)], emb


def cafe_terms(model: nn.Module, images: Tensor, hard_labels: Tensor, ctx: MatchingContext, section: CafeConfig,
               aug: AugmentConfig | None, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """(weighted feature-alignment loss, unweighted discrimination loss) of `images`; both differentiable in them."""
    layers = matched_layers(model)
    weights = layer_weights(section, len(layers)) + [section.embedding_weight]
    feature = images.new_zeros(())
    centres, real_embs, targets = [], [], []
    for i, c in enumerate(present_classes(hard_labels)):
        real = real_batch(ctx, c, section.batch_real, rng, images)
        real, syn = siamese_pair(real, images[synthetic_of_class(hard_labels, c)], rng, aug)
        with torch.no_grad():
            real_means, real_emb = class_statistics(model, layers, real)
        syn_means, syn_emb = class_statistics(model, layers, syn)
        for w, r, s in zip(weights, real_means, syn_means, strict=True):
            feature = feature + w * (r - s).pow(2).sum()
        centres.append(syn_means[-1])
        real_embs.append(real_emb)
        targets.append(torch.full((real_emb.shape[0],), i, dtype=torch.long, device=real_emb.device))
    logits = torch.cat(real_embs) @ torch.stack(centres).t()
    discrimination = F.cross_entropy(logits, torch.cat(targets), reduction="sum")
    return feature, discrimination


def cafe_loss(model: nn.Module, images: Tensor, hard_labels: Tensor, ctx: MatchingContext, section: CafeConfig,
              aug: AugmentConfig | None, rng: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(total, feature, discrimination): total = feature + discrimination_weight x discrimination."""
    feature, discrimination = cafe_terms(model, images, hard_labels, ctx, section, aug, rng)
    return feature + section.discrimination_weight * discrimination, feature, discrimination
