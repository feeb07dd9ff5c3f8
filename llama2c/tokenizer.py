"""Tokenizers for Llama-architecture models: text <-> token ids, in pure Python.

Two kinds, chosen by the vocabulary:

* 'spm' (sentencepiece style): llama2.c's tokenizer.bin, GGUF `tokenizer.ggml.model =
  llama`, and Hugging Face tokenizer.json files with Llama 2's '▁' handling. A dummy-prefix
  space is added, the text is split into characters (unknown ones fall back to `<0xXX>`
  byte tokens) and pairs are merged by piece score (or merge rank for tokenizer.json), as
  llama2.c's run.c `encode` and sentencepiece do.
* 'bpe' (GPT-2 byte-level): GGUF `tokenizer.ggml.model = gpt2` and tokenizer.json files with
  a ByteLevel pre-tokenizer. The text is cut by a regex, its UTF-8 bytes are mapped to
  GPT-2's printable alphabet and merged by rank.

Special tokens written in the text (`<|im_start|>`, ...) are ordinary text by default;
encode(text, special=True) matches them whole first (except for llama2.c's tokenizer.bin,
which, like llama2.c, never parses them), and encode_chunks mixes both (chat templates).

    >>> tok = Tokenizer.load("tokenizer.bin")
    >>> tok.decode(tok.encode("Hello world"))
    'Hello world'
"""
from __future__ import annotations

import codecs
import json
import numbers
import struct
from array import array
from pathlib import Path

import regex

from ._engine import TokenIndex
from .bpe import WordEncoder, merge_rank_cost, score_cost
from .errors import TokenizerError
from .pretokenize import (BYTE_DECODER, LLAMA3_FAMILY, gguf_pre_tokenizer, hf_normalizer,
                          hf_pre_tokenizer, hf_spec_has_type, json_field,
                          special_token_splitter)

SPM_SPACE = "▁"                      # sentencepiece's visible space, U+2581
_BYTE_TOKEN = regex.compile(r"<0x([0-9A-Fa-f]{2})>")
_GGUF_MAGIC = b"GGUF"
_MAX_TOKEN_LENGTH = 1 << 16          # sanity bound on tokenizer.bin's max_token_length

# GGUF tokenizer.ggml.token_type values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = \
    1, 2, 3, 4, 5, 6

# llama2.c's fixed ids in tokenizer.bin
LLAMA2C_UNK_ID, LLAMA2C_BOS_ID, LLAMA2C_EOS_ID = 0, 1, 2


def _replace_each_byte(exc: UnicodeDecodeError):
    """Decode error handler: one U+FFFD per invalid byte, as sentencepiece decodes."""
    return "\ufffd" * (exc.end - exc.start), exc.end


codecs.register_error("llama2c.replace_each_byte", _replace_each_byte)


class Tokenizer:
    """Encode text to token ids and decode ids back to text.

    Build one with `Tokenizer.load(path)` or `Tokenizer.from_gguf_metadata(md)`; the
    constructor is internal (it takes the already-validated parts of a vocabulary).
    """

    def __init__(self, *, tokens, kind, word_encoder, pre_tokenizer, specials=None,
                 hidden_ids=(), literal_ids=(), bos_id=None, eos_id=None, eos_ids=(),
                 add_bos=False, chat_template=None, space_symbol=SPM_SPACE,
                 strip_leading_space=False, token_ids=None):
        self._tokens = tokens                  # id -> token string (None for an unused id)
        # token string -> id (the last id of a repeated string); token_ids: that dict when the
        # caller has it already (the BPE encoder's vocabulary), so that it is not built twice
        self._token_ids = token_ids if token_ids is not None else _ids_of(tokens)
        self._kind = kind
        self._words = word_encoder             # one pre-tokenized word -> ids
        # (fragment, at_start, after_special) -> words, for text free of special tokens
        self._pre_tokenize = pre_tokenizer
        self._specials = dict(specials or {})  # token text -> id, matched whole in text
        self._split_specials = special_token_splitter(self._specials)
        self._hidden = frozenset(hidden_ids)   # control tokens: decode to nothing
        self._literal = frozenset(literal_ids)  # user-defined tokens: decode to their text
        self._bos_id, self._eos_id = bos_id, eos_id
        self._eos_ids = tuple(sorted(set(eos_ids) | ({eos_id} if eos_id is not None else set())))
        self._add_bos = bool(add_bos)
        self._chat_template = chat_template
        self._space_symbol = space_symbol
        self._strip_leading_space = strip_leading_space
        self._utf8_errors = "llama2c.replace_each_byte" if kind == "spm" else "replace"
        self._piece_bytes = {}                 # id -> bytes, filled as tokens are decoded

    # --------------------------------------------------------------------------------------
    # construction

    @classmethod
    def load(cls, path, vocab_size=None) -> "Tokenizer":
        """Load a llama2.c tokenizer.bin, a tokenizer.json, or a directory holding one.

        For tokenizer.bin, vocab_size (the model's) says how many tokens to read; None reads
        to the end of the file. For tokenizer.json, tokenizer_config.json, config.json,
        generation_config.json and chat_template.jinja next to it supply BOS/EOS settings and
        the chat template. A .gguf file is read with llama2c.loaders.gguf.
        """
        path = Path(path)
        if vocab_size is not None and (not isinstance(vocab_size, numbers.Integral)
                                       or isinstance(vocab_size, bool) or vocab_size <= 0):
            raise TokenizerError(f"{path}: vocab_size: expected a positive int, "
                                 f"got {vocab_size!r}")
        if path.is_dir():
            json_path = path / "tokenizer.json"
            if not json_path.is_file():
                raise TokenizerError(f"{path}: expected a directory holding tokenizer.json, "
                                     f"found none")
            tok = _from_hf_json(json_path)
        else:
            try:
                with open(path, "rb") as f:
                    head = f.read(64)
            except OSError as exc:
                raise TokenizerError(f"{path}: cannot open tokenizer file "
                                     f"({exc.strerror or exc})") from None
            if head[:4] == _GGUF_MAGIC:
                tok = _from_gguf_file(path)
            elif path.suffix == ".json" or head.lstrip()[:1] == b"{":
                tok = _from_hf_json(path)
            else:
                return _from_llama2c_bin(path, vocab_size)
        if vocab_size is not None and tok.vocab_size > vocab_size:
            raise TokenizerError(f"{path}: vocabulary size: expected at most the model's "
                                 f"{vocab_size} tokens, got {tok.vocab_size}")
        return tok

    @classmethod
    def from_gguf_metadata(cls, md: dict, source: str = "GGUF metadata") -> "Tokenizer":
        """Build the tokenizer described by a GGUF file's `tokenizer.*` key/value metadata."""
        return _from_gguf(md, source)

    # --------------------------------------------------------------------------------------
    # properties

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def kind(self) -> str:
        """'spm' (sentencepiece-style) or 'bpe' (GPT-2 byte-level)."""
        return self._kind

    @property
    def bos_id(self):
        return self._bos_id

    @property
    def eos_id(self):
        return self._eos_id

    @property
    def eos_ids(self) -> tuple:
        """Ids that end generation: eos_id plus the model's other end-of-turn ids."""
        return self._eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether encode(bos=True) prepends bos_id (the model's own setting)."""
        return self._add_bos

    @property
    def chat_template(self):
        return self._chat_template

    @property
    def special_tokens(self) -> dict:
        """Token text -> id for the tokens encode() matches whole in the text."""
        return dict(self._specials)

    def token_to_id(self, token: str):
        """The id of a token string as the vocabulary stores it, or None."""
        return self._token_ids.get(token)

    def id_to_token(self, token_id: int):
        """The vocabulary's string for an id, or None if the id is out of range."""
        if isinstance(token_id, numbers.Integral) and 0 <= token_id < len(self._tokens):
            return self._tokens[token_id]
        return None

    # --------------------------------------------------------------------------------------
    # encoding

    def encode(self, text: str, bos: bool = True, eos: bool = False,
               special: bool = False) -> list:
        """Token ids for text; bos/eos add BOS (if this model adds one) and EOS.

        special=False (the default, as llama-cpp-python's tokenize): control-token text in
        `text` ("<|im_end|>", "<s>", ...) is ordinary text, encoded piece by piece, so user
        text can never produce a control token. special=True matches those strings whole as
        their tokens (Hugging Face's default; use it only for text you wrote yourself).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        return self.encode_chunks([(text, bool(special))], bos=bos, eos=eos)

    def encode_chunks(self, chunks, bos: bool = False, eos: bool = False,
                      specials: dict | None = None) -> list:
        """Token ids of the concatenation of chunks, a list of (text, parse_special) pairs.

        Control-token text is matched only inside chunks whose flag is True (a token must lie
        within one such chunk); everywhere else it is ordinary text. The text between matched
        tokens is encoded as one piece across chunk boundaries, so a rendered chat template
        tokenizes exactly as if it were one string, except that message contents cannot
        contain control tokens. specials: the token text -> id table to match (default: this
        tokenizer's special_tokens).
        """
        split = self._split_specials if specials is None else special_token_splitter(specials)
        fragments = []          # (text, special id or None), plain runs merged
        for text, parse in chunks:
            if not isinstance(text, str):
                raise TypeError(f"encode_chunks() expects (str, bool) pairs, got "
                                f"{type(text).__name__}")
            for fragment, special_id in (split(text) if parse else [(text, None)]):
                if special_id is None and fragments and fragments[-1][1] is None:
                    fragments[-1] = (fragments[-1][0] + fragment, None)
                else:
                    fragments.append((fragment, special_id))
        ids = []
        if bos and self._add_bos and self._bos_id is not None:
            ids.append(self._bos_id)
        at_start, after_special = True, False
        for fragment, special_id in fragments:
            if special_id is not None:
                ids.append(special_id)
                after_special = True
            elif fragment:
                for word in self._pre_tokenize(fragment, at_start, after_special):
                    ids += self._words.encode(word)
                after_special = False
            at_start = False
        if eos and self._eos_id is not None:
            ids.append(self._eos_id)
        return ids

    # --------------------------------------------------------------------------------------
    # decoding

    def decode(self, ids) -> str:
        """Text for ids; control tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        chunks, first = [], True
        for token_id in ids:
            chunks.append(self._render(token_id, first))
            first = first and self._check_id(token_id) in self._hidden
        return b"".join(chunks).decode("utf-8", self._utf8_errors)

    def decode_stream(self, continuation: bool = False) -> "StreamDecoder":
        """A decoder fed one id at a time, returning text as complete characters arrive.
        continuation=True: the ids continue earlier text (a prompt), so the first piece keeps
        its leading space (sentencepiece drops it only at the start of a text)."""
        return StreamDecoder(self, continuation)

    def token_bytes(self, token_id) -> bytes:
        """The bytes token_id contributes to decoded text (b"" for control tokens)."""
        return self._token_bytes(self._check_id(token_id))

    def _check_id(self, token_id) -> int:
        if not isinstance(token_id, numbers.Integral) or not 0 <= token_id < len(self._tokens):
            raise TokenizerError(f"token id: expected an int in [0, {len(self._tokens)}), "
                                 f"got {token_id!r}")
        return int(token_id)

    def _render(self, token_id, first: bool) -> bytes:
        """The bytes token_id contributes; `first` = no visible token came before it."""
        token_id = self._check_id(token_id)
        data = self._token_bytes(token_id)
        # sentencepiece drops the dummy-prefix space of the first piece it decodes
        if (first and self._strip_leading_space and data[:1] == b" "
                and self._tokens[token_id].startswith(self._space_symbol)):
            return data[1:]
        return data

    def _token_bytes(self, token_id: int) -> bytes:
        data = self._piece_bytes.get(token_id)
        if data is None:
            data = self._compute_token_bytes(token_id)
            self._piece_bytes[token_id] = data
        return data

    def _compute_token_bytes(self, token_id: int) -> bytes:
        text = self._tokens[token_id]
        if text is None or token_id in self._hidden:
            return b""
        if token_id in self._literal:
            return text.encode("utf-8", "surrogateescape")
        if self._kind == "bpe":
            # chars outside the byte alphabet can only come from a hand-made vocabulary
            return b"".join(bytes([BYTE_DECODER[c]]) if c in BYTE_DECODER else c.encode("utf-8", "surrogateescape")
                            for c in text)
        m = _BYTE_TOKEN.fullmatch(text)
        if m:
            return bytes([int(m.group(1), 16)])
        # GGUF strings keep invalid UTF-8 (partial characters) as surrogate escapes
        return text.replace(self._space_symbol, " ").encode("utf-8", "surrogateescape")


class StreamDecoder:
    """Incremental decode: push(id) returns the text completed by that token.

    Bytes of a multi-byte character split across tokens are held until it is complete, so
    the pushes' outputs plus flush() always equal Tokenizer.decode of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer, continuation: bool = False):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=tokenizer._utf8_errors)
        self._first = not continuation

    def push(self, token_id) -> str:
        data = self._tokenizer._render(token_id, self._first)
        self._first = self._first and int(token_id) in self._tokenizer._hidden
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Text for any held incomplete bytes (as U+FFFD); the stream can then go on."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

def _ids_of(tokens) -> TokenIndex:
    """token string -> id (the last id of a repeated string), as the dict
    {t: i for i, t in enumerate(tokens) if t is not None} answers, in a fraction of its memory."""
    return TokenIndex(tokens if type(tokens) is list else list(tokens))

# ------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin


def _from_llama2c_bin(path: Path, vocab_size) -> Tokenizer:
    """Read llama2.c's format: int32 max_token_length, then per token float32 score,
    int32 length and that many UTF-8 bytes. BOS = 1 and EOS = 2 by llama2.c convention."""
    data = path.read_bytes()
    if len(data) < 4:
        raise TokenizerError(f"{path}: max_token_length: expected 4 bytes, "
                             f"got a {len(data)}-byte file")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= _MAX_TOKEN_LENGTH:
        raise TokenizerError(f"{path}: max_token_length: expected 1..{_MAX_TOKEN_LENGTH}, "
                             f"got {max_len}")
    tokens, scores, off = [], [], 4
    while (off < len(data)) if vocab_size is None else (len(tokens) < vocab_size):
        text, raw = _read_bin_token(data, off, len(tokens), max_len, path, vocab_size)
        tokens.append(text)
        scores.append(struct.unpack_from("<f", data, off)[0])
        off += 8 + len(raw)
    if len(tokens) < 3:
        raise TokenizerError(f"{path}: number of tokens: expected at least 3 (unk, bos, eos), "
                             f"got {len(tokens)}")
    byte_ids = _byte_token_ids(tokens, unk_id=LLAMA2C_UNK_ID)
    # Merges may only produce normal pieces (sentencepiece never merges into unk, BOS, EOS
    # or byte tokens); llama2.c stores real spaces where sentencepiece has '▁'.
    excluded = {LLAMA2C_UNK_ID, LLAMA2C_BOS_ID, LLAMA2C_EOS_ID} | {i for i in byte_ids if i}
    pieces = TokenIndex(tokens, [i not in excluded for i in range(len(tokens))])

    def pre_tokenize(fragment, at_start, after_special):
        # sentencepiece's dummy prefix (also after a BOS/EOS a chat template wrote, as
        # Hugging Face's legacy Llama tokenizer and llama.cpp add it); a '▁' typed in the
        # text is a space to sentencepiece (llama2.c would byte-encode it)
        fragment = fragment.replace(SPM_SPACE, " ")
        return [" " + fragment if at_start or after_special else fragment]

    return Tokenizer(tokens=tokens, kind="spm",
                     word_encoder=WordEncoder(pieces, score_cost(pieces, array("d", scores)),
                                              byte_ids=byte_ids, unk_id=LLAMA2C_UNK_ID),
                     pre_tokenizer=pre_tokenize, hidden_ids=(LLAMA2C_BOS_ID, LLAMA2C_EOS_ID),
                     bos_id=LLAMA2C_BOS_ID, eos_id=LLAMA2C_EOS_ID, add_bos=True,
                     space_symbol=" ", strip_leading_space=True)


def _read_bin_token(data: bytes, off: int, index: int, max_len: int, path, vocab_size):
    """Validate and read token `index` at `off`: returns (text, raw bytes)."""
    wanted = "" if vocab_size is None else f" of the {vocab_size} requested"
    if off + 8 > len(data):
        raise TokenizerError(f"{path}: token {index}{wanted}: expected 8 bytes of score and "
                             f"length at offset {off}, got {len(data) - off} (file truncated)")
    (length,) = struct.unpack_from("<i", data, off + 4)
    if not 0 <= length <= max_len:
        raise TokenizerError(f"{path}: token {index} length: expected 0..max_token_length="
                             f"{max_len}, got {length}")
    raw = data[off + 8:off + 8 + length]
    if len(raw) < length:
        raise TokenizerError(f"{path}: token {index}{wanted}: expected {length} bytes of text "
                             f"at offset {off + 8}, got {len(raw)} (file truncated)")
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: token {index} text: expected UTF-8, got {raw!r} "
                             f"({exc.reason})") from None


def _byte_token_ids(tokens: list, unk_id=None) -> list:
    """byte value -> id of its "<0xXX>" token (unk_id where the vocabulary has none)."""
    ids = {}
    for i, t in enumerate(tokens):
        m = _BYTE_TOKEN.fullmatch(t) if t else None
        if m:
            ids.setdefault(int(m.group(1), 16), i)
    return [ids.get(b, unk_id) for b in range(256)]

# ------------------------------------------------------------------------------------------
# GGUF metadata


def _md_value(md: dict, key: str, types, source: str, default=None, required=False):
    if key not in md or md[key] is None:
        if required:
            raise TokenizerError(f"{source}: missing key {key!r}")
        return default
    value = md[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = "/".join(t.__name__ for t in types)
        raise TokenizerError(f"{source}: {key}: expected {names}, got {type(value).__name__}")
    return value


def _md_list(md: dict, key: str, item_types, source: str, length=None, required=False):
    value = md.get(key)
    if value is None:
        if required:
            raise TokenizerError(f"{source}: missing key {key!r}")
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise TokenizerError(f"{source}: {key}: expected a list, got {type(value).__name__}")
    items = list(value)
    if length is not None and len(items) != length:
        raise TokenizerError(f"{source}: {key}: expected {length} entries (one per token), "
                             f"got {len(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, item_types):
            names = "/".join(t.__name__ for t in item_types)
            raise TokenizerError(f"{source}: {key}[{i}]: expected {names}, "
                                 f"got {type(item).__name__}")
    return items


def _md_token_id(md: dict, key: str, n_tokens: int, source: str):
    token_id = _md_value(md, key, (numbers.Integral,), source)
    if token_id is not None and not 0 <= token_id < n_tokens:
        raise TokenizerError(f"{source}: {key}: expected an id in [0, {n_tokens}), "
                             f"got {token_id}")
    return None if token_id is None else int(token_id)


def _from_gguf(md: dict, source: str) -> Tokenizer:
    if not isinstance(md, dict):
        raise TokenizerError(f"{source}: expected a dict of metadata, got {type(md).__name__}")
    model = _md_value(md, "tokenizer.ggml.model", (str,), source, required=True)
    tokens = _md_list(md, "tokenizer.ggml.tokens", (str,), source, required=True)
    n = len(tokens)
    types = _md_list(md, "tokenizer.ggml.token_type", (numbers.Integral,), source, length=n)
    ids = {k: _md_token_id(md, f"tokenizer.ggml.{k}_token_id", n, source)
           for k in ("bos", "eos", "unknown", "eot")}
    if types is None:   # no types: only BOS/EOS are known to be control tokens
        types = [TOKEN_NORMAL] * n
        for k in ("bos", "eos"):
            if ids[k] is not None:
                types[ids[k]] = TOKEN_CONTROL
    common = dict(
        tokens=tokens,
        specials={t: i for i, t in enumerate(tokens)
                  if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)},
        hidden_ids=[i for i, ty in enumerate(types) if ty in (TOKEN_CONTROL, TOKEN_UNUSED)],
        literal_ids=[i for i, ty in enumerate(types) if ty == TOKEN_USER_DEFINED],
        bos_id=ids["bos"], eos_id=ids["eos"],
        eos_ids=[i for i in (ids["eos"], ids["eot"]) if i is not None],
        chat_template=_md_value(md, "tokenizer.chat_template", (str,), source))
    if model == "llama":
        return _gguf_spm(md, types, ids["unknown"], common, source)
    if model == "gpt2":
        return _gguf_bpe(md, ids["unknown"], common, source)
    raise TokenizerError(f"{source}: tokenizer.ggml.model: expected 'llama' or 'gpt2', "
                         f"got {model!r}")


def _gguf_spm(md, types, unk_id, common, source) -> Tokenizer:
    """GGUF 'llama': sentencepiece merges by score, '▁' for spaces (llama.cpp's SPM path)."""
    tokens = common["tokens"]
    scores = _md_list(md, "tokenizer.ggml.scores", (numbers.Real,), source,
                      length=len(tokens), required=True)
    pieces = TokenIndex(tokens, [t not in (TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_BYTE) for t in types])
    add_prefix = _md_value(md, "tokenizer.ggml.add_space_prefix", (bool,), source, True)

    def pre_tokenize(fragment, at_start, after_special):
        # llama.cpp adds the dummy prefix at the start and after every special token
        prefix = SPM_SPACE if add_prefix and (at_start or after_special) else ""
        return [prefix + fragment.replace(" ", SPM_SPACE)]

    return Tokenizer(kind="spm", word_encoder=WordEncoder(
        pieces, score_cost(pieces, array("d", scores)),
        byte_ids=_byte_token_ids(tokens, unk_id), unk_id=unk_id),
        pre_tokenizer=pre_tokenize, strip_leading_space=add_prefix,
        add_bos=_md_value(md, "tokenizer.ggml.add_bos_token", (bool,), source, True), **common)


def _gguf_bpe(md, unk_id, common, source) -> Tokenizer:
    """GGUF 'gpt2': byte-level BPE, merges by rank, regex chosen by tokenizer.ggml.pre."""
    tokens = common["tokens"]
    merges = _md_list(md, "tokenizer.ggml.merges", (str,), source, required=True)
    pre_name = _md_value(md, "tokenizer.ggml.pre", (str,), source)
    pre = gguf_pre_tokenizer(pre_name)
    llama3 = pre_name in LLAMA3_FAMILY
    pieces = _ids_of(tokens)                          # = the Tokenizer's token -> id
    cost = merge_rank_cost(_merge_pairs(merges, "tokenizer.ggml.merges", source), pieces)
    return Tokenizer(kind="bpe", word_encoder=WordEncoder(pieces, cost,
                                                          unk_id=unk_id, ignore_merges=llama3),
                     pre_tokenizer=lambda fragment, at_start, after: pre(fragment, at_start),
                     add_bos=_md_value(md, "tokenizer.ggml.add_bos_token", (bool,), source,
                                       llama3),
                     token_ids=pieces, **common)


def _merge_pairs(merges, field: str, source: str):
    """(left, right) per merge rule, in rank order, from "left right" strings or [left, right]
    pairs (checked)."""
    for rank, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(p, str) for p in pair)):
            raise TokenizerError(f"{source}: {field}[{rank}]: expected 'left right' or "
                                 f"[left, right], got {merge!r}")
        yield pair[0], pair[1]


def _from_gguf_file(path: Path) -> Tokenizer:
    try:
        from .loaders.gguf import read_gguf
    except ImportError as exc:
        raise TokenizerError(f"{path}: reading a GGUF file needs llama2c.loaders.gguf "
                             f"({exc})") from None
    return _from_gguf(read_gguf(path).metadata, str(path))

# ------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


def _read_json(path: Path, required: bool):
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path}: file not found")
        return None
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: expected UTF-8 JSON, got invalid UTF-8 at byte "
                             f"{exc.start}") from None
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: expected JSON, got a syntax error at line {exc.lineno} "
                             f"column {exc.colno}: {exc.msg}") from None


def _hf_vocab(spec: dict, source: Path):
    """tokens list (None for ids nobody uses), model vocab dict and added-token entries."""
    model = json_field(spec, "model", (dict,), source, "tokenizer.json")
    kind = json_field(model, "type", (str,), source, "model", default="BPE", required=False)
    if kind != "BPE":
        raise TokenizerError(f"{source}: model.type: expected 'BPE', got {kind!r}")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(f"{source}: model.{key}: expected empty, got {model[key]!r}")
    vocab = json_field(model, "vocab", (dict,), source, "model")
    added = json_field(spec, "added_tokens", (list,), source, "tokenizer.json", [], False)
    entries = list(vocab.items())
    for i, tok in enumerate(added):
        entries.append((json_field(tok, "content", (str,), source, f"added_tokens[{i}]"),
                        json_field(tok, "id", (int,), source, f"added_tokens[{i}]")))
    for text, token_id in entries:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise TokenizerError(f"{source}: id of token {text!r}: expected an int >= 0, "
                                 f"got {token_id!r}")
    n = 1 + max((i for _, i in entries), default=-1)
    if n > 10 * (len(entries) + 1000):
        raise TokenizerError(f"{source}: token ids: expected them near 0..{len(entries)}, "
                             f"got {n - 1}")
    tokens = [None] * n
    for text, token_id in entries:   # added tokens come last and win a shared id
        tokens[token_id] = text
    return tokens, model, vocab, added


def _from_hf_json(path: Path) -> Tokenizer:
    spec = _read_json(path, required=True)
    if not isinstance(spec, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(spec).__name__}")
    tokens, model, vocab, added = _hf_vocab(spec, path)
    merges = _merge_pairs(json_field(model, "merges", (list,), path, "model", [], False),
                          "model.merges", path)
    unk_name = json_field(model, "unk_token", (str,), path, "model", None, False)
    unk_id = vocab.get(unk_name) if unk_name is not None else None
    byte_fallback = bool(model.get("byte_fallback", False))
    words = WordEncoder(vocab, merge_rank_cost(merges, vocab),
                        byte_ids=_byte_token_ids(tokens, unk_id) if byte_fallback else None,
                        unk_id=unk_id, fuse_unk=bool(model.get("fuse_unk", False)),
                        ignore_merges=bool(model.get("ignore_merges", False)))
    normalize = hf_normalizer(spec.get("normalizer"), str(path))
    pre = hf_pre_tokenizer(spec.get("pre_tokenizer"), str(path))
    byte_level = (hf_spec_has_type(spec.get("pre_tokenizer"), "ByteLevel")
                  or hf_spec_has_type(spec.get("decoder"), "ByteLevel"))
    specials = {t["content"]: t["id"] for t in added}
    settings = _hf_settings(path.parent, spec, tokens, path)
    return Tokenizer(
        tokens=tokens, kind="bpe" if byte_level else "spm", word_encoder=words,
        pre_tokenizer=lambda fragment, at_start, after: pre(normalize(fragment), at_start),
        specials=specials, hidden_ids=[t["id"] for t in added if t.get("special")],
        literal_ids=[t["id"] for t in added if not t.get("special")],
        strip_leading_space=not byte_level and _hf_adds_prefix(spec), **settings)


def _hf_adds_prefix(spec: dict) -> bool:
    """Whether a sentencepiece-style tokenizer.json prepends '▁' (so decode strips it)."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if hf_spec_has_type(normalizer, "Prepend"):
        return True
    return hf_spec_has_type(pre, "Metaspace") and _metaspace_scheme(pre) != "never"


def _metaspace_scheme(spec) -> str:
    if isinstance(spec, dict) and spec.get("type") == "Metaspace":
        default = "always" if spec.get("add_prefix_space", True) else "never"
        return spec.get("prepend_scheme", default)
    for s in (spec or {}).get("pretokenizers") or []:
        if hf_spec_has_type(s, "Metaspace"):
            return _metaspace_scheme(s)
    return "never"


def _hf_settings(folder: Path, spec: dict, tokens: list, source: Path) -> dict:
    """BOS/EOS ids, add_bos and chat template from the files next to tokenizer.json."""
    tok_config = _read_json(folder / "tokenizer_config.json", required=False) or {}
    model_config = _read_json(folder / "config.json", required=False) or {}
    gen_config = _read_json(folder / "generation_config.json", required=False) or {}
    token_ids = {t: i for i, t in enumerate(tokens) if t is not None}
    template_bos = _template_bos(spec.get("post_processor"))

    def named_id(key: str):
        name = tok_config.get(key)
        if isinstance(name, dict):          # {"content": "<s>", ...} in older configs
            name = name.get("content")
        return token_ids.get(name) if isinstance(name, str) else None

    bos_id = named_id("bos_token")
    if bos_id is None and template_bos is not None:
        bos_id = token_ids.get(template_bos)
    if bos_id is None:
        bos_id = _config_id(model_config, "bos_token_id")
    eos_id = named_id("eos_token")
    if eos_id is None:
        eos_id = _config_id(model_config, "eos_token_id")
    eos_ids = {eos_id} if eos_id is not None else set()
    for config in (model_config, gen_config):
        eos_ids |= _config_ids(config, "eos_token_id", len(tokens))
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = template_bos is not None
    return dict(bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids, add_bos=add_bos,
                chat_template=_hf_chat_template(folder, tok_config))


def _config_ids(config: dict, key: str, n_tokens: int) -> set:
    value = config.get(key) if isinstance(config, dict) else None
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)
            and 0 <= v < n_tokens}


def _config_id(config: dict, key: str):
    value = config.get(key) if isinstance(config, dict) else None
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _template_bos(post_processor):
    """The special token a TemplateProcessing post-processor puts first, if any."""
    if not isinstance(post_processor, dict):
        return None
    if post_processor.get("type") == "Sequence":
        for p in post_processor.get("processors") or []:
            found = _template_bos(p)
            if found:
                return found
        return None
    single = post_processor.get("single") if post_processor.get("type") == \
        "TemplateProcessing" else None
    if isinstance(single, list) and single and isinstance(single[0], dict):
        special = single[0].get("SpecialToken")
        if isinstance(special, dict) and isinstance(special.get("id"), str):
            return special["id"]
    return None


def _hf_chat_template(folder: Path, tok_config: dict):
    template = tok_config.get("chat_template")
    if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(f"{jinja}: expected UTF-8 text") from None
    return None
