"""GGUF reader and llama loader: small files written here in every supported tensor type,
the real SmolLM2 Q4_1 file from the shared data, and malformed inputs."""
import struct

import numpy as np
import pytest

from llama2c.errors import ModelFormatError
from llama2c.loaders.gguf import GGUFTensor, as_stored, dequantize, load_gguf, read_gguf
from llama2c.weights import QTensor, quantize_q8
from l2c_files import gguf_bytes

F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, BF16 = 0, 1, 2, 3, 8, 12, 30
TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1"}
SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- a minimal GGUF writer

def write_gguf(path, metadata: dict, tensors: list, version=3, alignment=32, magic=b"GGUF"):
    """tensors: (name, ggml_type, numpy shape, raw bytes[, relative offset override])."""
    data, _, _ = gguf_bytes(metadata, tensors, version, alignment)
    path.write_bytes(magic + data[4:])
    return path


# ----------------------------------------------------------------------------- reference quantizers

def _fp16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def _pack_nibbles(q):
    """(n, 32) values 0..15 -> (n, 16) bytes: element j in the low nibble, j+16 in the high."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def encode(x: np.ndarray, ggml_type: int):
    """(raw bytes, exact float32 values a correct reader returns) for x in the given type,
    following ggml's quantize_row_*_ref."""
    shape = x.shape
    if ggml_type == F32:
        return x.astype("<f4").tobytes(), x.astype(np.float32)
    if ggml_type == F16:
        h = x.astype("<f2")
        return h.tobytes(), h.astype(np.float32)
    if ggml_type == BF16:
        bits = (x.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
        return bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32)
    b = x.reshape(-1, 32).astype(np.float32)
    if ggml_type == Q8_0:
        d = np.abs(b).max(axis=1) / 127
        q = np.rint(b / np.where(d == 0, 1, d)[:, None]).astype(np.int8)
        d16 = _fp16(d)
        raw = np.concatenate([d16.view(np.uint8).reshape(-1, 2), q.view(np.uint8)], axis=1)
        expect = q.astype(np.float32) * d16.astype(np.float32)[:, None]
    elif ggml_type == Q4_0:
        mx = b[np.arange(len(b)), np.abs(b).argmax(axis=1)]
        d = mx / -8
        q = np.minimum(15, (b / np.where(d == 0, 1, d)[:, None] + 8.5).astype(np.int8)).astype(np.uint8)
        d16 = _fp16(d)
        raw = np.concatenate([d16.view(np.uint8).reshape(-1, 2), _pack_nibbles(q)], axis=1)
        expect = (q.astype(np.float32) - 8) * d16.astype(np.float32)[:, None]
    elif ggml_type == Q4_1:
        lo, hi = b.min(axis=1), b.max(axis=1)
        d = (hi - lo) / 15
        q = np.minimum(15, ((b - lo[:, None]) / np.where(d == 0, 1, d)[:, None] + 0.5).astype(np.int8))
        q = q.astype(np.uint8)
        d16, m16 = _fp16(d), _fp16(lo)
        raw = np.concatenate([d16.view(np.uint8).reshape(-1, 2), m16.view(np.uint8).reshape(-1, 2),
                              _pack_nibbles(q)], axis=1)
        expect = q.astype(np.float32) * d16.astype(np.float32)[:, None] + m16.astype(np.float32)[:, None]
    else:
        raise ValueError(ggml_type)
    return raw.astype(np.uint8).tobytes(), expect.reshape(shape).astype(np.float32)


# ----------------------------------------------------------------------------- a tiny llama

TINY = dict(dim=64, hidden=96, layers=2, heads=4, kv_heads=2, vocab=40, seq=128)


def tiny_llama_meta(**overrides):
    t = TINY
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": t["dim"], "llama.feed_forward_length": t["hidden"],
        "llama.block_count": t["layers"], "llama.attention.head_count": t["heads"],
        "llama.attention.head_count_kv": t["kv_heads"], "llama.context_length": t["seq"],
        "llama.rope.freq_base": 50000.0, "llama.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(t["vocab"])],
        "tokenizer.ggml.eos_token_id": 2,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def tiny_llama_tensors(matrix_type: int, shared=True, kv_heads=TINY["kv_heads"], seed=0):
    """GGUF tensor list and the expected llama2c fp32 weights."""
    t = TINY
    rng = np.random.default_rng(seed)
    d, h, hs = t["dim"], t["hidden"], t["dim"] // t["heads"]
    kv = kv_heads * hs
    specs = [("token_embd.weight", "tok_embeddings", (t["vocab"], d), matrix_type),
             ("output_norm.weight", "norm", (d,), F32)]
    if not shared:
        specs.append(("output.weight", "output", (t["vocab"], d), matrix_type))
    for i in range(t["layers"]):
        specs += [(f"blk.{i}.attn_norm.weight", f"layers.{i}.attention_norm", (d,), F32),
                  (f"blk.{i}.ffn_norm.weight", f"layers.{i}.ffn_norm", (d,), F32),
                  (f"blk.{i}.attn_q.weight", f"layers.{i}.wq", (d, d), matrix_type),
                  (f"blk.{i}.attn_k.weight", f"layers.{i}.wk", (kv, d), matrix_type),
                  (f"blk.{i}.attn_v.weight", f"layers.{i}.wv", (kv, d), matrix_type),
                  (f"blk.{i}.attn_output.weight", f"layers.{i}.wo", (d, d), matrix_type),
                  (f"blk.{i}.ffn_gate.weight", f"layers.{i}.w1", (h, d), matrix_type),
                  (f"blk.{i}.ffn_down.weight", f"layers.{i}.w2", (d, h), matrix_type),
                  (f"blk.{i}.ffn_up.weight", f"layers.{i}.w3", (h, d), matrix_type)]
    tensors, expected = [], {}
    for gname, ours, shape, ggml_type in specs:
        raw, exp = encode(rng.normal(0, 0.5, shape).astype(np.float32), ggml_type)
        tensors.append((gname, ggml_type, shape, raw))
        expected[ours] = exp
    return tensors, expected


def write_tiny_llama(path, matrix_type=F32, shared=True, meta=None, drop=(), extra=(), **kw):
    tensors, expected = tiny_llama_tensors(matrix_type, shared, **kw)
    tensors = [t for t in tensors if t[0] not in drop] + list(extra)
    write_gguf(path, meta if meta is not None else tiny_llama_meta(), tensors)
    return expected


# ----------------------------------------------------------------------------- reading and dequantizing

@pytest.mark.parametrize("ggml_type", list(TYPE_NAMES))
def test_dequantize_each_type(tmp_path, ggml_type):
    x = np.random.default_rng(1).normal(0, 2.0, (3, 2, 64)).astype(np.float32)
    x[0, 0, :32] = 0.0  # an all-zero block (scale 0)
    raw, expect = encode(x, ggml_type)
    gf = read_gguf(write_gguf(tmp_path / "t.gguf", {"general.architecture": "test"}, [("x", ggml_type, x.shape, raw)]))
    t = gf.tensors["x"]
    assert (t.ggml_type, t.type_name, t.shape) == (ggml_type, TYPE_NAMES[ggml_type], x.shape)
    assert t.nbytes == len(raw)
    assert t.offset % 32 == 0 and t.offset == gf.data_offset
    assert not t.data.flags.writeable and not t.data.flags.owndata  # a view into the read-only map
    y = dequantize(t)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, expect)
    tol = {F32: 0, F16: 2e-3, BF16: 2e-2, Q8_0: 0.02, Q4_0: 0.7, Q4_1: 0.4}[ggml_type]
    np.testing.assert_allclose(y, x, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("ggml_type", list(TYPE_NAMES))
def test_dequantize_matches_gguf_package(tmp_path, ggml_type):
    gguf = pytest.importorskip("gguf")
    x = np.random.default_rng(2).normal(0, 1.0, (4, 96)).astype(np.float32)
    raw, _ = encode(x, ggml_type)
    path = write_gguf(tmp_path / "t.gguf", {}, [("x", ggml_type, x.shape, raw)])
    ref_tensor = gguf.GGUFReader(str(path)).tensors[0]
    ref = gguf.quants.dequantize(ref_tensor.data, ref_tensor.tensor_type)
    np.testing.assert_array_equal(dequantize(read_gguf(path).tensors["x"]), ref)


def test_metadata_values(tmp_path):
    meta = {"s": "héllo ✓", "u": 7, "i": -3, "f": 0.5, "b": True, "nb": False,
            "strs": ["a", "", "ü"], "ints": [1, 2, 3], "floats": [1.5, -2.0], "bools": [True, False],
            "nested": [[1, 2], [3]], "empty": [], "general.alignment": 64}
    gf = read_gguf(write_gguf(tmp_path / "m.gguf", meta, [("x", F32, (2,), b"\0" * 8)], alignment=64))
    assert gf.version == 3 and gf.alignment == 64
    assert gf.metadata == meta
    assert gf.tensors["x"].offset % 64 == 0


def test_version_2_accepted(tmp_path):
    gf = read_gguf(write_gguf(tmp_path / "v2.gguf", {"a": 1}, [], version=2))
    assert gf.version == 2 and gf.metadata == {"a": 1} and gf.tensors == {}


def test_invalid_utf8_value_is_kept_as_surrogate_escape(tmp_path):
    path = write_gguf(tmp_path / "u.gguf", {"tok": "X"}, [])
    path.write_bytes(path.read_bytes().replace(b"X", b"\xff"))
    assert read_gguf(path).metadata["tok"].encode("utf-8", "surrogateescape") == b"\xff"


# ----------------------------------------------------------------------------- llama loading

@pytest.mark.parametrize("matrix_type", list(TYPE_NAMES))
def test_load_tiny_llama_fp32(tmp_path, matrix_type):
    expected = write_tiny_llama(tmp_path / "m.gguf", matrix_type)
    cfg, weights, meta = load_gguf(tmp_path / "m.gguf", dtype="fp32")
    t = TINY
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
            cfg.seq_len) == (t["dim"], t["hidden"], t["layers"], t["heads"], t["kv_heads"], t["vocab"], t["seq"])
    assert cfg.rope_theta == 50000.0 and cfg.norm_eps == pytest.approx(1e-6)
    assert cfg.shared_classifier and cfg.rope_scaling is None and cfg.head_dim == 16
    assert set(weights) == set(expected)
    for name, exp in expected.items():
        assert isinstance(weights[name], np.ndarray) and weights[name].dtype == np.float32
        np.testing.assert_array_equal(weights[name], exp, err_msg=name)
    assert meta["format"] == "gguf" and meta["eos_token_id"] == 2
    assert meta["gguf_metadata"]["tokenizer.ggml.tokens"][3] == "t3" and meta["dtype"] == "fp32"
    assert meta["tensor_types"]["layers.1.w2"] == TYPE_NAMES[matrix_type]


def test_load_unshared_classifier_and_defaults(tmp_path):
    meta = tiny_llama_meta(**{"llama.attention.head_count_kv": None, "llama.rope.freq_base": None,
                              "llama.attention.layer_norm_rms_epsilon": None,
                              "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
                              "llama.attention.key_length": 16, "llama.rope.dimension_count": 16})
    expected = write_tiny_llama(tmp_path / "m.gguf", F16, shared=False, meta=meta, kv_heads=TINY["heads"])
    cfg, weights, _ = load_gguf(tmp_path / "m.gguf")
    assert cfg.n_kv_heads == cfg.n_heads == 4 and not cfg.shared_classifier and cfg.head_dim == 16
    assert cfg.rope_theta == 10000.0 and cfg.norm_eps == pytest.approx(1e-5)
    assert cfg.rope_scaling == {"type": "linear", "factor": 4.0} and cfg.rope_type == "linear"
    np.testing.assert_array_equal(weights["output"], expected["output"])
    np.testing.assert_array_equal(weights["layers.1.wk"], expected["layers.1.wk"])


@pytest.mark.parametrize("matrix_type", list(TYPE_NAMES))
def test_default_load_is_as_stored(tmp_path, matrix_type):
    """dtype None: float types as float32 arrays, block types as exact QTensors (bits 4 for
    Q4_0/Q4_1, 8 for Q8_0) whose values equal the fp32 load."""
    write_tiny_llama(tmp_path / "m.gguf", matrix_type)
    _, w, meta = load_gguf(tmp_path / "m.gguf")
    _, w32, _ = load_gguf(tmp_path / "m.gguf", dtype="fp32")
    assert load_gguf(tmp_path / "m.gguf", dtype="auto")[0] == load_gguf(tmp_path / "m.gguf")[0]
    quantized = matrix_type in (Q8_0, Q4_0, Q4_1)
    assert meta["dtype"] == {Q8_0: "int8", Q4_0: "q4", Q4_1: "q4"}.get(matrix_type, "fp32")
    assert meta.get("group_size") == (32 if quantized else None)
    for name, t in w.items():
        if w32[name].ndim == 1 or not quantized:
            assert isinstance(t, np.ndarray) and t.dtype == np.float32, name
            np.testing.assert_array_equal(t, w32[name])
            continue
        assert isinstance(t, QTensor) and t.bits == (8 if matrix_type == Q8_0 else 4), name
        assert t.q.dtype == (np.int8 if t.bits == 8 else np.uint8) and t.group_size == 32
        np.testing.assert_array_equal(t.dequantize(), w32[name], err_msg=name)
    if matrix_type == F32:   # F32 matrices are views of the file map, not copies
        assert not w["layers.0.wq"].flags.owndata and not w["layers.0.wq"].flags.writeable


def test_load_int8(tmp_path):
    write_tiny_llama(tmp_path / "q8.gguf", Q8_0)
    write_tiny_llama(tmp_path / "q4.gguf", Q4_1)
    _, w32, _ = load_gguf(tmp_path / "q8.gguf", dtype="fp32")
    _, w8, _ = load_gguf(tmp_path / "q8.gguf", dtype="int8")
    gf = read_gguf(tmp_path / "q8.gguf")
    wq = w8["layers.0.wq"]
    assert isinstance(wq, QTensor) and wq.group_size == 32 and wq.q.dtype == np.int8
    blocks = gf.tensors["blk.0.attn_q.weight"].data.reshape(-1, 34)
    np.testing.assert_array_equal(wq.q.reshape(-1, 32), blocks[:, 2:].view(np.int8))  # codes kept as-is
    np.testing.assert_array_equal(wq.dequantize(), w32["layers.0.wq"])
    assert w8["norm"].dtype == np.float32 and w8["norm"].ndim == 1
    _, w4, _ = load_gguf(tmp_path / "q4.gguf", dtype="int8", group_size=16)
    assert isinstance(w4["layers.0.w2"], QTensor) and w4["layers.0.w2"].group_size == 16
    with pytest.raises(ValueError):
        load_gguf(tmp_path / "q8.gguf", dtype="q3")


@pytest.mark.parametrize("ggml_type", [Q8_0, Q4_0, Q4_1], ids=["Q8_0", "Q4_0", "Q4_1"])
def test_load_int8_maps_blocks_exactly(tmp_path, ggml_type):
    path = tmp_path / "m.gguf"
    expected = write_tiny_llama(path, ggml_type, shared=False)
    _, w32, _ = load_gguf(path, dtype="fp32")
    _, w8, meta = load_gguf(path, dtype="int8")
    assert meta["group_size"] == 32
    for name, w in w8.items():
        if w32[name].ndim == 1:
            assert not isinstance(w, QTensor) and w.dtype == np.float32, name
            continue
        assert isinstance(w, QTensor) and w.group_size == 32 and w.q.dtype == np.int8, name
        assert w.bits == 8 and (w.m is not None) == (ggml_type != Q8_0), name
        if ggml_type != Q8_0:
            assert 0 <= w.q.min() and w.q.max() <= 15, name
        np.testing.assert_array_equal(w.dequantize(), w32[name], err_msg=name)
        np.testing.assert_array_equal(w.dequantize(), expected[name], err_msg=name)
    if ggml_type == Q4_1:  # the 4-bit form widened to int8: q = nibble, s = d, m = min
        blocks = read_gguf(path).tensors["blk.1.ffn_down.weight"].data.reshape(-1, 20)
        d = blocks[:, 0:2].copy().view("<f2")[:, 0].astype(np.float32)
        mins = blocks[:, 2:4].copy().view("<f2")[:, 0].astype(np.float32)
        qs = blocks[:, 4:]
        nib = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int8)
        w = w8["layers.1.w2"]
        np.testing.assert_array_equal(w.q.reshape(-1, 32), nib)
        np.testing.assert_array_equal(w.s.reshape(-1), d)
        np.testing.assert_array_equal(w.m.reshape(-1), mins)


def test_load_int8_float_sources_and_other_group_sizes(tmp_path):
    write_tiny_llama(tmp_path / "f16.gguf", F16)
    write_tiny_llama(tmp_path / "q4.gguf", Q4_1)
    _, w32, _ = load_gguf(tmp_path / "f16.gguf")
    _, w8, _ = load_gguf(tmp_path / "f16.gguf", dtype="int8")
    ref = quantize_q8(w32["layers.0.w1"], 32)
    assert w8["layers.0.w1"].m is None
    np.testing.assert_array_equal(w8["layers.0.w1"].q, ref.q)
    np.testing.assert_array_equal(w8["layers.0.w1"].s, ref.s)
    _, q32, _ = load_gguf(tmp_path / "q4.gguf", dtype="fp32")
    _, q16, _ = load_gguf(tmp_path / "q4.gguf", dtype="int8", group_size=16)   # requantized
    ref = quantize_q8(q32["layers.0.w1"], 16)
    assert q16["layers.0.w1"].m is None and q16["layers.0.w1"].group_size == 16
    np.testing.assert_array_equal(q16["layers.0.w1"].q, ref.q)
    np.testing.assert_array_equal(q16["layers.0.w1"].s, ref.s)


def test_q4_1_extreme_scales_stay_exact():
    """Q4_1 blocks whose d and min lie far apart in magnitude (where the old int8 mapping
    q = nibble - 8, m = min + 8 d rounded) map exactly: q = nibble, s = d, m = min."""
    d = np.array([2.0, 1.0], np.float16)
    mins = np.array([2.0 ** -24, -3.0], np.float16)
    nib = np.array([np.arange(32) % 16, np.arange(32)[::-1] % 16], np.uint8)
    raw = np.zeros((2, 20), np.uint8)
    raw[:, 0:2] = d.view(np.uint8).reshape(2, 2)
    raw[:, 2:4] = mins.view(np.uint8).reshape(2, 2)
    raw[:, 4:] = nib[:, :16] | (nib[:, 16:] << 4)
    t = GGUFTensor("w", Q4_1, "Q4_1", (2, 32), 0, raw)
    got = as_stored(t)
    assert got.bits == 4 and got.m is not None
    np.testing.assert_array_equal(got.dequantize().view(np.uint32), dequantize(t).view(np.uint32))


# ----------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def smollm2_path(shared_dir):
    path = shared_dir / SMOLLM2
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_real_file_config(smollm2_path):
    cfg, weights, meta = load_gguf(smollm2_path, dtype="fp32")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size,
            cfg.seq_len) == (576, 30, 9, 3, 1536, 49152, 8192)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == pytest.approx(1e-5)
    assert cfg.shared_classifier and "output" not in weights and cfg.head_size == 64
    gm = meta["gguf_metadata"]
    assert gm["tokenizer.ggml.model"] == "gpt2" and len(gm["tokenizer.ggml.merges"]) == 48900
    assert meta["tensor_types"]["tok_embeddings"] == "Q8_0" and meta["tensor_types"]["layers.0.wq"] == "Q4_1"
    assert meta["tensor_types"]["norm"] == "F32"
    for name, w in weights.items():
        assert w.dtype == np.float32 and np.isfinite(w).all(), name
        amax = float(np.abs(w).max())
        assert 1e-3 < amax < 100, (name, amax)
        if w.ndim == 2:
            assert 1e-3 < float(w.std()) < 1.0, name


def test_real_file_int8(smollm2_path):
    cfg, weights, _ = load_gguf(smollm2_path, dtype="int8")
    emb = weights["tok_embeddings"]
    assert isinstance(emb, QTensor) and emb.shape == (49152, 576) and emb.group_size == 32
    assert isinstance(weights["layers.29.w2"], QTensor) and weights["layers.29.w2"].group_size == 32
    assert weights["layers.0.ffn_norm"].dtype == np.float32


def test_real_file_int8_weights_are_exact(smollm2_path):
    """Q8_0 embedding and Q4_1 matrices map onto QTensors without requantization: as stored
    (Q4_1 as bits 4) and as int8 (Q4_1 widened), both equal to the fp32 load."""
    _, w32, meta = load_gguf(smollm2_path, dtype="fp32")
    _, w8, _ = load_gguf(smollm2_path, dtype="int8")
    _, w4, _ = load_gguf(smollm2_path)
    for name, w in w8.items():
        if not isinstance(w, QTensor):
            assert w32[name].ndim == 1, name
            continue
        q41 = meta["tensor_types"][name] == "Q4_1"
        assert w.group_size == 32 and w.bits == 8 and (w.m is not None) == q41, name
        assert w4[name].bits == (4 if q41 else 8), name
        np.testing.assert_array_equal(w.dequantize(), w32[name], err_msg=name)
        np.testing.assert_array_equal(w4[name].dequantize(), w32[name], err_msg=name)


def test_real_file_matches_gguf_package(smollm2_path):
    gguf = pytest.importorskip("gguf")
    gf = read_gguf(smollm2_path)
    reader = gguf.GGUFReader(str(smollm2_path))
    for name, value in gf.metadata.items():
        assert reader.fields[name].contents() == value, name
    for t in reader.tensors[:12]:  # token_embd (Q8_0), norms (F32), layer 0/1 matrices (Q4_1)
        np.testing.assert_array_equal(dequantize(gf.tensors[t.name]),
                                      gguf.quants.dequantize(t.data, t.tensor_type), err_msg=t.name)


# ----------------------------------------------------------------------------- malformed files

@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, Q4_1)
    return path


def _patched(path, offset, data: bytes):
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    path.write_bytes(bytes(b))
    return path


def _tensor_info_offset(path, name: str) -> int:
    """Byte offset of a tensor info record (the position of its name's length prefix)."""
    return path.read_bytes().index(name.encode()) - 8


@pytest.mark.parametrize("fraction", [0.0, 0.0001, 0.001, 0.01, 0.05, 0.1, 0.3, 0.6, 0.9, 0.999])
def test_truncated(tiny_file, fraction):
    data = tiny_file.read_bytes()
    tiny_file.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(ModelFormatError, match="tiny.gguf"):
        load_gguf(tiny_file)


def test_truncated_inside_metadata_and_tensor_infos(tiny_file):
    data = tiny_file.read_bytes()
    for cut in (24, 30, data.index(b"t7"), _tensor_info_offset(tiny_file, "blk.1.ffn_up.weight") + 11):
        tiny_file.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match="truncated|past the end|cannot fit"):
            read_gguf(tiny_file)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ModelFormatError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="truncated"):
        read_gguf(tmp_path / "empty.gguf")


def test_wrong_magic(tiny_file):
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        read_gguf(_patched(tiny_file, 0, b"GGUG"))


@pytest.mark.parametrize("version, message", [(1, "version 1"), (4, "version 4"),
                                              (0x03000000, "big-endian")])
def test_bad_version(tiny_file, version, message):
    with pytest.raises(ModelFormatError, match=message):
        read_gguf(_patched(tiny_file, 4, struct.pack("<I", version)))


@pytest.mark.parametrize("offset, field", [(8, "tensor count"), (16, "key/value count")])
def test_absurd_counts(tiny_file, offset, field):
    with pytest.raises(ModelFormatError, match=field):
        read_gguf(_patched(tiny_file, offset, struct.pack("<Q", 1 << 60)))


def test_string_length_past_eof(tiny_file):
    # the first key's length prefix sits right after the 24-byte header
    with pytest.raises(ModelFormatError, match="past the end of the file"):
        read_gguf(_patched(tiny_file, 24, struct.pack("<Q", 1 << 40)))


def test_unknown_metadata_value_type(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", {"key": 5}, [])
    with pytest.raises(ModelFormatError, match="unknown metadata value type 13"):
        read_gguf(_patched(path, 24 + 8 + 3, struct.pack("<I", 13)))


def test_absurd_array_length(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {"arr": [1, 2, 3]}, [])
    # key(8+3) + value type(4) + element type(4) -> array length
    with pytest.raises(ModelFormatError, match="array length"):
        read_gguf(_patched(path, 24 + 11 + 8, struct.pack("<Q", 1 << 59)))


def test_too_many_dims(tiny_file):
    at = _tensor_info_offset(tiny_file, "output_norm.weight") + 8 + len("output_norm.weight")
    with pytest.raises(ModelFormatError, match="n_dims 5"):
        read_gguf(_patched(tiny_file, at, struct.pack("<I", 5)))


def test_zero_dim(tiny_file):
    at = _tensor_info_offset(tiny_file, "output_norm.weight") + 8 + len("output_norm.weight") + 4
    with pytest.raises(ModelFormatError, match="must all be positive"):
        read_gguf(_patched(tiny_file, at, struct.pack("<Q", 0)))


@pytest.mark.parametrize("ggml_type", [99, 4])  # never existed / removed from ggml
def test_unknown_tensor_type(tmp_path, ggml_type):
    path = write_gguf(tmp_path / "t.gguf", {}, [("weird.weight", ggml_type, (32,), b"\0" * 32)])
    with pytest.raises(ModelFormatError, match=f"'weird.weight'.*unknown ggml type {ggml_type}"):
        read_gguf(path)


@pytest.mark.parametrize("ggml_type, type_name, block, size", [
    (20, "IQ4_NL", 32, 18), (23, "IQ4_XS", 256, 136), (15, "Q8_K", 256, 292),
    (34, "TQ1_0", 256, 54), (39, "MXFP4", 32, 17), (9, "Q8_1", 32, 40), (28, "F64", 1, 8)])
@pytest.mark.parametrize("dtype", [None, "fp32", "int8", "q4"])
def test_unsupported_known_type(tmp_path, ggml_type, type_name, block, size, dtype):
    """Types llama2c does not read are refused by name (file, tensor, type) whatever the dtype."""
    meta = tiny_llama_meta()
    tensors, _ = tiny_llama_tensors(F32)
    shape = (TINY["hidden"], TINY["dim"] * (block // 32 if block > 32 else 1))
    tensors = [(n, ggml_type, (TINY["hidden"], TINY["dim"]), b"\0" * (TINY["hidden"] * TINY["dim"] // block * size))
               if n == "blk.0.ffn_up.weight" else (n, t, s, r) for n, t, s, r in tensors]
    if block > TINY["dim"]:   # rows must hold whole blocks: use a wider row, the shape check comes later
        tensors = [(n, ggml_type, shape, b"\0" * (shape[0] * shape[1] // block * size))
                   if n == "blk.0.ffn_up.weight" else (n, t, s, r) for n, t, s, r in tensors]
    write_gguf(tmp_path / "k.gguf", meta, tensors)
    assert read_gguf(tmp_path / "k.gguf").tensors["blk.0.ffn_up.weight"].type_name == type_name
    with pytest.raises(ModelFormatError, match=f"k.gguf.*'blk.0.ffn_up.weight'.*{type_name}"):
        load_gguf(tmp_path / "k.gguf", dtype=dtype)


def test_tensor_offset_past_eof(tmp_path):
    path = write_gguf(tmp_path / "o.gguf", {}, [("x", F32, (8,), b"\0" * 32, 1 << 20)])
    with pytest.raises(ModelFormatError, match="'x'.*outside"):
        read_gguf(path)


def test_misaligned_tensor_offset(tmp_path):
    path = write_gguf(tmp_path / "o.gguf", {}, [("x", F32, (2,), b"\0" * 8, 4)])
    with pytest.raises(ModelFormatError, match="alignment"):
        read_gguf(path)


def test_row_not_multiple_of_block(tmp_path):
    path = write_gguf(tmp_path / "b.gguf", {}, [("x", Q8_0, (2, 48), b"\0" * 128)])
    with pytest.raises(ModelFormatError, match="block size 32"):
        read_gguf(path)


@pytest.mark.parametrize("arch", ["phi3", "gemma", "qwen3", "mistral3", None])
def test_other_architectures_refused_by_name(tmp_path, arch):
    write_tiny_llama(tmp_path / "m.gguf", meta=tiny_llama_meta(**{"general.architecture": arch}))
    with pytest.raises(ModelFormatError, match=f"general.architecture is {arch!r}.*llama, qwen2"):
        load_gguf(tmp_path / "m.gguf")


def test_missing_tensor(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", drop={"blk.1.ffn_down.weight"})
    with pytest.raises(ModelFormatError, match="blk.1.ffn_down.weight"):
        load_gguf(tmp_path / "m.gguf")


def test_unsupported_extra_tensor(tmp_path):
    bias = ("blk.0.attn_q.bias", F32, (64,), b"\0" * 256)
    write_tiny_llama(tmp_path / "m.gguf", extra=[bias])
    with pytest.raises(ModelFormatError, match="attn_q.bias"):
        load_gguf(tmp_path / "m.gguf")


def test_missing_hyperparameter_and_vocab_mismatch(tmp_path):
    write_tiny_llama(tmp_path / "a.gguf", meta=tiny_llama_meta(**{"llama.block_count": None}))
    with pytest.raises(ModelFormatError, match="llama.block_count"):
        load_gguf(tmp_path / "a.gguf")
    write_tiny_llama(tmp_path / "b.gguf", meta=tiny_llama_meta(**{"tokenizer.ggml.tokens": ["a", "b"]}))
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.tokens"):
        load_gguf(tmp_path / "b.gguf")


def test_random_corruption_never_escapes(tiny_file):
    """Flipping bytes anywhere either still loads or raises ModelFormatError, nothing else."""
    data = tiny_file.read_bytes()
    rng = np.random.default_rng(7)
    header_end = data.index(b"blk.1.ffn_up.weight") + 64  # corrupt mostly the structured part
    for _ in range(300):
        b = bytearray(data)
        for pos in rng.integers(0, header_end, size=rng.integers(1, 4)):
            b[pos] = int(rng.integers(0, 256))
        tiny_file.write_bytes(bytes(b))
        try:
            load_gguf(tiny_file)
        except ModelFormatError:
            pass


def test_load_any_picks_gguf(tiny_file):
    from llama2c.loaders import load_any
    cfg, _, meta = load_any(tiny_file)
    assert meta["format"] == "gguf" and cfg == load_gguf(tiny_file)[0]
