"""What every loader shares: `dtype` means the same for llama2.c .bin, GGUF and Hugging Face
files (None/'auto' as stored, 'fp32', 'int8', 'q4'; see llama2c/loaders/dtypes.py), and
load_any recognises the format from the file in one place (sniff_format)."""
import struct
import warnings

import numpy as np
from llama2c.loaders.dtypes import EIGHT_BIT_IN_Q4
import pytest

import llama2c
from llama2c.config import Config
from llama2c.errors import ModelFormatError
from llama2c.loaders import load_any, sniff_format
from llama2c.loaders.hf import write_hf_dir
from llama2c.loaders.llama2c_bin import write_llama2c_bin
from llama2c.reference import ReferenceModel
from llama2c.testing import make_random_model
from llama2c.weights import QTensor, quantize_q8
from l2c_files import KQUANT_TYPES, kquant_llama_gguf

CFG = Config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, seq_len=32)
EXACT_4BIT = {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loaders")
    w = make_random_model(CFG, seed=2)
    write_llama2c_bin(d / "v1.bin", CFG, w, version=1)
    write_llama2c_bin(d / "v2.bin", CFG, w, version=2, group_size=32)
    write_hf_dir(CFG, w, d / "hf")
    (d / "kq.gguf").write_bytes(kquant_llama_gguf()[0])
    return {"v1": d / "v1.bin", "v2": d / "v2.bin", "hf": d / "hf", "kq": d / "kq.gguf", "w": w}


def _matrices(weights):
    return {n: t for n, t in weights.items() if np.ndim(getattr(t, "q", t)) == 2}


# ----------------------------------------------------------------------------- dtype

@pytest.mark.parametrize("fmt", ["v1", "v2", "hf", "kq"])
def test_dtype_means_the_same_everywhere(files, fmt):
    path = files[fmt]
    stored = load_any(path)[1]
    assert load_any(path, dtype="auto")[0] == load_any(path)[0]
    _, fp32, meta32 = load_any(path, dtype="fp32")
    assert meta32["dtype"] == "fp32"
    for name, t in _matrices(fp32).items():
        assert isinstance(t, np.ndarray) and t.dtype == np.float32, name
        want = stored[name].dequantize() if isinstance(stored[name], QTensor) else stored[name]
        np.testing.assert_array_equal(t, want, err_msg=name)       # as stored, dequantized
    for dtype, bits in (("int8", 8), ("q4", 4)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # group sizes backing off to fit
            _, w, meta = load_any(path, dtype=dtype)
        assert meta["dtype"] == dtype, fmt
        for name, t in _matrices(w).items():
            want = bits
            if dtype == "q4" and name in EIGHT_BIT_IN_Q4 and not (
                    isinstance(stored[name], QTensor) and stored[name].bits == 4):
                want = 8                             # the embedding and classifier
            assert isinstance(t, QTensor) and t.bits == want, (fmt, dtype, name)
            assert t.q.dtype == (np.int8 if want == 8 else np.uint8)
        for name, t in w.items():
            if np.ndim(getattr(t, "q", t)) == 1:
                assert t.dtype == np.float32, name    # norms stay float32


def test_stored_none_is_exact(files):
    """None: llama2.c v1 and HF fp32, v2 its int8 groups, GGUF each block type's exact form."""
    assert all(isinstance(t, np.ndarray) for t in _matrices(load_any(files["v1"])[1]).values())
    assert all(isinstance(t, np.ndarray) for t in _matrices(load_any(files["hf"])[1]).values())
    v2 = load_any(files["v2"])[1]
    assert all(isinstance(t, QTensor) and t.bits == 8 and t.group_size == 32 for t in _matrices(v2).values())
    _, kq, meta = load_any(files["kq"])
    assert meta["dtype"] == "mixed"
    from llama2c.loaders.ggml_quants import EXACT_FORMAT
    for name, kind in KQUANT_TYPES.items():
        assert (kq[name].bits, kq[name].group_size) == EXACT_FORMAT[kind], name


def test_gguf_int8_and_q4_keep_exact_blocks(files):
    """int8: every block type exactly (4-bit ones widened; values equal the fp32 load).
    q4: the 4-bit types exactly; Q8_0/Q5_x/Q5_K/Q6_K quantized to 4 bits at group 32."""
    _, w32, _ = load_any(files["kq"], dtype="fp32")
    _, w8, _ = load_any(files["kq"], dtype="int8")
    _, w4, _ = load_any(files["kq"], dtype="q4")
    for name, kind in KQUANT_TYPES.items():
        np.testing.assert_array_equal(w8[name].dequantize(), w32[name], err_msg=name)
        if kind in EXACT_4BIT:
            np.testing.assert_array_equal(w4[name].dequantize(), w32[name], err_msg=name)
        else:
            assert w4[name].group_size == 32, name
            err = np.abs(w4[name].dequantize() - w32[name]).reshape(w32[name].shape[0], -1, 32)
            assert (err <= 0.51 * w4[name].s[:, :, None] + 1e-3 * np.abs(w32[name]).max()).all(), name


def test_group_size_requantizes_other_sizes(files):
    """A given group size keeps the exact tensors that already have it and requantizes the
    rest (Q6_K/Q3_K/Q2_K come in groups of 16)."""
    _, w32, _ = load_any(files["kq"], dtype="fp32")
    _, w8, meta = load_any(files["kq"], dtype="int8", group_size=32)
    assert meta["group_size"] == 32
    for name, kind in KQUANT_TYPES.items():
        t = w8[name]
        assert t.group_size == 32 and t.bits == 8, name
        if kind in ("Q6_K", "Q3_K", "Q2_K"):
            ref = quantize_q8(w32[name], 32)
            np.testing.assert_array_equal(t.q, ref.q, err_msg=name)
        else:
            np.testing.assert_array_equal(t.dequantize(), w32[name], err_msg=name)
    _, v2, _ = load_any(files["v2"], dtype="int8", group_size=16)
    assert all(t.group_size == 16 for t in _matrices(v2).values())
    with pytest.raises(ValueError, match="group size 24"):
        load_any(files["v1"], dtype="q4", group_size=24)


def test_bad_dtype_and_group_size(files):
    for bad in ("fp16", "q8", 8, "INT8"):
        with pytest.raises(ValueError, match="None, 'auto', 'fp32', 'int8' or 'q4'"):
            load_any(files["v1"], dtype=bad)
    for bad in (0, -32, 1.5, True):
        with pytest.raises(ValueError, match="group_size"):
            load_any(files["v1"], dtype="int8", group_size=bad)


def test_model_load_q4_runs_the_4bit_weights(files):
    """Model.load(dtype='q4'): the engine computes what the reference computes with the same
    bits-4 weights (packed as 4-bit, or widened exactly to int8 where the engine has no
    4-bit matrices)."""
    for path in (files["kq"], files["v1"]):
        model = llama2c.Model.load(path, dtype="q4", n_threads=1)
        assert model.dtype == "q4"
        assert {t.dtype for n, t in model.manifest.items()
                if len(t.shape) == 2 and n not in EIGHT_BIT_IN_Q4} == {"q4"}
        cfg, w, _ = load_any(path, dtype="q4")
        ids = [1, 7, 3, 30, 2]
        want = ReferenceModel(cfg, w, act_bits=16).logits(ids)
        got = model.logits(ids)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


# ----------------------------------------------------------------------------- sniffing

def test_sniff_formats(files, tmp_path):
    assert sniff_format(files["kq"]) == "gguf"
    assert sniff_format(files["v1"]) == "llama2c" and sniff_format(files["v2"]) == "llama2c"
    assert sniff_format(files["hf"]) == "hf"


@pytest.mark.parametrize("head, match", [
    (b"PK\x03\x04" + b"\0" * 60, "zip archive"),
    (b"FUGG" + b"\0" * 60, "big-endian GGUF"),
    (b"tjgg" + b"\0" * 60, "legacy GGJT"),
    (b"lmgg" + b"\0" * 60, "legacy GGML"),
    (struct.pack("<Q", 20) + b'{"x": {"dtype": "F32"}}' + b"\0" * 40, "safetensors"),
    (b"\x00\x01garbage" * 8, "llama2.c magic"),       # no magic: read as a legacy header
])
def test_foreign_files_get_a_clear_error(tmp_path, head, match):
    path = tmp_path / "model.bin"
    path.write_bytes(head)
    with pytest.raises(ModelFormatError, match=match):
        load_any(path)
    with pytest.raises(ModelFormatError, match=match):
        llama2c.Model.load(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_any(tmp_path)
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_any(tmp_path / "nope")
