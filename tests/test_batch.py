"""The batched forward pass (l2c_forward over runs of sequences sharing a KV pool), end to end.

Within one kernel table, a token's logits and the keys/values it leaves in the cache are the
same bits whether it ran alone (decode), inside a prefill chunk at any offset, in one step with
other sequences (forward_batch), or with another thread count. That needs row-invariant matmul
kernels too: the int8 ones are on every table; the fp32 ones are checked here per table
(tests marked with the fp32 weights skip where a table's fp32 matmul is not row-invariant).
"""
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import llama2c
from llama2c import _engine as E
from llama2c.config import Config
from llama2c.errors import ContextLengthError, GenerationCancelled, KVCacheFullError
from llama2c.reference import ReferenceModel
from llama2c.testing import make_random_model
from llama2c.weights import quantize_weights

SIMD = E.available_simd()
KV = ["f32", "f16", "q8", "f16/q8"]
CFG = Config(dim=96, hidden_dim=160, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=120,
             seq_len=512, shared_classifier=False)


def fp32_matmul_row_invariant(simd):
    """True if the fp32 matmul of this table gives every row the same bits alone or in a batch."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((11, 96)).astype(np.float32), rng.standard_normal((40, 96)).astype(np.float32)
    full = np.empty((11, 40), np.float32)
    E.matmul(full, x, w, simd=simd)
    rows = [E.matmul(np.empty((1, 40), np.float32), x[i:i + 1], w, simd=simd) for i in range(11)]
    return np.array_equal(full, np.concatenate(rows))


@pytest.fixture(scope="module", params=["int8", "fp32"])
def weights(request):
    w = make_random_model(CFG, 3)
    return request.param, quantize_weights(CFG, w, 32) if request.param == "int8" else w


def engine(weights, simd):
    kind, w = weights
    if kind == "fp32" and simd != "generic" and not fp32_matmul_row_invariant(simd):
        pytest.skip(f"the {simd} fp32 matmul is not row-invariant in this build")
    return llama2c.Model(CFG, w, simd=simd)._engine


def ids(n, seed):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).astype(np.int32)


# ---- chunked prefill == token by token ------------------------------------------------------

@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("simd", SIMD)
def test_chunked_prefill_equals_token_by_token(weights, simd, kv):
    eng = engine(weights, simd)
    toks = ids(150, 1)
    chunked = E.Session(eng, max_batch=64, n_threads=2, kv_dtype=kv)
    got = chunked.eval(toks, "all")
    odd = E.Session(eng, max_batch=7, n_threads=1, kv_dtype=kv)
    got_odd = odd.eval(toks, "all")
    steps = E.Session(eng, max_batch=64, n_threads=2, kv_dtype=kv)
    one = np.stack([steps.eval(toks[i:i + 1]) for i in range(len(toks))])
    np.testing.assert_array_equal(got, one)
    np.testing.assert_array_equal(got_odd, one)
    assert chunked.export_kv() == steps.export_kv() == odd.export_kv()


@pytest.mark.parametrize("simd", SIMD)
def test_decode_steps_as_a_team_equal_one_thread(weights, simd):
    """Decode steps run as one team (one parallel region per step, meeting at the engine's own
    barrier; three threads on two cores take each other's blocks and attention tasks): the same
    bits as one thread."""
    eng = engine(weights, simd)
    toks = ids(140, 5)
    runs = {}
    for nth in (1, 2, 3):
        s = E.Session(eng, max_batch=64, n_threads=nth, kv_dtype="f16")
        runs[nth] = np.stack([s.eval(toks[i:i + 1]) for i in range(len(toks))])
    np.testing.assert_array_equal(runs[2], runs[1])
    np.testing.assert_array_equal(runs[3], runs[1])


# ---- a batch == each sequence alone ---------------------------------------------------------

@pytest.mark.parametrize("kv", ["f16", "q8"])
@pytest.mark.parametrize("simd", SIMD)
def test_batch_equals_each_sequence_alone(weights, simd, kv):
    """Sequences at different positions advance together (decode rows and a prefill chunk in
    one step, steps that cut a run in two) and get what each gets alone."""
    eng = engine(weights, simd)
    prompts = [ids(30, 10), ids(5, 11), ids(70, 12), ids(1, 13)]
    pool = E.KVPool(eng, kv_dtype=kv, block_size=16, max_batch=24)
    batch = [E.Session(eng, pool=pool) for _ in prompts]
    # (the same block size: the canonical merge of a row is over blocks of that size)
    alone = [E.Session(eng, pool=E.KVPool(eng, kv_dtype=kv, block_size=16)) for _ in prompts]
    # the first three have their prompts already; the fourth arrives with its prompt later
    for s, a, p in zip(batch[:3], alone[:3], prompts[:3]):
        s.eval(p[:-1], "none")
        a.eval(p[:-1], "none")
    feeds = [[p[-1:] for p in prompts[:3]] + [prompts[3]]]     # step 1: 3 decodes + a prompt
    for k in range(5):                                         # then decode steps, new tokens
        feeds.append([ids(1, 100 + 4 * k + i) for i in range(4)])
    feeds.append([ids(40, 7), ids(1, 8), ids(1, 9), ids(33, 6)])   # two prefills cut in steps
    modes = ["last", "all", "none", "last"]
    for n_threads, feed in zip([1, 2, 3, 2, 1, 2, 2], feeds):
        got = E.forward_batch(batch, feed, modes, n_threads=n_threads)
        for i, (a, t) in enumerate(zip(alone, feed)):
            want = a.eval(t, modes[i])
            if want is None:
                assert got[i] is None
            else:
                np.testing.assert_array_equal(got[i], want)
    for s, a, mode in zip(batch, alone, modes):
        assert s.n_tokens == a.n_tokens
        assert s.export_kv() == a.export_kv()
        if mode != "none":
            np.testing.assert_array_equal(s.last_logits(), a.last_logits())


def test_forward_batch_arguments(weights):
    eng = engine(weights, "generic")
    pool = E.KVPool(eng, block_size=16, n_blocks=6)
    a, b = E.Session(eng, pool=pool), E.Session(eng, pool=pool, context=20)
    assert E.forward_batch([], [], "last") == []
    out = E.forward_batch([a, b], [ids(3, 0), np.zeros(0, np.int32)], ["all", "last"])
    assert out[0].shape == (3, CFG.vocab_size) and out[1] is None and b.n_tokens == 0
    with pytest.raises(ValueError, match="share one KVPool"):
        E.forward_batch([a, E.Session(eng)], [ids(1, 0), ids(1, 0)], "last")
    with pytest.raises(ValueError, match="appears twice"):
        E.forward_batch([a, a], [ids(1, 0), ids(1, 0)], "last")
    with pytest.raises(ValueError, match="logits must be"):
        E.forward_batch([a], [ids(1, 0)], "first")
    with pytest.raises(ValueError, match="2 sessions but 1 token arrays"):
        E.forward_batch([a, b], [ids(1, 0)], "last")
    with pytest.raises(ContextLengthError, match=r"sessions\[1\]"):
        E.forward_batch([a, b], [ids(1, 0), ids(21, 0)], "last")
    with pytest.raises(ValueError, match="token id"):
        E.forward_batch([a], [np.array([CFG.vocab_size], np.int32)], "last")
    with pytest.raises(KVCacheFullError, match="needs 6 blocks of 16 positions; the pool has 5 free"):
        E.forward_batch([a, b], [ids(70, 0), ids(20, 0)], "none")
    assert (a.n_tokens, b.n_tokens, pool.blocks_used) == (3, 0, 1)


# ---- cancellation ----------------------------------------------------------------------------

def test_cancel_stops_a_long_prefill_between_steps():
    cfg = Config(dim=256, hidden_dim=512, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=200,
                 seq_len=4096)
    eng = llama2c.Model(cfg, make_random_model(cfg, 0))._engine
    toks = np.random.default_rng(0).integers(0, 200, 4000).astype(np.int32)
    s = E.Session(eng, max_batch=16, n_threads=1)
    caught = []

    def run():
        try:
            s.eval(toks, "last")
        except GenerationCancelled as e:
            caught.append((e, time.perf_counter()))

    th = threading.Thread(target=run)
    th.start()
    while s.n_tokens < 64 and th.is_alive():
        time.sleep(0.001)
    asked = time.perf_counter()
    s.request_cancel()
    th.join(60)
    assert caught, "eval finished without being cancelled"
    done = s.n_tokens
    assert 64 <= done < len(toks) and done % 16 == 0, done      # stopped between steps
    assert "cancelled after" in str(caught[0][0])
    # the positions that ran stay; the rest continues to the uninterrupted result
    rest = s.eval(toks[done:], "last")
    whole = E.Session(eng, max_batch=16).eval(toks, "last")
    np.testing.assert_array_equal(rest, whole)
    print(f"\ncancel returned {1e3 * (caught[0][1] - asked):.1f} ms after request_cancel")


# ---- q/k/v biases (qwen2) --------------------------------------------------------------------

@pytest.mark.parametrize("simd", SIMD)
def test_qkv_biases_match_reference(simd):
    w = make_random_model(CFG, 5)
    rng = np.random.default_rng(6)
    for i in range(CFG.n_layers):
        w[f"layers.{i}.bq"] = rng.standard_normal(CFG.n_heads * CFG.head_size).astype(np.float32)
        w[f"layers.{i}.bk"] = rng.standard_normal(CFG.n_kv_heads * CFG.head_size).astype(np.float32)
        w[f"layers.{i}.bv"] = rng.standard_normal(CFG.n_kv_heads * CFG.head_size).astype(np.float32)
    toks = ids(40, 2)
    got = llama2c.Model(CFG, w, simd=simd, kv_dtype="f32").logits(toks)
    want = ReferenceModel(CFG, w).logits(toks)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    plain = {k: v for k, v in w.items() if not k[-2:] in ("bq", "bk", "bv")}
    assert np.abs(llama2c.Model(CFG, plain, simd=simd).logits(toks) - got).max() > 1e-2
    bad = dict(w, **{"layers.0.bk": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="layers.0.bk"):
        llama2c.Model(CFG, bad)


# ---- the real model ---------------------------------------------------------------------------

def test_smollm2_batched_greedy_equals_alone(shared_dir):
    path = Path(shared_dir) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    m = llama2c.Model.load(path, n_threads=2)
    prompts = [m.tokenizer.encode(t, bos=False) for t in
               ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,")]
    n_new = 12
    alone = [m.generate(p, max_new_tokens=n_new, temperature=0, stop_token_ids=[]).token_ids
             for p in prompts]
    pool = E.KVPool(m._engine, budget_bytes=64 << 20)
    sess = [E.Session(m._engine, pool=pool) for _ in prompts]
    logits = E.forward_batch(sess, [np.asarray(p, np.int32) for p in prompts], "last", n_threads=2)
    outs = [[] for _ in prompts]
    for _ in range(n_new):
        nxt = [int(np.argmax(l)) for l in logits]
        for o, t in zip(outs, nxt):
            o.append(t)
        logits = E.forward_batch(sess, [np.array([t], np.int32) for t in nxt], "last", n_threads=2)
    assert outs == alone
