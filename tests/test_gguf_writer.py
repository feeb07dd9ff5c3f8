"""write_gguf: F32 / Q8_0 / Q4_1 tensors with llama.cpp's names and metadata. Round trips are
exact (the QTensors load back unchanged), gguf-py reads the files, and rewriting the shared
Q4_1 file reproduces its tensor bytes."""
import dataclasses
import warnings

import numpy as np
import pytest

from llama2c.config import Config
from llama2c.loaders import ggml_quants as gq
from llama2c.loaders.gguf import (gguf_quantize_weights, load_gguf, read_gguf, tokenizer_metadata,
                                  write_gguf)
from llama2c.testing import make_random_model
from llama2c.weights import QTensor
from l2c_files import kquant_llama_gguf, random_blocks

CFG = Config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
             seq_len=64, rope_theta=50000.0, norm_eps=float(np.float32(1e-5)),   # GGUF stores f32
             shared_classifier=False)
TOKENIZER = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [f"t{i}" for i in range(50)],
             "tokenizer.ggml.scores": [-float(i) for i in range(50)],
             "tokenizer.ggml.token_type": [1] * 50, "tokenizer.ggml.bos_token_id": 1,
             "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True}
SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf"


def _same(a, b, name=""):
    if isinstance(a, QTensor):
        assert isinstance(b, QTensor) and (a.bits, a.group_size) == (b.bits, b.group_size), name
        np.testing.assert_array_equal(a.q, b.q, err_msg=name)
        np.testing.assert_array_equal(a.s, b.s, err_msg=name)
        assert (a.m is None) == (b.m is None), name
        if a.m is not None:
            np.testing.assert_array_equal(a.m, b.m, err_msg=name)
    else:
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("ggml_type", [None, "F32", "Q8_0", "Q4_1"])
def test_round_trip(tmp_path, ggml_type):
    w = make_random_model(CFG, seed=3)
    stored = gguf_quantize_weights(w, ggml_type)
    write_gguf(tmp_path / "m.gguf", CFG, stored, TOKENIZER)
    cfg, back, meta = load_gguf(tmp_path / "m.gguf")
    assert cfg == CFG
    for name, t in stored.items():
        _same(t, back[name], name)
    kind = {None: "F32", "F32": "F32"}.get(ggml_type, ggml_type)
    assert meta["tensor_types"]["layers.1.w2"] == kind and meta["tensor_types"]["norm"] == "F32"
    assert meta["gguf_metadata"]["tokenizer.ggml.tokens"] == TOKENIZER["tokenizer.ggml.tokens"]
    assert meta["bos_token_id"] == 1 and meta["eos_token_id"] == 2
    # quantized with ggml's reference quantizers: within half a step (+ f16 rounding of d)
    if ggml_type in ("Q8_0", "Q4_1"):
        t = back["layers.0.w1"]
        err = np.abs(t.dequantize() - w["layers.0.w1"]).reshape(96, 2, 32)
        assert (err <= 0.51 * t.s[:, :, None] + 1e-3 * np.abs(w["layers.0.w1"]).max()).all()


def test_gguf_py_reads_what_we_write(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf_quantize_weights(make_random_model(CFG, seed=4), "Q4_1")
    w["tok_embeddings"] = gq.quantize_q8_0(np.asarray(w["tok_embeddings"].dequantize()))
    write_gguf(tmp_path / "m.gguf", CFG, w, TOKENIZER, name="tiny")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {k: v.contents() for k, v in r.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny"
    assert fields["llama.embedding_length"] == 64 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.block_count"] == 2 and fields["llama.feed_forward_length"] == 96
    assert fields["llama.rope.freq_base"] == 50000.0 and fields["general.file_type"] == 3
    assert fields["tokenizer.ggml.token_type"] == [1] * 50
    assert r.fields["tokenizer.ggml.scores"].types[-1] == gguf.GGUFValueType.FLOAT32
    assert r.fields["llama.context_length"].types[0] == gguf.GGUFValueType.UINT32
    _, back, _ = load_gguf(tmp_path / "m.gguf", dtype="fp32")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert types["output_norm.weight"] == "F32"
    names = {"token_embd.weight": "tok_embeddings", "blk.1.ffn_down.weight": "layers.1.w2",
             "output.weight": "output", "blk.0.attn_norm.weight": "layers.0.attention_norm"}
    for t in r.tensors:
        if t.name in names:
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                          back[names[t.name]], err_msg=t.name)


def test_exact_block_types_are_written_as_they_are(tmp_path):
    """Q8_0 and Q4_1 QTensors (e.g. from such a file) are stored verbatim; Q4_0's (m = -8 d)
    fits a Q4_1 block exactly; a K-quant (f32 scales) is requantized, with a warning."""
    rng = np.random.default_rng(5)
    w = make_random_model(CFG, seed=5)
    q40 = gq.to_qtensor("Q4_0", np.frombuffer(random_blocks("Q4_0", 96 * 2, rng), np.uint8), (96, 64))
    q41 = gq.to_qtensor("Q4_1", np.frombuffer(random_blocks("Q4_1", 96 * 2, rng), np.uint8), (96, 64))
    q80 = gq.to_qtensor("Q8_0", np.frombuffer(random_blocks("Q8_0", 64 * 3, rng), np.uint8), (64, 96))
    w.update({"layers.0.w1": q40, "layers.0.w3": q41, "layers.0.w2": q80})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_gguf(tmp_path / "a.gguf", CFG, w)
    _, back, meta = load_gguf(tmp_path / "a.gguf")
    assert [meta["tensor_types"][f"layers.0.{n}"] for n in ("w1", "w3", "w2")] == ["Q4_1", "Q4_1", "Q8_0"]
    np.testing.assert_array_equal(back["layers.0.w1"].dequantize(), q40.dequantize())
    _same(q41, back["layers.0.w3"])
    _same(q80, back["layers.0.w2"])
    k = gq.to_qtensor("Q4_K", np.frombuffer(random_blocks("Q4_K", 24, rng), np.uint8), (24, 256))
    w["layers.1.w3"] = QTensor(k.q.reshape(96, 64), k.s.reshape(96, 2), 32, k.m.reshape(96, 2), bits=4)
    with pytest.warns(UserWarning, match="requantized"):
        write_gguf(tmp_path / "b.gguf", CFG, w)
    _, back, meta = load_gguf(tmp_path / "b.gguf")
    assert meta["tensor_types"]["layers.1.w3"] == "Q4_1"


def test_rope_settings_round_trip(tmp_path):
    cfg = dataclasses.replace(CFG, rope_scaling={"type": "linear", "factor": 4.0})
    write_gguf(tmp_path / "l.gguf", cfg, make_random_model(cfg))
    assert load_gguf(tmp_path / "l.gguf")[0].rope_scaling == {"type": "linear", "factor": 4.0}
    # Llama 3 scaling is written as llama.cpp does, a rope_freqs.weight tensor of divisors
    cfg = dataclasses.replace(CFG, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16})
    write_gguf(tmp_path / "l3.gguf", cfg, make_random_model(cfg))
    cfg2, _, _ = load_gguf(tmp_path / "l3.gguf")
    assert cfg2.rope_scaling is None and len(cfg2.rope_freq_factors) == cfg.head_size // 2
    np.testing.assert_allclose(cfg2.rope_frequencies(), cfg.rope_frequencies(), rtol=1e-6)
    assert not np.allclose(cfg2.rope_frequencies(), CFG.rope_frequencies())


def test_writer_rejects_bad_arguments(tmp_path):
    w = make_random_model(CFG)
    with pytest.raises(ValueError, match="ggml_type"):
        write_gguf(tmp_path / "x.gguf", CFG, w, ggml_type="Q4_K")
    w.pop("layers.1.w2")
    with pytest.raises(ValueError, match="layers.1.w2"):
        write_gguf(tmp_path / "x.gguf", CFG, w)


def test_kquant_file_rewritten_as_q4_1_loads(tmp_path):
    path = tmp_path / "kq.gguf"
    path.write_bytes(kquant_llama_gguf()[0])
    cfg, w, meta = load_gguf(path)
    with pytest.warns(UserWarning, match="requantized"):
        write_gguf(tmp_path / "out.gguf", cfg, w, tokenizer_metadata(meta["gguf_metadata"]))
    cfg2, w2, meta2 = load_gguf(tmp_path / "out.gguf")
    assert cfg2 == cfg and set(meta2["tensor_types"].values()) == {"F32", "Q8_0", "Q4_1"}
    assert meta2["tensor_types"]["layers.0.wq"] == "Q4_1"       # Q4_K: bits 4 -> Q4_1
    assert meta2["tensor_types"]["layers.0.wv"] == "Q8_0"       # Q6_K: bits 8 -> Q8_0
    assert meta2["gguf_metadata"]["tokenizer.ggml.tokens"] == meta["gguf_metadata"]["tokenizer.ggml.tokens"]


def test_real_q4_1_file_rewrites_byte_for_byte(tmp_path, shared_dir):
    """The shared SmolLM2 Q4_1 file (Q8_0 embedding, Q4_1 matrices, F32 norms) loaded as stored
    and written again: every tensor's bytes and every tokenizer key are the same."""
    src = shared_dir / SMOLLM2
    if not src.is_file():
        pytest.skip(f"{src} not found")
    cfg, w, meta = load_gguf(src)
    write_gguf(tmp_path / "re.gguf", cfg, w, tokenizer_metadata(meta["gguf_metadata"]))
    a, b = read_gguf(src), read_gguf(tmp_path / "re.gguf")
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        assert b.tensors[name].type_name == t.type_name, name
        assert np.array_equal(b.tensors[name].data, t.data), name
    for key, value in a.metadata.items():
        if key.startswith("tokenizer.") or key.startswith("llama."):
            assert b.metadata[key] == value, key
    cfg2, w2, _ = load_gguf(tmp_path / "re.gguf")
    assert cfg2 == cfg
    for name in ("layers.3.wq", "tok_embeddings", "norm"):
        _same(w[name], w2[name], name)
