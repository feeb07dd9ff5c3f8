"""The real model: SmolLM2-135M-Instruct (GGUF, Q4_1) against Hugging Face transformers' outputs
(../shared/golden/smollm2_public.json): token ids, last-position logits, greedy generation."""
import json

import numpy as np
import pytest

import llama2c
from llama2c.reference import ReferenceModel

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def golden(shared_dir):
    path = shared_dir / "models" / GGUF
    if not path.is_file():
        pytest.skip(f"{path} not found")
    cases = json.loads((shared_dir / "golden" / "smollm2_public.json").read_text())["cases"]
    logits = np.load(shared_dir / "golden" / "smollm2_public_last_logits.npz")
    return path, cases, logits


@pytest.fixture(scope="module")
def fp32(golden):
    return llama2c.Model.load(golden[0], dtype="fp32", context_length=2048)


@pytest.fixture(scope="module")
def int8(golden):
    return llama2c.Model.load(golden[0], dtype="int8", context_length=2048)


def test_config_and_tokenizer_from_the_file(fp32):
    c = fp32.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == \
        (576, 30, 9, 3, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.shared_classifier and c.seq_len == 8192
    assert fp32.tokenizer.kind == "bpe" and 2 in fp32.tokenizer.eos_ids


def test_prompt_ids_match(golden, fp32):
    _, cases, _ = golden
    for case in cases:
        assert fp32.tokenizer.encode(case["prompt"]) == case["ids"]


def test_fp32_last_logits_match_transformers(golden, fp32):
    _, cases, logits = golden
    for i, case in enumerate(cases):
        want = logits[f"p{i}"]
        got = fp32.logits(case["ids"])[-1]
        err = np.abs(got - want).max()
        assert err <= 1e-3 * np.abs(want).max(), (case["prompt"], err)
        assert got.argmax() == want.argmax()


def test_fp32_greedy_matches_transformers(golden, fp32):
    _, cases, _ = golden
    for case in cases:
        out = fp32.generate(case["ids"], max_new_tokens=len(case["greedy"]), temperature=0)
        assert out.token_ids == case["greedy"], case["prompt"]
        if case["greedy"][-1] == 2:
            assert out.finish_reason == "stop"


def test_int8_greedy_agrees_for_16_tokens(golden, int8, fp32):
    """int8 weights (the GGUF's Q4_1/Q8_0 blocks mapped exactly to int8 groups of 32 with
    offsets) and two-plane activations: greedy equals the fp32 path (and transformers) for at
    least the first 16 tokens of every prompt; the last-position logits stay within 0.05."""
    _, cases, logits = golden
    assert int8.dtype == "int8" and int8.act_bits == 16
    for i, case in enumerate(cases):
        out = int8.generate(case["ids"], max_new_tokens=16, temperature=0).token_ids
        n = min(16, len(case["greedy"]))
        assert out[:n] == case["greedy"][:n], case["prompt"]
        got, want = int8.logits(case["ids"])[-1], fp32.logits(case["ids"])[-1]
        assert np.abs(got - want).max() < 0.05


def test_int8_with_8bit_activations_stays_close(golden):
    """llama2.c runq.c's scheme (8-bit activations): measured greedy agreement of 10, 5 and
    16+ tokens (each split at a near-tie of the fp32 logits: margins 0.022 and 0.22) and about
    96% teacher-forced top-1 agreement."""
    path, cases, logits = golden
    int8 = llama2c.Model.load(path, act_bits=8, context_length=256)
    fp32 = llama2c.Model.load(path, dtype="fp32", context_length=256)
    for i, case in enumerate(cases):
        assert int8.logits(case["ids"])[-1].argmax() == logits[f"p{i}"].argmax()
        seq = case["ids"] + case["greedy"][:16]
        n = len(case["ids"]) - 1
        top1 = (int8.logits(seq)[n:].argmax(1) == fp32.logits(seq)[n:].argmax(1)).mean()
        assert top1 >= 0.9, (case["prompt"], top1)


def test_text_generation_from_a_string(fp32):
    out = fp32.generate("The capital of France is", max_new_tokens=3, temperature=0)
    assert out.text.startswith(" Paris")


def test_long_prompt_matches_reference(golden, fp32):
    """~1000 positions: RoPE at theta 1e5 far past short prompts, C vs the NumPy reference."""
    text = " ".join(f"Item {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7} marbles."
                    for i in range(90))
    ids = fp32.tokenizer.encode(text)[:1000]
    assert len(ids) >= 900
    from llama2c.loaders import load_any
    cfg, weights, _ = load_any(golden[0], dtype="fp32")
    ref = ReferenceModel(cfg, weights)
    got = fp32.logits(ids)
    want = ref.logits(ids)
    for row in (0, len(ids) // 2, len(ids) - 1):
        assert np.abs(got[row] - want[row]).max() <= 1e-3 * np.abs(want[row]).max()
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.99


def test_hf_directory_gives_the_same_logits(golden, fp32, smollm2_hf_dir):
    """A Hugging Face directory (HF names, HF q/k layout, safetensors) written from the GGUF's
    weights loads and computes the same logits as the GGUF path."""
    _, cases, _ = golden
    hf = llama2c.Model.load(smollm2_hf_dir, dtype="fp32", context_length=256)
    assert hf.tokenizer.encode(cases[0]["prompt"]) == cases[0]["ids"]
    a, b = hf.logits(cases[0]["ids"]), fp32.logits(cases[0]["ids"])
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_default_load_keeps_the_files_blocks(golden, int8):
    """dtype=None is 'as stored': the GGUF's Q4_1 blocks stay 4-bit groups of 32 with offsets,
    its Q8_0 embedding int8; dtype='int8' widens the same values exactly."""
    model = llama2c.Model.load(golden[0], context_length=64)
    assert model.dtype == "q4"          # 4-bit layers; the embedding (classifier) int8
    wq = model.manifest["layers.0.wq"]
    assert (wq.dtype, wq.group_size, wq.has_offset) == ("q4", 32, True)
    assert model.manifest["tok_embeddings"].dtype == "int8"
    w2 = int8.manifest["layers.0.w2"]
    assert (w2.dtype, w2.group_size, w2.has_offset) == ("int8", 32, True)
    ids = model.tokenizer.encode("The same weights give the same logits.")
    assert np.array_equal(model.logits(ids), int8.logits(ids))
