"""CAFE's config section (`cafe:`) and its checks.

Published weights (the official code's distill.py defaults, ConvNet-3): the three conv blocks' activations 0.1, 0.1,
1.0 (shallow to deep); the pooled last block 1.0 plus its flattened copy, the embedding, 1.0 again: the same numbers
twice, so the embedding weighs 2.0 here; the discrimination term 0.01 (a cross-entropy summed over the real images).
"""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.config.checks import at_least
from raydistill.config.errors import ConfigError
from raydistill.config.schema import DistillConfig
from raydistill.methods.matching import EpisodeConfig, validate_episode
from raydistill.models.layers import BasicBlock, ConvNormReLU
from raydistill.models.registry import create_model

SHALLOW_WEIGHT, DEEPEST_WEIGHT = 0.1, 1.0  # layer_weights None: every matched layer 0.1 but the deepest, 1.0
MATCHED_LAYERS = (ConvNormReLU, BasicBlock)  # the blocks whose outputs CAFE matches, found by forward hooks


@dataclass
class CafeConfig(EpisodeConfig):
    layer_weights: list[float] | None = None  # per matched block, shallow to deep; None: 0.1 ..., 0.1, 1.0
    embedding_weight: float = 2.0  # the class-mean embedding (model.features) term
    discrimination_weight: float = 0.01  # real embeddings classified by the synthetic class centres (summed CE)


def matched_layer_count(cfg: DistillConfig) -> int:
    """How many blocks of the configured network CAFE matches (independent of the image and class counts)."""
    m = cfg.model
    model = create_model(m.name, 1, 2, max(32, 2 ** m.depth), width=1, depth=m.depth, norm=m.norm)
    return sum(isinstance(mod, MATCHED_LAYERS) for mod in model.modules())


def validate_section(c: CafeConfig, cfg: DistillConfig) -> None:
    validate_episode(c, "cafe")
    at_least(c.embedding_weight, 0, "cafe.embedding_weight")
    at_least(c.discrimination_weight, 0, "cafe.discrimination_weight")
    if c.layer_weights is not None:
        for i, w in enumerate(c.layer_weights):
            at_least(w, 0, f"cafe.layer_weights[{i}]")
        count = matched_layer_count(cfg)
        if len(c.layer_weights) != count:
            raise ConfigError(f"cafe.layer_weights: {len(c.layer_weights)} weights, but {cfg.model.name} has "
                              f"{count} matched blocks; give {count} weights (shallow to deep) or leave it unset")
    layers = sum(c.layer_weights) if c.layer_weights is not None else 1.0
    if layers + c.embedding_weight + c.discrimination_weight == 0:
        raise ConfigError("cafe: every loss weight is 0 (layer_weights, embedding_weight, discrimination_weight), so "
                          "the loss is 0 and nothing is learned; give at least one a positive weight")
