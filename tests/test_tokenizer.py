"""Tests for llama2c.tokenizer: golden ids, parity with sentencepiece and Hugging Face
tokenizers, decode/streaming round trips, and malformed tokenizer files."""
import json
import random
import struct
import time
import warnings

import pytest

from llama2c.errors import TokenizerError
from llama2c.tokenizer import Tokenizer

# ------------------------------------------------------------------------------------------
# Texts

COMMON_TEXTS = [
    "", "a", " ", "  ", "Hello world", "hello world", " leading space", "  two leading",
    "trailing space ", "trailing spaces   ", "multiple     spaces   here", "\n", "\n\n\n",
    "line one\nline two\r\nline three", "tabs\tand\ttabs", "\t\tindented", "mixed \t\n \t ws",
    "digits 0123456789", "3.14159", "1,000,000.50 USD", "x=1;y=22;z=333;w=4444",
    "year 2024, 12345678901234567890", "naïve café déjà vu", "Ελληνικά κείμενο",
    "Привет мир", "日本語のテキスト", "中文测试，标点。", "한국어 텍스트", "עברית", "العربية",
    "हिन्दी", "emoji 🦙 llama", "🙂🙃", "👨‍👩‍👧‍👦 family", "🇫🇷 flag", "e\u0301 combining",
    "zero\u200bwidth", "nbsp\u00a0here", "em\u2003space", "ideographic\u3000space",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { c[i] = d->e; }",
    "<html><body class=\"x\">hi</body></html>", "https://example.com/path?query=1&b=2",
    "It's a dog's life, isn't it? We'll see; they'd know. I'M SHOUTING, YOU'VE HEARD",
    "CamelCaseIdentifier and snake_case_identifier", "¿Qué tal? ¡Bien!", "--- *** ...",
    "!!!???", "a\u0000b", "control\x07\x1bchars", "Once upon a time, there was a little girl.",
]

SPM_TEXTS = COMMON_TEXTS + [
    "[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi! [/INST]", "<s>not special</s>",
    "<0x41> literal", "▁already▁meta", "   ",
]

SMOLLM_SPECIAL_TEXTS = [
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|>", "text<|endoftext|>more", "<|im_start|> spaced <|im_end|>",
    "a <repo_name>b<file_sep>c", "<|im_start", "|im_end|>", "<|im_start|>system\n\n",
]

BPE_TEXTS = COMMON_TEXTS + SMOLLM_SPECIAL_TEXTS + [
    "don't won't can't shouldn't", "'s 't 're 've 'm 'll 'd", "  \n  \n", "a\n\n\nb",
    "   leading and trailing   ", "\x0b\x0cform feeds", "tab\there",
]

assert len(SPM_TEXTS) >= 40 and len(BPE_TEXTS) >= 50


def _long_text(seed=0, n_chars=6000):
    """Random mixed-script text, so no word cache can make the timing test pass."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFG 0123456789 ,.;!? \n éüß 日本語中文 🦙🙂"
    return "".join(rng.choice(alphabet) for _ in range(n_chars))

# ------------------------------------------------------------------------------------------
# Fixtures


def _read_gguf_metadata(path):
    """GGUF metadata through the project's loader, else the gguf package, else skip."""
    try:
        from llama2c.loaders.gguf import read_gguf
    except ImportError:
        gguf = pytest.importorskip("gguf")
        reader = gguf.GGUFReader(str(path))
        return {key: field.contents() for key, field in reader.fields.items()}
    return read_gguf(path).metadata


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def llama2_bin(shared_dir):
    return Tokenizer.load(_need(shared_dir / "models" / "tokenizer.bin"))


@pytest.fixture(scope="module")
def sp(shared_dir):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(_need(shared_dir / "models" /
                                                           "tokenizer.model")))


@pytest.fixture(scope="module")
def smollm_md(shared_dir):
    return _read_gguf_metadata(_need(shared_dir / "models" /
                                     "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def smollm_gguf(smollm_md):
    return Tokenizer.from_gguf_metadata(smollm_md)


@pytest.fixture(scope="module")
def smollm_hf_dir(shared_dir):
    return _need(shared_dir / "models" / "smollm2-hf-tokenizer")


@pytest.fixture(scope="module")
def smollm_hf(smollm_hf_dir):
    return Tokenizer.load(smollm_hf_dir)


@pytest.fixture(scope="module", params=["gguf", "hf"])
def smollm(request):
    return request.getfixturevalue(f"smollm_{request.param}")


@pytest.fixture(scope="module")
def hf_ref(smollm_hf_dir):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(smollm_hf_dir / "tokenizer.json"))


SMOLLM_DIGITS_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


@pytest.fixture(scope="module")
def hf_digits_ref(smollm_hf_dir, tmp_path_factory):
    """SmolLM2's original Hugging Face pre-tokenizer (Digits, then ByteLevel), which llama.cpp's
    'smollm' reproduces. The shared tokenizer.json, re-saved by transformers from the GGUF,
    lacks the Digits step, so it differs on e.g. "a \n8": whitespace before a digit."""
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("smollm2-digits") / "tokenizer.json"
    path.write_text(json.dumps(_smollm_variant_json(smollm_hf_dir, SMOLLM_DIGITS_PRE, False)),
                    encoding="utf-8")
    return tokenizers.Tokenizer.from_file(str(path))


@pytest.fixture(scope="module", params=["gguf", "hf"])
def smollm_and_ref(request):
    """(our tokenizer, the tokenizers.Tokenizer it must match) for each SmolLM2 source."""
    if request.param == "gguf":
        return request.getfixturevalue("smollm_gguf"), request.getfixturevalue("hf_digits_ref")
    return request.getfixturevalue("smollm_hf"), request.getfixturevalue("hf_ref")


def _spm_gguf_metadata(sp):
    """GGUF 'llama' metadata for Llama 2's vocabulary, as llama.cpp's converter writes it."""
    def token_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        return 6 if sp.is_byte(i) else 1
    n = sp.get_piece_size()
    return {"tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


@pytest.fixture(scope="module")
def llama2_gguf(sp):
    return Tokenizer.from_gguf_metadata(_spm_gguf_metadata(sp))


def _llama2_tokenizer_json(sp):
    """A Llama 2 style tokenizer.json (merges by rank, byte fallback, Prepend/Replace
    normalizer), built from the sentencepiece model as transformers' LlamaConverter does."""
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    merges = []
    for piece, piece_id in vocab.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, sp.get_score(piece_id)) for left, right in local]
    merges.sort(key=lambda m: m[2], reverse=True)
    special = [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True} for i in range(3)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1],
                                                      "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[left, right] for left, right, _ in merges]},
    }


@pytest.fixture(scope="module")
def llama2_json_path(sp, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama2-hf") / "tokenizer.json"
    path.write_text(json.dumps(_llama2_tokenizer_json(sp)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama2_json(llama2_json_path):
    return Tokenizer.load(llama2_json_path)


@pytest.fixture(scope="module")
def llama2_json_ref(llama2_json_path):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(llama2_json_path))


def _ref_ids(ref, text, special=True):
    """tokenizers' ids for text (nothing added): special tokens matched whole (its default)
    or, special=False, encoded as plain text (its encode_special_tokens switch)."""
    old = ref.encode_special_tokens
    ref.encode_special_tokens = not special
    try:
        return ref.encode(text, add_special_tokens=False).ids
    finally:
        ref.encode_special_tokens = old


def _golden(shared_dir, name):
    return json.loads(_need(shared_dir / "golden" / name).read_text(encoding="utf-8"))

# ------------------------------------------------------------------------------------------
# Sentencepiece-style: llama2.c tokenizer.bin, GGUF 'llama', Llama 2 tokenizer.json


def test_llama2_bin_golden(llama2_bin, shared_dir):
    for case in _golden(shared_dir, "llama2_tokenizer.json")["cases"]:
        assert llama2_bin.encode(case["text"], bos=False) == case["ids"], case["text"]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_llama2_bin_matches_sentencepiece(llama2_bin, sp, text):
    ids = sp.encode(text)
    assert llama2_bin.encode(text, bos=False) == ids
    assert llama2_bin.decode(ids) == sp.decode(ids)
    assert llama2_bin.decode([1] + ids + [2]) == sp.decode(ids)


# GGUF parses "<s>" in the text as the BOS control token; sentencepiece does not
@pytest.mark.parametrize("text", [t for t in SPM_TEXTS if "<s>" not in t])
def test_llama2_gguf_metadata_matches_sentencepiece(llama2_gguf, sp, text):
    ids = sp.encode(text)
    assert llama2_gguf.encode(text, bos=False) == ids
    assert llama2_gguf.decode(ids) == sp.decode(ids)


def test_llama2_gguf_parses_control_tokens(llama2_gguf, sp):
    # llama.cpp: special tokens are cut out whole and the text after each gets the prefix
    assert llama2_gguf.encode("<s>Hi</s>", bos=False, special=True) == [1] + sp.encode("Hi") + [2]
    # by default control-token text is plain text, as sentencepiece encodes it
    assert llama2_gguf.encode("<s>Hi</s>", bos=False) == sp.encode("<s>Hi</s>")
    assert llama2_gguf.special_tokens == {"<s>": 1, "</s>": 2}


def test_llama2_long_text_matches_sentencepiece_quickly(llama2_bin, sp):
    text = _long_text()
    start = time.perf_counter()
    ids = llama2_bin.encode(text, bos=False)
    elapsed = time.perf_counter() - start
    assert ids == sp.encode(text)
    assert elapsed < 0.5, f"encoding {len(text)} chars took {elapsed:.2f}s"


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_llama2_tokenizer_json_matches_hf_tokenizers(llama2_json, llama2_json_ref, text):
    expected = _ref_ids(llama2_json_ref, text)
    assert llama2_json.encode(text, bos=False, special=True) == expected
    assert llama2_json.encode(text, bos=False) == _ref_ids(llama2_json_ref, text, special=False)
    assert llama2_json.decode(expected) == llama2_json_ref.decode(expected,
                                                                  skip_special_tokens=True)


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_llama2_metaspace_tokenizer_json_matches_hf_tokenizers(sp, tmp_path, scheme):
    """Newer Llama tokenizer.json files use a Metaspace pre-tokenizer instead of normalizers."""
    tokenizers = pytest.importorskip("tokenizers")
    spec = _llama2_tokenizer_json(sp)
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁",
                             "prepend_scheme": scheme, "split": False}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    ref, tok = tokenizers.Tokenizer.from_file(str(path)), Tokenizer.load(path)
    for text in SPM_TEXTS + ["<s>after special", "a</s> b"]:
        for special in (True, False):
            assert tok.encode(text, bos=False, special=special) == _ref_ids(ref, text, special), text


def test_llama2_tokenizer_json_settings(llama2_json, llama2_bin):
    tok = llama2_json
    assert (tok.kind, tok.add_bos, tok.bos_id, tok.vocab_size) == ("spm", True, 1, 32000)
    assert tok.encode("Hello world") == [1, 15043, 3186]
    text = _long_text(seed=1)
    assert tok.encode(text, bos=False) == llama2_bin.encode(text, bos=False)


def test_llama2_bin_properties(llama2_bin):
    t = llama2_bin
    assert (t.kind, t.vocab_size, t.bos_id, t.eos_id, t.eos_ids) == ("spm", 32000, 1, 2, (2,))
    assert t.add_bos and t.chat_template is None and t.special_tokens == {}
    assert t.token_to_id(" the") == 278 and t.id_to_token(278) == " the"
    assert t.token_to_id("no such token") is None and t.id_to_token(32000) is None
    assert t.encode("Hello world") == [1, 15043, 3186]
    assert t.encode("Hello world", bos=False, eos=True) == [15043, 3186, 2]
    assert t.encode("") == [1] and t.encode("", bos=False) == []
    # llama2.c does not parse special tokens written in the text
    assert t.encode("<s>", bos=False).count(1) == 0


def test_llama2_bin_vocab_size_argument(shared_dir):
    path = _need(shared_dir / "models" / "tokenizer.bin")
    assert Tokenizer.load(path, vocab_size=512).vocab_size == 512
    with pytest.raises(TokenizerError, match="token 32000 of the 32001 requested"):
        Tokenizer.load(path, vocab_size=32001)

# ------------------------------------------------------------------------------------------
# Byte-level BPE: SmolLM2 from GGUF metadata and from tokenizer.json


def test_smollm2_golden(smollm, shared_dir):
    for case in _golden(shared_dir, "smollm2_tokenizer.json")["cases"]:
        assert smollm.encode(case["text"], special=True) == case["ids"], case["text"]


def test_smollm2_public_prompts(smollm, shared_dir):
    for case in _golden(shared_dir, "smollm2_public.json")["cases"]:
        assert smollm.encode(case["prompt"]) == case["ids"]
        assert smollm.decode(case["greedy"]) == case["text"].replace("<|im_end|>", "")


@pytest.mark.parametrize("text", BPE_TEXTS + ["a \n8 b  9", "x\t\t1"])
def test_smollm2_matches_hf_tokenizers(smollm_and_ref, text):
    tok, ref = smollm_and_ref
    expected = _ref_ids(ref, text)
    assert tok.encode(text, special=True) == expected
    assert tok.encode(text) == _ref_ids(ref, text, special=False)
    assert tok.decode(expected) == ref.decode(expected, skip_special_tokens=True)


def test_smollm2_long_text_matches_quickly(smollm_and_ref):
    tok, ref = smollm_and_ref
    text = _long_text(seed=2)
    start = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - start
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert elapsed < 0.5, f"encoding {len(text)} chars took {elapsed:.2f}s"


def test_smollm2_properties(smollm):
    t = smollm
    assert (t.kind, t.vocab_size, t.bos_id, t.eos_id, t.add_bos) == ("bpe", 49152, 1, 2, False)
    assert 2 in t.eos_ids
    assert t.chat_template.startswith("{% for message in messages %}")
    assert t.special_tokens["<|im_start|>"] == 1 and t.special_tokens["<|endoftext|>"] == 0
    assert t.token_to_id("Ġthe") == 260 and t.id_to_token(260) == "Ġthe"
    # SmolLM2 adds no BOS
    assert t.encode("Hi", bos=True, eos=True) == t.encode("Hi", bos=False) + [2]


def test_smollm2_load_gguf_file(shared_dir, smollm_gguf):
    tok = Tokenizer.load(_need(shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert tok.encode("Hello, world!") == smollm_gguf.encode("Hello, world!")


def _smollm_variant_json(smollm_hf_dir, pre_tokenizer, ignore_merges):
    spec = json.loads((smollm_hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = pre_tokenizer
    spec["model"]["ignore_merges"] = ignore_merges
    return spec


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("gguf_pre, hf_pre, ignore_merges", [
    ("smollm", SMOLLM_DIGITS_PRE, False),
    ("llama-bpe", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}, True),
])
def test_pre_tokenizer_variants_match_hf_tokenizers(smollm_md, smollm_hf_dir, tmp_path,
                                                    gguf_pre, hf_pre, ignore_merges):
    """The named GGUF pre-tokenizers and the tokenizer.json builders agree with tokenizers."""
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_smollm_variant_json(smollm_hf_dir, hf_pre, ignore_merges)),
                    encoding="utf-8")
    ref = tokenizers.Tokenizer.from_file(str(path))
    from_json = Tokenizer.load(path)
    from_gguf = Tokenizer.from_gguf_metadata({**smollm_md, "tokenizer.ggml.pre": gguf_pre})
    for text in BPE_TEXTS + ["numbers 1234567 and 12", "Don'T SHOUT'S"]:
        for special in (True, False):
            expected = _ref_ids(ref, text, special)
            assert from_json.encode(text, bos=False, special=special) == expected, text
            assert from_gguf.encode(text, bos=False, special=special) == expected, text


def test_unknown_pre_tokenizer_warns_and_uses_default(smollm_md):
    with pytest.warns(UserWarning, match="'mystery'"):
        tok = Tokenizer.from_gguf_metadata({**smollm_md, "tokenizer.ggml.pre": "mystery"})
    assert tok.encode("Hello, world!") == [19556, 28, 905, 17]

# ------------------------------------------------------------------------------------------
# Decoding and streaming


@pytest.fixture(scope="module", params=["llama2_bin", "llama2_gguf", "smollm_gguf",
                                        "smollm_hf"])
def any_tokenizer(request):
    return request.getfixturevalue(request.param)


STREAM_TEXTS = ["emoji 🦙 llama 🙂🙃 👨‍👩‍👧‍👦", "日本語のテキスト and 中文测试",
                "naïve café", "Once upon a time", "  spaces  ", "\n\n🇫🇷\n"]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_decode_round_trip(any_tokenizer, text):
    assert any_tokenizer.decode(any_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_equals_decode_and_never_splits_characters(any_tokenizer, text):
    ids = any_tokenizer.encode(text, eos=True)
    stream = any_tokenizer.decode_stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == any_tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_invalid_utf8_spm(llama2_bin, sp):
    # 0xF0 0x9F start a 4-byte character that never completes; then a stray continuation
    ids = [3 + 0xF0, 3 + 0x9F, 3186, 3 + 0x80, 3 + 0xE6]
    stream = llama2_bin.decode_stream()
    out = "".join(stream.push(i) for i in ids)
    assert out + stream.flush() == llama2_bin.decode(ids) == sp.decode(ids)


def test_stream_invalid_utf8_bpe(smollm_hf, hf_ref):
    ids = [smollm_hf.token_to_id(c) for c in ("ð", "Ł", "a", "Ģ", "æ")]  # F0 9F 'a' 82 E6
    stream = smollm_hf.decode_stream()
    out = "".join(stream.push(i) for i in ids)
    assert out + stream.flush() == smollm_hf.decode(ids) == hf_ref.decode(ids)
    assert "\ufffd" in out


def test_decode_hides_control_tokens(smollm_hf, llama2_bin):
    assert smollm_hf.decode([1, 520, 9531, 198, 2]) == "assistant\n"
    assert llama2_bin.decode([1, 15043, 2]) == "Hello"
    # the dummy-prefix space is dropped only from the first visible piece
    assert llama2_bin.decode([15043, 3186]) == "Hello world"


def test_decode_rejects_bad_ids(llama2_bin):
    for bad in (-1, 32000, "5", 1.5):
        with pytest.raises(TokenizerError):
            llama2_bin.decode([bad])
        with pytest.raises(TokenizerError):
            llama2_bin.decode_stream().push(bad)

# ------------------------------------------------------------------------------------------
# Malformed input


def _bin_bytes(tokens, max_len=8, scores=None):
    out = struct.pack("<i", max_len)
    for i, tok in enumerate(tokens):
        raw = tok if isinstance(tok, bytes) else tok.encode("utf-8")
        out += struct.pack("<fi", 0.0 if scores is None else scores[i], len(raw)) + raw
    return out


GOOD_BIN = ["<unk>", "\n<s>\n", "\n</s>\n", " ", "a", "b", " a", "ab"]


def _load_bin(tmp_path, data, **kw):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(data)
    return Tokenizer.load(path, **kw)


def test_small_bin_loads_and_merges(tmp_path):
    tok = _load_bin(tmp_path, _bin_bytes(GOOD_BIN, scores=[0, 0, 0, -5, -3, -3, -1, -2]))
    assert tok.encode("ab a", bos=False) == [6, 5, 6]   # " a" + "b" + " a"
    assert tok.decode([1, 6, 5, 6]) == "ab a"


@pytest.mark.parametrize("data, message", [
    (b"", "max_token_length: expected 4 bytes"),
    (struct.pack("<i", -3), "max_token_length: expected 1"),
    (_bin_bytes(GOOD_BIN)[:-1], "file truncated"),
    (_bin_bytes(GOOD_BIN) + b"\x00\x00", "file truncated"),
    (_bin_bytes(GOOD_BIN[:3]) + struct.pack("<fi", 0.0, -1), "length: expected 0..max"),
    (_bin_bytes(GOOD_BIN[:3]) + struct.pack("<fi", 0.0, 2**31 - 1), "length: expected 0..max"),
    (_bin_bytes(GOOD_BIN[:3] + [b"\xff\xfe"]), "expected UTF-8"),
    (_bin_bytes(GOOD_BIN[:2]), "expected at least 3"),
])
def test_bad_tokenizer_bin(tmp_path, data, message):
    with pytest.raises(TokenizerError, match=message):
        _load_bin(tmp_path, data)


def test_tokenizer_bin_shorter_than_vocab_size(tmp_path):
    with pytest.raises(TokenizerError, match="token 8 of the 9 requested"):
        _load_bin(tmp_path, _bin_bytes(GOOD_BIN), vocab_size=9)
    with pytest.raises(TokenizerError, match="vocab_size"):
        _load_bin(tmp_path, _bin_bytes(GOOD_BIN), vocab_size=-1)


def _minimal_json():
    return {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}


def test_minimal_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_minimal_json()))
    tok = Tokenizer.load(path)
    assert tok.encode("abab") == [2, 2] and tok.bos_id is None and not tok.add_bos


def _edit(spec, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        spec = spec[key]
    if value is _DELETE:
        del spec[last]
    else:
        spec[last] = value
    return spec


_DELETE = object()


@pytest.mark.parametrize("dotted, value, message", [
    ("model", _DELETE, "missing field 'model'"),
    ("model.vocab", _DELETE, "missing field 'vocab'"),
    ("model.vocab", ["a"], "model.vocab: expected dict"),
    ("model.vocab.a", "zero", "expected an int"),
    ("model.vocab.a", -4, "expected an int"),
    ("model.type", "WordPiece", "model.type: expected 'BPE'"),
    ("model.merges", ["a b c"], r"model.merges\[0\]"),
    ("model.merges", [["a", 1]], r"model.merges\[0\]"),
    ("pre_tokenizer.type", "Whitespace", "pre_tokenizer.type"),
    ("pre_tokenizer", {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated"},
     "does not compile"),
    ("normalizer", {"type": "Mystery"}, "normalizer.type"),
    ("added_tokens", [{"id": 5}], r"added_tokens\[0\]: missing field 'content'"),
])
def test_bad_tokenizer_json(tmp_path, dotted, value, message):
    spec = _minimal_json()
    _edit(spec, dotted, value)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.load(path)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{}", b"[1, 2]"])
def test_unparsable_tokenizer_json(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(path)


def test_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def _gguf_md():
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "gpt2"}


def test_minimal_gguf_metadata():
    tok = Tokenizer.from_gguf_metadata(_gguf_md())
    assert tok.encode("abba") == [2, 1, 0] and tok.kind == "bpe"


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer.ggml.model", _DELETE, "missing key 'tokenizer.ggml.model'"),
    ("tokenizer.ggml.model", "bert", "expected 'llama' or 'gpt2'"),
    ("tokenizer.ggml.tokens", _DELETE, "missing key 'tokenizer.ggml.tokens'"),
    ("tokenizer.ggml.tokens", "abc", "expected a list"),
    ("tokenizer.ggml.tokens", ["a", 2, "ab"], r"tokens\[1\]: expected str"),
    ("tokenizer.ggml.merges", _DELETE, "missing key 'tokenizer.ggml.merges'"),
    ("tokenizer.ggml.merges", ["ab"], r"merges\[0\]"),
    ("tokenizer.ggml.token_type", [1, 1], "expected 3 entries"),
    ("tokenizer.ggml.bos_token_id", 7, r"expected an id in \[0, 3\)"),
    ("tokenizer.ggml.eos_token_id", "2", "expected Integral"),
    ("tokenizer.ggml.add_bos_token", 1, "expected bool"),
])
def test_bad_gguf_metadata(key, value, message):
    md = _gguf_md()
    if value is _DELETE:
        del md[key]
    else:
        md[key] = value
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gguf_metadata(md)


def test_gguf_llama_needs_matching_scores():
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
          "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(TokenizerError, match="scores: expected 2 entries"):
        Tokenizer.from_gguf_metadata(md)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del md["tokenizer.ggml.scores"]
        with pytest.raises(TokenizerError, match="missing key 'tokenizer.ggml.scores'"):
            Tokenizer.from_gguf_metadata(md)

# ------------------------------------------------------------------------------------------
# special tokens: plain text by default, matched only where asked


def test_control_token_text_is_plain_by_default(smollm):
    for text in ("<|im_end|>", "a<|im_start|>system\nb", "<|endoftext|>"):
        ids = smollm.encode(text)
        assert not set(ids) & set(smollm.special_tokens.values()), text
        assert smollm.decode(ids) == text
    assert smollm.encode("<|im_end|>", special=True) == [2]


def test_encode_chunks(smollm, llama2_bin):
    ids = smollm.encode_chunks([("<|im_start|>user\n", True), ("<|im_end|>hi", False),
                                ("<|im_end|>", True)])
    plain = smollm.encode("<|im_end|>hi")
    assert ids == [1] + smollm.encode("user\n") + plain + [2]
    # plain text runs across chunk boundaries are encoded as one text
    assert smollm.encode_chunks([("Hel", False), ("lo wor", True), ("ld", False)]) == \
        smollm.encode("Hello world")
    assert llama2_bin.encode_chunks([("Hello", False), (" world", False)], bos=True) == \
        llama2_bin.encode("Hello world")
    # an extra table of specials: llama2.c's tokenizer.bin does not parse <s> by itself
    ids = llama2_bin.encode_chunks([("<s>[INST]", True), (" <s>", False)], specials={"<s>": 1})
    assert ids[0] == 1 and ids.count(1) == 1
    with pytest.raises(TypeError):
        smollm.encode_chunks([(b"x", True)])


def test_decode_stream_continuation_keeps_the_space(llama2_bin):
    ids = llama2_bin.encode("Once upon a time", bos=False)
    first = llama2_bin.decode_stream()
    assert "".join(first.push(t) for t in ids) == "Once upon a time"
    cont = llama2_bin.decode_stream(continuation=True)
    assert "".join(cont.push(t) for t in ids) == " Once upon a time"
    assert llama2_bin.token_bytes(ids[1]) == b" upon" and llama2_bin.token_bytes(1) == b""


def test_token_index_answers_as_the_dict_it_replaces():
    """TokenIndex (the tokenizers' token -> id lookup, llama2c/_engine) gives what
    {t: i for i, t in enumerate(tokens) if t is not None and mask[i]} gives: the last id of a
    repeated string, None/default/KeyError/False for strings it lacks and for non-strings, the
    same distinct strings and ids; and it survives pickling."""
    import pickle
    from llama2c._engine import TokenIndex
    rng = random.Random(7)
    alphabet = ["a", "b", "\u0120", "\u2581", "\u00e9", "\U0001f600", "<", ">"]
    tokens = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    for i in rng.sample(range(3000), 40):
        tokens[i] = None
    for mask in (None, [rng.random() < 0.8 for _ in tokens]):
        index = TokenIndex(tokens, mask)
        want = {t: i for i, t in enumerate(tokens) if t is not None and (mask is None or mask[i])}
        assert len(index) == len(want) and len(want) < 3000 - 40    # repeats were folded
        assert sorted(index.items()) == sorted(want.items())
        assert sorted(index.values()) == sorted(want.values()) and set(index) == set(want)
        for t in set(tokens) - {None}:
            assert index.get(t) == want.get(t) and (t in index) == (t in want)
            assert index[t] == want[t] if t in want else index.get(t, -1) == -1
        for absent in ("zz", "", 3, None, b"a"):
            assert index.get(absent) is None and absent not in index
        with pytest.raises(KeyError):
            index["zz"]
        again = pickle.loads(pickle.dumps(index))
        assert sorted(again.items()) == sorted(want.items())
    with pytest.raises(TypeError):
        TokenIndex(["a", 3])
    with pytest.raises(ValueError):
        TokenIndex(["a", "b"], [True])
