"""Text preparation before BPE merging: special-token splitting, regex pre-tokenizers
(by llama.cpp's `tokenizer.ggml.pre` name or from a Hugging Face tokenizer.json), the
Hugging Face normalizers we support, and GPT-2's byte <-> unicode alphabet.

A pre-tokenizer here is a callable `(fragment, at_start) -> list[str]`: it cuts one piece of
text that holds no special token into the words BPE merges independently. `at_start` says
the fragment begins at offset 0 of the encoded text (Metaspace's prepend_scheme="first").
"""
from __future__ import annotations

import unicodedata
import warnings
from typing import Callable

import regex

from .errors import TokenizerError

PreTokenizer = Callable[[str, bool], list]
Normalizer = Callable[[str], str]

# ------------------------------------------------------------------------------------------
# GPT-2 byte-level alphabet

def bytes_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) are shifted
    to code points 256+ so every byte has a visible, non-whitespace stand-in (' ' -> 'Ġ').
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


BYTE_ENCODER = bytes_to_unicode()                       # byte value -> unicode char
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}  # unicode char -> byte value
_BYTE_TRANSLATION = [BYTE_ENCODER[b] for b in range(256)]


def to_byte_level(text: str) -> str:
    """Map text's UTF-8 bytes into the GPT-2 alphabet (one char per byte)."""
    return "".join([_BYTE_TRANSLATION[b] for b in text.encode("utf-8")])

# ------------------------------------------------------------------------------------------
# Regex splitting

GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
                r"|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's tokenizer.json regex starts with (?i:'s|'t|...); llama.cpp (src/llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_QWEN2) runs it with the case-insensitive group spelled out as ASCII
# classes, so e.g. "'ſ" (long s, which case-folds to s) is not a contraction. We use its form.
QWEN2_PATTERN = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                 r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SINGLE_DIGIT_PATTERN = r"\p{N}"

# llama.cpp (src/llama-vocab.cpp) applies a list of regexes one after the other, each
# splitting the pieces the previous one produced. Names are `tokenizer.ggml.pre` values.
GGUF_PRE_PATTERNS = {
    "default": (GPT2_PATTERN,),
    "gpt2": (GPT2_PATTERN,),
    "gpt-2": (GPT2_PATTERN,),
    "mpt": (GPT2_PATTERN,),
    "olmo": (GPT2_PATTERN,),
    "jais": (GPT2_PATTERN,),
    "llama3": (LLAMA3_PATTERN,),
    "llama-v3": (LLAMA3_PATTERN,),
    "llama-bpe": (LLAMA3_PATTERN,),
    "dbrx": (LLAMA3_PATTERN,),
    "smaug-bpe": (LLAMA3_PATTERN,),
    "smollm": (SINGLE_DIGIT_PATTERN, GPT2_PATTERN),
    "starcoder": (SINGLE_DIGIT_PATTERN, GPT2_PATTERN),
    "refact": (SINGLE_DIGIT_PATTERN, GPT2_PATTERN),
    "command-r": (SINGLE_DIGIT_PATTERN, GPT2_PATTERN),
    "codeshell": (SINGLE_DIGIT_PATTERN, GPT2_PATTERN),
    "exaone": (SINGLE_DIGIT_PATTERN, GPT2_PATTERN),
    "qwen2": (QWEN2_PATTERN,),
    "stablelm2": (QWEN2_PATTERN,),
}
# Pre-tokenizer names whose models ship Llama 3's tokenizer.json quirks (add BOS, and a
# word that is already a vocabulary entry is emitted whole: "ignore_merges").
LLAMA3_FAMILY = frozenset({"llama3", "llama-v3", "llama-bpe"})


def _compile(pattern: str, source: str):
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise TokenizerError(f"{source}: pre-tokenizer regex {pattern!r} does not compile: "
                             f"{exc}") from None


def split_isolated(pieces: list, pattern) -> list:
    """Cut each piece at pattern's matches, keeping matches and the text between them."""
    out = []
    for piece in pieces:
        pos = 0
        for m in pattern.finditer(piece):
            start, end = m.span()
            if start > pos:
                out.append(piece[pos:start])
            if end > start:
                out.append(piece[start:end])
            pos = end
        if pos < len(piece):
            out.append(piece[pos:])
    return out


def gguf_pre_tokenizer(name: str | None) -> PreTokenizer:
    """The byte-level pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` = name."""
    if name not in GGUF_PRE_PATTERNS:
        warnings.warn(f"tokenizer.ggml.pre = {name!r} is not a pre-tokenizer llama2c knows; "
                      f"using 'default' (the GPT-2 regex)", stacklevel=3)
        name = "default"
    patterns = [_compile(p, "tokenizer.ggml.pre") for p in GGUF_PRE_PATTERNS[name]]

    def pre_tokenize(fragment: str, at_start: bool) -> list:
        pieces = [fragment]
        for pattern in patterns:
            pieces = split_isolated(pieces, pattern)
        return [to_byte_level(p) for p in pieces]
    return pre_tokenize


def special_token_splitter(specials: dict):
    """Return split(text) -> [(fragment, token_id or None)] cutting out special tokens whole.

    Longer tokens are tried first, so at any position the longest special token wins
    (as the Aho-Corasick leftmost-longest match of Hugging Face and llama.cpp).
    """
    names = sorted((s for s in specials if s), key=len, reverse=True)
    if not names:
        return lambda text: [(text, None)]
    pattern = regex.compile("|".join(regex.escape(s) for s in names))

    def split(text: str) -> list:
        parts, pos = [], 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                parts.append((text[pos:m.start()], None))
            parts.append((m.group(), specials[m.group()]))
            pos = m.end()
        if pos < len(text):
            parts.append((text[pos:], None))
        return parts
    return split

# ------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json normalizers and pre-tokenizers

def json_field(obj, key: str, types, source, where: str, default=None, required=True):
    """obj[key] checked against types (a tuple); TokenizerError names the file and field."""
    if not isinstance(obj, dict):
        raise TokenizerError(f"{source}: {where}: expected an object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if required:
            raise TokenizerError(f"{source}: {where}: missing field {key!r}")
        return default
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = "/".join(t.__name__ for t in types)
        raise TokenizerError(f"{source}: {where}.{key}: expected {names}, "
                             f"got {type(value).__name__}")
    return value


def _hf_pattern(spec: dict, source: str, where: str):
    """Compile a {"String": s} or {"Regex": r} pattern object."""
    pattern = json_field(spec, "pattern", (dict,), source, where)
    if "Regex" in pattern:
        return _compile(json_field(pattern, "Regex", (str,), source, where + ".pattern"), source)
    if "String" in pattern:
        return regex.compile(regex.escape(json_field(pattern, "String", (str,), source,
                                                 where + ".pattern")))
    raise TokenizerError(f"{source}: {where}.pattern: expected a 'String' or 'Regex' key, "
                         f"got {sorted(pattern)}")


def hf_normalizer(spec, source: str, where: str = "normalizer") -> Normalizer:
    """Build the normalizer a tokenizer.json "normalizer" object describes."""
    if spec is None:
        return lambda text: text
    kind = json_field(spec, "type", (str,), source, where)
    if kind == "Sequence":
        steps = [hf_normalizer(s, source, f"{where}.normalizers[{i}]")
                 for i, s in enumerate(json_field(spec, "normalizers", (list,), source, where))]

        def sequence(text: str) -> str:
            for step in steps:
                text = step(text)
            return text
        return sequence
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda text: unicodedata.normalize(kind, text)
    if kind == "Lowercase":
        return str.lower
    if kind == "Prepend":
        prefix = json_field(spec, "prepend", (str,), source, where)
        return lambda text: prefix + text if text else text
    if kind == "Replace":
        pattern = _hf_pattern(spec, source, where)
        content = json_field(spec, "content", (str,), source, where)
        return lambda text: pattern.sub(lambda m: content, text)
    if kind == "Strip":
        left, right = spec.get("strip_left", True), spec.get("strip_right", True)

        def strip(text: str) -> str:
            text = text.lstrip() if left else text
            return text.rstrip() if right else text
        return strip
    raise TokenizerError(f"{source}: {where}.type: expected one of Sequence, NFC, NFD, NFKC, "
                         f"NFKD, Lowercase, Prepend, Replace, Strip; got {kind!r}")


def _split_with_behavior(piece: str, pattern, behavior: str) -> list:
    """Hugging Face Split: cut piece at matches; behavior says where the matches go."""
    out, pos, pending = [], 0, ""
    for m in pattern.finditer(piece):
        start, end = m.span()
        if end == start:
            continue
        before, match = piece[pos:start], piece[start:end]
        if behavior == "Isolated":
            out += [before, match]
        elif behavior == "Removed":
            out.append(before)
        elif behavior == "MergedWithPrevious":
            out.append(before + match)
        else:  # MergedWithNext: the match starts the next piece
            out.append(pending + before)
            pending = match
        pos = end
    out.append(pending + piece[pos:])
    return [p for p in out if p]


_SPLIT_BEHAVIORS = ("Isolated", "Removed", "MergedWithPrevious", "MergedWithNext")


def _hf_pre_step(spec, source: str, where: str):
    """One pre-tokenizer as a function (pieces, at_start) -> pieces."""
    kind = json_field(spec, "type", (str,), source, where)
    if kind == "Sequence":
        steps = [_hf_pre_step(s, source, f"{where}.pretokenizers[{i}]")
                 for i, s in enumerate(json_field(spec, "pretokenizers", (list,), source, where))]

        def sequence(pieces, at_start):
            for step in steps:
                pieces = step(pieces, at_start)
            return pieces
        return sequence
    if kind == "ByteLevel":
        return _byte_level_step(spec)
    if kind == "Digits":
        pattern = regex.compile(r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")
        return lambda pieces, at_start: split_isolated(pieces, pattern)
    if kind == "Split":
        pattern = _hf_pattern(spec, source, where)
        behavior = json_field(spec, "behavior", (str,), source, where)
        if behavior not in _SPLIT_BEHAVIORS or spec.get("invert"):
            raise TokenizerError(f"{source}: {where}: expected behavior in {_SPLIT_BEHAVIORS} "
                                 f"and invert false, got {behavior!r}, invert "
                                 f"{spec.get('invert')!r}")
        return lambda pieces, at_start: [q for p in pieces
                                         for q in _split_with_behavior(p, pattern, behavior)]
    if kind == "Metaspace":
        return _metaspace_step(spec, source, where)
    raise TokenizerError(f"{source}: {where}.type: expected one of Sequence, ByteLevel, Digits, "
                         f"Split, Metaspace; got {kind!r}")


def _byte_level_step(spec: dict):
    """Hugging Face ByteLevel: optional prefix space, the GPT-2 regex, then the byte alphabet."""
    add_prefix_space = bool(spec.get("add_prefix_space", False))
    pattern = regex.compile(GPT2_PATTERN) if spec.get("use_regex", True) else None

    def byte_level(pieces, at_start):
        if add_prefix_space:
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        if pattern is not None:
            pieces = split_isolated(pieces, pattern)
        return [to_byte_level(p) for p in pieces]
    return byte_level


def _metaspace_step(spec: dict, source: str, where: str):
    """Hugging Face Metaspace: ' ' -> replacement, prepend it per prepend_scheme, maybe split."""
    replacement = spec.get("replacement", "▁")
    if not isinstance(replacement, str) or len(replacement) != 1:
        raise TokenizerError(f"{source}: {where}.replacement: expected one character, "
                             f"got {replacement!r}")
    # Older files carry add_prefix_space (a bool) instead of prepend_scheme.
    default_scheme = "always" if spec.get("add_prefix_space", True) else "never"
    scheme = spec.get("prepend_scheme", default_scheme)
    if scheme not in ("always", "first", "never"):
        raise TokenizerError(f"{source}: {where}.prepend_scheme: expected always/first/never, "
                             f"got {scheme!r}")
    split = bool(spec.get("split", True))
    splitter = regex.compile(regex.escape(replacement))

    def metaspace(pieces, at_start):
        out = []
        for i, piece in enumerate(pieces):
            piece = piece.replace(" ", replacement)
            first = at_start and i == 0
            if (scheme == "always" or (scheme == "first" and first)) \
                    and not piece.startswith(replacement):
                piece = replacement + piece
            out += _split_with_behavior(piece, splitter, "MergedWithNext") if split else [piece]
        return out
    return metaspace


def hf_pre_tokenizer(spec, source: str) -> PreTokenizer:
    """Build the pre-tokenizer a tokenizer.json "pre_tokenizer" object describes."""
    if spec is None:
        return lambda fragment, at_start: [fragment]
    step = _hf_pre_step(spec, source, "pre_tokenizer")
    return lambda fragment, at_start: [p for p in step([fragment], at_start) if p]


def hf_spec_has_type(spec, kind: str) -> bool:
    """True if a (possibly nested Sequence) normalizer/pre-tokenizer spec contains `kind`."""
    if isinstance(spec, dict):
        if spec.get("type") == kind:
            return True
        return any(hf_spec_has_type(s, kind)
                   for key in ("normalizers", "pretokenizers", "decoders")
                   for s in (spec.get(key) or []))
    return False
