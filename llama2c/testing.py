"""Helpers shared by the tests and the benchmarks: random models of any shape."""
from __future__ import annotations

import numpy as np

from .config import Config
from .weights import expected_shapes


def make_random_model(cfg: Config, seed: int = 0) -> dict:
    """cfg -> weights dict of float32 random tensors (MHA or GQA, shared or unshared classifier).

    Matrices are N(0, 1/in_features) so each projection keeps unit-scale activations; the
    embedding is N(0, 0.1^2)-ish and norm weights are 1 + N(0, 0.1^2), so logits stay sane.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("tok_embeddings", "output"):
            w = 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = w.astype(np.float32)
    return weights
