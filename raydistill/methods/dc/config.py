"""The config section of DC (`dc:`) and of DSA (`dsa:`): the same fields, DC's published defaults."""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.methods.matching import EpisodeConfig, validate_episode


@dataclass
class DcConfig(EpisodeConfig):
    """outer_loop / inner_loop (None: by IPC, 1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
    50: (50, 10)), lr_net 0.01, batch_train 256, batch_real 256: DC's published values (official repo, main.py and
    get_loops), which DSA keeps."""


def validate_section(d: DcConfig, name: str) -> None:
    validate_episode(d, name)
