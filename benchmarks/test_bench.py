"""pytest-benchmark suite: kernels per table, decode and prefill per shape and dtype, the NumPy
reference. The measurements are llama2c.bench's (the same as `llama2c bench` and
benchmarks/report.py): pytest-benchmark times the same phases, with the untimed set-up
(weight packing, the 1-token prompt, emptying the cache) outside the timed call.

    pytest benchmarks/ --benchmark-only        (LLAMA2C_BENCH_THREADS, default 2)
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama2c import bench  # noqa: E402
from llama2c import _engine as E  # noqa: E402

THREADS = int(os.environ.get("LLAMA2C_BENCH_THREADS", "2"))
DECODE_TOKENS = 32
PROMPTS = (128, 512)


# ---- kernels: SmolLM2's w1 (1536 x 576); weights packed once, outside the timed call ----------

@pytest.mark.parametrize("simd", bench.available_simd())
@pytest.mark.parametrize("T", [1, 4, 64])
@pytest.mark.parametrize("dtype", ["fp32", "int8", "q4"])
def test_matmul(benchmark, dtype, T, simd):
    case = bench.MatmulCase(dtype, simd, T, 1536, 576, THREADS)
    benchmark.extra_info["GOP"] = case.ops / 1e9
    benchmark(case.run)


@pytest.mark.parametrize("simd", bench.available_simd())
@pytest.mark.parametrize("rows", [1, 64])
def test_attention_4k(benchmark, simd, rows):
    """One SmolLM2 layer's attention (9 heads, 3 kv heads, head 64) over 4,096 cached
    positions in the f16 cache: a decode row, or a 64-row prefill tile at the end."""
    rng = np.random.default_rng(0)
    ctx = 4096
    q = rng.standard_normal((rows, 576)).astype(np.float32)
    k = rng.standard_normal((ctx, 192)).astype(np.float32)
    v = rng.standard_normal((ctx, 192)).astype(np.float32)
    benchmark.pedantic(E.attention_seqs, args=([q], [k], [v], [ctx - rows], 9, 3), kwargs=dict(
        simd=simd, kv_dtype="f16", n_threads=THREADS, readback=False), rounds=5)


# ---- the model: decode and prefill per shape and dtype ----------------------------------------

@pytest.fixture(scope="module", params=bench.README_SHAPES)
def shape(request):
    return request.param


@pytest.fixture(scope="module", params=["fp32", "int8"])
def engine(request, shape):
    e = bench.Llama2c.from_shape(shape, request.param)
    yield e
    e.close()


def test_decode(benchmark, engine):
    """DECODE_TOKENS greedy tokens after a 1-token prompt (bench.Llama2c.time_decode)."""
    def setup():
        sess, tok = engine.start_decode(THREADS, DECODE_TOKENS + 1)
        return (sess, tok, DECODE_TOKENS), {}
    benchmark.extra_info.update(tokens=DECODE_TOKENS, weight_bytes=engine.weight_bytes)
    benchmark.pedantic(engine.decode_steps, setup=setup, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("n", PROMPTS)
def test_prefill(benchmark, engine, n):
    """An n-token prompt from an empty cache (bench.Llama2c.time_prefill)."""
    ids = bench.prompt_ids(n, engine.config.vocab_size)

    def setup():
        return (engine.start_prefill(THREADS, n), ids), {}
    benchmark.extra_info.update(tokens=n, GOP_per_token=bench.prefill_ops_per_token(engine.config, n) / 1e9)
    benchmark.pedantic(engine.prefill, setup=setup, rounds=3, warmup_rounds=1)


def test_reference_decode(benchmark, shape):
    ref = bench.Reference.of(bench.Llama2c.from_shape(shape, "fp32"))
    benchmark.pedantic(ref.time_decode, args=(16, THREADS), rounds=2, warmup_rounds=1)
