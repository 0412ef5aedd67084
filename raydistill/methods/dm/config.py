"""DM's config section (`dm:`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.config.checks import positive


@dataclass
class DmConfig:
    batch_real: int = 256  # real images per class in each task (DM's published batch_real)


def validate_section(d: DmConfig) -> None:
    positive(d.batch_real, "dm.batch_real")
