"""The generation API's costs and savings, on the real SmolLM2 GGUF (and a tiny random model):

    python benchmarks/generation_api.py [--model PATH] [--threads 2] [--tokens 128] [--repeat 3]

1. Per-token overhead of the generation loop (Model.generate: sampler chain, stop checks, text
   decoding, usage) against the engine's raw loop (Session.eval of one token + Sampler.sample,
   nothing else), both greedy and sampled, interleaved round by round; reported as decode
   tok/s and microseconds per token of difference. The tiny model shows the overhead itself
   (its forward pass costs microseconds), SmolLM2 what it weighs in a real decode.
2. Prompt cache: a 500-token shared prefix, two generate() calls with different questions;
   prefill seconds without and with the cached prefix (the results are checked identical to
   an uncached call).
3. Cancel latency: a 2,000-token prompt, cancel() from another thread during the prefill;
   seconds from cancel() to generate() returning (finish_reason "cancelled").

Timings on a shared machine are noisy: each figure is the best (overhead, cache) or the
median and max (cancel) of --repeat rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama2c  # noqa: E402
from llama2c import _engine  # noqa: E402
from llama2c.loaders import load_any  # noqa: E402
from llama2c.testing import toy_model  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("LLAMA2C_TEST_DATA", Path(__file__).resolve().parents[2] / "shared")) \
    / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLED = dict(temperature=0.8, top_p=0.95)


def raw_decode(engine, vocab, prompt, n, n_threads, sampling, seed=1):
    """The engine's own loop: (decode seconds, ids). One eval and one sample per token."""
    sess = _engine.Session(engine, len(prompt) + n + 1, 64, n_threads)
    sampler = _engine.Sampler(vocab, sampling.get("temperature", 0.0), sampling.get("top_p", 1.0),
                              0, seed)
    logits = sess.eval(np.asarray(prompt, np.int32), logits="last")
    buf = np.empty((1, vocab), np.float32)
    feed = np.empty(1, np.int32)
    ids = []
    t0 = time.perf_counter()
    tok = sampler.sample(logits)
    ids.append(tok)
    for _ in range(n - 1):
        feed[0] = tok
        sess.eval(feed, logits="all", out=buf)
        tok = sampler.sample(buf[0])
        ids.append(tok)
    return time.perf_counter() - t0, ids


def api_decode(model, prompt, n, sampling, stream, seed=1):
    """Model.generate's loop: (decode seconds, ids)."""
    model.prompt_cache.clear()
    kw = dict(max_new_tokens=n, stop_token_ids=[], seed=seed, **sampling)
    if "temperature" not in sampling:
        kw["temperature"] = 0.0
    if stream:
        chunks = list(model.generate(prompt, stream=True, **kw))
        u, ids = chunks[-1].usage, [t for c in chunks for t in c.token_ids]
    else:
        r = model.generate(prompt, **kw)
        u, ids = r.usage, r.token_ids
    return u.decode_seconds, ids


def overhead(name, model, engine, n, repeat, n_threads):
    prompt = [1, 2, 3, 4]
    print(f"\n## per-token cost of the loop: {name} ({n} tokens, {n_threads} threads)")
    print("| loop | raw engine tok/s | Model.generate tok/s | stream=True tok/s | "
          "overhead us/token (generate, stream) |")
    print("|---|---|---|---|---|")
    for label, sampling in (("greedy", {}), ("T 0.8, top_p 0.95", SAMPLED)):
        best = {"raw": 1e9, "api": 1e9, "stream": 1e9}
        for _ in range(repeat):           # interleaved: each round runs all three
            t, raw_ids = raw_decode(engine, model.vocab_size, prompt, n, n_threads, sampling)
            best["raw"] = min(best["raw"], t)
            t, ids = api_decode(model, prompt, n, sampling, stream=False)
            best["api"] = min(best["api"], t)
            assert ids == raw_ids, "the API loop and the raw loop must pick the same tokens"
            t, _ = api_decode(model, prompt, n, sampling, stream=True)
            best["stream"] = min(best["stream"], t)
        rate = {k: n / v for k, v in best.items()}
        us = {k: 1e6 * (best[k] - best["raw"]) / n for k in ("api", "stream")}
        print(f"| {label} | {rate['raw']:.1f} | {rate['api']:.1f} | {rate['stream']:.1f} | "
              f"{us['api']:+.1f}, {us['stream']:+.1f} |")


def prompt_cache(model, repeat):
    text = " ".join(f"Fact {i}: the {['red', 'blue', 'green', 'gold'][i % 4]} box holds "
                    f"{i * 7 % 97} marbles." for i in range(60))
    prefix = model.tokenizer.encode(text)[:500]
    questions = [model.tokenizer.encode(q, bos=False) for q in
                 (" Which box holds the most marbles?", " How many boxes are red?")]
    kw = dict(max_new_tokens=16, temperature=0)
    print(f"\n## prompt cache: a {len(prefix)}-token shared prefix, generate twice")
    rows = []
    for _ in range(repeat):
        model.prompt_cache.max_bytes = 0          # uncached reference for the second prompt
        ref = model.generate(prefix + questions[1], **kw)
        model.prompt_cache.max_bytes = 256 << 20
        model.prompt_cache.clear()
        first = model.generate(prefix + questions[0], **kw)
        second = model.generate(prefix + questions[1], **kw)
        assert second.token_ids == ref.token_ids, "cached and uncached results differ"
        rows.append((first.usage, second.usage, ref.usage))
    f, s, r = min(rows, key=lambda x: x[1].prefill_seconds)
    print("| call | prompt tokens | cached | prefill s | total s |")
    print("|---|---|---|---|---|")
    for label, u in (("uncached (cache off)", r), ("first (cold cache)", f), ("second (shared prefix)", s)):
        print(f"| {label} | {u.prompt_tokens} | {u.cached_tokens} | {u.prefill_seconds:.3f} | "
              f"{u.prefill_seconds + u.decode_seconds:.3f} |")
    print(f"prefill speed-up of the second call: {r.prefill_seconds / s.prefill_seconds:.1f}x; "
          f"whole call: {(r.prefill_seconds + r.decode_seconds) / (s.prefill_seconds + s.decode_seconds):.2f}x; "
          f"same tokens as uncached: True")


def cancel_latency(model, repeat, n_prompt=2000):
    ids = np.random.default_rng(0).integers(100, model.vocab_size, n_prompt).tolist()
    print(f"\n## cancel during a {n_prompt}-token prefill")
    lat, done_tokens = [], []
    for i in range(repeat):
        model.prompt_cache.clear()
        token = llama2c.CancelToken()
        out = {}

        def work():
            out["r"] = model.generate(ids, max_new_tokens=4, temperature=0, cancel=token)
            out["t"] = time.perf_counter()

        th = threading.Thread(target=work)
        th.start()
        time.sleep(0.3 + 0.2 * i)
        t_cancel = time.perf_counter()
        token.cancel()
        th.join()
        assert out["r"].finish_reason == "cancelled"
        lat.append(out["t"] - t_cancel)
        done_tokens.append(out["r"].usage.prefill_seconds)
    t0 = time.perf_counter()
    model.prompt_cache.clear()
    r = model.generate(ids, max_new_tokens=1, temperature=0, max_time=0.5)
    mt = time.perf_counter() - t0
    print(f"cancel() -> return: median {1000 * statistics.median(lat):.1f} ms, "
          f"max {1000 * max(lat):.1f} ms over {repeat} cancels")
    print(f"max_time=0.5: returned after {mt:.3f} s ({r.finish_reason})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    tiny = toy_model(seed=0, dim=64, n_layers=2, seq_len=1024, n_threads=args.threads)
    from llama2c.testing import make_random_model
    cfg = tiny.config
    w = make_random_model(cfg, 0)
    w["tok_embeddings"] *= 3.0
    overhead("tiny random model (dim 64, 2 layers, vocab 83)", tiny,
             _engine.Engine(cfg, w, None, cfg.seq_len, 16), args.tokens, args.repeat, args.threads)

    if not Path(args.model).is_file():
        print(f"\n{args.model} not found: SmolLM2 sections skipped")
        return
    model = llama2c.Model.load(args.model, n_threads=args.threads, context_length=2048)
    cfg, weights, _ = load_any(args.model, dtype="auto")
    engine = _engine.Engine(cfg, weights, None, 2048, 16)
    overhead(f"SmolLM2-135M ({model.dtype})", model, engine, args.tokens, args.repeat, args.threads)
    del engine, weights
    prompt_cache(model, args.repeat)
    cancel_latency(model, max(args.repeat, 5))


if __name__ == "__main__":
    main()
