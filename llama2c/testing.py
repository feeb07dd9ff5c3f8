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


# A small sentencepiece-style vocabulary with multi-character pieces, control tokens and a
# ChatML template, so that text-level behaviour (stop strings, chat templates, special tokens)
# can be tested on random-weight models without any file.
TOY_PIECES = (["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
              + ["<0xE2>", "<0x82>", "<0xAC>"]        # the bytes of "€", split over 3 tokens
              + ["▁", ".", ",", "!", "?", "\n", "'"]
              + [chr(c) for c in range(ord("a"), ord("z") + 1)]
              + ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "ing", "▁a", "▁dog", "▁ran", "er",
                 "▁stop", "▁hello", "▁world", "llo", "▁wor", "ld", "▁and", "▁then", "th", "he",
                 "an", "at", "on", "▁s", "▁t", "▁c", "▁d", "▁m", "▁h", "▁w", "é", "▁été",
                 "user", "assistant", "system", "im", "end", "start", "<", ">", "|", "_"])
TOY_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
              "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def toy_tokenizer(chat_template: str | None = TOY_CHATML):
    """A Tokenizer over TOY_PIECES (GGUF 'llama' style: BOS 1, EOS 2, control tokens
    <|im_start|> 3 and <|im_end|> 4; three byte tokens; other characters are <unk>)."""
    from .tokenizer import Tokenizer
    return Tokenizer.from_gguf_metadata(toy_tokenizer_metadata(chat_template), "toy tokenizer")


def toy_tokenizer_metadata(chat_template: str | None = TOY_CHATML) -> dict:
    """toy_tokenizer()'s GGUF metadata keys (tokenizer.*), e.g. for write_gguf."""
    n = len(TOY_PIECES)
    types = [2, 3, 3, 3, 3] + [6] * 3 + [1] * (n - 8)
    scores = [0.0] * 8 + [float(len(p)) - i * 1e-3 for i, p in enumerate(TOY_PIECES[8:])]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": list(TOY_PIECES),
          "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.eot_token_id": 4, "tokenizer.ggml.add_bos_token": True}
    if chat_template is not None:
        md["tokenizer.chat_template"] = chat_template
    return md


def toy_model(seed: int = 0, dim: int = 64, n_layers: int = 2, seq_len: int = 512,
              int8: bool = False, **kw):
    """A random-weight Model over toy_tokenizer()'s vocabulary."""
    from .model import Model
    from .weights import quantize_weights
    cfg = Config(dim=dim, hidden_dim=2 * dim + 32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                 vocab_size=len(TOY_PIECES), seq_len=seq_len)
    weights = make_random_model(cfg, seed)
    # peakier logits than unit-scale activations give: sampled text looks less uniform
    weights["tok_embeddings"] *= 3.0
    if int8:
        weights = quantize_weights(cfg, weights, 32)
    return Model(cfg, weights, toy_tokenizer(), **kw)


def write_toy_gguf(path, seed: int = 0, dim: int = 64, n_layers: int = 2, seq_len: int = 512,
                   ggml_type: str = "Q8_0") -> str:
    """toy_model(seed, ...)'s config and weights with toy_tokenizer() as a GGUF file (Q8_0
    matrices by default: int8 groups, row-invariant on every kernel table); returns the path.
    For code that loads models by path (other processes, Ray workers)."""
    from .loaders.gguf import write_gguf
    cfg = Config(dim=dim, hidden_dim=2 * dim + 32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                 vocab_size=len(TOY_PIECES), seq_len=seq_len)
    weights = make_random_model(cfg, seed)
    weights["tok_embeddings"] *= 3.0
    write_gguf(path, cfg, weights, toy_tokenizer_metadata(), ggml_type=ggml_type, name="toy")
    return str(path)
