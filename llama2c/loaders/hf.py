"""Hugging Face Llama checkpoints: a directory with config.json and *.safetensors.

Safetensors files are parsed here (u64 header length, JSON header, raw little-endian data) and
memory-mapped read-only: F32 tensors are zero-copy views, F16/BF16 are converted to float32.
A single `model.safetensors`, a sharded set listed by `model.safetensors.index.json`, or any
other *.safetensors files in the directory are accepted.

Hugging Face stores Q and K projection rows in the "rotate_half" RoPE layout (each head's first
half pairs with its second half); llama2c, llama2.c and GGUF use interleaved pairs. `permute_from_hf`
is llama.cpp's convert_hf_to_gguf `LlamaModel.permute` (HF -> interleaved); `permute_to_hf` is its
inverse, used by `write_hf_dir` to export llama2c weights as a Hugging Face directory.
"""
from __future__ import annotations

import json
import math
import mmap
import shutil
import struct
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import ModelFormatError
from ..weights import LazyWeights, QTensor, expected_shapes, validate_weights
from . import drop_pages
from .dtypes import (check_dtype, check_group_size_arg, convert_weights,
                     convert_weights_lazy, describe)
from .ggml_quants import bf16_to_f32

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_U64 = struct.Struct("<Q")

_GLOBAL_TENSORS = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight",
                   "output": "lm_head.weight"}
_LAYER_TENSORS = {"attention_norm": "input_layernorm", "wq": "self_attn.q_proj",
                  "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
                  "ffn_norm": "post_attention_layernorm", "w1": "mlp.gate_proj",
                  "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
_BIAS_TENSORS = {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj"}
# Buffers some checkpoints carry that the engine recomputes itself.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Files write_hf_dir copies from a tokenizer directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "added_tokens.json", "vocab.json",
                   "merges.txt", "generation_config.json")


# ----------------------------------------------------------------------------- RoPE layout

def permute_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows from HF's rotate_half layout to interleaved pairs (llama.cpp LlamaModel.permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_from_hf: interleaved pairs -> HF's rotate_half layout."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- safetensors

class _SafetensorsFile:
    """Header of one safetensors file plus its memory-mapped data section."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.raw, self.data_start = self._map()
        self.entries = self._parse_header()

    def error(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {message}")

    def _map(self):
        try:
            size = Path(self.path).stat().st_size
        except OSError as e:
            raise self.error(f"cannot open safetensors file ({e.strerror})") from None
        if size < 8:
            raise self.error(f"truncated file: {size} bytes is shorter than the 8-byte header length")
        with open(self.path, "rb") as f:
            self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(self.mapping, np.uint8)    # read-only; views keep the map alive
        header_len = _U64.unpack_from(raw, 0)[0]
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise self.error(f"header length {header_len} does not fit in the {size}-byte file")
        return raw, 8 + header_len

    def _parse_header(self) -> dict:
        try:
            header = json.loads(bytes(self.raw[8:self.data_start]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.error(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self.error("header is not a JSON object")
        header.pop("__metadata__", None)
        return {name: self._check_entry(name, entry) for name, entry in header.items()}

    def _check_entry(self, name: str, entry) -> tuple:
        """Validate one header entry; returns (dtype, shape, absolute start, nbytes)."""
        if not isinstance(entry, dict):
            raise self.error(f"tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_ITEMSIZE:
            raise self.error(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
            raise self.error(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise self.error(f"tensor {name!r}: bad data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise self.error(f"tensor {name!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} "
                             f"bytes, but {dtype} {shape} needs {nbytes}")
        start = self.data_start + offsets[0]
        if start + nbytes > self.raw.size:
            raise self.error(f"tensor {name!r}: data [{start}, {start + nbytes}) lies outside the "
                             f"{self.raw.size}-byte file (truncated?)")
        return dtype, tuple(shape), start, nbytes

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32: a read-only view for F32, a converted copy for F16/BF16."""
        dtype, shape, start, nbytes = self.entries[name]
        if dtype not in _ST_DTYPES:
            raise self.error(f"tensor {name!r}: dtype {dtype} is not supported (F32, F16, BF16)")
        data = self.raw[start:start + nbytes].view(_ST_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            return bf16_to_f32(data)
        return data if dtype == "F32" else data.astype(np.float32)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: {what} is not a JSON object")
    return value


def _shard_files(model_dir: Path) -> list:
    """The safetensors files of a checkpoint directory."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index_path}: missing 'weight_map' object")
        names = sorted(set(weight_map.values()))
        for name in names:
            # Shards must be plain file names inside the model directory.
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ModelFormatError(f"{index_path}: bad shard file name {name!r}")
            if not (model_dir / name).is_file():
                raise ModelFormatError(f"{index_path}: shard {name!r} does not exist")
        return [model_dir / name for name in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{model_dir}: no *.safetensors weights found")
    return files


def _open_tensors(model_dir: Path) -> dict:
    """Tensor name -> the _SafetensorsFile holding it, across all shards."""
    where = {}
    for path in _shard_files(model_dir):
        st = _SafetensorsFile(path)
        for name in st.entries:
            if name in where:
                raise ModelFormatError(f"{model_dir}: tensor {name!r} appears in both "
                                       f"{where[name].path} and {st.path}")
            where[name] = st
    return where


# ----------------------------------------------------------------------------- config.json

def _field_int(hf: dict, key: str, source: str, default=None) -> int:
    v = hf.get(key, default)
    if v is None:
        raise ModelFormatError(f"{source}: missing {key!r}")
    if not _is_int(v):
        raise ModelFormatError(f"{source}: {key!r} must be an integer, got {v!r}")
    return v


def _field_float(hf: dict, key: str, source: str, default: float) -> float:
    v = hf.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ModelFormatError(f"{source}: {key!r} must be a number, got {v!r}")
    return float(v)


def _hf_arch(hf: dict, source: str) -> str:
    """'llama' (model_type llama or a LlamaForCausalLM: SiLU, no biases) or 'qwen2' (the llama
    block with q/k/v biases, no sliding window); anything else is refused by name."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in archs:
        arch = "qwen2"
        if hf.get("use_sliding_window"):
            raise ModelFormatError(f"{source}: use_sliding_window = true is not supported")
    elif hf.get("model_type") == "llama" or "LlamaForCausalLM" in archs:
        arch = "llama"
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ModelFormatError(f"{source}: {key} = true is not supported")
    else:
        raise ModelFormatError(f"{source}: model_type is {hf.get('model_type')!r} "
                               f"(architectures {archs!r}); supported: 'llama', 'qwen2'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    return arch


def _rope(hf: dict, source: str) -> tuple:
    """(rope_theta, rope_scaling) from rope_theta / rope_scaling, or transformers 5's
    rope_parameters. rope_scaling is stored as given; a 'default' type means none."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ModelFormatError(f"{source}: 'rope_parameters' must be an object")
    theta = _field_float(hf, "rope_theta", source, _field_float(params, "rope_theta", source, 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"} or None
    if scaling is not None and not isinstance(scaling, dict):
        raise ModelFormatError(f"{source}: 'rope_scaling' must be an object, got {scaling!r}")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return theta, scaling


def hf_config(hf: dict, source: str, has_lm_head: bool = True) -> Config:
    """Config from a parsed config.json; shared classifier when tied or lm_head is absent."""
    arch = _hf_arch(hf, source)
    theta, scaling = _rope(hf, source)
    n_heads = _field_int(hf, "num_attention_heads", source)
    tied = hf.get("tie_word_embeddings", False)
    try:
        return Config(
            dim=_field_int(hf, "hidden_size", source),
            hidden_dim=_field_int(hf, "intermediate_size", source),
            n_layers=_field_int(hf, "num_hidden_layers", source),
            n_heads=n_heads,
            n_kv_heads=_field_int(hf, "num_key_value_heads", source, n_heads),
            vocab_size=_field_int(hf, "vocab_size", source),
            seq_len=_field_int(hf, "max_position_embeddings", source),
            rope_theta=theta,
            norm_eps=_field_float(hf, "rms_norm_eps", source, 1e-6),  # LlamaConfig's default
            shared_classifier=bool(tied) or not has_lm_head,
            rope_scaling=scaling,
            head_dim=_field_int(hf, "head_dim", source) if hf.get("head_dim") is not None else None,
            arch=arch,
            attention_bias=arch == "qwen2",
        )
    except ModelFormatError as e:
        if str(e).startswith(source):
            raise
        raise ModelFormatError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- loading

def hf_tensor_name_map(n_layers: int, shared_classifier: bool, attention_bias: bool = False) -> dict:
    """llama2c weight name -> Hugging Face tensor name for every tensor the model needs."""
    names = {k: v for k, v in _GLOBAL_TENSORS.items() if k != "output" or not shared_classifier}
    for i in range(n_layers):
        for ours, theirs in _LAYER_TENSORS.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}.weight"
        if attention_bias:
            for ours, theirs in _BIAS_TENSORS.items():
                names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}.bias"
    return names


def _check_tensor_names(model_dir: Path, where: dict, names: dict) -> None:
    """Every needed tensor present, and none the engine would silently ignore (e.g. biases)."""
    missing = [n for n in names.values() if n not in where]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ModelFormatError(f"{model_dir}: missing {len(missing)} tensor(s): {shown}")
    needed = set(names.values()) | {"lm_head.weight"}  # a tied checkpoint may still carry lm_head
    unused = sorted(n for n in where if n not in needed and not n.endswith(_IGNORED_SUFFIXES))
    if unused:
        shown = ", ".join(repr(u) for u in unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise ModelFormatError(f"{model_dir}: tensors this llama loader does not support: {shown}")


def _load_tensor(where: dict, cfg: Config, ours: str, theirs: str) -> np.ndarray:
    """One weight as float32 in llama2c's layout (Q/K rows and biases un-permuted to
    interleaved pairs)."""
    w = where[theirs].float32(theirs)
    if ours.endswith((".wq", ".bq")):
        return permute_from_hf(w, cfg.n_heads)
    if ours.endswith((".wk", ".bk")):
        return permute_from_hf(w, cfg.n_kv_heads)
    return w


def _hf_metadata(model_dir: Path, hf: dict, weights: dict | None) -> dict:
    """format, path, config, generation_config, dtype and group_size of the weights
    (loaders.dtypes.describe; not for lazy weights, None), and bos/eos ids
    (generation_config.json first)."""
    meta = {"format": "hf", "path": str(model_dir), "config": hf}
    if weights is not None:
        meta["dtype"], group_size = describe(weights)
        if group_size is not None:
            meta["group_size"] = group_size
    gen_path = model_dir / "generation_config.json"
    gen = _read_json(gen_path, "generation_config.json") if gen_path.is_file() else {}
    if gen:
        meta["generation_config"] = gen
    for key in ("bos_token_id", "eos_token_id"):
        value = gen.get(key, hf.get(key))
        if value is not None:
            meta[key] = value
    if (model_dir / "tokenizer.json").is_file():
        meta["tokenizer_json"] = str(model_dir / "tokenizer.json")
    return meta


def load_hf(path, dtype=None, group_size: int | None = None, lazy: bool = False):
    """Load a Hugging Face Llama or Qwen2 directory -> (Config, weights, metadata).

    dtype (the same meaning in every loader, see loaders/dtypes.py): None/'auto' and 'fp32'
    give float32 weights (F32 non-Q/K tensors stay memory-mapped views); 'int8' quantizes every
    matrix with quantize_q8 at `group_size` (default 64, halved until it fits), 'q4' to 4
    bits (default 32). Norms and biases stay float32.
    lazy: the weights as a llama2c.weights.LazyWeights (each tensor read, converted and
    validated when asked for, as Model.load does; release() drops the maps' resident pages);
    metadata then has no dtype/group_size.
    """
    dtype = check_dtype(dtype)
    group_size = check_group_size_arg(group_size)
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise ModelFormatError(f"{path}: not a directory (expected a Hugging Face model directory)")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{path}: missing config.json")
    hf = _read_json(config_path, "config.json")
    where = _open_tensors(model_dir)
    cfg = hf_config(hf, str(config_path), has_lm_head="lm_head.weight" in where)
    per_layer = 12 if cfg.attention_bias else 9
    if cfg.n_layers * per_layer > len(where):   # checked before naming them all
        raise ModelFormatError(f"{config_path}: num_hidden_layers is {cfg.n_layers} but the "
                               f"safetensors hold only {len(where)} tensors")
    names = hf_tensor_name_map(cfg.n_layers, cfg.shared_classifier, cfg.attention_bias)
    _check_tensor_names(model_dir, where, names)
    if lazy:
        shapes = expected_shapes(cfg)
        stored = LazyWeights({ours: shapes[ours] for ours in names},
                             lambda ours: _load_tensor(where, cfg, ours, names[ours]), str(model_dir))
        files = {id(st): st for st in where.values()}.values()

        def release():
            for st in files:
                drop_pages(st.mapping)
        return cfg, convert_weights_lazy(cfg, stored, dtype, group_size, 64, str(model_dir),
                                         release=release, all_float=True), \
            _hf_metadata(model_dir, hf, None)
    weights = {ours: _load_tensor(where, cfg, ours, theirs) for ours, theirs in names.items()}
    validate_weights(cfg, weights, source=str(model_dir))
    weights = convert_weights(cfg, weights, dtype, group_size, default=64)
    return cfg, weights, _hf_metadata(model_dir, hf, weights)


# ----------------------------------------------------------------------------- writing

def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write name -> float32 array as a safetensors file (header padded to 8 bytes)."""
    header, offset = {}, 0
    arrays = {}
    for name, t in tensors.items():
        a = np.ascontiguousarray(t, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays[name] = a
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(_U64.pack(len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.data)


def _hf_config_json(cfg: Config, token_ids: dict) -> dict:
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_size,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.seq_len,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.shared_classifier,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if cfg.arch == "qwen2":   # Qwen2's q/k/v projections always carry biases
        hf.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "use_sliding_window": False})
        del hf["attention_bias"], hf["mlp_bias"]
    hf.update(token_ids)
    return hf


def _token_ids(tokenizer_dir: Path | None, bos_token_id, eos_token_id) -> dict:
    """bos/eos/pad ids: explicit arguments first, then the tokenizer directory's config.json."""
    ids = {}
    src = tokenizer_dir / "config.json" if tokenizer_dir is not None else None
    if src is not None and src.is_file():
        ids = {k: v for k, v in _read_json(src, "config.json").items()
               if k in ("bos_token_id", "eos_token_id", "pad_token_id") and v is not None}
    if bos_token_id is not None:
        ids["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        ids["eos_token_id"] = eos_token_id
    return ids


def write_hf_dir(cfg: Config, weights: dict, out_dir, tokenizer_dir=None, *,
                 bos_token_id=None, eos_token_id=None) -> Path:
    """Write llama2c weights as a Hugging Face Llama/Qwen2 directory (fp32 model.safetensors,
    config.json, tokenizer files copied from `tokenizer_dir`); returns the directory.
    QTensors are dequantized; Q/K rows are permuted back to HF's rotate_half layout."""
    if cfg.rope_freq_factors is not None:
        raise ValueError("write_hf_dir: config.json cannot carry per-frequency RoPE factors "
                         "(a GGUF rope_freqs.weight); write GGUF instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
    tensors = {}
    names = hf_tensor_name_map(cfg.n_layers, cfg.shared_classifier, cfg.attention_bias)
    for ours, theirs in names.items():
        w = weights[ours].dequantize() if isinstance(weights[ours], QTensor) else np.asarray(weights[ours])
        if ours.endswith((".wq", ".bq")):
            w = permute_to_hf(w, cfg.n_heads)
        elif ours.endswith((".wk", ".bk")):
            w = permute_to_hf(w, cfg.n_kv_heads)
        tensors[theirs] = w
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    ids = _token_ids(tokenizer_dir, bos_token_id, eos_token_id)
    with open(out / "config.json", "w") as f:
        json.dump(_hf_config_json(cfg, ids), f, indent=2)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out / name)
    if "eos_token_id" in ids and not (out / "generation_config.json").exists():
        gen = {k: v for k, v in ids.items() if k in ("bos_token_id", "eos_token_id")}
        with open(out / "generation_config.json", "w") as f:
            json.dump(gen, f, indent=2)
    return out
