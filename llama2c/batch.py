"""Continuous batching: many generations advancing together over one KV pool, one forward pass
per step.

A Scheduler owns a KVPool with a fixed budget and the requests submitted to it. Each step is
one call of the C forward pass (_engine.forward_batch, GIL released) carrying one token for
every decoding sequence plus a chunk of at most `prefill_chunk` prompt tokens of newly arrived
requests, so the weights are read once for the whole batch and running streams keep flowing
while new prompts are prefilled; then every sequence that got logits takes its next token
through its llama2c.generation.Generation (the C sampler, stop strings, logprobs). Sequences
join and leave between steps. The engine computes every row bitwise as it would alone, so each
request gets exactly what Model.generate() gives it alone (greedy: the same ids; sampled: the
same ids for the same seed).

KV memory: the pool holds blocks of `block_size` positions shared by all sequences; a sequence
takes another block only when its last one is full. A request is admitted (oldest first) when
its prompt and first token fit next to what the running ones still need; it waits otherwise.
Each sequence's context is at most the pool's capacity, so every admitted request can finish
(a prompt longer than that is refused at submit with ContextLengthError). When decoding
sequences run out of blocks, the youngest is preempted: its blocks are freed and it waits at
the head of the queue, to be prefilled again (its prompt and the tokens generated so far) when
room frees up; what it generates does not change.

    sched = Scheduler(model, kv_budget="256MB", max_batch=16)
    req = sched.submit("Once upon a time", {"temperature": 0, "max_new_tokens": 32})
    sched.start()                     # a background thread runs the steps
    for chunk in req:                 # StreamChunks, as Model.generate(stream=True) yields them
        print(chunk.text, end="")
    sched.close()

Model.generate_batch / Model.chat_batch drive a private scheduler on the calling thread; the
server runs one on a background thread, its requests delivering their chunks to the asyncio
loop (sink=asyncio_sink(loop, queue, tag)).
"""
from __future__ import annotations

import itertools
import queue
import re
import threading
import time
from collections import deque

import numpy as np

from . import _engine
from .errors import ContextLengthError, KVCacheFullError, QueueFullError
from .generation import (OPTION_NAMES, Generation, GenerationOptions, GenerationSession,
                         TokenLogprob, _logprob_rows)

DEFAULT_MAX_BATCH = 16          # sequences in one step
DEFAULT_PREFILL_CHUNK = 32      # prompt tokens per step (benchmarks/server_bench.py)
DEFAULT_KV_BUDGET = "512MB"
RATE_WINDOW = 10.0              # seconds of the tokens/s gauge

__all__ = ["Scheduler", "Request", "asyncio_sink", "parse_kv_budget", "generate_batch",
           "chat_batch", "QueueFullError", "KVCacheFullError"]

# ------------------------------------------------------------------------------------------
# the KV budget

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_kv_budget(value) -> tuple:
    """A KV budget as ("bytes", n) or ("tokens", n): "512MB", "1.5GiB", "64k" (KiB) are
    bytes; an int, "8192" or "8192 tokens" are positions. ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"kv_budget must be bytes ('512MB') or tokens (8192), got {value!r}")
    if isinstance(value, int):
        kind, n = "tokens", value
    else:
        m = _BUDGET.match(str(value))
        unit = m.group(2).lower() if m else None
        if m is None or (unit not in _UNITS and unit not in ("", "t", "tok", "tokens")):
            raise ValueError(f"kv_budget must be bytes ('512MB', '2GiB') or tokens ('8192', "
                             f"'8192 tokens'), got {value!r}")
        if unit in _UNITS:
            kind, n = "bytes", int(float(m.group(1)) * _UNITS[unit])
        else:
            if "." in m.group(1):
                raise ValueError(f"kv_budget: a number of tokens must be an integer, got {value!r}")
            kind, n = "tokens", int(m.group(1))
    if n <= 0:
        raise ValueError(f"kv_budget must be positive, got {value!r}")
    return kind, n


def _blocks(n_pos: int, block_size: int) -> int:
    return -(-n_pos // block_size)


def kv_geometry(model) -> tuple:
    """(positions per block, bytes per block) of a KV pool of this model's cache type."""
    probe = _engine.KVPool(model._engine, n_blocks=1, kv_dtype=model.kv_dtype)
    return probe.block_size, probe.block_bytes

# ------------------------------------------------------------------------------------------
# requests


def asyncio_sink(loop, q, tag=None):
    """A sink for Scheduler.submit that hands each item, as (tag, item), to the asyncio queue
    `q` of `loop` (thread-safe: loop.call_soon_threadsafe). Items after the loop closed are
    dropped."""
    def sink(item):
        try:
            loop.call_soon_threadsafe(q.put_nowait, (tag, item))
        except RuntimeError:          # the loop is closed: nobody is listening any more
            pass
    return sink


class Request:
    """A generation submitted to a Scheduler (Scheduler.submit returns it).

    Its chunks (llama2c.generation.StreamChunk; the last has finish_reason and usage) go to
    the sink given to submit, or else to an internal queue that iterating the request reads.
    An exception that ends it abnormally is delivered as the last item instead (and raised by
    iteration and wait()). `result` is the GenerationResult once done; `cancel()` (any thread)
    ends it at the next step with finish_reason "cancelled" and frees its KV blocks.
    """
    _ids = itertools.count()

    def __init__(self, scheduler, prompt_ids: list, gen: Generation, gs: GenerationSession,
                 sink=None, tag=None):
        self.id = next(Request._ids)
        self.scheduler = scheduler
        self.prompt_ids = prompt_ids
        self.tag = tag
        self.status = "waiting"             # waiting -> running -> done
        self.result = None                  # GenerationResult when done
        self.error = None                   # the exception that ended it abnormally
        self.preemptions = 0
        self._gen, self._gs, self._sess = gen, gs, gs.engine_session
        self._queue = queue.SimpleQueue() if sink is None else None
        self._sink = sink if sink is not None else self._queue.put
        self._cancel = False
        self._begun = False                 # Generation.begin() called (admitted once)
        self._prefilled = False             # the prompt's last logits reached once
        self._echo = gen.opts.echo          # prompt logprobs still to compute
        self._done = threading.Event()

    # ---- the caller's side ---------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this request at the next step (finish_reason "cancelled"); thread-safe."""
        self.scheduler.cancel(self)

    def wait(self, timeout: float | None = None):
        """Block until done; returns the GenerationResult (raises what ended it abnormally,
        TimeoutError after `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def __iter__(self):
        if self._queue is None:
            raise TypeError("this request delivers to its sink; it cannot be iterated")
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, status={self.status!r}, prompt_tokens="
                f"{len(self.prompt_ids)}, preemptions={self.preemptions})")

    # ---- the scheduler's side ------------------------------------------------------------

    @property
    def _pending(self) -> int:
        """Tokens of the sequence not yet in the KV cache (1 while decoding)."""
        return self._gs.n_tokens - self._sess.n_tokens

    def _deliver(self, item) -> None:
        try:
            self._sink(item)
        except Exception:          # a broken sink must not stop the scheduler
            pass

    def _close(self, item, error=None) -> None:
        """Deliver the last item, release the KV blocks and the generation state."""
        gen = self._gen
        if gen is not None:
            self.result = gen.make_result()
            gen.finish()
        self.error = error
        if self._sess is not None:
            self._sess.truncate(0)
        self._gen = self._gs = self._sess = None
        self.status = "done"
        self._done.set()
        self._deliver(item)

# ------------------------------------------------------------------------------------------
# the scheduler


class Scheduler:
    """Continuous batching of generations of one Model over a KV pool with a fixed budget.

    kv_budget: the pool's size: bytes ("512MB", "2GiB") or positions (8192, "8192 tokens");
        see parse_kv_budget. Each sequence's context is min(model.context_length, the pool's
        capacity).
    max_batch: most sequences running together (the rest wait in the queue).
    prefill_chunk: most prompt tokens per step (over all prefilling requests), so a step
        carries at most max_batch + prefill_chunk rows.
    max_queue: most requests waiting (None: no limit); submit raises QueueFullError beyond.
    n_threads: kernel threads of the forward pass (default: the model's).

    Thread-safe: submit() and cancel() from any thread; the steps run on one thread, either
    the scheduler's own (start(); close() stops it) or the caller's (step(), run()).
    """

    def __init__(self, model, kv_budget=DEFAULT_KV_BUDGET, *, max_batch: int = DEFAULT_MAX_BATCH,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_queue: int | None = None,
                 n_threads: int | None = None):
        for name, v in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int)
                                      or max_queue < 0):
            raise ValueError(f"max_queue must be an integer >= 0 or None, got {max_queue!r}")
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int)
                                      or n_threads < 1):
            raise ValueError(f"n_threads must be an integer >= 1, got {n_threads!r}")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.n_threads = n_threads
        kind, n = parse_kv_budget(kv_budget)
        engine = model._engine
        block_size, block_bytes = kv_geometry(model)
        n_blocks = n // block_bytes if kind == "bytes" else _blocks(n, block_size)
        if n_blocks < 1:
            raise ValueError(f"kv_budget {kv_budget!r} is less than one KV block "
                             f"({block_size} positions, {block_bytes} bytes)")
        self.pool = _engine.KVPool(engine, n_blocks=n_blocks, kv_dtype=model.kv_dtype,
                                   block_size=block_size, max_batch=max_batch + prefill_chunk)
        self.block_size = block_size
        self.context = min(model.context_length, self.pool.capacity_tokens)
        self._cv = threading.Condition()
        self._waiting: deque = deque()       # requests not running, oldest (or preempted) first
        self._running: list = []             # admission order; only the stepping thread changes it
        self._cancels = 0                    # cancel() calls not yet seen by a step
        self._closed = False
        self._thread = None
        self._rate: deque = deque()          # (time, tokens generated) per step, RATE_WINDOW s
        self.counters = {"steps": 0, "rows": 0, "prompt_tokens": 0, "generated_tokens": 0,
                         "requests": 0, "finished": 0, "cancelled": 0, "failed": 0,
                         "preemptions": 0}

    # ---- submitting ----------------------------------------------------------------------

    def _options(self, options) -> GenerationOptions:
        if options is None:
            return GenerationOptions.make(self.model.vocab_size)
        if isinstance(options, GenerationOptions):
            return options
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict or GenerationOptions, got "
                            f"{type(options).__name__}")
        if "stream" in options:
            raise TypeError("options: 'stream' is not an option of a batched request (iterate "
                            "the request, or give a sink)")
        return GenerationOptions.make(self.model.vocab_size, **options)

    def _make(self, prompt, options, stop_token_ids, sink, tag) -> Request:
        model = self.model
        ids = model.encode_prompt(prompt).tolist() if isinstance(prompt, str) else \
            model._ids(prompt).tolist()
        opts = self._options(options)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) > self.context:
            what = "context" if self.context == model.context_length else \
                f"context (the KV pool holds {self.pool.capacity_tokens} positions)"
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the {what} holds "
                                     f"{self.context}")
        sess = _engine.Session(model._engine, context=self.context, max_batch=1,
                               n_threads=self.n_threads or model.n_threads, pool=self.pool)
        gs = GenerationSession(model, sess, seed=1)
        gs.set_context(ids)
        gen = Generation(model, gs, opts, stop_token_ids=stop_token_ids)
        return Request(self, ids, gen, gs, sink=sink, tag=tag)

    def submit(self, prompt, options=None, *, stop_token_ids=None, sink=None, tag=None) -> Request:
        """Queue a generation: `prompt` a text (tokenized with BOS as Model.generate does,
        control-token text as plain text) or token ids; `options` a dict of Model.generate's
        options (or a GenerationOptions); stop_token_ids the default stop ids (None: the
        model's end-of-sequence ids; options['stop_token_ids'] overrides them); sink: a
        callable receiving each StreamChunk (called on the stepping thread; see asyncio_sink).
        Raises what Model.generate raises for bad options, ContextLengthError for a prompt
        beyond the context, QueueFullError when max_queue requests wait already."""
        return self.submit_many([(prompt, options)], stop_token_ids=stop_token_ids,
                                sinks=None if sink is None else [sink],
                                tags=None if tag is None else [tag])[0]

    def submit_many(self, items, *, stop_token_ids=None, sinks=None, tags=None) -> list:
        """submit() for several (prompt, options) pairs at once, all or none (the queue limit
        counts them together): e.g. the n choices of one API request."""
        items = list(items)
        reqs = [self._make(p, o, stop_token_ids, None if sinks is None else sinks[i],
                           None if tags is None else tags[i]) for i, (p, o) in enumerate(items)]
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self.max_queue is not None and len(self._waiting) + len(reqs) > self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue "
                                     f"{self.max_queue}); retry later")
            self._waiting.extend(reqs)
            self.counters["requests"] += len(reqs)
            self._cv.notify_all()
        return reqs

    def cancel(self, request: Request) -> None:
        """End `request` at the next step (finish_reason "cancelled", KV blocks freed)."""
        with self._cv:
            if not request._cancel and request.status != "done":
                request._cancel = True
                self._cancels += 1
                self._cv.notify_all()

    # ---- state ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW seconds."""
        now = time.monotonic()
        with self._cv:
            while self._rate and self._rate[0][0] < now - RATE_WINDOW:
                self._rate.popleft()
            n = sum(k for _, k in self._rate)
        return n / RATE_WINDOW

    def stats(self) -> dict:
        """A snapshot: queue depth, running sequences, KV blocks, counters, tokens/s."""
        return {"queue_depth": self.queue_depth, "running": self.running,
                "kv_blocks_used": self.pool.blocks_used, "kv_blocks_free": self.pool.blocks_free,
                "kv_blocks_total": self.pool.n_blocks, "kv_block_size": self.block_size,
                "context": self.context, "tokens_per_second": self.tokens_per_second(),
                **self.counters}

    # ---- running -------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Run the steps on a background thread (idempotent)."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llama2c-scheduler",
                                                daemon=True)
                self._thread.start()
        _engine.release_threads()       # this thread's OpenMP workers (see Generation._chunks)
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop: every request not done ends with finish_reason "cancelled"; the background
        thread (if any) exits. Idempotent."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None or not thread.is_alive():
            self._cancel_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def run(self) -> None:
        """Step on the calling thread until no request is waiting or running."""
        while self.has_work():
            self.step()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._running:
                    self._cv.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as exc:      # a bug: fail what runs rather than hang the clients
                for r in list(self._running):
                    self._fail(r, exc)
        self._cancel_all()

    def _cancel_all(self) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for r in list(self._running) + waiting:
            self._end_cancelled(r)

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> bool:
        """One step: drop cancelled requests, admit waiting ones that fit, one forward pass
        over the batch, then a token for each sequence that got logits. Returns False when
        there was nothing to run."""
        self._reap()
        self._admit()
        batch = self._plan()
        if not batch:
            return False
        batch = self._fit(batch)
        sessions = [r._sess for r, _, _ in batch]
        feeds = [np.asarray(r._gs._tokens[r._sess.n_tokens:r._sess.n_tokens + k], np.int32)
                 for r, k, _ in batch]
        modes = [m for _, _, m in batch]
        try:
            outs = _engine.forward_batch(sessions, feeds, modes,
                                         self.n_threads or self.model.n_threads)
        except KVCacheFullError as exc:   # not expected (_fit checked): make room, try again
            if len(self._running) > 1:
                self._preempt(self._running[-1])
            else:
                for r, _, _ in batch:
                    self._fail(r, exc)
            return True
        except Exception as exc:
            for r, _, _ in batch:
                self._fail(r, exc)
            return True
        generated = 0
        for (r, k, mode), out, feed in zip(batch, outs, feeds):
            try:
                generated += self._advance(r, k, mode, out, feed)
            except Exception as exc:
                self._fail(r, exc)
        now = time.monotonic()
        with self._cv:
            c = self.counters
            c["steps"] += 1
            c["rows"] += sum(k for _, k, _ in batch)
            c["generated_tokens"] += generated
            self._rate.append((now, generated))
            while self._rate and self._rate[0][0] < now - RATE_WINDOW:
                self._rate.popleft()
        return True

    def _reap(self) -> None:
        """End cancelled (or expired: cancel option, max_time) requests, running or waiting."""
        with self._cv:
            if not self._cancels and not any(r._gen.opts.cancel is not None or
                                             r._gen.opts.max_time is not None
                                             for r in self._running):
                return
            self._cancels = 0
            gone = [r for r in self._waiting if r._cancel]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._end_cancelled(r)
        for r in list(self._running):
            if r._cancel or (r._begun and r._gen.expired()):
                self._end_cancelled(r)

    def _admit(self) -> None:
        """Move waiting requests (oldest first) into the batch while their prompt and first
        token fit beside what the running sequences still need."""
        bs = self.block_size
        with self._cv:
            if not self._waiting or len(self._running) >= self.max_batch:
                return
            free = self.pool.blocks_free - sum(
                _blocks(min(r._gs.n_tokens + 1, self.context), bs) - _blocks(r._sess.n_tokens, bs)
                for r in self._running)
            while self._waiting and len(self._running) < self.max_batch:
                r = self._waiting[0]
                need = _blocks(min(r._gs.n_tokens + 1, self.context), bs)
                if need > free and self._running:
                    break
                self._waiting.popleft()
                free -= need
                self._running.append(r)
                r.status = "running"
        for r in self._running:
            if not r._begun:
                r._begun = True
                r._gen.begin()

    def _plan(self) -> list:
        """The step's runs (request, tokens, logits mode): one token of each decoding
        sequence, then prompt chunks (oldest request first) up to prefill_chunk tokens."""
        decode = [r for r in self._running if r._prefilled and r._pending == 1]
        batch = [(r, 1, "last") for r in decode]
        budget = self.prefill_chunk
        for r in self._running:
            if budget <= 0:
                break
            if r._prefilled and r._pending == 1:
                continue
            pending = r._pending
            k = min(pending, budget)
            budget -= k
            batch.append((r, k, "all" if r._echo else ("last" if k == pending else "none")))
        return batch

    def _fit(self, batch: list) -> list:
        """Preempt the youngest sequences until the step's new blocks fit the pool."""
        bs = self.block_size

        def need(b):
            return sum(_blocks(r._sess.n_tokens + k, bs) - _blocks(r._sess.n_tokens, bs)
                       for r, k, _ in b)
        while need(batch) > self.pool.blocks_free and len(self._running) > 1:
            victim = self._running[-1]
            self._preempt(victim)
            batch = [b for b in batch if b[0] is not victim]
        return batch

    def _preempt(self, r: Request) -> None:
        """Free r's blocks and put it first in the queue; it is prefilled again later."""
        self._running.remove(r)
        r._sess.truncate(0)
        if r._echo:                       # the prompt's logprobs are computed again
            r._gen.prompt_logprobs = None
        r.preemptions += 1
        r.status = "waiting"
        with self._cv:
            self._waiting.appendleft(r)
            self.counters["preemptions"] += 1

    def _advance(self, r: Request, k: int, mode: str, out, feed) -> int:
        """After the forward pass: prompt logprobs (echo), then the next token once the
        sequence's pending tokens have all run. Returns the tokens generated (0 or 1)."""
        caught_up = r._pending == 0
        if r._echo:
            self._prompt_logprobs(r, k, out)
        if not caught_up:
            return 0
        row = out if mode == "last" else out[k - 1]
        gen = r._gen
        if not r._prefilled:
            r._prefilled = True
            with self._cv:
                self.counters["prompt_tokens"] += len(r.prompt_ids)
            final = gen.prefilled()
            if final is not None:
                self._end(r, final)
                return 0
        chunk = gen.step(row)
        if chunk.finish_reason is not None:
            self._end(r, chunk)
        else:
            r._deliver(chunk)
        return 1

    def _prompt_logprobs(self, r: Request, k: int, out) -> None:
        """echo: the logprob of each prompt token after the first, from the rows just run."""
        gen, n = r._gen, r._sess.n_tokens
        start = n - k
        if gen.prompt_logprobs is None:
            gen.prompt_logprobs = [TokenLogprob(int(r.prompt_ids[0]), None, [])]
        targets = np.asarray(r.prompt_ids[start + 1:n + 1], np.int32)
        if len(targets):
            gen.prompt_logprobs += _logprob_rows(out[:len(targets)], targets,
                                                 gen.opts.logprobs or 0)
        if n >= len(r.prompt_ids):
            r._echo = False

    def _end(self, r: Request, final) -> None:
        if r in self._running:
            self._running.remove(r)
        r._close(final)
        with self._cv:
            self.counters["finished"] += 1
            if final.finish_reason == "cancelled":
                self.counters["cancelled"] += 1

    def _end_cancelled(self, r: Request) -> None:
        if r.status == "done":
            return
        gen = r._gen
        if not r._begun:
            r._begun = True
            gen.begin()
        self._end(r, gen.cancel())

    def _fail(self, r: Request, exc: Exception) -> None:
        if r.status == "done":
            return
        if r in self._running:
            self._running.remove(r)
        r._close(exc, error=exc)
        with self._cv:
            self.counters["failed"] += 1

# ------------------------------------------------------------------------------------------
# batch generation for Model


def _per_item_options(n: int, per_item, shared: dict, what: str) -> list:
    unknown = set(shared) - set(OPTION_NAMES)
    if "stream" in shared:
        raise TypeError(f"{what}: stream=True is not supported; use a Scheduler to stream")
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    if per_item is None:
        return [dict(shared)] * n
    per_item = list(per_item)
    if len(per_item) != n:
        raise ValueError(f"{what}: {n} inputs but {len(per_item)} option dicts")
    out = []
    for i, o in enumerate(per_item):
        if o is None:
            o = {}
        if not isinstance(o, dict):
            raise ValueError(f"{what}: options[{i}] must be a dict, got {type(o).__name__}")
        bad = set(o) - set(OPTION_NAMES)
        if bad:
            raise TypeError(f"options[{i}]: unexpected option(s): {', '.join(sorted(bad))}")
        out.append({**shared, **o})
    return out


def _run_batch(model, items: list, options: list, stop_token_ids, max_batch, kv_budget,
               prefill_chunk) -> list:
    """Run (ids, options) items through a private scheduler on this thread; results in order."""
    if not items:
        return []
    opts = []
    for i, o in enumerate(options):
        try:
            opts.append(GenerationOptions.make(model.vocab_size, **o))
        except (TypeError, ValueError) as e:
            raise type(e)(f"prompt {i}: {e}") from None
    for i, ids in enumerate(items):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(ids) > model.context_length:
            raise ContextLengthError(f"prompt {i} has {len(ids)} tokens but the context holds "
                                     f"{model.context_length}")
    if kv_budget is None:
        # room for every request at once, within DEFAULT_KV_BUDGET, but never less than the
        # longest one needs (so that each can run to the end exactly as alone)
        bs, per_block = kv_geometry(model)
        needs = [_blocks(min(len(ids) + o.max_new_tokens, model.context_length), bs)
                 for ids, o in zip(items, opts)]
        cap = parse_kv_budget(DEFAULT_KV_BUDGET)[1] // per_block
        kv_budget = max(min(sum(needs), cap), max(needs)) * bs
    sched = Scheduler(model, kv_budget, max_batch=max_batch or DEFAULT_MAX_BATCH,
                      prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK)
    try:
        reqs = [sched.submit(ids, o, stop_token_ids=stop_token_ids) for ids, o in zip(items, opts)]
        sched.run()
        return [r.wait(0) for r in reqs]
    finally:
        sched.close()


def generate_batch(model, prompts, options=None, *, max_batch=None, kv_budget=None,
                   prefill_chunk=None, special: bool = False, **shared) -> list:
    """Model.generate_batch: see there."""
    prompts = list(prompts)
    if isinstance(options, dict):
        raise TypeError("generate_batch: give per-prompt options as a list of dicts (one per "
                        "prompt), shared ones as keyword arguments")
    per = _per_item_options(len(prompts), options, shared, "generate_batch")
    items = []
    for i, p in enumerate(prompts):
        try:
            items.append(model.encode_prompt(p, special=special).tolist())
        except ValueError as e:
            raise type(e)(f"prompt {i}: {e}") from None
    return _run_batch(model, items, per, None, max_batch, kv_budget, prefill_chunk)


def chat_batch(model, conversations, options=None, *, max_batch=None, kv_budget=None,
               prefill_chunk=None, **shared) -> list:
    """Model.chat_batch: see there."""
    from .chat import chat_prompt_ids, chat_stop_ids, require_tokenizer
    tok = require_tokenizer(model)
    conversations = list(conversations)
    if isinstance(options, dict):
        raise TypeError("chat_batch: give per-conversation options as a list of dicts, shared "
                        "ones as keyword arguments")
    per = _per_item_options(len(conversations), options, shared, "chat_batch")
    items = []
    for i, messages in enumerate(conversations):
        try:
            items.append(chat_prompt_ids(tok, messages))
        except ValueError as e:
            raise type(e)(f"conversation {i}: {e}") from None
    return _run_batch(model, items, per, chat_stop_ids(tok), max_batch, kv_budget, prefill_chunk)
