"""The README's benchmark tables: `llama2c bench` runs (llama2c/bench.py), one per section.

    PYTHONPATH=. python benchmarks/report.py [--sections shapes,gguf] [--repeat 3] [--threads 1,2]

Sections (each prints the `llama2c bench` command line it runs, then its Markdown tables):
  shapes    random weights of stories15M, stories110M and SmolLM2-135M: fp32, int8 (16-bit and
            8-bit activations) and the NumPy reference; decode, prefill of 128 and 512 tokens
  gguf      the real SmolLM2-135M-Instruct Q4_1 and Q4_K_M files: their own 4-bit weights (auto)
            and widened to int8, avx512 and avx2 tables (+ llama.cpp on the same files)
  llamacpp  issue 11's comparison: our int8 on the Q8_0 file and fp32 on the F32 file (made by
            benchmarks/make_peer_models.py) against llama.cpp on the same files, 121- and
            512-token prompts, on the avx512 table against the AVX-512 llama.cpp and on the
            avx2 table against the AVX2-only build (--avx2-python)
  long      issue 13's long context: our 4-bit and int8 on the Q4_1 file, llama.cpp on the
            Q4_1 and Q8_0 files; prefill of 1000, 4000 and 8000 tokens, decode after them,
            resident memory

Every figure is the best of --repeat interleaved rounds: each round runs every engine once.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2c import bench  # noqa: E402
from llama2c.cli import build_parser  # noqa: E402

AVX2_PYTHON = "/work/peers/venv-avx2/bin/python"


def has_llamacpp(python: str = sys.executable) -> bool:
    try:
        bench.llamacpp_build(python)
        return True
    except (OSError, subprocess.CalledProcessError, FileNotFoundError):
        return False


def sections(args) -> dict:
    """Section name -> list of `llama2c bench` command lines."""
    common = ["--repeat", str(args.repeat), "--tokens", str(args.tokens)]
    if args.quiet:
        common.append("--quiet")
    out = {"shapes": [[shape, "--dtype", "fp32,int8", "--act-bits", "16,8", "--peers", "reference",
                       "--threads", args.threads] + common for shape in args.shapes.split(",")]}
    q4_1 = bench.find_model(bench.SMOLLM2_GGUF)
    f32, q8 = (bench.find_model(name) for name in bench.PEER_GGUFS)
    q4km = bench.find_model(bench.SMOLLM2_Q4KM_GGUF)
    if q4_1:
        # issue 9: the files' own 4-bit weights (auto) against them widened to int8, on both
        # kernel tables, with llama.cpp on the same files
        files = [str(q4_1)] + ([str(q4km)] if q4km else [])
        simd = "avx512,avx2" if "avx512" in bench.available_simd() else "avx2"
        line = files + ["--dtype", "auto,int8", "--simd", simd, "--threads", args.threads,
                        "--prompt", "128"] + common
        if has_llamacpp():
            line += ["--peers", "llamacpp"]
        out["gguf"] = [line]
    if f32 and q8:
        pythons = [sys.executable] + ([args.avx2_python] if os.path.exists(args.avx2_python) else [])
        simd = "avx512,avx2" if "avx512" in bench.available_simd() else "avx2"
        out["llamacpp"] = [[str(q8), str(f32), "--simd", simd, "--threads", "2", "--prompt", "121,512",
                            "--peers", "llamacpp", "--llamacpp-python", ",".join(pythons)] + common]
    if q4_1 and q8:
        out["long"] = [[str(q4_1), "--dtype", "auto,int8", "--long-context", "--threads", "2",
                        "--tokens", "32", "--repeat", str(args.repeat), "--peers", "llamacpp",
                        "--llamacpp-models", f"{q4_1},{q8}"] + (["--quiet"] if args.quiet else [])]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="shapes,gguf",
                    help="comma-separated: shapes, gguf, llamacpp, long (default shapes,gguf)")
    ap.add_argument("--shapes", default=",".join(bench.README_SHAPES))
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to decode (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--avx2-python", default=AVX2_PYTHON,
                    help=f"interpreter of the AVX2-only llama-cpp-python (default {AVX2_PYTHON})")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    available = sections(args)
    parser = build_parser()
    for name in args.sections.split(","):
        if name not in available:
            print(f"\n## {name}: skipped (its model files are missing; see "
                  "benchmarks/make_peer_models.py)\n", flush=True)
            continue
        for line in available[name]:
            print(f"\n## {name}\n\n    llama2c bench {shlex.join(line)}\n", flush=True)
            bench.run_command(parser.parse_args(["bench"] + line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
