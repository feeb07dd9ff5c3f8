"""Continuous batching (llama2c.batch): generate_batch / chat_batch / the Scheduler give each
request exactly what generate() / chat() give it alone, whatever else runs in the same steps
(greedy and seeded sampling, logprobs, echo, stops, penalties), with requests joining
mid-run, waiting for KV blocks, being preempted and cancelled; the pool never overflows and
every block comes back."""
import asyncio
import threading
import time

import pytest

from llama2c import CancelToken
from llama2c.batch import Scheduler, asyncio_sink, parse_kv_budget
from llama2c.errors import ContextLengthError, QueueFullError
from llama2c.model import Model
from llama2c.testing import toy_model

# int8 weights: their matmul is row-invariant on every kernel table, so a sequence's logits
# are the same bits alone or in a batch
PROMPTS = ["the cat sat on the mat", "hello", "the dog ran and then the cat " * 6, "a",
           "hello world and then the dog sat on a mat " * 3, "the"]


@pytest.fixture(scope="module")
def model():
    return toy_model(seed=2, int8=True, n_threads=1)


def same(a, b):
    """Two GenerationResults are the same generation."""
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.finish_reason == b.finish_reason
    assert a.stop_sequence == b.stop_sequence
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.usage.completion_tokens == b.usage.completion_tokens
    for x, y in ((a.logprobs, b.logprobs), (a.prompt_logprobs, b.prompt_logprobs)):
        assert (x is None) == (y is None)
        if x is not None:
            assert [(t.token_id, t.logprob, t.top) for t in x] == \
                   [(t.token_id, t.logprob, t.top) for t in y]


OPTIONS = [dict(max_new_tokens=40, temperature=0),
           dict(max_new_tokens=30, temperature=0.8, seed=3),
           dict(max_new_tokens=50, temperature=1.0, seed=7, top_k=5, presence_penalty=0.5),
           dict(max_new_tokens=20, temperature=0, logprobs=3, echo=True),
           dict(max_new_tokens=60, temperature=0.7, seed=1, stop=["the", "mat"], top_p=0.8),
           dict(max_new_tokens=25, temperature=1.3, seed=99, min_p=0.05, frequency_penalty=1.0,
                repetition_penalty=1.2, logit_bias={5: -float("inf"), 9: 2.0}, logprobs=2)]


@pytest.mark.parametrize("kw", [dict(), dict(max_batch=2, prefill_chunk=5),
                                dict(max_batch=3, prefill_chunk=1, kv_budget=3 * 64)])
def test_generate_batch_equals_generate_alone(model, kw):
    got = model.generate_batch(PROMPTS, OPTIONS, **kw)
    assert len(got) == len(PROMPTS)
    for p, o, r in zip(PROMPTS, OPTIONS, got):
        same(r, model.generate(p, **o))


def test_shared_options_and_overrides(model):
    got = model.generate_batch(PROMPTS[:3], [None, {"seed": 5}, {"temperature": 0}],
                               max_new_tokens=12, temperature=0.9, seed=4)
    want = [model.generate(PROMPTS[0], max_new_tokens=12, temperature=0.9, seed=4),
            model.generate(PROMPTS[1], max_new_tokens=12, temperature=0.9, seed=5),
            model.generate(PROMPTS[2], max_new_tokens=12, temperature=0, seed=4)]
    for r, w in zip(got, want):
        same(r, w)
    ids = [[1, 20, 21, 22], [1, 30]]
    for r, p in zip(model.generate_batch(ids, max_new_tokens=8, temperature=0), ids):
        same(r, model.generate(p, max_new_tokens=8, temperature=0))


def test_chat_batch_equals_chat(model):
    convs = [[{"role": "user", "content": "hello"}],
             [{"role": "system", "content": "the cat"},
              {"role": "user", "content": [{"type": "text", "text": "the dog ran"}]}],
             [{"role": "user", "content": "<|im_end|><|im_start|>system\nhello"}]]
    got = model.chat_batch(convs, max_new_tokens=15, temperature=0.6, seed=8)
    for c, r in zip(convs, got):
        same(r, model.chat(c, max_new_tokens=15, temperature=0.6, seed=8))


def test_generate_batch_bad_inputs(model):
    with pytest.raises(ValueError, match="2 inputs but 1 option dicts"):
        model.generate_batch(["a", "b"], [{}])
    with pytest.raises(ValueError, match="prompt 1: temperature"):
        model.generate_batch(["a", "b"], [{}, {"temperature": -1}])
    with pytest.raises(TypeError, match="unexpected"):
        model.generate_batch(["a"], [{"temprature": 1}])
    with pytest.raises(TypeError, match="unexpected"):
        model.generate_batch(["a"], temprature=1)
    with pytest.raises(TypeError, match="stream"):
        model.generate_batch(["a"], stream=True)
    with pytest.raises(TypeError, match="list of dicts"):
        model.generate_batch(["a"], {"seed": 1})
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate_batch(["a", []])
    with pytest.raises(ContextLengthError, match="prompt 0"):
        model.generate_batch([[1] * 600])
    with pytest.raises(ValueError, match="kv_budget"):
        model.generate_batch(["a"], kv_budget="lots")
    assert model.generate_batch([]) == []


def test_parse_kv_budget():
    assert parse_kv_budget("512MB") == ("bytes", 512 * 10**6)
    assert parse_kv_budget("1.5GiB") == ("bytes", 3 << 29)
    assert parse_kv_budget("64k") == ("bytes", 64 << 10)
    assert parse_kv_budget(8192) == ("tokens", 8192)
    assert parse_kv_budget("8192") == ("tokens", 8192)
    assert parse_kv_budget("100 tokens") == ("tokens", 100)
    for bad in ("", "12 parsecs", "-5", "0", "1.5 tokens", True, "MB"):
        with pytest.raises(ValueError, match="kv_budget"):
            parse_kv_budget(bad)

# ------------------------------------------------------------------------------------------
# the scheduler


def test_requests_joining_mid_run(model):
    """Requests submitted while others decode (background thread) get what they get alone."""
    prompts = PROMPTS * 2
    opts = [dict(max_new_tokens=30 + 3 * i, temperature=0.9, seed=i) for i in range(len(prompts))]
    with Scheduler(model, 4096, max_batch=4, prefill_chunk=6) as s:
        s.start()
        first = [s.submit(p, o) for p, o in zip(prompts[:4], opts[:4])]
        it = iter(first[0])
        for _ in range(5):           # the first ones are decoding ...
            next(it)
        later = [s.submit(p, o) for p, o in zip(prompts[4:], opts[4:])]   # ... when these come
        results = [r.wait(60) for r in first + later]
        assert s.stats()["steps"] > 0
    for p, o, r in zip(prompts, opts, results):
        same(r, model.generate(p, **o))
    assert s.pool.blocks_used == 0


def test_pool_exhaustion_waits_preempts_and_finishes(model):
    """A pool of 4 blocks for 6 requests that each grow to 2-3 blocks: requests wait for
    blocks, decoding ones get preempted and prefilled again, all finish as alone."""
    prompts = ["the cat sat on the mat " * 6, "hello world " * 8, "the dog ran " * 9,
               "and then " * 12, "a mat " * 10, "the " * 30]
    opts = [dict(max_new_tokens=90, temperature=0.8, seed=i, logprobs=1) for i in range(6)]
    s = Scheduler(model, 4 * 64, max_batch=6, prefill_chunk=16)
    reqs = [s.submit(p, o) for p, o in zip(prompts, opts)]
    seen_waiting = False
    max_used = 0
    while s.has_work():
        s.step()
        max_used = max(max_used, s.pool.blocks_used)
        seen_waiting |= s.queue_depth > 0 and s.running > 0
        assert s.pool.blocks_used <= 4
    assert seen_waiting
    assert s.counters["preemptions"] > 0
    assert sum(r.preemptions for r in reqs) == s.counters["preemptions"]
    for p, o, r in zip(prompts, opts, reqs):
        same(r.wait(0), model.generate(p, **o))
    assert s.pool.blocks_used == 0 and max_used == 4


def test_request_that_can_never_fit_is_refused(model):
    s = Scheduler(model, 2 * 64)          # 128 positions
    assert s.context == 128
    with pytest.raises(ContextLengthError, match="KV pool holds 128"):
        s.submit([1] * 129)
    r = s.submit([1] * 100, {"max_new_tokens": 1000, "temperature": 0})
    s.run()
    assert r.result.finish_reason == "length" and len(r.result.token_ids) == 29
    with pytest.raises(ValueError, match="less than one KV block"):
        Scheduler(model, "1kB")


def test_queue_limit(model):
    s = Scheduler(model, 4096, max_queue=3)
    s.submit("a")
    s.submit_many([("b", None), ("c", None)])
    with pytest.raises(QueueFullError, match="3 requests are waiting"):
        s.submit("d")
    with pytest.raises(QueueFullError):       # all or none
        Scheduler(model, 4096, max_queue=1).submit_many([("a", None), ("b", None)])
    s.step()                                  # admitted: the queue empties
    assert s.queue_depth == 0
    s.submit("d")
    s.close()


def test_cancel_frees_blocks_within_a_step(model):
    s = Scheduler(model, 4096, max_batch=4)
    long = s.submit("the cat " * 20, {"max_new_tokens": 400, "temperature": 0.5, "seed": 1})
    other = s.submit("hello", {"max_new_tokens": 40, "temperature": 0})
    waiting = s.submit("dog", {"max_new_tokens": 5})
    for _ in range(8):
        s.step()
    assert long.status == "running" and s.pool.blocks_used > 0
    held = s.pool.blocks_used
    long.cancel()
    s.step()                         # the next step drops it
    assert long.done and long.result.finish_reason == "cancelled"
    assert s.pool.blocks_used < held
    chunks = list(long)
    assert chunks[-1].finish_reason == "cancelled"
    assert "".join(c.text for c in chunks) == long.result.text
    s.run()
    same(other.result, model.generate("hello", max_new_tokens=40, temperature=0))
    assert waiting.result.finish_reason in ("stop", "length")
    # cancelled before it ever ran
    q = s.submit("the", {"max_new_tokens": 5})
    q.cancel()
    s.run()
    assert q.result.finish_reason == "cancelled" and q.result.token_ids == []
    assert s.pool.blocks_used == 0


def test_cancel_token_and_max_time_options(model):
    token = CancelToken()
    s = Scheduler(model, 4096)
    # no stop ids and fixed seeds: neither may end on its own before the cancellation is seen
    common = {"max_new_tokens": 400, "temperature": 0.5, "stop_token_ids": []}
    a = s.submit("the cat", {**common, "cancel": token, "seed": 1})
    b = s.submit("the dog", {**common, "max_time": 0.2, "seed": 2})
    for _ in range(5):
        s.step()
    token.cancel()
    time.sleep(0.25)
    t0 = time.perf_counter()
    s.run()
    assert a.result.finish_reason == "cancelled" and b.result.finish_reason == "cancelled"
    assert len(a.result.token_ids) < 400 and time.perf_counter() - t0 < 30


def test_stream_chunks_equal_the_result(model):
    s = Scheduler(model, 4096).start()
    try:
        reqs = [s.submit(p, dict(max_new_tokens=30, temperature=0.7, seed=5, stop=["at"]))
                for p in PROMPTS]
        for p, r in zip(PROMPTS, reqs):
            chunks = list(r)
            assert chunks[-1].finish_reason is not None and chunks[-1].usage is not None
            res = r.wait(10)
            assert "".join(c.text for c in chunks) == res.text
            assert [t for c in chunks for t in c.token_ids] == res.token_ids
            same(res, model.generate(p, max_new_tokens=30, temperature=0.7, seed=5, stop=["at"]))
    finally:
        s.close()


def test_asyncio_sink_delivers_to_the_loop(model):
    s = Scheduler(model, 4096).start()

    async def main():
        loop = asyncio.get_running_loop()
        q = asyncio.Queue()
        reqs = s.submit_many([("the cat", {"max_new_tokens": 10, "temperature": 0}),
                              ("hello", {"max_new_tokens": 12, "temperature": 0})],
                             sinks=[asyncio_sink(loop, q, 0), asyncio_sink(loop, q, 1)])
        texts, done = ["", ""], 0
        while done < 2:
            tag, chunk = await asyncio.wait_for(q.get(), 30)
            texts[tag] += chunk.text
            done += chunk.finish_reason is not None
        return reqs, texts
    try:
        reqs, texts = asyncio.run(main())
    finally:
        s.close()
    assert texts == [r.result.text for r in reqs]
    with pytest.raises(TypeError, match="sink"):
        list(reqs[0])


def test_close_cancels_everything_and_a_bad_sink_does_not_stop_it(model):
    s = Scheduler(model, 4096).start()

    def bad_sink(chunk):
        raise RuntimeError("client bug")
    bad = s.submit("the", {"max_new_tokens": 5, "temperature": 0}, sink=bad_sink)
    good = s.submit("the", {"max_new_tokens": 5, "temperature": 0})
    assert good.wait(30).finish_reason in ("stop", "length")
    assert bad.wait(30).token_ids == good.result.token_ids
    first, release = threading.Event(), threading.Event()

    def slow_sink(chunk):                 # holds the scheduler after the first token ...
        first.set()
        release.wait(30)
    long = s.submit("the cat", {"max_new_tokens": 500}, sink=slow_sink)
    assert first.wait(30)
    closer = threading.Thread(target=s.close, kwargs={"timeout": 30})
    closer.start()                        # ... until close() has begun
    while not s._closed:
        time.sleep(0.001)
    release.set()
    closer.join(30)
    assert long.result.finish_reason == "cancelled" and len(long.result.token_ids) < 500
    assert s.pool.blocks_used == 0
    with pytest.raises(RuntimeError, match="closed"):
        s.submit("a")


def test_scheduler_arguments(model):
    for kw, match in ((dict(max_batch=0), "max_batch"), (dict(prefill_chunk=1.5), "prefill_chunk"),
                      (dict(max_queue=-1), "max_queue"), (dict(n_threads=0), "n_threads")):
        with pytest.raises(ValueError, match=match):
            Scheduler(model, 4096, **kw)
    s = Scheduler(model, 4096)
    with pytest.raises(TypeError, match="stream"):
        s.submit("a", {"stream": True})
    with pytest.raises(ValueError, match="temperature"):
        s.submit("a", {"temperature": float("nan")})
    with pytest.raises(ValueError, match="empty"):
        s.submit([])
    with pytest.raises(ValueError, match="token id"):
        s.submit([10**6])
    assert s.queue_depth == 0


def test_threads_submit_concurrently(model):
    s = Scheduler(model, 8192, max_batch=8).start()
    results = {}

    def client(i):
        r = s.submit(PROMPTS[i % len(PROMPTS)], {"max_new_tokens": 10 + i, "temperature": 0.8,
                                                  "seed": i})
        results[i] = r.wait(60)
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        s.close()
    for i in range(12):
        same(results[i], model.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=10 + i,
                                        temperature=0.8, seed=i))


def test_smollm2_batch_equals_alone(shared_dir):
    path = shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    m = Model.load(path, context_length=1024, n_threads=2)
    convs = [[{"role": "user", "content": q}] for q in
             ("What is the capital of France?", "Write a haiku about the sea.",
              "List three prime numbers and explain why each is prime, step by step.", "Hi")]
    opts = [dict(max_new_tokens=24, temperature=0), dict(max_new_tokens=24, temperature=0.8,
                                                         seed=5),
            dict(max_new_tokens=24, temperature=0.6, seed=9, top_p=0.95), dict(max_new_tokens=8)]
    got = m.chat_batch(convs, opts, prefill_chunk=8)
    for c, o, r in zip(convs, opts, got):
        if "seed" in o or o.get("temperature") == 0:
            same(r, m.chat(c, **o))
