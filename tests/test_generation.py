"""The generation core (llama2c/generation.py) through Model.generate, Model.score,
GenerationSession and the prompt cache: options, stop strings, streaming, log-probabilities,
cached prefixes, saved states, cancellation. Random-weight models over a toy vocabulary
(llama2c.testing) keep it fast; a few tests use the real SmolLM2 GGUF."""
import gc
import math
import threading
import time
import weakref

import numpy as np
import pytest

import llama2c
from llama2c import CancelToken, GenerationCancelled
from llama2c.config import Config
from llama2c.errors import ContextLengthError
from llama2c.generation import PREFILL_CHUNK, StreamChunk, common_prefix
from llama2c.model import Model
from llama2c.testing import TOY_PIECES, make_random_model, toy_model
from llama2c.weights import quantize_weights


@pytest.fixture(scope="module")
def model():
    return toy_model(seed=1)


@pytest.fixture(scope="module")
def smollm2(shared_dir):
    path = shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return Model.load(path, context_length=1024)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def token_texts(model, prompt_ids, ids):
    """Each generated token's text after the prompt (an independent decode)."""
    tok = model.tokenizer
    base = tok.decode(prompt_ids)
    out, prev = [], base
    for n in range(1, len(ids) + 1):
        cur = tok.decode(list(prompt_ids) + list(ids[:n]))
        assert cur.startswith(prev)
        out.append(cur[len(prev):])
        prev = cur
    return out


def joined(chunks):
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]

# ------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_p=1.5), "min_p"), (dict(min_p=math.nan), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"),
    (dict(penalty_last_n=-1), "penalty_last_n"),
    (dict(logit_bias={10**6: 1.0}), "logit_bias"), (dict(logit_bias={1: math.nan}), "logit_bias"),
    (dict(logit_bias={1: math.inf}), "logit_bias"), (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(stop=""), "stop"), (dict(stop=[1]), "stop"), (dict(stop=5), "stop"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"),
    (dict(max_time=0), "max_time"), (dict(max_time=-1.0), "max_time"),
    (dict(cancel="now"), "cancel"), (dict(echo="yes"), "echo"),
    (dict(temperature=-1), "temperature"), (dict(top_p=math.nan), "top_p"),
])
def test_bad_options_name_the_argument(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate("the cat", max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate("the cat", max_new_tokens=2, stream=True, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.chat([{"role": "user", "content": "hi"}], max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.new_session().generate("the cat", max_new_tokens=2, **kwargs)


def test_unknown_option_is_a_type_error(model):
    with pytest.raises(TypeError, match="max_tokens"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=3)
    with pytest.raises(TypeError, match="tempreature"):
        model.new_session().generate("a", tempreature=0)


def test_logit_bias_accepts_json_keys_and_bans(model):
    free = model.generate("the cat", max_new_tokens=8, temperature=0)
    first = free.token_ids[0]
    banned = model.generate("the cat", max_new_tokens=8, temperature=0,
                            logit_bias={str(first): -math.inf})
    assert banned.token_ids[0] != first and first not in banned.token_ids
    forced = model.generate("the cat", max_new_tokens=3, temperature=0, logit_bias={60: 100.0},
                            stop_token_ids=[])
    assert forced.token_ids == [60, 60, 60]

# ------------------------------------------------------------------------------------------
# stop strings


def _stop_cases(model, prompt, seeds=range(12), n=48):
    """From sampled text, stop strings whose first occurrence spans 2 tokens, 3 tokens, and
    lies strictly inside one token: [(kind, seed, stop)]."""
    found = {}
    for seed in seeds:
        r = model.generate(prompt, max_new_tokens=n, temperature=1.0, top_p=1.0, seed=seed,
                           stop_token_ids=[])
        texts = token_texts(model, r.prompt_token_ids, r.token_ids)
        full = "".join(texts)
        assert r.text == full
        starts = np.cumsum([0] + [len(t) for t in texts])
        for j, t in enumerate(texts):
            if "inside" not in found and len(t) >= 3:
                stop = t[1:-1]
                if full.find(stop) == starts[j] + 1:
                    found["inside"] = (seed, stop)
            for k in (2, 3):
                if f"span{k}" in found or j + k > len(texts) or not t:
                    continue
                mid = texts[j + 1:j + k - 1]
                last = texts[j + k - 1]
                if not last or any(not m for m in mid):
                    continue
                stop = t[-1] + "".join(mid) + last[0]
                if full.find(stop) == starts[j + 1] - 1:
                    found[f"span{k}"] = (seed, stop)
        if len(found) == 3:
            break
    assert set(found) == {"inside", "span2", "span3"}, found
    return found


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_across_and_inside_tokens(model, stream):
    prompt = "the cat"
    for kind, (seed, stop) in sorted(_stop_cases(model, prompt).items()):
        kw = dict(max_new_tokens=48, temperature=1.0, top_p=1.0, seed=seed, stop_token_ids=[])
        ref = model.generate(prompt, **kw)
        texts = token_texts(model, ref.prompt_token_ids, ref.token_ids)
        full = "".join(texts)
        cut = full.find(stop)
        # the token that completes the stop string is the last one generated
        ends = np.cumsum([len(t) for t in texts])
        last = int(np.searchsorted(ends, cut + len(stop)))
        if stream:
            chunks = list(model.generate(prompt, stream=True, stop=[stop, "\x00never"], **kw))
            text, ids = joined(chunks)
            final = chunks[-1]
            assert all(c.finish_reason is None for c in chunks[:-1])
            reason, seq = final.finish_reason, final.stop_sequence
            # nothing past the stop ever reached the caller: every prefix is a prefix of it
            seen = ""
            for c in chunks:
                seen += c.text
                assert full[:cut].startswith(seen)
        else:
            r = model.generate(prompt, stop=[stop, "\x00never"], **kw)
            text, ids, reason, seq = r.text, r.token_ids, r.finish_reason, r.stop_sequence
        assert text == full[:cut], kind
        assert ids == ref.token_ids[:last + 1], kind
        assert reason == "stop" and seq == stop, kind


def test_text_that_may_become_a_stop_is_held_back(model):
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=1.0, seed=2, stop_token_ids=[])
    ref = model.generate("the cat", **kw)
    texts = token_texts(model, ref.prompt_token_ids, ref.token_ids)
    j = next(i for i, t in enumerate(texts) if len(t) >= 2)
    # a stop whose beginning is the end of token j but which never completes
    stop = texts[j][-1] + "\x01"
    chunks = list(model.generate("the cat", stream=True, stop=stop, **kw))
    text, ids = joined(chunks)
    assert text == ref.text and ids == ref.token_ids and chunks[-1].finish_reason == "length"
    # chunk j held its last character back; it came out with a later chunk
    assert chunks[j].text == texts[j][:-1]
    held = "".join(c.text for c in chunks[:j + 1])
    assert held == "".join(texts[:j + 1])[:-1]


def test_stop_on_real_tokenizer_with_utf8(smollm2):
    prompt = "Here is a list of French words with accents: été, café, naïve, déjà"
    kw = dict(max_new_tokens=40, temperature=0)
    ref = smollm2.generate(prompt, **kw)
    assert len(ref.text) > 10
    stop = ref.text[5:8]
    cut = ref.text.find(stop)
    for stream in (False, True):
        if stream:
            chunks = list(smollm2.generate(prompt, stream=True, stop=stop, **kw))
            text, ids = joined(chunks)
            reason = chunks[-1].finish_reason
        else:
            r = smollm2.generate(prompt, stop=stop, **kw)
            text, ids, reason = r.text, r.token_ids, r.finish_reason
        assert text == ref.text[:cut] and reason == "stop"
        assert ids == ref.token_ids[:len(ids)]


def test_character_split_over_byte_tokens_is_held_whole(model):
    """The three byte tokens of "€": nothing of it is released before it is whole, and a
    stop string made of it is found (the decoder and the stop filter of the loop)."""
    from llama2c.generation import _StopText
    x = model.tokenizer.token_to_id("x")
    dec = model.tokenizer.decode_stream(continuation=True)
    stops = _StopText(("x€",))
    assert [stops.push(dec.push(t)) for t in (x, 5, 6)] == ["", "", ""]   # "x", 2 bytes
    assert stops.push(dec.push(7)) == "" and stops.matched == "x€"
    stops = _StopText(("€y",))
    assert [stops.push(dec.push(t)) for t in (5, 6, 7)] == ["", "", ""]
    assert stops.push(dec.push(x)) == "€x" and stops.matched is None


# ------------------------------------------------------------------------------------------
# finish reasons, streaming


def test_eos_stop_and_length(model):
    r = model.generate("the cat", max_new_tokens=5, temperature=0, logit_bias={2: 100.0})
    assert r.token_ids == [2] and r.finish_reason == "stop" and r.stop_sequence == 2
    assert r.text == ""
    r = model.generate("the cat", max_new_tokens=5, temperature=0, stop_token_ids=[])
    assert len(r.token_ids) == 5 and r.finish_reason == "length" and r.stop_sequence is None
    small = model.new_session(context_length=8)
    r = small.generate([1, 9, 10], max_new_tokens=100, temperature=0, stop_token_ids=[])
    assert r.finish_reason == "length" and len(r.token_ids) == 8 - 3 + 1
    with pytest.raises(ContextLengthError):
        small.generate([9] * 3)


@pytest.mark.parametrize("kw", [
    dict(temperature=0),
    dict(temperature=1.0, top_p=0.9, seed=11),
    dict(temperature=0.8, top_k=20, min_p=0.05, repetition_penalty=1.3, presence_penalty=0.5,
         frequency_penalty=0.3, penalty_last_n=16, seed=5),
])
def test_streaming_equals_blocking(model, kw):
    kw = dict(max_new_tokens=30, stop_token_ids=[], logprobs=2, **kw)
    r = model.generate("the cat sat", **kw)
    chunks = list(model.generate("the cat sat", stream=True, **kw))
    text, ids = joined(chunks)
    assert text == r.text and ids == r.token_ids
    assert [lp for c in chunks for lp in (c.logprobs or [])] == r.logprobs
    assert all(isinstance(c, StreamChunk) for c in chunks)
    final = chunks[-1]
    assert final.finish_reason == r.finish_reason == "length"
    assert final.usage.completion_tokens == 30 and final.usage.prompt_tokens == len(r.prompt_token_ids)
    assert final.usage.decode_tokens_per_second > 0 and final.usage.prefill_seconds > 0


def test_penalties_change_the_greedy_path(model):
    plain = model.generate("the cat", max_new_tokens=30, temperature=0, stop_token_ids=[])
    pen = model.generate("the cat", max_new_tokens=30, temperature=0, stop_token_ids=[],
                         repetition_penalty=3.0, presence_penalty=2.0, penalty_last_n=64)
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))

# ------------------------------------------------------------------------------------------
# log-probabilities and score


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.3, top_k=30, seed=3,
                                                          repetition_penalty=1.5)])
def test_logprobs_are_log_softmax_of_the_logits(model, kw):
    r = model.generate("the cat sat on", max_new_tokens=12, logprobs=5, echo=True,
                       stop_token_ids=[], **kw)
    seq = r.prompt_token_ids + r.token_ids
    ref = log_softmax(model.logits(seq))
    n = len(r.prompt_token_ids)
    for i, lp in enumerate(r.logprobs):
        row = ref[n - 1 + i]
        assert lp.token_id == r.token_ids[i]
        assert lp.logprob == pytest.approx(row[lp.token_id], abs=1e-4)
        top = np.lexsort((np.arange(len(row)), -row))[:5]
        assert [t for t, _ in lp.top] == top.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], row[top], atol=1e-4)
        if kw["temperature"] == 0:
            assert lp.top[0][0] == lp.token_id         # greedy picks the top alternative
    assert r.prompt_logprobs[0].logprob is None
    for i, lp in enumerate(r.prompt_logprobs[1:], start=1):
        assert lp.token_id == seq[i]
        assert lp.logprob == pytest.approx(ref[i - 1][seq[i]], abs=1e-4)


def test_score_equals_single_step_logprobs(model):
    ids = model.tokenizer.encode("the cat sat on the mat and then the dog ran")
    sc = model.score(ids, top_logprobs=3)
    assert sc.token_ids == ids and sc.logprobs.shape == (len(ids) - 1,)
    steps = []
    for i in range(1, len(ids)):
        # one decode step: the prefix is cached, ids[i] is forced by the bias; logprobs
        # report the raw distribution (before the bias)
        r = model.generate(ids[:i], max_new_tokens=1, temperature=0, logprobs=0,
                           logit_bias={ids[i]: 1e4}, stop_token_ids=[])
        assert r.token_ids == [ids[i]]
        steps.append(r.logprobs[0].logprob)
    np.testing.assert_allclose(sc.logprobs, steps, atol=1e-4)
    assert sc.total == pytest.approx(sum(steps), abs=1e-3)
    assert model.score("the cat sat").total == pytest.approx(
        model.score(model.tokenizer.encode("the cat sat")).total)
    with pytest.raises(ValueError, match="two tokens"):
        model.score([1])


def test_score_long_text_in_chunks(model):
    ids = np.random.default_rng(0).integers(8, model.vocab_size, 3 * PREFILL_CHUNK + 5).tolist()
    sc = model.score(ids)
    ref = log_softmax(model.logits(ids))
    np.testing.assert_allclose(sc.logprobs, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)

# ------------------------------------------------------------------------------------------
# prompt cache


def test_prompt_cache_identical_results_and_faster_prefill():
    m = toy_model(seed=4, dim=128, n_layers=4, seq_len=1024)
    prefix = np.random.default_rng(1).integers(8, m.vocab_size, 500).tolist()
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7, stop_token_ids=[],
              logprobs=3)
    m.prompt_cache.max_bytes = 0
    uncached = m.generate(prefix + [20, 21], **kw)
    assert uncached.usage.cached_tokens == 0
    m.prompt_cache.max_bytes = 64 << 20
    first = m.generate(prefix + [20, 21], **kw)
    second = m.generate(prefix + [30, 31, 32], **kw)          # shares the 500-token prefix
    again = m.generate(prefix + [20, 21], **kw)
    for r in (first, again):
        assert r.token_ids == uncached.token_ids and r.text == uncached.text
        for a, b in zip(r.logprobs, uncached.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == 500
    assert again.usage.cached_tokens >= 500
    # 3 tokens to run instead of 502: lower even on a busy machine (best of three calls)
    cached = min(m.generate(prefix + [30, 31, 32], **kw).usage.prefill_seconds
                 for _ in range(3))
    assert cached < first.usage.prefill_seconds / 3
    assert again.usage.prefill_seconds < first.usage.prefill_seconds
    fresh = m.generate(prefix + [30, 31, 32], **{**kw, "seed": 7})
    assert fresh.token_ids == second.token_ids


def test_prompt_cache_budget_and_lru(model):
    cache = model.prompt_cache
    old = cache.max_bytes, cache.max_entries
    try:
        cache.clear()
        per_token = cache.bytes_per_token
        cache.max_bytes = 40 * per_token
        cache.max_entries = 2
        a = [1] + [9] * 30
        b = [1] + [10] * 30
        model.generate(a, max_new_tokens=2, temperature=0)
        model.generate(b, max_new_tokens=2, temperature=0)
        assert cache.nbytes <= 40 * per_token and len(cache) <= 2
        assert model.generate(b, max_new_tokens=2, temperature=0).usage.cached_tokens > 0
        model.generate([1] + [11] * 5, max_new_tokens=1, temperature=0)
        model.generate([1] + [12] * 5, max_new_tokens=1, temperature=0)
        assert len(cache) == 2
        assert model.generate(a, max_new_tokens=2, temperature=0).usage.cached_tokens == 1  # BOS
        cache.max_bytes = 0
        assert model.generate(a, max_new_tokens=2, temperature=0).usage.cached_tokens == 0
        assert cache.nbytes == 0
    finally:
        cache.max_bytes, cache.max_entries = old


def test_threads_share_the_cache_safely():
    m = toy_model(seed=2)
    prompts = [[1] + [8 + (i % 3)] * 40 + [20 + i] for i in range(8)]
    want = [m.generate(p, max_new_tokens=10, temperature=1.0, seed=i).token_ids
            for i, p in enumerate(prompts)]
    got = [None] * len(prompts)

    def work(i):
        got[i] = m.generate(prompts[i], max_new_tokens=10, temperature=1.0, seed=i).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_common_prefix():
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    a = list(range(1000))
    assert common_prefix(a, a[:700] + [-1] + a[701:]) == 700

# ------------------------------------------------------------------------------------------
# sessions and saved states


def test_session_appends_and_continues(model):
    s = model.new_session(seed=3)
    r1 = s.generate("the cat", max_new_tokens=6, temperature=0, stop_token_ids=[])
    assert s.tokens == r1.prompt_token_ids + r1.token_ids and s.n_cached == s.n_tokens - 1
    r2 = s.generate(" and", max_new_tokens=4, temperature=0, stop_token_ids=[])
    added = model.tokenizer.encode(" and", bos=False)
    assert r2.prompt_token_ids == r1.prompt_token_ids + r1.token_ids + added
    assert r2.usage.prompt_tokens == len(r2.prompt_token_ids)
    assert r2.usage.cached_tokens == len(r1.prompt_token_ids) + len(r1.token_ids) - 1
    whole = model.generate(r2.prompt_token_ids, max_new_tokens=4, temperature=0,
                           stop_token_ids=[])
    assert whole.token_ids == r2.token_ids
    s.truncate(3)
    assert s.tokens == r1.prompt_token_ids[:3] and s.n_cached <= 3
    s.reset()
    assert s.n_tokens == 0 and s.n_cached == 0


def test_save_and_load_state_continue_exactly(model, tmp_path):
    s = model.new_session(seed=42)
    s.generate("the cat sat", max_new_tokens=8, temperature=1.0, stop_token_ids=[])
    blob = s.save_state(tmp_path / "state.bin")
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, stop_token_ids=[],
              repetition_penalty=1.2, penalty_last_n=8)
    a = s.generate(None, **kw)                      # continues with the session's RNG
    b = model.load_state(blob).generate(None, **kw)
    c = model.load_state(tmp_path / "state.bin").generate(None, **kw)
    assert a.token_ids == b.token_ids == c.token_ids and a.text == b.text
    assert b.usage.cached_tokens == len(b.prompt_token_ids) - 1
    # appending a prompt after loading works the same way too
    s2, s3 = model.load_state(blob), model.load_state(blob)
    assert s2.generate(" on", **kw).token_ids == s3.generate(" on", **kw).token_ids
    # a state saved right after a prefill carries the logits
    p = model.new_session(seed=1)
    p.generate("the dog", max_new_tokens=0)
    q = model.load_state(p.save_state())
    assert q.n_cached == q.n_tokens
    assert q.generate(None, max_new_tokens=5, temperature=0).token_ids == \
        p.generate(None, max_new_tokens=5, temperature=0).token_ids


def test_decode_runs_rewind_at_a_stop_string_as_token_by_token(model):
    """Without streaming the decode loop runs many tokens per C call; a run that passes a stop
    string is rewound (cache, RNG stream, penalty window), so the session continues exactly as
    after a token-by-token (streamed) generation."""
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.95, stop_token_ids=[],
              repetition_penalty=1.3, penalty_last_n=6, frequency_penalty=0.2)
    probe = model.new_session(seed=7).generate("the cat", **kw)
    assert len(probe.text) > 8
    stop = probe.text[4:7]
    a, b = model.new_session(seed=7), model.new_session(seed=7)
    ra = a.generate("the cat", stop=stop, **kw)
    chunks = list(b.generate("the cat", stop=stop, stream=True, **kw))
    text, ids = joined(chunks)
    assert ra.finish_reason == chunks[-1].finish_reason == "stop"
    assert (ra.text, ra.token_ids) == (text, ids)
    assert len(ra.token_ids) < 40
    assert a.tokens == b.tokens and a.n_cached == b.n_cached
    more = dict(kw, max_new_tokens=20)
    assert a.generate(None, **more).token_ids == b.generate(None, **more).token_ids


def test_non_streamed_generation_equals_streamed_long(model):
    kw = dict(max_new_tokens=200, temperature=0.9, seed=3, stop_token_ids=[], min_p=0.05,
              presence_penalty=0.5)
    r = model.generate("the cat", **kw)
    text, ids = joined(list(model.generate("the cat", stream=True, **kw)))
    assert (r.text, r.token_ids) == (text, ids) and len(ids) == 200


def test_state_from_another_model_is_refused(model):
    blob = model.new_session().save_state()
    other = toy_model(seed=99)
    with pytest.raises(ValueError, match="different model"):
        other.load_state(blob)
    with pytest.raises(ValueError, match="not a llama2c session state"):
        model.load_state(b"nonsense")
    with pytest.raises(ValueError, match="corrupt"):
        model.load_state(blob[:-1] if len(blob) > 200 else blob + b"x")

# ------------------------------------------------------------------------------------------
# cancellation


@pytest.fixture(scope="module")
def long_model():
    model = toy_model(seed=3, dim=384, n_layers=6, seq_len=4096)
    ids = np.random.default_rng(5).integers(8, model.vocab_size, 4000).tolist()
    model.prompt_cache.clear()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, temperature=0)
    model.full_prefill_seconds = time.perf_counter() - t0
    return model, ids


@pytest.mark.parametrize("how", ["token", "event", "max_time"])
def test_cancel_during_a_long_prefill_returns_promptly(long_model, how):
    long_model, ids = long_model
    full = long_model.full_prefill_seconds
    long_model.prompt_cache.clear()
    kw = {}
    if how == "max_time":
        kw["max_time"] = 0.1 * full
    else:
        token = CancelToken() if how == "token" else threading.Event()
        threading.Timer(0.1 * full, token.set).start()
        kw["cancel"] = token
    t0 = time.perf_counter()
    r = long_model.generate(ids, max_new_tokens=5, temperature=0, **kw)
    elapsed = time.perf_counter() - t0
    assert r.finish_reason == "cancelled" and r.token_ids == [] and r.text == ""
    # the whole prefill takes `full` seconds; one step of PREFILL_CHUNK tokens a few ms
    assert elapsed < 0.5 * full, (elapsed, full)
    # what was run stays cached and valid: the next call continues from it
    r2 = long_model.generate(ids[:300], max_new_tokens=3, temperature=0)
    assert r2.usage.cached_tokens >= PREFILL_CHUNK


def test_cancel_and_max_time_during_decode(model):
    token = CancelToken()
    stream = model.generate("the cat", max_new_tokens=200, temperature=0, stop_token_ids=[],
                            stream=True, cancel=token)
    chunks = []
    for c in stream:
        chunks.append(c)
        if len(chunks) == 5:
            token.cancel()
    assert len(chunks) == 6 and chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].usage.completion_tokens == 6
    r = model.generate("the cat", max_new_tokens=10**6, temperature=0, stop_token_ids=[],
                       max_time=0.05)
    assert r.finish_reason in ("cancelled", "length")


def test_closing_a_stream_stops_generation(model):
    s = model.new_session()
    stream = s.generate("the cat", max_new_tokens=100, temperature=0, stop_token_ids=[],
                        stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert stream.finish_reason == "cancelled" and len(stream.result.token_ids) == 3
    n = s.n_tokens
    time.sleep(0.05)
    assert s.n_tokens == n == len(stream.result.prompt_token_ids) + 3
    # the model's cache got its session back: the same prompt reuses it
    model.prompt_cache.clear()
    st = model.generate("the cat", max_new_tokens=100, temperature=0, stream=True)
    next(st)
    del st
    gc.collect()
    assert model.generate("the cat", max_new_tokens=1).usage.cached_tokens > 0

# ------------------------------------------------------------------------------------------
# the model keeps no weight arrays


def test_model_drops_packed_weights():
    cfg = Config(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97,
                 seq_len=64)
    weights = quantize_weights(cfg, make_random_model(cfg, 0), 32)
    ref = weakref.ref(weights["layers.0.wq"].q)
    m = Model(cfg, weights)
    # tied classifier: every tensor is read once per token, as the engine packed it (rows in
    # blocks of 16: the 97-row embedding holds 112; f32 scales)
    from llama2c._engine import PackedMatrix
    expected_bytes = sum(PackedMatrix(t).nbytes if hasattr(t, "q") else t.nbytes
                         for t in weights.values())
    emb = weights["tok_embeddings"]
    assert PackedMatrix(emb).nbytes == 112 * 64 + 112 * (64 // 32) * 4
    del weights, emb
    gc.collect()
    assert ref() is None                        # packed by the engine, not kept by the model
    assert not hasattr(m, "weights")
    assert m.dtype == "int8" and m.manifest["layers.0.wq"].shape == (64, 64)
    assert m.weight_bytes() == expected_bytes
    assert m.generate([1, 2], max_new_tokens=3, temperature=0).token_ids


def test_result_fields(model):
    r = model.generate("the", max_new_tokens=3, temperature=0, stop_token_ids=[])
    assert r.prompt_seconds == r.usage.prefill_seconds
    assert r.generate_seconds >= r.prompt_seconds and r.tokens_per_second > 0
    d = r.usage.to_dict()
    assert d["total_tokens"] == d["prompt_tokens"] + d["completion_tokens"] == len(
        r.prompt_token_ids) + 3
    assert str(r) == r.text
    assert llama2c.GenerationResult is type(r)


def test_special_text_in_a_prompt_is_plain_by_default(model):
    tok = model.tokenizer
    plain = model.generate("<|im_end|>", max_new_tokens=1, temperature=0)
    assert 4 not in plain.prompt_token_ids
    parsed = model.generate("<|im_end|>", max_new_tokens=1, temperature=0, special=True)
    assert parsed.prompt_token_ids == [1, 4]
    assert plain.prompt_token_ids == tok.encode("<|im_end|>")


def test_echo_on_a_stream_and_logprobs_true(model):
    kw = dict(max_new_tokens=4, temperature=0, stop_token_ids=[], echo=True)
    r = model.generate("the cat sat", logprobs=True, **kw)
    assert all(lp.top == [] for lp in r.logprobs) and len(r.logprobs) == 4
    chunks = list(model.generate("the cat sat", stream=True, logprobs=2, **kw))
    assert chunks[0].prompt_logprobs is not None and len(chunks[0].prompt_logprobs) == len(
        r.prompt_token_ids)
    assert all(c.prompt_logprobs is None for c in chunks[1:])
    # echo with nothing to generate: the prompt's logprobs alone (OpenAI's scoring idiom)
    only = list(model.generate("the cat sat", stream=True, logprobs=0,
                               **{**kw, "max_new_tokens": 0}))
    assert len(only) == 1 and only[0].finish_reason == "length" and only[0].prompt_logprobs


def test_huge_penalty_window_is_clamped_to_the_context(model):
    r = model.generate("the cat", max_new_tokens=4, repetition_penalty=1.2,
                       penalty_last_n=10**9, temperature=0, stop_token_ids=[])
    assert len(r.token_ids) == 4


def test_chat_session_seed_makes_the_conversation_reproducible(model):
    def talk():
        chat = model.new_chat(temperature=1.0, max_new_tokens=8, seed=5)
        return [chat.send("the cat"), chat.send("the dog")]
    assert talk() == talk()


def test_an_external_driver_gets_the_same_tokens(model):
    """What a batched scheduler does: run the forward passes itself and call step() with the
    logits (here with a plain engine session), for the same result as generate()."""
    from llama2c.generation import Generation, GenerationOptions
    opts = GenerationOptions.make(model.vocab_size, max_new_tokens=12, temperature=0.9,
                                  seed=4, stop=["zz"], logprobs=1)
    # the prompt runs whole in both (a cached prefix from an earlier test would run the rest
    # as a shorter chunk; the fp32 matmul of some tables is not row-invariant)
    model.prompt_cache.clear()
    want = model.generate("the cat sat", max_new_tokens=12, temperature=0.9, seed=4,
                          stop=["zz"], logprobs=1)
    gs = model.new_session(context_length=64)
    gs.set_context(model.encode_prompt("the cat sat").tolist())
    run = Generation(model, gs, opts)
    run.begin()
    engine = gs.engine_session
    row = engine.eval(np.asarray(gs.tokens, np.int32), logits="last")
    assert run.prefilled() is None
    chunks = []
    while True:
        chunks.append(run.step(row))
        if chunks[-1].finish_reason is not None:
            break
        row = engine.eval(np.array([run.generated[-1]], np.int32), logits="last")
    run.finish()
    text, ids = joined(chunks)
    assert ids == want.token_ids and text == want.text
    got = run.make_result().logprobs
    assert [lp.token_id for lp in got] == [lp.token_id for lp in want.logprobs]
    np.testing.assert_allclose([lp.logprob for lp in got], [lp.logprob for lp in want.logprobs],
                               atol=1e-5)


def test_chat_turn_cancelled_before_any_token_is_not_kept(model):
    chat = model.new_chat(temperature=0, max_new_tokens=5)
    token = CancelToken()
    token.cancel()
    assert chat.send("the cat", cancel=token) == ""
    assert chat.history == [] and chat.last_result.finish_reason == "cancelled"
    chat.send("the cat")
    assert len(chat.history) == 2
