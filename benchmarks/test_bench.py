"""pytest-benchmark suite: kernels, decode and prefill on the benchmark shapes.

    pytest benchmarks/ --benchmark-only            (benchmarks/report.py prints the summary table)
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llama2c  # noqa: E402
from llama2c import _engine as E  # noqa: E402
from llama2c.reference import ReferenceModel  # noqa: E402
from llama2c.testing import make_random_model  # noqa: E402
from llama2c.weights import fit_group_size, quantize_q4, quantize_q8, quantize_weights  # noqa: E402
from shapes import SHAPES  # noqa: E402

THREADS = int(os.environ.get("LLAMA2C_BENCH_THREADS", "2"))
rng = np.random.default_rng(0)


def _packed(kind):
    """A (1536, 576) matrix (SmolLM2's w1) packed once, as the engine holds it."""
    w = rng.standard_normal((1536, 576)).astype(np.float32)
    return E.PackedMatrix({"f32": w, "q8": quantize_q8(w, 32), "q4": quantize_q4(w, 32)}[kind])


@pytest.mark.parametrize("simd", E.available_simd())
@pytest.mark.parametrize("T", [1, 64])
def test_matmul_f32(benchmark, simd, T):
    P = _packed("f32")
    x = rng.standard_normal((T, 576)).astype(np.float32)
    out = np.empty((T, 1536), np.float32)
    benchmark(P.matmul, x, out, simd=simd, n_threads=THREADS)


@pytest.mark.parametrize("simd", E.available_simd())
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("kind", ["q8", "q4"])
@pytest.mark.parametrize("act_bits", [16, 8])
def test_matmul_quantized(benchmark, simd, T, kind, act_bits):
    """The packed matrix's matmul on activations quantized beforehand (the engine quantizes
    once per layer input and reuses it for the matrices that read it)."""
    P = _packed(kind)
    x = rng.standard_normal((T, 576)).astype(np.float32)
    a = E.quantize(x, 32, act_bits, simd=simd)
    out = np.empty((T, 1536), np.float32)
    benchmark(P.matmul_q, a, out, simd=simd, n_threads=THREADS)


@pytest.mark.parametrize("simd", E.available_simd())
def test_attention_1k(benchmark, simd):
    q = rng.standard_normal((1, 576)).astype(np.float32)
    kc = rng.standard_normal((1024, 192)).astype(np.float32)
    vc = rng.standard_normal((1024, 192)).astype(np.float32)
    out = np.empty_like(q)
    benchmark(E.attention, out, q, kc, vc, 1023, 9, 3, simd=simd, n_threads=THREADS)


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request):
    cfg = SHAPES[request.param]
    return request.param, cfg, make_random_model(cfg, 0)


def c_model(shape, dtype):
    """The C engine on the shape's random weights, fp32 or int8."""
    name, cfg, w = shape
    if dtype == "int8":
        w = quantize_weights(cfg, w, fit_group_size(cfg, 64))
    return llama2c.Model(cfg, w, n_threads=THREADS)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_decode_32_tokens(benchmark, shape, dtype):
    model = c_model(shape, dtype)
    benchmark.extra_info["tokens"] = 32
    benchmark.pedantic(model.generate, args=([1],), kwargs=dict(
        max_new_tokens=32, temperature=0, stop_token_ids=[]), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_prefill_128(benchmark, shape, dtype):
    model = c_model(shape, dtype)
    prompt = list(range(1, 129))
    benchmark.pedantic(model.generate, args=(prompt,), kwargs=dict(max_new_tokens=1, temperature=0),
                       rounds=3, warmup_rounds=1)


def test_reference_decode_16_tokens(benchmark, shape):
    name, cfg, w = shape
    ref = ReferenceModel(cfg, w)
    benchmark.pedantic(ref.generate, args=([1], 16), rounds=2, warmup_rounds=1)
