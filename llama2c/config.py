"""Model hyperparameters, read from the model file (never hard-coded per model)."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict


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
        if self.rope_scaling is not None:
            factor = self.rope_scaling.get("factor", 1.0) if isinstance(self.rope_scaling, dict) else None
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0 \
                    or factor == float("inf"):
                raise ModelFormatError(f"{source}: rope scaling factor must be a positive number, "
                                       f"got {factor!r}")

    @property
    def rope_factor(self) -> float:
        """Linear position-interpolation factor (positions are divided by it); 1.0 = none."""
        rs = self.rope_scaling or {}
        if rs.get("type", rs.get("rope_type")) == "linear":
            return float(rs.get("factor", 1.0))
        return 1.0

    def to_dict(self) -> dict:
        return asdict(self)
