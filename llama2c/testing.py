"""Helpers shared by the tests and the benchmarks: random models of any shape (llama, qwen2)."""
from __future__ import annotations

import numpy as np

from .config import Config
from .weights import expected_shapes

BIAS_NAMES = ("bq", "bk", "bv")


def make_random_model(cfg: Config, seed: int = 0) -> dict:
    """cfg -> weights dict of float32 random tensors (MHA or GQA, shared or unshared classifier,
    q/k/v biases when cfg.attention_bias).

    Matrices are N(0, 1/in_features) so each projection keeps unit-scale activations; the
    embedding is N(0, 0.1^2)-ish, norm weights are 1 + N(0, 0.1^2) and biases N(0, 0.5^2)
    (large enough that a forward pass which drops them is visibly wrong), so logits stay sane.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if name.rsplit(".", 1)[-1] in BIAS_NAMES:
            w = 0.5 * rng.standard_normal(shape)
        elif len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("tok_embeddings", "output"):
            w = 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = w.astype(np.float32)
    return weights


# A qwen2-shaped model: the llama block with q/k/v biases, GQA, untied classifier, Qwen2's
# rope theta and norm epsilon (Qwen2-0.5B: dim 896, 14 heads, 2 kv heads, head 64, theta 1e6).
QWEN2_SMALL = dict(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                   seq_len=128, rope_theta=1000000.0, norm_eps=1e-6, shared_classifier=False)


def qwen2_config(**overrides) -> Config:
    """A small qwen2 Config (QWEN2_SMALL with overrides): arch 'qwen2', attention_bias True."""
    return Config(**{**QWEN2_SMALL, **overrides, "arch": "qwen2", "attention_bias": True})


def make_random_qwen2(seed: int = 0, **overrides) -> tuple:
    """(Config, weights) of a random qwen2-shaped model, in llama2c's convention (interleaved
    RoPE pairs; write it with llama2c.loaders.gguf.write_gguf to get a qwen2 GGUF file)."""
    cfg = qwen2_config(**overrides)
    return cfg, make_random_model(cfg, seed)
