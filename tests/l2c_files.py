"""Small model and tokenizer files for the robustness tests (bad inputs, fuzzing, threads,
memory): llama2.c v0/v1/v2 checkpoints, GGUF files, tokenizer.bin and tokenizer.json.

Not a test module (no test_ prefix); the test files import it from the tests folder.
"""
from __future__ import annotations

import json
import struct

import numpy as np

from llama2c import Config
from llama2c.loaders.llama2c_bin import write_llama2c_bin
from llama2c.testing import make_random_model

# A model small enough that loading it and running a forward step take well under a ms,
# so fuzzing can try hundreds of files per second.
TINY = dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=40, seq_len=16)


def tiny_config(**overrides) -> Config:
    return Config(**{**TINY, **overrides})


def tiny_weights(cfg: Config | None = None, seed: int = 0) -> dict:
    return make_random_model(cfg or tiny_config(), seed=seed)


# ----------------------------------------------------------------------------- llama2.c .bin

def llama2c_bin_bytes(tmp_path, version: int, cfg: Config | None = None, seed: int = 0) -> bytes:
    """A valid llama2.c checkpoint of the given version (0, 1 or 2) as bytes."""
    cfg = cfg or tiny_config()
    w = tiny_weights(cfg, seed)
    path = tmp_path / f"_base_v{version}.bin"
    if version in (1, 2):
        write_llama2c_bin(path, cfg, w, version=version, group_size=16 if version == 2 else 64)
        data = path.read_bytes()
    else:
        data = legacy_v0_bytes(cfg, w)
    path.unlink(missing_ok=True)
    return data


def legacy_v0_bytes(cfg: Config, w: dict) -> bytes:
    """llama2.c legacy_export layout: 7 x int32 header, then fp32 weights (no freq_cis)."""
    vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
    out = [struct.pack("<7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                       vocab, cfg.seq_len)]
    L = range(cfg.n_layers)

    def put(name):
        out.append(np.ascontiguousarray(w[name], dtype="<f4").tobytes())

    put("tok_embeddings")
    for i in L:
        put(f"layers.{i}.attention_norm")
    for m in ("wq", "wk", "wv", "wo"):
        for i in L:
            put(f"layers.{i}.{m}")
    for i in L:
        put(f"layers.{i}.ffn_norm")
    for m in ("w1", "w2", "w3"):
        for i in L:
            put(f"layers.{i}.{m}")
    put("norm")
    if not cfg.shared_classifier:
        put("output")
    return b"".join(out)


# ----------------------------------------------------------------------------- GGUF

def _gguf_string(s) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value_type(v) -> int:
    if isinstance(v, bool):
        return 7
    if isinstance(v, int):
        return 4 if v >= 0 else 5
    if isinstance(v, float):
        return 6
    if isinstance(v, str):
        return 8
    if isinstance(v, list):
        return 9
    raise TypeError(v)


def _gguf_value(v) -> bytes:
    vt = _value_type(v)
    if vt == 9:
        et = _value_type(v[0]) if v else 4
        return struct.pack("<IQ", et, len(v)) + b"".join(_gguf_value(x) for x in v)
    if vt == 8:
        return _gguf_string(v)
    return struct.pack({7: "<?", 4: "<I", 5: "<i", 6: "<f"}[vt], v)


def gguf_bytes(metadata: dict, tensors: list, version: int = 3, alignment: int = 32):
    """A GGUF file as bytes, plus the offsets of its integer fields and where data starts.

    tensors: (name, ggml_type, numpy shape, raw bytes[, relative offset override]).
    Returns (data, int_fields, data_offset), int_fields = [(offset, size)] of every count,
    length, type code, dimension and tensor offset in the header (fuzzing targets).
    """
    fields = [(4, 4), (8, 8), (16, 8)]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, value in metadata.items():
        fields.append((len(out), 8))
        out += _gguf_string(key)
        fields.append((len(out), 4))
        out += struct.pack("<I", _value_type(value))
        if isinstance(value, list):
            fields += [(len(out), 4), (len(out) + 4, 8)]
        elif isinstance(value, str):
            fields.append((len(out), 8))
        out += _gguf_value(value)
    offset, blobs = 0, []
    for name, ggml_type, shape, raw, *override in tensors:
        ne = list(reversed(shape))
        fields.append((len(out), 8))
        out += _gguf_string(name)
        fields.append((len(out), 4))
        out += struct.pack("<I", len(ne))
        fields += [(len(out) + 8 * k, 8) for k in range(len(ne))]
        out += struct.pack(f"<{len(ne)}Q", *ne)
        fields += [(len(out), 4), (len(out) + 4, 8)]
        out += struct.pack("<IQ", ggml_type, override[0] if override else offset)
        blobs.append(raw + b"\0" * (-len(raw) % alignment))
        offset += len(blobs[-1])
    out += b"\0" * (-len(out) % alignment)
    data_offset = len(out)
    out += b"".join(blobs)
    return bytes(out), fields, data_offset


SPM_TOKENS = (["<unk>", "<s>", "</s>", "▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
              + ["▁h", "▁he", "ll", "llo", "▁w", "or", "ld", "▁hello", "▁world", "he"])


def tiny_llama_gguf(cfg: Config | None = None, seed: int = 0, tokenizer: bool = True,
                    meta_overrides: dict | None = None, tensor_overrides: dict | None = None):
    """(bytes, int_fields, data_offset) of an F32 llama GGUF with cfg's shape, optionally
    carrying a small sentencepiece-style tokenizer (vocab must then be len(SPM_TOKENS) = 40)."""
    cfg = cfg or tiny_config()
    w = tiny_weights(cfg, seed)
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": cfg.dim, "llama.feed_forward_length": cfg.hidden_dim,
        "llama.block_count": cfg.n_layers, "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads, "llama.context_length": cfg.seq_len,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    }
    if tokenizer:
        assert cfg.vocab_size == len(SPM_TOKENS)
        meta.update({
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": list(SPM_TOKENS),
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0] + [-float(i) for i in range(len(SPM_TOKENS) - 3)],
            "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (len(SPM_TOKENS) - 3),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        })
    meta.update(meta_overrides or {})
    names = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight",
             "output": "output.weight"}
    per_layer = {"attention_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                 "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
                 "w3": "ffn_up"}
    tensors = []
    for ours, t in w.items():
        if ours.startswith("layers."):
            _, i, kind = ours.split(".")
            theirs = f"blk.{i}.{per_layer[kind]}.weight"
        else:
            theirs = names[ours]
        entry = [theirs, 0, t.shape, np.ascontiguousarray(t, dtype="<f4").tobytes()]
        if tensor_overrides and theirs in tensor_overrides:
            entry = tensor_overrides[theirs](entry)
        tensors.append(tuple(entry))
    return gguf_bytes(meta, tensors)


# ----------------------------------------------------------------------------- tokenizers

def tokenizer_bin_bytes(tokens=SPM_TOKENS, max_len: int | None = None) -> bytes:
    """llama2.c tokenizer.bin: int32 max_token_length, then per token float score, int32
    length, bytes (llama2.c stores spaces, not '▁')."""
    raw = [t.replace("▁", " ").encode("utf-8") for t in tokens]
    out = [struct.pack("<i", max_len if max_len is not None else max(len(r) for r in raw))]
    for i, r in enumerate(raw):
        out.append(struct.pack("<fi", -float(i), len(r)) + r)
    return b"".join(out)


def tokenizer_json_spec() -> dict:
    """A small byte-level BPE tokenizer.json (GPT-2 style, as SmolLM2's)."""
    from llama2c.pretokenize import BYTE_DECODER
    alphabet = sorted(BYTE_DECODER, key=lambda c: BYTE_DECODER[c])  # 256 byte symbols
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = ["h e", "l l", "he ll", "o Ġ", "Ġ w", "o r", "Ġw or", "l d"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    added = [{"id": len(vocab), "content": "<|endoftext|>", "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
                  "merges": merges},
    }


def tokenizer_json_bytes() -> bytes:
    return json.dumps(tokenizer_json_spec(), ensure_ascii=False).encode("utf-8")


# ----------------------------------------------------------------------------- subprocesses

def run_python(code: str, env: dict | None = None, timeout: float = 120, drop_env=()):
    """Run `code` in a fresh interpreter that imports the same llama2c as this one.
    Returns subprocess.CompletedProcess (text mode); raises subprocess.TimeoutExpired."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import llama2c
    root = str(Path(llama2c.__file__).resolve().parent.parent)
    full = {k: v for k, v in os.environ.items() if k not in drop_env}
    full["PYTHONPATH"] = os.pathsep.join([root] + [p for p in full.get("PYTHONPATH", "").split(os.pathsep) if p])
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------- ggml blocks

GGML_TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
                 "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def random_blocks(type_name: str, n_blocks: int, rng, scale: float = 0.01,
                  scales=None) -> bytes:
    """n_blocks random ggml blocks of a block type: every code/scale byte random (so every
    nibble and high-bit pattern occurs), the f16 fields d (and dmin / m) set to
    |N(0, scale)|-ish values, or to `scales` (an array of f16 values, cycled) when given."""
    from llama2c.loaders.ggml_quants import BLOCK_DTYPES
    dt = BLOCK_DTYPES[type_name]
    raw = rng.integers(0, 256, size=n_blocks * dt.itemsize, dtype=np.uint8)
    b = raw.view(dt)
    for field in ("d", "dmin", "m"):
        if field in dt.names:
            if scales is None:
                v = (scale * rng.standard_normal(n_blocks)).astype(np.float16)
                if field != "m":
                    v = np.abs(v)
            else:
                v = np.resize(np.asarray(scales, np.float16), n_blocks)
                v = rng.permutation(v)
            b[field] = v
    return raw.tobytes()


# K-quant blocks need rows that are multiples of 256: the smallest llama that holds them.
KQUANT = dict(dim=256, hidden_dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=40, seq_len=32)
# llama2c name -> ggml type of the K-quant fuzz base: every supported block type once.
KQUANT_TYPES = {"tok_embeddings": "Q8_0", "layers.0.wq": "Q4_K", "layers.0.wk": "Q5_K",
                "layers.0.wv": "Q6_K", "layers.0.wo": "Q3_K", "layers.0.w1": "Q2_K",
                "layers.0.w2": "Q5_0", "layers.0.w3": "Q5_1", "output": "Q4_0"}


def kquant_llama_gguf(seed: int = 0, scale: float = 0.0005):
    """(bytes, int_fields, data_offset) of a llama GGUF whose matrices use every block type
    (KQUANT_TYPES, random blocks), F32 norms and the small SPM tokenizer of tiny_llama_gguf."""
    from llama2c.loaders.ggml_quants import BLOCK_SIZES
    cfg = Config(**KQUANT, shared_classifier=False)
    rng = np.random.default_rng(seed)

    def kquant(entry):
        name = {v: k for k, v in _GGUF_NAMES.items()}.get(entry[0])
        kind = KQUANT_TYPES.get(name)
        if kind is None:
            return entry
        n_blocks = int(np.prod(entry[2])) // BLOCK_SIZES[kind]
        return [entry[0], GGML_TYPE_IDS[kind], entry[2], random_blocks(kind, n_blocks, rng, scale)]

    overrides = {g: kquant for g in _GGUF_NAMES.values()}
    return tiny_llama_gguf(cfg, seed, tensor_overrides=overrides)


_GGUF_NAMES = {"tok_embeddings": "token_embd.weight", "output": "output.weight",
               **{f"layers.0.{k}": f"blk.0.{v}.weight" for k, v in
                  {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                   "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}.items()}}


# ----------------------------------------------------------------------------- qwen2

def neox_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a Q/K weight or bias from llama2c's interleaved-pair layout to the rotate-half
    layout qwen2 GGUF files store (each head: pair i = rows (i, i + hs/2)), written out
    row by row so the tests do not reuse the loader's permutation."""
    hs = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(hs // 2):
            out[h * hs + i] = w[h * hs + 2 * i]
            out[h * hs + hs // 2 + i] = w[h * hs + 2 * i + 1]
    return out


def qwen2_gguf(cfg: Config, w: dict, matrix_type: str = "F32", tokenizer: dict | None = None,
               drop=(), meta_overrides: dict | None = None) -> bytes:
    """A qwen2 GGUF file (bytes) of llama2c weights `w` (cfg.arch == 'qwen2'): qwen2.* keys,
    Q/K rows and biases in the rotate-half layout, F32 vectors, matrices F32 or Q8_0."""
    from llama2c.loaders.ggml_quants import encode_q8_0, quantize_q8_0
    meta = {"general.architecture": "qwen2",
            "qwen2.embedding_length": cfg.dim, "qwen2.feed_forward_length": cfg.hidden_dim,
            "qwen2.block_count": cfg.n_layers, "qwen2.attention.head_count": cfg.n_heads,
            "qwen2.attention.head_count_kv": cfg.n_kv_heads, "qwen2.context_length": cfg.seq_len,
            "qwen2.rope.freq_base": float(cfg.rope_theta),
            "qwen2.attention.layer_norm_rms_epsilon": float(cfg.norm_eps)}
    meta.update(tokenizer or {})
    meta.update(meta_overrides or {})
    layer = {"attention_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
             "wv": "attn_v.weight", "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight",
             "w1": "ffn_gate.weight", "w2": "ffn_down.weight", "w3": "ffn_up.weight",
             "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
    tensors = []
    for ours, t in w.items():
        if ours.startswith("layers."):
            _, i, kind = ours.split(".")
            theirs = f"blk.{i}.{layer[kind]}"
            if kind in ("wq", "bq"):
                t = neox_rows(t, cfg.n_heads)
            elif kind in ("wk", "bk"):
                t = neox_rows(t, cfg.n_kv_heads)
        else:
            theirs = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight",
                      "output": "output.weight"}[ours]
        if theirs in drop:
            continue
        if t.ndim == 2 and matrix_type == "Q8_0":
            tensors.append((theirs, GGML_TYPE_IDS["Q8_0"], t.shape, encode_q8_0(quantize_q8_0(t))))
        else:
            tensors.append((theirs, 0, t.shape, np.ascontiguousarray(t, dtype="<f4").tobytes()))
    return gguf_bytes(meta, tensors)[0]
