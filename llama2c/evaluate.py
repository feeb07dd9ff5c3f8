"""Model quality measures: token-level perplexity, and how closely an int8 model tracks fp32.

    from llama2c.evaluate import perplexity, compare_int8
    perplexity(model, open("wiki.txt").read())          # {'perplexity': ..., 'nll': ..., 'n_tokens': ...}
    compare_int8(Model.load(p, dtype="fp32"), Model.load(p, dtype="int8"), text)

Windows. The text is tokenized without BOS and cut into windows of up to `context` tokens
(default min(model.context_length, 512)), each evaluated from position 0 with model.logits.
When the tokenizer adds a BOS, every window starts with it and every text token is scored,
the first one of each window conditioned on BOS alone. Otherwise the first token of the text
has nothing to be predicted from and is not scored, and consecutive windows overlap by one
token (the last token of a window is the unscored first token of the next), so every other
token is scored exactly once. With the default stride the windows are otherwise disjoint:
tokens early in a window see little context, which makes the perplexity somewhat higher than
a sliding evaluation would. A smaller `stride` starts windows more often (windows overlap by
more) and scores only the tokens a window adds, giving each more context at more cost.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import TokenizerError

DEFAULT_CONTEXT = 512
ROW_BLOCK = 64  # logit rows converted to float64 at a time (a 49152-token vocabulary is 25 MB)


def _token_ids(model, text_or_ids) -> list:
    """A text (tokenized without BOS) or a sequence of ids -> list of int."""
    if isinstance(text_or_ids, str):
        if model.tokenizer is None:
            raise TokenizerError("the model has no tokenizer: pass token ids, or load it with a tokenizer")
        return [int(t) for t in model.tokenizer.encode(text_or_ids, bos=False)]
    return [int(t) for t in text_or_ids]


def _bos_prefix(model) -> list:
    """[bos_id] when the model's tokenizer adds a BOS to encoded text, else []."""
    tok = model.tokenizer
    if tok is not None and tok.add_bos and tok.bos_id is not None:
        return [int(tok.bos_id)]
    return []


def _windows(ids: list, prefix: list, window: int, stride: int | None):
    """Yield (window token ids, logit rows, target ids): logits row rows[j] of the window
    predicts targets[j]. Together the windows score every token of `ids` once (all of them
    with a prefix, all but the first without)."""
    body = window - len(prefix)              # text tokens per window
    first = 0 if prefix else 1               # the first text token a window can score
    if body - first < 1:
        raise ValueError(f"context {window} is too short: each window needs at least "
                         f"{len(prefix) + first + 1} tokens")
    step = body - first if stride is None else stride
    if not 1 <= step <= body - first:
        raise ValueError(f"stride must be in [1, {body - first}] for a context of {window}, got {stride}")
    start, scored = 0, first
    while scored < len(ids):
        end = min(start + body, len(ids))
        rows = np.arange(scored, end) - start + len(prefix) - 1
        yield prefix + ids[start:end], rows, np.asarray(ids[scored:end])
        scored, start = end, start + step


def _plan(model, text_or_ids, context, stride):
    """Tokenize and return the window generator, after checking there is something to score."""
    ids = _token_ids(model, text_or_ids)
    prefix = _bos_prefix(model)
    window = min(model.context_length, DEFAULT_CONTEXT) if context is None else int(context)
    if not 1 <= window <= model.context_length:
        raise ValueError(f"context must be in [1, {model.context_length}], got {context}")
    if len(ids) < (1 if prefix else 2):
        raise ValueError(f"the text has {len(ids)} token(s): too few to score")
    return _windows(ids, prefix, window, stride)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def _blocks(rows: np.ndarray, targets: np.ndarray):
    """(rows, targets) in blocks of ROW_BLOCK, to bound float64 memory."""
    for i in range(0, len(rows), ROW_BLOCK):
        yield rows[i:i + ROW_BLOCK], targets[i:i + ROW_BLOCK]


def _summary(nll_sum: float, n: int) -> dict:
    nll = nll_sum / n
    return {"perplexity": math.exp(nll), "nll": nll, "n_tokens": n}


def perplexity(model, text_or_ids, context: int | None = None, stride: int | None = None) -> dict:
    """Perplexity of `model` on a text (or its token ids, without BOS).

    Returns {'perplexity': exp(nll), 'nll': mean negative log-likelihood in nats per scored
    token, 'n_tokens': scored tokens}. See the module docstring for the windowing.
    """
    nll_sum, n = 0.0, 0
    for window, rows, targets in _plan(model, text_or_ids, context, stride):
        logits = model.logits(window)
        for r, t in _blocks(rows, targets):
            logp = _log_softmax(logits[r])
            nll_sum -= float(logp[np.arange(len(t)), t].sum())
            n += len(t)
    return _summary(nll_sum, n)


def compare_int8(fp32_model, int8_model, text_or_ids, context: int | None = None,
                 stride: int | None = None) -> dict:
    """How closely `int8_model` follows `fp32_model` on a text, position by position.

    Returns {'top1_agreement': fraction of scored positions where both models' most likely
    next token agree, 'mean_kl': mean KL(p_fp32 || p_int8) of the next-token distributions
    (nats, computed in float64), 'ppl_fp32', 'ppl_int8', 'n_tokens'}. The text is tokenized
    with fp32_model's tokenizer; both models see the same windows.
    """
    if fp32_model.vocab_size != int8_model.vocab_size:
        raise ValueError(f"the models' vocabularies differ ({fp32_model.vocab_size} vs "
                         f"{int8_model.vocab_size})")
    if context is None:
        context = min(fp32_model.context_length, int8_model.context_length, DEFAULT_CONTEXT)
    agree, kl_sum, nll32, nll8, n = 0, 0.0, 0.0, 0.0, 0
    for window, rows, targets in _plan(fp32_model, text_or_ids, context, stride):
        logits32, logits8 = fp32_model.logits(window), int8_model.logits(window)
        for r, t in _blocks(rows, targets):
            lp32, lp8 = _log_softmax(logits32[r]), _log_softmax(logits8[r])
            at = np.arange(len(t))
            agree += int((lp32.argmax(axis=1) == lp8.argmax(axis=1)).sum())
            kl_sum += float((np.exp(lp32) * (lp32 - lp8)).sum())
            nll32 -= float(lp32[at, t].sum())
            nll8 -= float(lp8[at, t].sum())
            n += len(t)
    return {"top1_agreement": agree / n, "mean_kl": kl_sum / n,
            "ppl_fp32": _summary(nll32, n)["perplexity"], "ppl_int8": _summary(nll8, n)["perplexity"],
            "n_tokens": n}
