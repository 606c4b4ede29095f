"""Seeds: a missing or negative seed becomes a random 32-bit one; image i of a batch uses seed + i."""

from __future__ import annotations

import secrets


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return secrets.randbits(32)
    return int(seed)


def batch_seeds(seed: int, count: int) -> list[int]:
    """One seed per output, so any single image can be reproduced with num_outputs=1."""
    return [seed + i for i in range(count)]
