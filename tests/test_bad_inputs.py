"""Every kind of bad input through the public API raises the documented exception type with a
message that says what is wrong: ModelFormatError for model files, TokenizerError for
tokenizer files and mismatches, ContextLengthError for prompts that do not fit, ValueError
for bad sampling arguments (all of them ValueError subclasses)."""
import math
import struct
import time

import numpy as np
import pytest

import llama2c
from llama2c.errors import ContextLengthError, Llama2cError, ModelFormatError, TokenizerError
from l2c_files import (SPM_TOKENS, TINY, llama2c_bin_bytes, tiny_llama_gguf,
                       tokenizer_bin_bytes)

V1_FIELD = {"dim": 8, "hidden_dim": 12, "n_layers": 16, "n_heads": 20, "n_kv_heads": 24,
            "vocab_size": 28, "seq_len": 32}
V0_FIELD = {k: v - 8 for k, v in V1_FIELD.items()}


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _load_error(path, exc=ModelFormatError, match=None, **kw):
    with pytest.raises(exc, match=match) as info:
        llama2c.Model.load(path, **kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, Llama2cError)
    return str(info.value)


def _poke(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    return {v: llama2c_bin_bytes(d, v) for v in (0, 1, 2)} | {"gguf": tiny_llama_gguf()}


@pytest.fixture(scope="module")
def model(tmp_path_factory, files):
    d = tmp_path_factory.mktemp("model")
    return llama2c.Model.load(_write(d, "m.bin", files[1]), n_threads=1)


# ----------------------------------------------------------------------------- model files

def test_missing_checkpoint(tmp_path):
    assert "does not exist" in _load_error(tmp_path / "nope.bin")


def test_empty_file(tmp_path):
    assert "too small" in _load_error(_write(tmp_path, "e.bin", b""))


@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("cut", ["header", "payload", "one_byte"])
def test_truncated_llama2c_bin(tmp_path, files, version, cut):
    data = files[version]
    n = {"header": 20 if version == 0 else 100, "payload": len(data) // 2,
         "one_byte": len(data) - 1}[cut]
    msg = _load_error(_write(tmp_path, "t.bin", data[:n]))
    if version and cut == "header":
        assert "truncated header" in msg
    elif version == 0 and cut == "header":
        assert "shorter than the 28-byte legacy header" in msg
    else:
        assert "size does not match" in msg and f"got {n}" in msg


@pytest.mark.parametrize("cut", [3, 10, 23, 200, -1])
def test_truncated_gguf(tmp_path, files, cut):
    data = files["gguf"][0]
    msg = _load_error(_write(tmp_path, "t.gguf", data[:cut]))
    assert any(s in msg for s in ("truncated", "lies outside", "too small", "shorter")), msg


def test_wrong_magic_is_read_as_legacy_and_rejected(tmp_path, files):
    data = b"XXXX" + files[1][4:]
    assert "llama2.c magic" in _load_error(_write(tmp_path, "m.bin", data))


@pytest.mark.parametrize("version", [0, 3, -1, 2**31 - 1])
def test_wrong_llama2c_version(tmp_path, files, version):
    data = _poke(files[1], 4, "<i", version)
    assert "unsupported llama2.c file version" in _load_error(_write(tmp_path, "v.bin", data))


@pytest.mark.parametrize("version,match", [(1, "version 1 is not supported"),
                                           (4, "unsupported GGUF version"),
                                           (0x03000000, "big-endian")])
def test_wrong_gguf_version(tmp_path, files, version, match):
    data = _poke(files["gguf"][0], 4, "<I", version)
    assert match in _load_error(_write(tmp_path, "v.gguf", data))


def test_gguf_magic_in_bin_extension_and_bad_gguf_magic(tmp_path, files):
    # a GGUF named .bin is still read as GGUF; a corrupted GGUF magic falls to the .bin reader
    m = llama2c.Model.load(_write(tmp_path, "a.bin", files["gguf"][0]))
    assert m.vocab_size == TINY["vocab_size"]
    data = b"GGUX" + files["gguf"][0][4:]
    assert "llama2.c" in _load_error(_write(tmp_path, "b.gguf", data))


# (a negative v0 vocab_size means 'unshared classifier': test_v0_negative_vocab_... below)
@pytest.mark.parametrize("version,field,value", [
    (version, field, value) for version in (0, 1, 2) for field in V1_FIELD
    for value in (0, -1, -2**31, 2**31 - 1, 1 << 25)
    if not (version == 0 and field == "vocab_size" and value < 0)])
def test_header_field_out_of_range(tmp_path, files, version, field, value):
    offset = (V0_FIELD if version == 0 else V1_FIELD)[field]
    data = _poke(files[version], offset, "<i", value)
    msg = _load_error(_write(tmp_path, "h.bin", data))
    assert any(s in msg for s in (f"{field}={value} is out of range", f"{field}={abs(value)} is out of range",
                                  "does not divide", "must be even", "size does not match")), msg


@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("field,value", [("n_layers", 2), ("dim", 32), ("hidden_dim", 64),
                                         ("vocab_size", 41), ("n_kv_heads", 2)])
def test_header_inconsistent_with_file_size(tmp_path, files, version, field, value):
    offset = (V0_FIELD if version == 0 else V1_FIELD)[field]
    msg = _load_error(_write(tmp_path, "s.bin", _poke(files[version], offset, "<i", value)))
    assert "size does not match" in msg and "expected" in msg


def test_v0_negative_vocab_means_unshared_and_size_must_match(tmp_path, files):
    data = _poke(files[0], V0_FIELD["vocab_size"], "<i", -TINY["vocab_size"])
    msg = _load_error(_write(tmp_path, "u.bin", data))
    assert "shared classifier: False" in msg


@pytest.mark.parametrize("flag", [2, 255])
def test_bad_shared_classifier_flag(tmp_path, files, flag):
    data = bytearray(files[1])
    data[36] = flag
    assert "shared_classifier flag" in _load_error(_write(tmp_path, "f.bin", bytes(data)))


@pytest.mark.parametrize("gs,match", [(0, "group size must be positive"),
                                      (-16, "group size must be positive"),
                                      (7, "does not divide"), (32, "does not divide"),
                                      (8, "size does not match")])
def test_bad_v2_group_size(tmp_path, files, gs, match):
    data = _poke(files[2], 37, "<i", gs)
    assert match in _load_error(_write(tmp_path, "g.bin", data))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_v2_nonfinite_scale(tmp_path, files, value):
    d, L, V = TINY["dim"], TINY["n_layers"], TINY["vocab_size"]
    first_scale = 256 + 4 * (2 * L * d + d) + V * d      # tok_embeddings' q, then its scales
    data = _poke(files[2], first_scale + 4 * 3, "<f", value)
    assert "NaN or infinite scale" in _load_error(_write(tmp_path, "n.bin", data))


def _tensor_override(name, fn):
    return {name: fn}


@pytest.mark.parametrize("offset", [1 << 20, 2**64 - 32])
def test_gguf_tensor_offset_outside_file(tmp_path, offset):
    data, _, _ = tiny_llama_gguf(tensor_overrides=_tensor_override(
        "blk.0.ffn_up.weight", lambda e: e + [offset]))
    assert "lies outside" in _load_error(_write(tmp_path, "o.gguf", data))


def test_gguf_tensor_offset_misaligned(tmp_path):
    data, _, _ = tiny_llama_gguf(tensor_overrides=_tensor_override(
        "output_norm.weight", lambda e: e + [4]))
    assert "not a multiple of the alignment" in _load_error(_write(tmp_path, "a.gguf", data))


@pytest.mark.parametrize("shape", [(16, 1 << 40), (1 << 30, 16), (2**63, 16)])
def test_gguf_tensor_shape_outside_file(tmp_path, shape):
    data, _, _ = tiny_llama_gguf(tensor_overrides=_tensor_override(
        "blk.0.attn_q.weight", lambda e: [e[0], e[1], shape, e[3]]))
    msg = _load_error(_write(tmp_path, "s.gguf", data))
    assert "lies outside" in msg or "cannot fit" in msg


def test_gguf_tensor_wrong_shape(tmp_path):
    data, _, _ = tiny_llama_gguf(tensor_overrides=_tensor_override(
        "blk.0.attn_q.weight", lambda e: [e[0], e[1], (8, 16), e[3][:8 * 16 * 4]]))
    assert "has shape" in _load_error(_write(tmp_path, "w.gguf", data))


@pytest.mark.parametrize("key,value,match", [
    ("llama.block_count", 0, "n_layers must be positive"),
    ("llama.embedding_length", -16, "must be positive"),
    ("llama.attention.head_count", 3, "head size must be a positive even number"),
    ("llama.attention.head_count_kv", 0, "n_kv_heads must be positive"),
    ("llama.context_length", -1, "seq_len must be positive"),
    ("llama.block_count", "two", "must be an integer"),
    ("general.architecture", "gpt2", "general.architecture is 'gpt2'; supported architectures: llama, qwen2"),
])
def test_gguf_bad_metadata(tmp_path, key, value, match):
    data, _, _ = tiny_llama_gguf(meta_overrides={key: value})
    assert match in _load_error(_write(tmp_path, "m.gguf", data))


def test_gguf_absurd_context_length(tmp_path):
    data, _, _ = tiny_llama_gguf(meta_overrides={"llama.context_length": 2**31 - 1})
    assert "seq_len" in _load_error(_write(tmp_path, "c.gguf", data))


def test_gguf_absurd_block_count(tmp_path):
    """A block count far beyond the file's tensors fails at once (found by the fuzzer: it used
    to build a name for each of 16M layers)."""
    data, _, _ = tiny_llama_gguf(meta_overrides={"llama.block_count": 1 << 24})
    start = time.perf_counter()
    _load_error(_write(tmp_path, "b.gguf", data), match="block_count")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("factor", [0.0, -2.0])
def test_gguf_bad_rope_factor(tmp_path, factor):
    data, _, _ = tiny_llama_gguf(meta_overrides={"llama.rope.scaling.type": "linear",
                                                 "llama.rope.scaling.factor": factor})
    _load_error(_write(tmp_path, "r.gguf", data), match="rope")


# ----------------------------------------------------------------------------- tokenizers

def test_tokenizer_vocab_differs_from_model(tmp_path, files):
    model_path = _write(tmp_path, "m.bin", files[1])
    tok = _write(tmp_path, "other_tokenizer.bin", tokenizer_bin_bytes(SPM_TOKENS + ["extra"]))
    with pytest.raises(TokenizerError, match="tokenizer has 41 tokens but the model's vocab_size is 40"):
        llama2c.Model.load(model_path, tokenizer=tok)
    with pytest.raises(TokenizerError, match="41 tokens"):
        llama2c.Model.load(model_path, tokenizer=llama2c.Tokenizer.load(tok))


def test_matching_tokenizer_loads(tmp_path, files):
    tok = _write(tmp_path, "tokenizer.bin", tokenizer_bin_bytes())
    m = llama2c.Model.load(_write(tmp_path, "m.bin", files[1]), tokenizer=tok)
    r = m.generate("hello world", max_new_tokens=3, temperature=0)
    assert isinstance(r.text, str) and len(r.token_ids) == 3


def test_missing_tokenizer(tmp_path, files):
    with pytest.raises(TokenizerError, match="cannot open tokenizer file"):
        llama2c.Tokenizer.load(tmp_path / "nope.bin")
    with pytest.raises(TokenizerError, match="cannot open"):
        llama2c.Model.load(_write(tmp_path, "m.bin", files[1]), tokenizer=tmp_path / "nope.bin")


def _tok_with_length(index, length):
    data = bytearray(tokenizer_bin_bytes())
    off = 4
    for i in range(index):
        (n,) = struct.unpack_from("<i", data, off + 4)
        off += 8 + n
    struct.pack_into("<i", data, off + 4, length)
    return bytes(data)


@pytest.mark.parametrize("data,match", [
    (b"", "max_token_length"),
    (b"\x01\x00", "max_token_length"),
    (struct.pack("<i", 0), "max_token_length"),
    (struct.pack("<i", -5), "max_token_length"),
    (struct.pack("<i", 2**31 - 1), "max_token_length"),
    (_tok_with_length(5, -1), "length"),
    (_tok_with_length(5, 1000), "length"),
    (_tok_with_length(39, 2**31 - 1), "length"),
    (tokenizer_bin_bytes()[:-3], "truncated"),
    (tokenizer_bin_bytes()[:42], "truncated"),
    (tokenizer_bin_bytes(["<unk>", "<s>"]), "at least 3"),
    (tokenizer_bin_bytes(["<unk>", "<s>", "</s>", "\udcff"[:0] + "ok"]).replace(b"ok", b"\xff\xfe"), "UTF-8"),
])
def test_tokenizer_bin_bad_lengths(tmp_path, data, match):
    with pytest.raises(TokenizerError, match=match):
        llama2c.Tokenizer.load(_write(tmp_path, "tokenizer.bin", data))


def test_tokenizer_bin_shorter_than_model_vocab(tmp_path):
    with pytest.raises(TokenizerError, match="of the 41 requested"):
        llama2c.Tokenizer.load(_write(tmp_path, "tokenizer.bin", tokenizer_bin_bytes()), vocab_size=41)


@pytest.mark.parametrize("text,match", [("{", "syntax error"), ("[]", "JSON object"),
                                        ('{"model": 3}', "model"), (b"\xff{}", "UTF-8")])
def test_tokenizer_json_malformed(tmp_path, text, match):
    p = tmp_path / "tokenizer.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TokenizerError, match=match):
        llama2c.Tokenizer.load(p)


# ----------------------------------------------------------------------------- context

def test_prompt_longer_than_context(tmp_path, files):
    m = llama2c.Model.load(_write(tmp_path, "m.bin", files[1]), context_length=8)
    with pytest.raises(ContextLengthError, match="the prompt has 9 tokens but the context holds 8"):
        m.generate(list(range(9)), max_new_tokens=1)
    with pytest.raises(ContextLengthError, match="do not fit the context of 8"):
        m.logits(list(range(9)))
    # a prompt that exactly fills the context still yields one token, then stops
    r = m.generate(list(range(8)), max_new_tokens=5, temperature=0)
    assert len(r.token_ids) == 1 and r.finish_reason == "length"
    with pytest.raises(ContextLengthError):
        list(m.generate(list(range(9)), max_new_tokens=2, stream=True))


@pytest.mark.parametrize("ctx", [0, -1, 17, 2.5, "8"])
def test_bad_context_length(tmp_path, files, ctx):
    with pytest.raises(ValueError, match="context_length"):
        llama2c.Model.load(_write(tmp_path, "m.bin", files[1]), context_length=ctx)


# ----------------------------------------------------------------------------- sampling args

@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(temperature=None), "temperature must be a number"),
    (dict(temperature=math.nan), "temperature must be finite"),
    (dict(temperature=math.inf), "temperature must be finite"),
    (dict(top_p=1.5), r"top_p must be in \[0.0, 1.0\]"),
    (dict(top_p=-0.5), "top_p must be in"),
    (dict(top_p=math.nan), "top_p must be finite"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(max_new_tokens="10"), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(seed=-1), "seed must be in"),
    (dict(seed=2**64), "seed must be in"),
    (dict(seed=1.5), "seed must be an integer"),
])
def test_bad_sampling_args(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate([1, 2, 3], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(ValueError, match=match):
        model.generate([1, 2, 3], stream=True, **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("prompt,match", [
    ([1, 40], "token id 40 is outside"),
    ([-1], "token id -1 is outside"),
    ([2**31], "outside"),
    ([1.5, 2.0], "integers"),
    ([[1, 2]], "1-D"),
    (None, "integers"),
    ([], "prompt is empty"),
    (np.array([], dtype=np.int32), "prompt is empty"),
])
def test_bad_prompt_ids(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompt, max_new_tokens=1)
    if match != "prompt is empty":
        with pytest.raises(ValueError, match=match):
            model.logits(prompt)


def test_text_prompt_without_tokenizer(model):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        model.generate("hello", max_new_tokens=1)


def test_empty_logits(model):
    with pytest.raises(ValueError, match="token_ids is empty"):
        model.logits([])


def test_empty_text_prompt_without_bos(tmp_path, files):
    # a tokenizer that adds BOS never yields an empty prompt; encode("") with bos=False does
    tok = _write(tmp_path, "tokenizer.bin", tokenizer_bin_bytes())
    m = llama2c.Model.load(_write(tmp_path, "m.bin", files[1]), tokenizer=tok)
    assert m.generate("", max_new_tokens=1, temperature=0).prompt_token_ids == [1]
    with pytest.raises(ValueError, match="prompt is empty"):
        m.generate(m.encode_prompt("", bos=False).tolist(), max_new_tokens=1)


def test_extreme_but_valid_sampling_args(model):
    V = model.vocab_size
    for kw in (dict(temperature=1e-40), dict(temperature=1e-30), dict(temperature=1e30),
               dict(top_p=0.0), dict(top_p=1.0), dict(top_k=1), dict(top_k=V),
               dict(top_k=V + 5, top_p=1.0), dict(seed=0), dict(seed=2**64 - 1)):
        r = model.generate([1, 2], max_new_tokens=4, **{"seed": 3, **kw})
        assert all(0 <= t < V for t in r.token_ids), kw
    assert model.generate([1], max_new_tokens=0).token_ids == []


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=10**12), dict(max_new_tokens=2**70),
                                    dict(top_k=2**70)])
def test_huge_counts_are_clamped(model, kwargs):
    r = model.generate([1], **{"temperature": 0, "max_new_tokens": 4, **kwargs})
    assert 0 < len(r.token_ids) <= model.context_length


def test_stop_token_ids_out_of_range(model):
    with pytest.raises(ValueError, match="stop"):
        model.generate([1], max_new_tokens=2, stop_token_ids=[2**40])


def test_bad_dtype_and_simd(tmp_path, files):
    p = _write(tmp_path, "m.bin", files[1])
    with pytest.raises(ValueError, match="dtype must be"):
        llama2c.Model.load(p, dtype="fp16")
    with pytest.raises(ValueError, match="unknown SIMD level"):
        llama2c.Model.load(p, simd="sse9")
    with pytest.raises(ValueError, match="n_threads must be"):
        llama2c.Model.load(p, n_threads=0)
