"""The shared Q4_K_M file (Q4_K, Q6_K, Q5_0, Q8_0, F32 tensors) against
golden/smollm2_q4km_exact.json: gguf-py's dequantized weights through a float64 NumPy forward.

fp32 path: our float32 NumPy reference and the C engine, last logits within 1e-4 relative and
the same greedy tokens. Integer paths: the file's blocks exactly as int8 groups (dtype='int8')
and as stored (default: Q4_K as 4-bit groups), last logits within 1e-3 and greedy equal for
the first 16 tokens."""
import json

import numpy as np
import pytest

import llama2c
from llama2c.loaders import load_any
from llama2c.reference import ReferenceModel

GGUF = "SmolLM2-135M-Instruct.Q4_K_M.gguf"
FP32_RTOL = 1e-4      # float32 computation vs the float64 golden
INT_RTOL = 1e-3       # exact integer weights, 16-bit two-plane activations


@pytest.fixture(scope="module")
def golden(shared_dir):
    path = shared_dir / "models" / GGUF
    if not path.is_file():
        pytest.skip(f"{path} not found")
    cases = json.loads((shared_dir / "golden" / "smollm2_q4km_exact.json").read_text())["cases"]
    logits = np.load(shared_dir / "golden" / "smollm2_q4km_exact_last_logits.npz")
    return path, cases, logits


def _rel(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_reference_fp32_matches_golden(golden):
    """The NumPy reference on dtype='fp32' weights (gguf-py's values bit for bit): last logits
    within 1e-4; teacher-forced along the golden greedy sequence, every argmax is the golden
    next token (which is what greedy decoding equal to the golden means), in one batch."""
    path, cases, logits = golden
    cfg, weights, meta = load_any(path, dtype="fp32")
    assert {meta["tensor_types"][n] for n in weights} == {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"}
    ref = ReferenceModel(cfg, weights)
    for i, case in enumerate(cases):
        out = ref.logits((case["ids"] + case["greedy"])[:-1])
        n = len(case["ids"])
        assert _rel(out[n - 1], logits[f"p{i}"]) <= FP32_RTOL, case["prompt"]
        picks = out[n - 1:n - 1 + len(case["greedy"])].argmax(axis=1).tolist()
        assert picks == case["greedy"], case["prompt"]


def test_engine_fp32_matches_golden(golden):
    path, cases, logits = golden
    # the fp32 path: fp32 weights and an fp32 KV cache
    model = llama2c.Model.load(path, dtype="fp32", context_length=256, kv_dtype="f32")
    assert model.dtype == "fp32"
    for i, case in enumerate(cases):
        assert _rel(model.logits(case["ids"])[-1], logits[f"p{i}"]) <= FP32_RTOL, case["prompt"]
        out = model.generate(case["ids"], max_new_tokens=len(case["greedy"]), temperature=0)
        assert out.token_ids == case["greedy"], case["prompt"]


def _check_integer_path(model, cases, logits):
    for i, case in enumerate(cases):
        assert _rel(model.logits(case["ids"])[-1], logits[f"p{i}"]) <= INT_RTOL, case["prompt"]
        n = min(16, len(case["greedy"]))
        out = model.generate(case["ids"], max_new_tokens=n, temperature=0).token_ids
        assert out == case["greedy"][:n], case["prompt"]


def test_int8_exact_blocks_match_golden(golden):
    """dtype='int8': every block type as exact int8 groups (Q4_K widened, Q6_K at group 16)."""
    path, cases, logits = golden
    model = llama2c.Model.load(path, dtype="int8", context_length=256)
    kinds = {(t.dtype, t.group_size) for t in model.manifest.values() if t.dtype != "fp32"}
    assert kinds == {("int8", 32), ("int8", 16)}
    _check_integer_path(model, cases, logits)


def test_default_4bit_path_matches_golden(golden):
    """The default load keeps Q4_K as 4-bit groups of 32 (and Q6_K as int8 groups of 16), and
    the engine runs them as stored."""
    path, cases, logits = golden
    model = llama2c.Model.load(path, context_length=256)
    kinds = {(t.dtype, t.group_size) for t in model.manifest.values() if t.dtype != "fp32"}
    assert ("q4", 32) in kinds and ("int8", 16) in kinds
    _check_integer_path(model, cases, logits)
