"""Hugging Face loader: RoPE layout permutation, round trips through safetensors directories
written here (by the safetensors package and by write_hf_dir), the real SmolLM2 weights
exported from the GGUF file, and malformed directories."""
import json
import struct

import numpy as np
import pytest

from llama2c.config import Config
from llama2c.errors import ModelFormatError
from llama2c.loaders import load_any
from llama2c.loaders.gguf import load_gguf
from llama2c.loaders.hf import (hf_tensor_name_map, load_hf, permute_from_hf, permute_to_hf,
                                write_hf_dir)
from llama2c.weights import QTensor, expected_shapes, quantize_q8

TINY = Config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40,
              seq_len=128, rope_theta=50000.0, norm_eps=1e-6, shared_classifier=False)


def random_weights(cfg: Config, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.5, shape).astype(np.float32) for name, shape in expected_shapes(cfg).items()}


def hf_tensors(cfg: Config, weights: dict) -> dict:
    """llama2c weights under HF names with Q/K in HF's rotate_half layout."""
    out = {}
    for ours, theirs in hf_tensor_name_map(cfg.n_layers, cfg.shared_classifier).items():
        w = weights[ours]
        if ours.endswith(".wq"):
            w = permute_to_hf(w, cfg.n_heads)
        elif ours.endswith(".wk"):
            w = permute_to_hf(w, cfg.n_kv_heads)
        out[theirs] = np.ascontiguousarray(w)
    return out


def hf_config_json(cfg: Config, **overrides) -> dict:
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
          "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
          "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.seq_len,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
          "tie_word_embeddings": cfg.shared_classifier, "hidden_act": "silu"}
    hf.update(overrides)
    return {k: v for k, v in hf.items() if v is not None}


def write_st(path, tensors: dict, dtype="F32"):
    """Minimal safetensors writer for F32 / F16 / BF16 test files."""
    header, blobs, offset = {}, [], 0
    for name, w in tensors.items():
        w = np.asarray(w, dtype=np.float32)
        if dtype == "BF16":
            raw = (w.view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raw = w.astype({"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(w.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_dir(d, cfg: Config, tensors: dict, config=None, dtype="F32"):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config or hf_config_json(cfg)))
    write_st(d / "model.safetensors", tensors, dtype)
    return d


# ----------------------------------------------------------------------------- RoPE layout

def test_permute_roundtrip():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(permute_from_hf(permute_to_hf(w, 3), 3), w)
    np.testing.assert_array_equal(permute_to_hf(permute_from_hf(w, 3), 3), w)
    # head 0 of HF rows [r0..r7] = [a0 a1 a2 a3 b0 b1 b2 b3] -> interleaved [a0 b0 a1 b1 ...]
    rows = permute_from_hf(np.arange(24.0)[:, None], 3)[:8, 0]
    np.testing.assert_array_equal(rows, [0, 4, 1, 5, 2, 6, 3, 7])


def _rope_hf(q, pos, theta):
    """transformers' apply_rotary_pos_emb on one head: q * cos + rotate_half(q) * sin."""
    half = q.shape[-1] // 2
    freqs = pos / theta ** (np.arange(half) * 2.0 / q.shape[-1])
    cos, sin = np.tile(np.cos(freqs), 2), np.tile(np.sin(freqs), 2)
    return q * cos + np.concatenate([-q[half:], q[:half]]) * sin


def _rope_interleaved(q, pos, theta):
    """llama2.c / GGUF RoPE on one head: rotate pairs (2i, 2i+1) by pos * theta^(-2i/hs)."""
    half = q.shape[-1] // 2
    freqs = pos / theta ** (np.arange(half) * 2.0 / q.shape[-1])
    a, b = q[0::2], q[1::2]
    out = np.empty_like(q)
    out[0::2] = a * np.cos(freqs) - b * np.sin(freqs)
    out[1::2] = a * np.sin(freqs) + b * np.cos(freqs)
    return out


def test_permutation_makes_rope_conventions_agree():
    """Attention scores with HF weights + rotate_half RoPE equal those with un-permuted weights
    + interleaved RoPE: the permutation is the right one, for GQA's K heads too."""
    rng = np.random.default_rng(1)
    n_heads, n_kv, hs, dim = 4, 2, 16, 32
    wq_hf = rng.normal(size=(n_heads * hs, dim))
    wk_hf = rng.normal(size=(n_kv * hs, dim))
    wq, wk = permute_from_hf(wq_hf, n_heads), permute_from_hf(wk_hf, n_kv)
    x1, x2 = rng.normal(size=dim), rng.normal(size=dim)
    for h in range(n_heads):
        kh = h // (n_heads // n_kv)
        q_sl, k_sl = slice(h * hs, (h + 1) * hs), slice(kh * hs, (kh + 1) * hs)
        score_hf = _rope_hf(wq_hf[q_sl] @ x1, 7, 1e4) @ _rope_hf(wk_hf[k_sl] @ x2, 3, 1e4)
        score = _rope_interleaved(wq[q_sl] @ x1, 7, 1e4) @ _rope_interleaved(wk[k_sl] @ x2, 3, 1e4)
        assert score == pytest.approx(score_hf, rel=1e-9)


# ----------------------------------------------------------------------------- round trips

def test_roundtrip_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    weights = random_weights(TINY)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json(TINY)))
    st.save_file(hf_tensors(TINY, weights), str(tmp_path / "model.safetensors"))
    cfg, loaded, meta = load_hf(tmp_path)
    assert cfg == TINY
    assert set(loaded) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(loaded[name], w, err_msg=name)
    assert meta["format"] == "hf" and meta["config"]["model_type"] == "llama"
    # F32 tensors other than Q/K are zero-copy read-only views of the mapped file
    assert not loaded["layers.0.w2"].flags.writeable and not loaded["layers.0.w2"].flags.owndata


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision(tmp_path, dtype):
    weights = random_weights(TINY, seed=3)
    write_dir(tmp_path, TINY, hf_tensors(TINY, weights), dtype=dtype)
    _, loaded, _ = load_hf(tmp_path)
    for name, w in weights.items():
        assert loaded[name].dtype == np.float32
        if dtype == "F16":
            expect = w.astype(np.float16).astype(np.float32)
        else:
            expect = ((w.view(np.uint32) >> 16) << 16).view(np.float32)
        np.testing.assert_array_equal(loaded[name], expect, err_msg=name)


def test_sharded_with_index(tmp_path):
    weights = random_weights(TINY, seed=4)
    tensors = hf_tensors(TINY, weights)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in shards.items():
        write_st(tmp_path / fname, {n: tensors[n] for n in part})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json(TINY)))
    _, loaded, _ = load_hf(tmp_path)
    for name, w in weights.items():
        np.testing.assert_array_equal(loaded[name], w, err_msg=name)


def test_tied_and_missing_lm_head_mean_shared(tmp_path):
    shared = Config(**{**TINY.to_dict(), "shared_classifier": True})
    weights = random_weights(TINY, seed=5)
    tensors = hf_tensors(TINY, weights)  # includes lm_head.weight
    write_dir(tmp_path / "tied", TINY, tensors, hf_config_json(TINY, tie_word_embeddings=True))
    cfg, loaded, _ = load_hf(tmp_path / "tied")
    assert cfg == shared and "output" not in loaded
    del tensors["lm_head.weight"]
    write_dir(tmp_path / "nohead", TINY, tensors, hf_config_json(TINY, tie_word_embeddings=None))
    cfg, loaded, _ = load_hf(tmp_path / "nohead")
    assert cfg.shared_classifier and "output" not in loaded


def test_config_options_and_metadata(tmp_path):
    weights = random_weights(TINY)
    conf = hf_config_json(TINY, num_key_value_heads=None, rope_theta=None, head_dim=16,
                          rope_scaling={"rope_type": "linear", "factor": 2.0})
    mha = Config(**{**TINY.to_dict(), "n_kv_heads": 4})
    write_dir(tmp_path, mha, hf_tensors(mha, random_weights(mha)), conf)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    cfg, _, meta = load_hf(tmp_path)
    assert cfg.n_kv_heads == 4 and cfg.rope_theta == 10000.0 and cfg.head_dim == 16
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0} and cfg.rope_type == "linear"
    assert meta["eos_token_id"] == [2, 7] and meta["bos_token_id"] == 1
    # transformers 5 writes rope_theta inside rope_parameters
    conf = hf_config_json(TINY, rope_theta=None, rope_parameters={"rope_theta": 1e5, "rope_type": "default"})
    write_dir(tmp_path / "v5", TINY, hf_tensors(TINY, weights), conf)
    cfg, _, _ = load_hf(tmp_path / "v5")
    assert cfg.rope_theta == 1e5 and cfg.rope_scaling is None


def test_int8(tmp_path):
    weights = random_weights(TINY)
    write_dir(tmp_path, TINY, hf_tensors(TINY, weights))
    _, loaded, _ = load_hf(tmp_path, dtype="int8", group_size=32)
    wq = loaded["layers.1.wq"]
    assert isinstance(wq, QTensor) and wq.group_size == 32
    ref = quantize_q8(weights["layers.1.wq"], 32)
    np.testing.assert_array_equal(wq.q, ref.q)
    np.testing.assert_array_equal(wq.s, ref.s)
    assert loaded["norm"].dtype == np.float32 and loaded["norm"].ndim == 1


def test_write_hf_dir_roundtrip(tmp_path):
    weights = random_weights(TINY, seed=6)
    weights["layers.0.w1"] = quantize_q8(weights["layers.0.w1"], 32)  # QTensors are dequantized
    out = write_hf_dir(TINY, weights, tmp_path / "out", eos_token_id=3)
    cfg, loaded, meta = load_hf(out)
    assert cfg == TINY and meta["eos_token_id"] == 3
    for name, w in weights.items():
        expect = w.dequantize() if isinstance(w, QTensor) else w
        np.testing.assert_array_equal(loaded[name], expect, err_msg=name)


def test_write_hf_dir_dequantizes_offsets(tmp_path):
    weights = random_weights(TINY, seed=7)
    t = quantize_q8(weights["layers.1.w2"], 32)
    m = np.random.default_rng(7).normal(0, 0.01, t.s.shape).astype(np.float32)
    weights["layers.1.w2"] = QTensor(t.q, t.s, 32, m)          # Q4_1-style offsets
    _, loaded, _ = load_hf(write_hf_dir(TINY, weights, tmp_path / "out"))
    np.testing.assert_array_equal(loaded["layers.1.w2"], weights["layers.1.w2"].dequantize())
    assert not np.array_equal(loaded["layers.1.w2"], t.dequantize())


def test_load_any_dispatch(tmp_path):
    write_dir(tmp_path / "hf", TINY, hf_tensors(TINY, random_weights(TINY)))
    assert load_any(tmp_path / "hf")[0] == TINY
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_any(tmp_path / "missing.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="config.json"):
        load_any(tmp_path / "empty")


# ----------------------------------------------------------------------------- the real model

def test_real_weights_roundtrip_through_hf(smollm2_hf_dir, shared_dir):
    """SmolLM2's GGUF weights (dequantized to fp32) written as a HF directory load back equal."""
    gguf_cfg, gguf_weights, _ = load_gguf(shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                                          dtype="fp32")
    cfg, weights, meta = load_hf(smollm2_hf_dir)
    assert cfg == gguf_cfg
    assert set(weights) == set(gguf_weights)
    for name, w in gguf_weights.items():
        np.testing.assert_array_equal(weights[name], w, err_msg=name)
    assert meta["eos_token_id"] == 2 and meta["bos_token_id"] == 1
    assert (smollm2_hf_dir / "tokenizer.json").is_file() and meta["tokenizer_json"].endswith("tokenizer.json")
    hf = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert hf["tie_word_embeddings"] is True and hf["num_key_value_heads"] == 3 and hf["head_dim"] == 64


# ----------------------------------------------------------------------------- malformed directories

@pytest.fixture
def good_dir(tmp_path):
    return write_dir(tmp_path / "m", TINY, hf_tensors(TINY, random_weights(TINY)))


def test_missing_tensor(tmp_path):
    tensors = hf_tensors(TINY, random_weights(TINY))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_dir(tmp_path, TINY, tensors)
    with pytest.raises(ModelFormatError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(tmp_path)


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json"):
        load_hf(good_dir)


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="not a directory"):
        load_hf(tmp_path / "nothing")


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "mistral"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"num_hidden_layers": 1 << 24}, "num_hidden_layers is 16777216"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
])
def test_bad_config(good_dir, overrides, message):
    (good_dir / "config.json").write_text(json.dumps(hf_config_json(TINY, **overrides)))
    with pytest.raises(ModelFormatError, match=message):
        load_hf(good_dir)


def test_config_not_json(good_dir):
    (good_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_hf(good_dir)


@pytest.mark.parametrize("cut", [0, 5, 8, 50, -1000, -1])
def test_truncated_safetensors(good_dir, cut):
    path = good_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        load_hf(good_dir)


def test_bad_safetensors_headers(good_dir):
    path = good_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(ModelFormatError, match="header length"):
        load_hf(good_dir)
    for header in (b"[1, 2]", b"\xff\xfe", b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}',
                   b'{"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}',
                   b'{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}'):
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
        with pytest.raises(ModelFormatError, match="model.safetensors"):
            load_hf(good_dir)


def test_unsupported_dtype_and_extra_tensor(tmp_path):
    tensors = hf_tensors(TINY, random_weights(TINY))
    write_dir(tmp_path / "a", TINY, tensors)
    path = tmp_path / "a" / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["dtype"] = "I32"
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    with pytest.raises(ModelFormatError, match="'model.norm.weight'.*I32"):
        load_hf(tmp_path / "a")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored
    write_dir(tmp_path / "b", TINY, tensors)
    with pytest.raises(ModelFormatError, match=r"q_proj\.bias"):
        load_hf(tmp_path / "b")


def test_index_with_missing_shard(good_dir):
    (good_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelFormatError, match="model-00002-of-00002.safetensors"):
        load_hf(good_dir)
    (good_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../model.safetensors"}}))
    with pytest.raises(ModelFormatError, match="bad shard file name"):
        load_hf(good_dir)
