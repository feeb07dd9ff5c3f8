"""The NumPy oracle: llama2.c's run.c / runq.c forward pass in plain float32 NumPy.

Function names match the C kernels (csrc/, llama2c.h) so tests pair them 1:1: rmsnorm, matmul,
quantize_q8, rope, softmax, swiglu, attention. Every matrix is (out, in) and y = W @ x.
The int8 path follows runq.c: activations are quantized per row in groups of the weight's
group size, each group's product is an exact integer dot, and the scales are applied in
float32 group by group. Activations are quantized to int8 (act_bits=8, as runq.c) or to the
"two-plane" 15-bit codes v = 128 * xh + xl (act_bits=16, see quantize_q8); weights with
per-group offsets (QTensor.m, GGUF Q4_1) add an offset term per group (see matmul_q8). float32 everywhere except the RoPE angles (float64, then cast).

ReferenceModel is also the NumPy speed baseline for the benchmarks, so its one-token `forward`
uses matrix-vector BLAS on contiguous weights and a preallocated KV cache.
"""
from __future__ import annotations

import numpy as np

from .config import Config
from .errors import ContextLengthError
from .weights import QTensor, quantize_q8 as _quantize_matrix, validate_weights

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# kernels

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (..., n), w (n,) -> (..., n): w * x / sqrt(mean(x^2) + eps)."""
    # PyTorch: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
    ss = np.mean(x * x, axis=-1, keepdims=True, dtype=F32) + F32(eps)
    return w * (x * (F32(1.0) / np.sqrt(ss)))


TWO_PLANE_MAX = 127 * 128      # 16256: largest |v| of a two-plane (15-bit) activation code
ACT_BITS = (8, 16)


def quantize_q8(x: np.ndarray, group_size: int, bits: int = 8) -> tuple:
    """Quantize activations per row in groups of `group_size`.

    bits=8: x (T, n) or (n,) -> (xq int8 same shape, xs float32 (T, n/gs) or (n/gs,)).
    Per row, each group of `group_size` values gets scale = max|x| / 127 and q = round(x / scale),
    exactly as llama2c.weights.quantize_q8 (round half to even, 0 scale for an all-zero group).

    bits=16, the "two-plane" 15-bit scheme: -> (xh int8, xl int8, xs float32). Per group
    s = max|x| / 16256 (16256 = 127 * 128; 0 for an all-zero group) and
    v = rint(x * (1/s)) in float32 (the float32 inverse, round half to even; 0 when s = 0),
    so v lies in [-16256, 16256]; then xh = rint(v / 128) in [-127, 127] and
    xl = v - 128 * xh in [-64, 64], both int8, and v = 128 * xh + xl exactly.
    """
    if bits == 8:
        x2 = np.atleast_2d(np.asarray(x, dtype=F32))
        qt = _quantize_matrix(x2, group_size, "activation")
        if np.ndim(x) == 1:
            return qt.q[0], qt.s[0]
        return qt.q, qt.s
    if bits != 16:
        raise ValueError(f"activation bits must be 8 or 16, got {bits!r}")
    x2 = np.atleast_2d(np.asarray(x, dtype=F32))
    if x2.ndim != 2:
        raise ValueError(f"activation: expected a 1-D or 2-D array, got shape {np.shape(x)}")
    T, n = x2.shape
    if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or n % group_size:
        raise ValueError(f"group size {group_size!r} does not divide the activation width {n}")
    g = x2.reshape(T, n // group_size, group_size)
    scale = (np.abs(g).max(axis=2) / F32(TWO_PLANE_MAX)).astype(F32)
    inv = np.divide(F32(1.0), scale, out=np.zeros_like(scale), where=scale != 0)
    v = np.rint(g * inv[:, :, None]).astype(np.int32)                  # [-16256, 16256]
    xh = np.rint(v.astype(F32) / F32(128.0)).astype(np.int32)          # v/128 is exact in float32
    xl = v - 128 * xh
    xh = xh.astype(np.int8).reshape(T, n)
    xl = xl.astype(np.int8).reshape(T, n)
    if np.ndim(x) == 1:
        return xh[0], xl[0], scale[0]
    return xh, xl, scale


def matmul_q8(xq: np.ndarray, xs: np.ndarray, w: QTensor, xl: np.ndarray | None = None) -> np.ndarray:
    """xq int8 (T, n), xs (T, n/gs), w QTensor (d, n) [, xl int8 (T, n)] -> float32 (T, d).

    The activation codes are v = xq (8-bit) or, with xl given (two-plane 16-bit activations,
    quantize_q8(..., bits=16)), v = 128 * xq + xl (exact int32). Per group g, in order:

        out[t, i] += float(int_dot(v[t, g], wq[i, g])) * ws[i, g] * xs[t, g]
        out[t, i] += wm[i, g] * xs[t, g] * float(sum(v[t, g]))      only when w.m is not None

    the integer dot and sum exact, every product and sum in float32, evaluated left to right
    (runq.c: `val += ((float) ival) * w->s[(in + j) / GS] * x->s[j / GS];`). The second line is
    the per-group offset (GGUF Q4_1 min) term: sum_k (q_k * s + m) * v_k * xs.
    """
    gs = w.group_size
    T, n = xq.shape
    if xl is None:
        v = xq
        vmax = 127
    else:
        v = 128 * xq.astype(np.int32) + xl.astype(np.int32)
        vmax = TWO_PLANE_MAX
    # Integer-valued floats add exactly while every partial sum stays below 2**24 (float32)
    # or 2**53 (float64): |partial sum| <= gs * vmax * 127.
    acc = F32 if gs * vmax * 127 < 2 ** 24 else np.float64
    out = np.zeros((T, w.q.shape[0]), dtype=F32)
    for g in range(n // gs):
        cols = slice(g * gs, (g + 1) * gs)
        vg = v[:, cols]
        ival = vg.astype(acc) @ w.q[:, cols].astype(acc).T               # (T, d) exact integers
        out += (ival.astype(F32) * w.s[:, g]) * xs[:, g, None]
        if w.m is not None:
            vsum = vg.sum(axis=1, dtype=np.int64).astype(F32)            # (T,) exact integers
            out += (w.m[:, g] * xs[:, g, None]) * vsum[:, None]
    return out


def matmul(x: np.ndarray, w, act_bits: int = 8) -> np.ndarray:
    """x (T, n) or (n,), w (d, n) float32 ndarray or QTensor -> (T, d) or (d,) = x @ w.T.
    With a QTensor, activations are quantized with act_bits 8 (int8) or 16 (two-plane)."""
    if isinstance(w, QTensor):
        x2 = np.atleast_2d(x)
        if act_bits == 16:
            xh, xl, xs = quantize_q8(x2, w.group_size, bits=16)
            out = matmul_q8(xh, xs, w, xl)
        elif act_bits == 8:
            out = matmul_q8(*quantize_q8(x2, w.group_size), w)
        else:
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits!r}")
        return out[0] if x.ndim == 1 else out
    if x.ndim == 1:
        return w @ x                         # W (d,n) @ x (n,) -> (d,): BLAS gemv
    if x.shape[0] == 1:
        return (w @ x[0])[None]
    return x @ w.T                           # (T,n) @ (n,d): BLAS gemm, no copy of W


def rope(x: np.ndarray, pos, theta: float, head_size: int, factor: float = 1.0,
         freqs: np.ndarray | None = None) -> np.ndarray:
    """x (T, n_heads*head_size) or (n,), pos int or (T,) ints -> rotated copy, same shape.

    Interleaved pairs (x[2i], x[2i+1]) of each head are rotated by angle pos * freqs[i], with
    freqs (head_size/2,) given (Config.rope_frequencies) or theta ** (-2i / head_size) / factor;
    angles in float64, cos/sin cast to float32.
    """
    x2 = np.atleast_2d(x)
    T, n = x2.shape
    pos = np.broadcast_to(np.asarray(pos, dtype=np.float64), (T,))
    if freqs is None:
        freqs = theta ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size) / factor
    angle = pos[:, None] * np.asarray(freqs, dtype=np.float64)[None, :]                   # (T, hs/2)
    cos = np.cos(angle).astype(F32)[:, None, :]                                            # (T, 1, hs/2)
    sin = np.sin(angle).astype(F32)[:, None, :]
    pairs = x2.reshape(T, n // head_size, head_size // 2, 2)                               # (T, H, hs/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = np.empty_like(pairs)
    out[..., 0] = x0 * cos - x1 * sin
    out[..., 1] = x0 * sin + x1 * cos
    return out.reshape(x.shape)


def softmax(x: np.ndarray) -> np.ndarray:
    """x (..., n) -> (..., n), softmax over the last axis (max subtracted first)."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def swiglu(h1: np.ndarray, h3: np.ndarray) -> np.ndarray:
    """h1, h3 (..., hidden) -> silu(h1) * h3, same shape."""
    # PyTorch: F.silu(self.w1(x)) * self.w3(x); silu(x) = x * sigmoid(x)
    with np.errstate(over="ignore"):         # exp(-h1) -> inf for very negative h1 gives 0
        return h1 * (F32(1.0) / (F32(1.0) + np.exp(-h1))) * h3


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int,
              n_heads: int, n_kv_heads: int) -> np.ndarray:
    """q (T, n_heads*hs) at positions pos..pos+T-1; k_cache, v_cache (>= pos+T, n_kv_heads*hs)
    holding positions 0..pos+T-1 -> (T, n_heads*hs). Causal, grouped-query: query head h
    reads kv head h // (n_heads // n_kv_heads)."""
    T = q.shape[0]
    P = pos + T                                            # positions attended to
    hs = q.shape[1] // n_heads
    rep = n_heads // n_kv_heads
    # (T, n_kv, rep, hs) -> (n_kv, rep*T, hs): rows of one kv group are its rep heads x T queries
    qg = q.reshape(T, n_kv_heads, rep, hs).transpose(1, 2, 0, 3).reshape(n_kv_heads, rep * T, hs)
    k = k_cache[:P].reshape(P, n_kv_heads, hs).transpose(1, 2, 0)      # (n_kv, hs, P)
    v = v_cache[:P].reshape(P, n_kv_heads, hs).transpose(1, 0, 2)      # (n_kv, P, hs)
    scores = (qg @ k) / np.sqrt(F32(hs))                               # (n_kv, rep*T, P)
    if T > 1:
        # query t (at position pos+t) may attend to positions <= pos+t
        t = np.tile(np.arange(T), rep)[:, None]
        scores = np.where(np.arange(P)[None, :] > pos + t, F32(-np.inf), scores)
    out = softmax(scores) @ v                                          # (n_kv, rep*T, hs)
    return out.reshape(n_kv_heads, rep, T, hs).transpose(2, 0, 1, 3).reshape(T, n_heads * hs)


KV_DTYPES = ("f32", "f16", "q8")


def kv_round(x: np.ndarray, kv_dtype: str, head_size: int) -> np.ndarray:
    """Keys or values (T, n_kv_heads*head_size) as a KV cache of kv_dtype holds them:
    "f32" unchanged, "f16" rounded to IEEE half (nearest even), "q8" int8 per (row, head) with
    scale s = max|x| / 127 (0 for an all-zero row), q = rint(x / s), read back as q * s."""
    x = np.asarray(x, dtype=F32)
    if kv_dtype == "f32":
        return x
    if kv_dtype == "f16":
        return x.astype(np.float16).astype(F32)
    if kv_dtype != "q8":
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    shape = x.shape
    g = x.reshape(-1, shape[-1] // head_size, head_size)
    s = (np.abs(g).max(axis=-1, keepdims=True) / F32(127.0)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(g / s), F32(0.0)).astype(F32)
    return (q * s).astype(F32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# model

class ReferenceModel:
    """A Llama-architecture transformer in NumPy (qwen2: plus q/k/v biases): batched `logits`,
    one-step `forward` with a KV cache held on the object, greedy `generate`. Weights: the
    llama2c.weights dict (fp32 arrays or QTensors of 4 or 8 bits)."""

    def __init__(self, config: Config, weights: dict, act_bits: int = 8, kv_dtype: str = "f32"):
        if act_bits not in ACT_BITS:
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits!r}")
        k_dtype, _, v_dtype = kv_dtype.partition("/")   # "K/V": keys and values of two types
        v_dtype = v_dtype or k_dtype
        if k_dtype not in KV_DTYPES or v_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES} or keys/values as 'f16/q8', "
                             f"got {kv_dtype!r}")
        self.kv_dtype = kv_dtype          # the KV cache's element types (see kv_round)
        self.k_dtype, self.v_dtype = k_dtype, v_dtype
        validate_weights(config, weights, "ReferenceModel")
        self.act_bits = act_bits          # activation quantization of every QTensor matmul
        self.config = config
        self.weights = weights
        self.wcls = weights["tok_embeddings"] if config.shared_classifier else weights["output"]
        self.freqs = config.rope_frequencies()                   # (head_size/2,) RoPE frequencies
        shape = (config.n_layers, config.seq_len, config.kv_dim)
        self.key_cache = np.zeros(shape, dtype=F32)       # (n_layers, seq_len, kv_dim)
        self.value_cache = np.zeros(shape, dtype=F32)     # (n_layers, seq_len, kv_dim)

    @classmethod
    def load(cls, path, dtype: str | None = None, act_bits: int = 8,
             kv_dtype: str = "f32") -> "ReferenceModel":
        """Load any supported model file (GGUF, Hugging Face, llama2.c .bin); act_bits 8 or 16
        picks the activation quantization for int8 weights."""
        try:
            from .loaders import load_any
        except ImportError:
            from .loaders.llama2c_bin import load_llama2c_bin as load_any
        config, weights, _ = load_any(path, dtype=dtype)
        return cls(config, weights, act_bits, kv_dtype)

    def reset(self) -> None:
        """Forget the KV cache (zero it)."""
        self.key_cache[:] = 0
        self.value_cache[:] = 0

    def _embed(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (T,) -> float32 (T, dim) rows of the token embedding (dequantized if int8)."""
        emb = self.weights["tok_embeddings"]
        if isinstance(emb, QTensor):
            return emb.dequantize_rows(tokens)
        return emb[tokens].astype(F32)

    def _run(self, tokens, pos0: int, key_cache: np.ndarray, value_cache: np.ndarray) -> np.ndarray:
        """tokens (T,) at positions pos0..pos0+T-1, filling the caches -> logits (T, vocab)."""
        c, w, bits = self.config, self.weights, self.act_bits
        tokens = np.asarray(tokens, dtype=np.int64)
        T = len(tokens)
        if T == 0:
            raise ValueError("no tokens to run")
        if pos0 < 0 or pos0 + T > key_cache.shape[1]:
            raise ContextLengthError(f"positions {pos0}..{pos0 + T - 1} do not fit in the context "
                                     f"of {key_cache.shape[1]} positions")
        if tokens.min() < 0 or tokens.max() >= c.vocab_size:
            raise ValueError(f"token ids must be in [0, {c.vocab_size}), got {tokens.tolist()}")
        positions = np.arange(pos0, pos0 + T)
        x = self._embed(tokens)                                         # (T, dim) residual stream
        for l in range(c.n_layers):
            p = f"layers.{l}."
            # attention rmsnorm, then q, k, v projections for these positions
            xb = rmsnorm(x, w[p + "attention_norm"], c.norm_eps)
            # (qwen2: nn.Linear(..., bias=True) for q, k, v; the biases are optional tensors)
            xq, xk, xv = (matmul(xb, w[p + n], bits) + (w[p + b] if p + b in w else F32(0.0))
                          for n, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
            q = rope(xq, positions, c.rope_theta, c.head_size, freqs=self.freqs)
            k = rope(xk, positions, c.rope_theta, c.head_size, freqs=self.freqs)
            # save key, value at these time steps to the kv cache (in its element type)
            key_cache[l, pos0:pos0 + T] = kv_round(k, self.k_dtype, c.head_size)
            value_cache[l, pos0:pos0 + T] = kv_round(xv, self.v_dtype, c.head_size)
            att = attention(q, key_cache[l], value_cache[l], pos0, c.n_heads, c.n_kv_heads)
            # residual connection: x = x + self.attention.forward(self.attention_norm(x), ...)
            x = x + matmul(att, w[p + "wo"], bits)
            # FFN in PyTorch: self.w2(F.silu(self.w1(x)) * self.w3(x))
            xb = rmsnorm(x, w[p + "ffn_norm"], c.norm_eps)
            x = x + matmul(swiglu(matmul(xb, w[p + "w1"], bits), matmul(xb, w[p + "w3"], bits)), w[p + "w2"], bits)
        # final rmsnorm and classifier into logits
        return matmul(rmsnorm(x, w["norm"], c.norm_eps), self.wcls, bits)

    def logits(self, token_ids) -> np.ndarray:
        """token_ids (T,) from position 0, fresh cache (not the object's) -> float32 (T, vocab)."""
        c = self.config
        shape = (c.n_layers, len(token_ids), c.kv_dim)
        if len(token_ids) > c.seq_len:
            raise ContextLengthError(f"{len(token_ids)} tokens do not fit in the context of {c.seq_len}")
        return self._run(token_ids, 0, np.zeros(shape, F32), np.zeros(shape, F32))

    def forward(self, token: int, pos: int) -> np.ndarray:
        """One token at position pos, using and extending the object's KV cache -> (vocab,)."""
        return self._run([token], pos, self.key_cache, self.value_cache)[0]

    def generate(self, ids, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list:
        """Run the prompt `ids` (from position 0, cache reset) then produce max_new_tokens ids.

        temperature 0 is greedy (argmax, as run.c `-t 0`); otherwise sample from
        softmax(logits / temperature) with a NumPy generator seeded by `seed`.
        Returns the new ids only (the prompt is not included).
        """
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("generate needs at least one prompt token (e.g. BOS)")
        if len(ids) + max_new_tokens - 1 > self.config.seq_len:
            raise ContextLengthError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens "
                                     f"exceed the context of {self.config.seq_len}")
        rng = np.random.default_rng(seed)
        self.reset()
        # prefill: the whole prompt in one batch; keep the last position's logits
        logits = self._run(ids, 0, self.key_cache, self.value_cache)[-1]
        out, pos = [], len(ids)
        while len(out) < max_new_tokens:
            # pick the next token: argmax, or a draw from the temperature-scaled distribution
            if temperature == 0.0:
                nxt = int(np.argmax(logits))
            else:
                nxt = int(rng.choice(len(logits), p=softmax(logits.astype(np.float64) / temperature)))
            out.append(nxt)
            # feed it back, unless it was the last one asked for
            if len(out) < max_new_tokens:
                logits = self.forward(nxt, pos)
                pos += 1
        return out
