"""llama2.c checkpoints: v0/v1/v2 reading (zero copy), v1/v2 writing, and every way a file can be bad."""
import struct
import warnings

import numpy as np
import pytest

from llama2c.config import Config
from llama2c.errors import ModelFormatError
from llama2c.loaders.llama2c_bin import load_llama2c_bin, write_llama2c_bin
from llama2c.testing import make_random_model
from llama2c.weights import QTensor, quantize_q8, quantize_weights

MHA = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=48, seq_len=16)
GQA = dict(dim=64, hidden_dim=96, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=40, seq_len=12)
MATS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _cfg(shape, shared=True):
    return Config(**shape, shared_classifier=shared)


@pytest.fixture(params=[(MHA, True), (GQA, False)], ids=["mha-shared", "gqa-unshared"])
def model(request):
    shape, shared = request.param
    cfg = _cfg(shape, shared)
    return cfg, make_random_model(cfg, seed=1)


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, QTensor):
            assert isinstance(y, QTensor) and x.group_size == y.group_size, name
            np.testing.assert_array_equal(x.q, y.q, err_msg=name)
            np.testing.assert_array_equal(x.s, y.s, err_msg=name)
        else:
            assert not isinstance(y, QTensor), name
            np.testing.assert_array_equal(x, y, err_msg=name)


def _f32(a):
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def _layers(cfg, w, name):
    return [w[f"layers.{i}.{name}"] for i in range(cfg.n_layers)]


# ---------------------------------------------------------------------------------------------
# hand-built files, following export.py line by line

def write_v0(path, cfg, w, freq_cis):
    """export.py legacy_export: header 7 x int32 (vocab < 0: unshared), fp32 tensors."""
    vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
    with open(path, "wb") as f:
        f.write(struct.pack("iiiiiii", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
                            cfg.n_kv_heads, vocab, cfg.seq_len))
        w["tok_embeddings"].tofile(f)
        for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
            for t in _layers(cfg, w, name):
                t.tofile(f)
        w["norm"].tofile(f)
        if freq_cis:   # model.freqs_cos[:max_seq_len], model.freqs_sin[:max_seq_len]
            angles = np.outer(np.arange(cfg.seq_len), 1.0 / 10000.0 ** (np.arange(0, cfg.head_size, 2) / cfg.head_size))
            np.cos(angles).astype(np.float32).tofile(f)
            np.sin(angles).astype(np.float32).tofile(f)
        if not cfg.shared_classifier:
            w["output"].tofile(f)


def export_quantize_q80(w, group_size):
    """export.py quantize_q80 in NumPy: groups along the flattened tensor, divide, round half even."""
    g = w.astype(np.float32).reshape(-1, group_size)
    scale = np.abs(g).max(axis=1) / np.float32(127.0)
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q.reshape(w.shape), scale.astype(np.float32).reshape(w.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# reading the shared checkpoint

def test_tiny260k_is_legacy_with_freq_cis(shared_dir):
    cfg, w, meta = load_llama2c_bin(shared_dir / "models" / "tiny260K.bin")
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
            cfg.seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert cfg.shared_classifier and "output" not in w
    assert meta["format"] == "llama2c-v0" and meta["freq_cis"] is True
    assert (cfg.rope_theta, cfg.norm_eps) == (10000.0, 1e-5)
    assert w["layers.4.w2"].shape == (64, 172)


# ---------------------------------------------------------------------------------------------
# round trips

def test_v1_round_trip(tmp_path, model):
    cfg, w = model
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, w, version=1)
    cfg2, w2, meta = load_llama2c_bin(path)
    assert cfg2 == cfg
    assert meta["format"] == "llama2c-v1" and meta["shared_classifier"] == cfg.shared_classifier
    _assert_same_weights(w, w2)


def test_loaded_tensors_are_read_only_views(tmp_path, model):
    cfg, w = model
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, w, version=1)
    _, w2, _ = load_llama2c_bin(path)
    t = w2["layers.1.wq"]
    assert not t.flags.writeable and not t.flags.owndata and t.flags.c_contiguous
    assert t.dtype == np.float32


def test_v1_writer_is_byte_exact_to_export_py(tmp_path, model):
    cfg, w = model
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, w, version=1)
    # export.py version1_export, step by step
    head = struct.pack("I", 0x616b3432) + struct.pack("i", 1)
    head += struct.pack("iiiiiii", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
                        cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len)
    head += struct.pack("B", int(cfg.shared_classifier))
    head += b"\0" * (256 - len(head))
    tensors = (_layers(cfg, w, "attention_norm") + _layers(cfg, w, "ffn_norm") + [w["norm"], w["tok_embeddings"]]
               + [t for name in MATS for t in _layers(cfg, w, name)])
    if not cfg.shared_classifier:
        tensors.append(w["output"])
    assert path.read_bytes() == head + b"".join(_f32(t) for t in tensors)


def test_v2_round_trip_keeps_qtensors(tmp_path, model):
    cfg, w = model
    wq = quantize_weights(cfg, w, 16)
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, wq, version=2, group_size=16)
    cfg2, w2, meta = load_llama2c_bin(path)
    assert cfg2 == cfg and meta["format"] == "llama2c-v2" and meta["group_size"] == 16
    _assert_same_weights(wq, w2)
    # a second write of what was read gives the same bytes
    path2 = tmp_path / "again.bin"
    write_llama2c_bin(path2, cfg2, w2, version=2, group_size=16)
    assert path2.read_bytes() == path.read_bytes()


def test_v2_writer_quantizes_fp32(tmp_path, model):
    cfg, w = model
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, w, version=2, group_size=32)
    _, w2, _ = load_llama2c_bin(path)
    _assert_same_weights(quantize_weights(cfg, w, 32), w2)


def test_v2_dtype_fp32_dequantizes(tmp_path, model):
    cfg, w = model
    wq = quantize_weights(cfg, w, 16)
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, wq, version=2, group_size=16)
    _, w2, meta = load_llama2c_bin(path, dtype="fp32")
    assert meta["dtype"] == "fp32"
    _assert_same_weights({k: v.dequantize() if isinstance(v, QTensor) else v for k, v in wq.items()}, w2)


def test_v1_written_from_qtensors_dequantizes(tmp_path, model):
    cfg, w = model
    wq = quantize_weights(cfg, w, 16)
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, wq, version=1)
    _, w2, _ = load_llama2c_bin(path)
    _assert_same_weights({k: v.dequantize() if isinstance(v, QTensor) else v for k, v in wq.items()}, w2)


def test_dtype_int8_quantizes_and_backs_off(tmp_path):
    cfg = _cfg(GQA, shared=False)                # hidden_dim 96: 64 does not divide it, 32 does
    w = make_random_model(cfg, 2)
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, w, version=1)
    with pytest.warns(UserWarning, match="using 32"):
        _, w2, meta = load_llama2c_bin(path, dtype="int8")
    assert meta["dtype"] == "int8" and meta["group_size"] == 32
    _assert_same_weights(quantize_weights(cfg, w, 32), w2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, w3, _ = load_llama2c_bin(path, dtype="int8", group_size=16)
    assert w3["layers.0.w2"].group_size == 16


def test_dtype_must_be_known(tmp_path, model):
    with pytest.raises(ValueError, match="dtype"):
        load_llama2c_bin(tmp_path / "m.bin", dtype="fp16")


# ---------------------------------------------------------------------------------------------
# hand-built legacy and v2 files

@pytest.mark.parametrize("freq_cis", [False, True], ids=["no-freq-cis", "freq-cis"])
def test_v0_hand_built(tmp_path, model, freq_cis):
    cfg, w = model
    path = tmp_path / "v0.bin"
    write_v0(path, cfg, w, freq_cis)
    cfg2, w2, meta = load_llama2c_bin(path)
    assert cfg2 == cfg
    assert meta == {"format": "llama2c-v0", "version": 0, "path": str(path), "shared_classifier": cfg.shared_classifier,
                    "file_size": path.stat().st_size, "dtype": "fp32", "freq_cis": freq_cis}
    _assert_same_weights(w, w2)


def test_v2_hand_built(tmp_path, model):
    """A v2 file written byte by byte as export.py version2_export does, loaded tensor for tensor."""
    cfg, w = model
    gs = 16
    buf = bytearray()
    # 1) magic, uint32 0x616b3432 ("ak42"); 2) version, int32 = 2
    buf += struct.pack("I", 0x616b3432) + struct.pack("i", 2)
    # 3) the params, 7 x int32
    buf += struct.pack("iiiiiii", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                       cfg.vocab_size, cfg.seq_len)
    # 4) flags: uint8 shared_classifier, int32 group_size; pad with zeros to 256 bytes
    buf += struct.pack("B", int(cfg.shared_classifier)) + struct.pack("i", gs)
    assert len(buf) == 41
    buf += b"\0" * (256 - len(buf))
    # fp32 params kept unquantized: attention norms, MLP norms, final norm
    for t in _layers(cfg, w, "attention_norm") + _layers(cfg, w, "ffn_norm") + [w["norm"]]:
        buf += _f32(t)
    # Q8_0 params: embedding, then each layer's wq, ..., each layer's w3, then output if unshared;
    # per tensor: serialize_int8(q) immediately followed by serialize_fp32(s)
    names = ["tok_embeddings"] + [f"layers.{i}.{m}" for m in MATS for i in range(cfg.n_layers)]
    if not cfg.shared_classifier:
        names.append("output")
    expected = {n: w[n] for n in w if w[n].ndim == 1}
    for name in names:
        q, s = export_quantize_q80(w[name], gs)
        buf += q.tobytes() + _f32(s)
        expected[name] = QTensor(q, s, gs)
    path = tmp_path / "v2.bin"
    path.write_bytes(bytes(buf))

    cfg2, w2, meta = load_llama2c_bin(path)
    assert cfg2 == cfg and meta["group_size"] == gs
    _assert_same_weights(expected, w2)


# ---------------------------------------------------------------------------------------------
# bad inputs: each raises ModelFormatError (a ValueError) saying what is wrong

@pytest.fixture
def v1_file(tmp_path):
    cfg = _cfg(MHA)
    path = tmp_path / "v1.bin"
    write_llama2c_bin(path, cfg, make_random_model(cfg, 3), version=1)
    return path


@pytest.fixture
def v2_file(tmp_path):
    cfg = _cfg(GQA, shared=False)
    path = tmp_path / "v2.bin"
    write_llama2c_bin(path, cfg, make_random_model(cfg, 4), version=2, group_size=32)
    return path


def _patch(path, offset, fmt, *values):
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(bytes(data))


def _raises(path, match, **kw):
    with pytest.raises(ModelFormatError, match=match) as exc:
        load_llama2c_bin(path, **kw)
    assert isinstance(exc.value, ValueError)
    return str(exc.value)


def test_missing_file(tmp_path):
    msg = _raises(tmp_path / "nope.bin", "no such file")
    assert "nope.bin" in msg


def test_empty_file(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    _raises(tmp_path / "e.bin", "too small")


@pytest.mark.parametrize("keep, match", [
    (3, "too small"), (6, "truncated header"), (100, "truncated header: file is 100 bytes"),
    (256, "expected .* bytes, got 256"), (1000, "got 1000"), (-1, "expected .* bytes, got"),
])
def test_truncated_v1(v1_file, keep, match):
    data = v1_file.read_bytes()
    v1_file.write_bytes(data[:keep])
    _raises(v1_file, match)


@pytest.mark.parametrize("cut", [4, 257, 5000, -4])
def test_truncated_v2(v2_file, cut):
    data = v2_file.read_bytes()
    v2_file.write_bytes(data[:cut])
    _raises(v2_file, "truncated|expected .* bytes")


@pytest.mark.parametrize("keep", [10, 28, 4000])
def test_truncated_v0(tmp_path, keep):
    cfg = _cfg(MHA)
    path = tmp_path / "v0.bin"
    write_v0(path, cfg, make_random_model(cfg, 5), freq_cis=True)
    path.write_bytes(path.read_bytes()[:keep])
    _raises(path, "shorter than the 28-byte legacy header" if keep < 28 else "expected")


def test_v0_size_mismatch_names_both_sizes(tmp_path):
    cfg = _cfg(MHA)
    path = tmp_path / "v0.bin"
    write_v0(path, cfg, make_random_model(cfg, 5), freq_cis=False)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"\0" * 4)
    freq = 2 * 4 * cfg.seq_len * cfg.head_size // 2
    msg = _raises(path, f"expected {size} bytes .without the freq_cis tables. or {size + freq} bytes")
    assert f"got {size + 4}" in msg


def test_v0_vocab_sign_disagrees_with_size(tmp_path):
    cfg = _cfg(MHA)            # shared: no output tensor; flip the sign to claim one
    path = tmp_path / "v0.bin"
    write_v0(path, cfg, make_random_model(cfg, 5), freq_cis=True)
    _patch(path, 20, "<i", -cfg.vocab_size)
    _raises(path, "shared classifier: False.*got")


def test_wrong_magic(v1_file):
    _patch(v1_file, 0, "<4s", b"ak43")
    _raises(v1_file, "magic 0x616b3432")


def test_gguf_file(v1_file):
    _patch(v1_file, 0, "<4s", b"GGUF")
    _raises(v1_file, "GGUF")


@pytest.mark.parametrize("version", [0, 3, -1, 1 << 20])
def test_unknown_version(v1_file, version):
    _patch(v1_file, 4, "<i", version)
    _raises(v1_file, f"unsupported llama2.c file version {version}")


@pytest.mark.parametrize("field", ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"])
@pytest.mark.parametrize("value", [0, -3, 1 << 30])
def test_bad_header_ints(v1_file, field, value):
    index = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"].index(field)
    _patch(v1_file, 8 + 4 * index, "<i", value)
    _raises(v1_file, f"{field}={value} is out of range")


@pytest.mark.parametrize("field", ["dim", "n_layers"])
def test_bad_legacy_header_ints(tmp_path, field):
    cfg = _cfg(MHA)
    path = tmp_path / "v0.bin"
    write_v0(path, cfg, make_random_model(cfg, 5), freq_cis=True)
    _patch(path, 4 * ["dim", "hidden_dim", "n_layers"].index(field), "<i", 0)
    msg = _raises(path, f"{field}=0 is out of range")
    assert "legacy v0 header" in msg


def test_heads_must_divide(v1_file):
    _patch(v1_file, 8 + 12, "<i", 5)                   # n_heads 5 does not divide dim 32
    _raises(v1_file, "n_heads=5 does not divide dim=32")
    _patch(v1_file, 8 + 12, "<ii", 4, 3)               # n_kv_heads 3 does not divide n_heads 4
    _raises(v1_file, "n_kv_heads=3 does not divide n_heads=4")


def test_header_disagrees_with_length(v1_file):
    _patch(v1_file, 8 + 8, "<i", 3)                    # n_layers 2 -> 3: the file is too short
    _raises(v1_file, r"expected \d+ bytes, got \d+")
    _patch(v1_file, 8 + 8, "<i", 1)                    # n_layers 1: the file is too long
    _raises(v1_file, r"expected \d+ bytes, got \d+")


def test_shared_flag_must_be_boolean(v1_file):
    _patch(v1_file, 36, "<B", 7)
    _raises(v1_file, "shared_classifier flag is 7")


@pytest.mark.parametrize("gs, match", [(0, "group size must be positive, got 0"),
                                       (-32, "group size must be positive"),
                                       (48, "group size 48 does not divide dim=64"),
                                       (64, "group size 64 does not divide hidden_dim=96"),
                                       (16, r"expected \d+ bytes, got \d+")])
def test_bad_group_size(v2_file, gs, match):
    _patch(v2_file, 37, "<i", gs)
    _raises(v2_file, match)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_scale(tmp_path, bad):
    cfg = _cfg(MHA)
    w = quantize_weights(cfg, make_random_model(cfg, 6), 16)
    path = tmp_path / "m.bin"
    write_llama2c_bin(path, cfg, w, version=2, group_size=16)
    # offset of layers.1.wv's scales: header, fp32 norms, then q + s of each earlier tensor
    off = 256 + 4 * (2 * cfg.n_layers + 1) * cfg.dim
    for name in ["tok_embeddings", "layers.0.wq", "layers.1.wq", "layers.0.wk", "layers.1.wk",
                 "layers.0.wv", "layers.1.wv"]:
        off += w[name].q.size + (4 * w[name].s.size if name != "layers.1.wv" else 0)
    np.testing.assert_array_equal(np.frombuffer(path.read_bytes(), "<f4", w["layers.1.wv"].s.size, off),
                                  w["layers.1.wv"].s.ravel())
    _patch(path, off + 4 * 5, "<f", bad)
    _raises(path, "'layers.1.wv' has a NaN or infinite scale")

    # the writer refuses such a tensor too
    s = w["layers.1.wv"].s.copy()
    s[2, 1] = bad
    w["layers.1.wv"] = QTensor(w["layers.1.wv"].q, s, 16)
    with pytest.raises(ModelFormatError, match="NaN or infinite scale"):
        write_llama2c_bin(tmp_path / "again.bin", cfg, w, version=2, group_size=16)


# ---------------------------------------------------------------------------------------------
# writer arguments

def test_writer_warns_on_unstorable_hyperparameters(tmp_path):
    cfg = Config(**MHA, rope_theta=500000.0, norm_eps=1e-6)
    path = tmp_path / "m.bin"
    with pytest.warns(UserWarning, match="cannot store rope_theta=500000"):
        write_llama2c_bin(path, cfg, make_random_model(cfg, 7), version=1)
    cfg2, _, _ = load_llama2c_bin(path)
    assert (cfg2.rope_theta, cfg2.norm_eps) == (10000.0, 1e-5)


def test_writer_rejects_bad_arguments(tmp_path):
    cfg = _cfg(GQA)
    w = make_random_model(cfg, 8)
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        write_llama2c_bin(tmp_path / "m.bin", cfg, w, version=0)
    with pytest.raises(ValueError, match="group size 64 does not divide"):
        write_llama2c_bin(tmp_path / "m.bin", cfg, w, version=2, group_size=64)
    odd = Config(**{**GQA, "n_heads": 4, "n_kv_heads": 2}, head_dim=8)      # head size != dim / n_heads
    with pytest.raises(ValueError, match="dim / n_heads"):
        write_llama2c_bin(tmp_path / "m.bin", odd, make_random_model(odd, 9), version=1)


def test_writer_requantizes_other_group_sizes(tmp_path, model):
    cfg, w = model
    path = tmp_path / "m.bin"
    with pytest.warns(UserWarning, match="re-quantizing"):
        write_llama2c_bin(path, cfg, quantize_weights(cfg, w, 16), version=2, group_size=32)
    _, w2, _ = load_llama2c_bin(path)
    assert w2["tok_embeddings"].group_size == 32
    expected = quantize_q8(quantize_weights(cfg, w, 16)["layers.0.w1"].dequantize(), 32)
    np.testing.assert_array_equal(w2["layers.0.w1"].q, expected.q)



def _with_offsets(cfg, w, gs, names):
    """quantize_weights at gs, with per-group offsets (as GGUF Q4_1 loads have) on `names`."""
    wq = dict(quantize_weights(cfg, w, gs))
    rng = np.random.default_rng(7)
    for name in names:
        t = wq[name]
        wq[name] = QTensor(t.q, t.s, gs, rng.normal(0, 0.01, t.s.shape).astype(np.float32))
    return wq


def test_v2_writer_requantizes_offsets_symmetrically(tmp_path, model):
    cfg, w = model
    wq = _with_offsets(cfg, w, 16, ["layers.0.w1", "layers.1.wq"])
    path = tmp_path / "m.bin"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_llama2c_bin(path, cfg, wq, version=2, group_size=16)
    offsets = [c for c in caught if "offsets" in str(c.message)]
    assert len(offsets) == 1, [str(c.message) for c in caught]              # once, not per tensor
    _, w2, _ = load_llama2c_bin(path)
    for name in ("layers.0.w1", "layers.1.wq"):
        expected = quantize_q8(wq[name].dequantize(), 16)
        assert w2[name].m is None
        np.testing.assert_array_equal(w2[name].q, expected.q, err_msg=name)
        np.testing.assert_array_equal(w2[name].s, expected.s, err_msg=name)
    np.testing.assert_array_equal(w2["layers.0.w2"].q, wq["layers.0.w2"].q)  # others as they are
    # v1 stores the dequantized values (offsets included) exactly, without that warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_llama2c_bin(tmp_path / "v1.bin", cfg, wq, version=1)
    _, w1, _ = load_llama2c_bin(tmp_path / "v1.bin")
    np.testing.assert_array_equal(w1["layers.0.w1"], wq["layers.0.w1"].dequantize())
