"""Shared pytest fixtures: where the test data lives."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared test-data folder ($LLAMA2C_TEST_DATA, default ../shared); skip if missing."""
    d = Path(os.environ.get("LLAMA2C_TEST_DATA", Path(__file__).resolve().parents[1] / ".." / "shared"))
    if not d.is_dir():
        pytest.skip(f"shared test data not found at {d} (set LLAMA2C_TEST_DATA)")
    return d.resolve()


@pytest.fixture(scope="session")
def smollm2_hf_dir(shared_dir, tmp_path_factory) -> Path:
    """A Hugging Face directory (fp32 safetensors, HF Q/K layout, config.json, SmolLM2's tokenizer
    files) holding the weights of the shared SmolLM2 Q4_1 GGUF, dequantized to fp32."""
    from llama2c.loaders.gguf import load_gguf
    from llama2c.loaders.hf import write_hf_dir
    gguf_path = shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer_dir = shared_dir / "models" / "smollm2-hf-tokenizer"
    if not gguf_path.is_file():
        pytest.skip(f"{gguf_path} not found")
    cfg, weights, _ = load_gguf(gguf_path, dtype="fp32")
    return write_hf_dir(cfg, weights, tmp_path_factory.mktemp("smollm2-hf"),
                        tokenizer_dir if tokenizer_dir.is_dir() else None)
