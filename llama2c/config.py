"""Model hyperparameters, read from the model file (never hard-coded per model)."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

import numpy as np

# RoPE scaling types (Hugging Face's rope_scaling "rope_type"/"type"; GGUF llama.rope.scaling.type)
ROPE_SCALING_TYPES = ("default", "none", "linear", "dynamic", "llama3")
# Architectures the engine runs: the Llama block, and qwen2 = the Llama block + q/k/v biases.
ARCHITECTURES = ("llama", "qwen2")


@dataclass
class Config:
    dim: int                      # transformer width (embedding length)
    hidden_dim: int               # FFN inner width
    n_layers: int                 # number of transformer blocks
    n_heads: int                  # number of query heads
    n_kv_heads: int               # number of key/value heads (< n_heads means GQA)
    vocab_size: int               # number of tokens (rows of the embedding table)
    seq_len: int                  # maximum context length the model was trained for
    rope_theta: float = 10000.0   # RoPE base frequency
    norm_eps: float = 1e-5        # RMSNorm epsilon
    shared_classifier: bool = True  # output projection tied to the token embedding
    rope_scaling: dict | None = field(default=None)  # e.g. {"type": "linear", "factor": 2.0}
    head_dim: int | None = None   # per-head width; defaults to dim // n_heads
    arch: str = "llama"           # "llama" or "qwen2" (GGUF general.architecture / HF model_type)
    attention_bias: bool = False  # q/k/v projections carry biases (layers.{i}.bq, bk, bv): qwen2
    rope_freq_factors: tuple | None = None  # (head_size/2,) RoPE frequency divisors (GGUF
                                  # rope_freqs.weight, Llama 3.1+ scaling), applied after rope_scaling

    def __post_init__(self):
        if self.head_dim is None and self.n_heads:
            self.head_dim = self.dim // self.n_heads
        self.validate()

    @property
    def head_size(self) -> int:
        return int(self.head_dim)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_size

    def validate(self, source: str = "model") -> None:
        """Raise ValueError naming the field if the hyperparameters are inconsistent."""
        from .errors import ModelFormatError
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ModelFormatError(f"{source}: {name} must be an integer, got {v!r}")
            if v <= 0:
                raise ModelFormatError(f"{source}: {name} must be positive, got {v}")
            if v > (1 << 24):
                raise ModelFormatError(f"{source}: {name}={v} is absurdly large (limit {1 << 24})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ModelFormatError(
                f"{source}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None or self.head_dim <= 0 or self.head_dim % 2 != 0:
            raise ModelFormatError(f"{source}: head size must be a positive even number, got {self.head_dim}")
        if not (self.rope_theta > 0):
            raise ModelFormatError(f"{source}: rope_theta must be positive, got {self.rope_theta}")
        if not (self.norm_eps >= 0):
            raise ModelFormatError(f"{source}: norm_eps must be >= 0, got {self.norm_eps}")
        if self.arch not in ARCHITECTURES:
            raise ModelFormatError(f"{source}: architecture {self.arch!r} is not supported "
                                   f"(supported: {', '.join(ARCHITECTURES)})")
        if not isinstance(self.attention_bias, bool):
            raise ModelFormatError(f"{source}: attention_bias must be a bool, got {self.attention_bias!r}")
        if self.rope_freq_factors is not None:
            f = np.asarray(self.rope_freq_factors, dtype=np.float64)
            if f.shape != (self.head_dim // 2,) or not (np.isfinite(f).all() and (f > 0).all()):
                raise ModelFormatError(f"{source}: rope frequency factors must be "
                                       f"{self.head_dim // 2} positive finite numbers, got "
                                       f"{f.size} values")
        if self.rope_scaling is not None:
            factor = self.rope_scaling.get("factor", 1.0) if isinstance(self.rope_scaling, dict) else None
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0 \
                    or factor == float("inf"):
                raise ModelFormatError(f"{source}: rope scaling factor must be a positive number, "
                                       f"got {factor!r}")
            if self.rope_type not in ROPE_SCALING_TYPES:
                raise ModelFormatError(f"{source}: unsupported rope scaling type {self.rope_type!r} "
                                       f"(supported: {', '.join(ROPE_SCALING_TYPES)})")

    @property
    def rope_type(self) -> str:
        """'default' (no scaling), 'linear', 'dynamic' (NTK-aware) or 'llama3'."""
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type")) or "default"
        return "default" if kind == "none" else kind

    @property
    def max_context(self) -> int:
        """Positions the model can run at: seq_len, times the factor for dynamic NTK scaling
        (the only kind whose seq_len is the original, unextended context)."""
        if self.rope_type == "dynamic":
            return int(self.seq_len * float(self.rope_scaling.get("factor", 1.0)))
        return self.seq_len

    def rope_frequencies(self, n_positions: int | None = None) -> np.ndarray:
        """(head_size/2,) float64: angle of RoPE pair i at position p is p * freq[i].

        default: theta^(-2i/head_size); linear: divided by the factor (position interpolation);
        dynamic: theta raised for a context of n_positions beyond seq_len, as Hugging Face's
        dynamic NTK scaling does once the sequence is that long (fixed here for the whole
        context rather than recomputed as it grows); llama3: Llama 3.1's per-band scaling.
        """
        hs = self.head_size
        rs = self.rope_scaling or {}
        factor = float(rs.get("factor", 1.0))
        base = float(self.rope_theta)
        kind = self.rope_type
        n = self.seq_len if n_positions is None else n_positions
        if kind == "dynamic" and n > self.seq_len:
            base *= (factor * n / self.seq_len - (factor - 1)) ** (hs / (hs - 2))
        freq = base ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)
        if kind == "linear":
            freq = freq / factor
        elif kind == "llama3":
            low = float(rs.get("low_freq_factor", 1.0))
            high = float(rs.get("high_freq_factor", 4.0))
            old = float(rs.get("original_max_position_embeddings", 8192))
            wavelen = 2 * np.pi / freq
            smooth = (old / wavelen - low) / (high - low)
            scaled = np.where(wavelen > old / low, freq / factor, freq)      # long waves: / factor
            mid = (wavelen >= old / high) & (wavelen <= old / low)          # between: blend
            freq = np.where(mid, (1 - smooth) * freq / factor + smooth * freq, scaled)
        if self.rope_freq_factors is not None:
            # llama.cpp: theta = pos * base^(-2i/n_rot) / freq_factors[i]
            freq = freq / np.asarray(self.rope_freq_factors, dtype=np.float64)
        return freq

    def to_dict(self) -> dict:
        return asdict(self)
