"""Per-sample random streams.

Sample ``i`` of a run with seed ``s`` draws only from generators derived from ``(s, i)``, so a
sample's bytes do not depend on worker count, node count, or which samples ran before it.
"""

from __future__ import annotations

import numpy as np

CROP_STREAM = 0
DEGRADE_STREAM = 1


def sample_rng(seed: int, sample_index: int, stream: int) -> np.random.Generator:
    """Independent generator for one purpose (``stream``) of one sample."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(sample_index, stream)))


# JSON numbers above 2**53 lose precision in JavaScript and other double-based readers: every
# seed in a sample's JSON stays below it.
JSON_SAFE_SEEDS = 2**53


def child_seed(rng: np.random.Generator) -> int:
    """A seed in [0, 2**53) drawn from ``rng``, recorded in JSON so a sub-step can be replayed alone."""
    return int(rng.integers(0, JSON_SAFE_SEEDS))
