"""DC's gradient-matching loss (Zhao, Mopuri & Bilen, ICLR 2021), with DSA's Siamese augmentation as an option.

For each class c: the gradient of the cross-entropy with respect to the network's parameters on a real batch of c
(a constant) and on the synthetic images of c (kept in the graph, create_graph=True); the loss adds their layer-wise
distance, the original's "ours" metric: every parameter tensor is reshaped to (out, -1) and contributes the sum over
its rows of 1 - cosine(real row, synthetic row); 1-D tensors (biases, norm parameters) contribute 0. With DSA both
batches of a class get the same augmentation (one strategy, one parameter set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.config.schema import AugmentConfig
from raydistill.methods.matching import MatchingContext, present_classes, real_batch, siamese_pair, synthetic_of_class

COSINE_EPS = 1e-6  # added to the product of the row norms, as the original does


def tensor_distance(g_real: Tensor, g_syn: Tensor) -> Tensor:
    """sum over rows of 1 - cos(real row, synthetic row) for one parameter tensor; 0 for a 1-D tensor."""
    if g_real.dim() <= 1:
        return g_syn.new_zeros(())
    r, s = g_real.reshape(g_real.shape[0], -1), g_syn.reshape(g_syn.shape[0], -1)
    cos = (r * s).sum(-1) / (r.norm(dim=-1) * s.norm(dim=-1) + COSINE_EPS)
    return (1 - cos).sum()


def layerwise_distance(g_real: list[Tensor], g_syn: list[Tensor]) -> Tensor:
    """DC's distance between two lists of parameter gradients: the sum of `tensor_distance` over the tensors."""
    return sum((tensor_distance(r, s) for r, s in zip(g_real, g_syn, strict=True)), g_syn[0].new_zeros(()))


def dc_loss(model: nn.Module, images: Tensor, hard_labels: Tensor, ctx: MatchingContext, batch_real: int,
            aug: AugmentConfig | None, rng: torch.Generator) -> Tensor:
    """DC's matching loss of `images` on `model` (differentiable with respect to the images), summed over classes."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = images.new_zeros(())
    for c in present_classes(hard_labels):
        real = real_batch(ctx, c, batch_real, rng, images)
        real, syn = siamese_pair(real, images[synthetic_of_class(hard_labels, c)], rng, aug)
        target_real = torch.full((real.shape[0],), c, dtype=torch.long, device=real.device)
        target_syn = torch.full((syn.shape[0],), c, dtype=torch.long, device=syn.device)
        g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(real), target_real), params)]
        g_syn = torch.autograd.grad(F.cross_entropy(model(syn), target_syn), params, create_graph=True)
        loss = loss + layerwise_distance(g_real, list(g_syn))
    return loss
