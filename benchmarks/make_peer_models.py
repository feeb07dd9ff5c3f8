"""Write the F32 and Q8_0 GGUF files of SmolLM2-135M-Instruct for the llama.cpp comparisons.

    python benchmarks/make_peer_models.py [--src SmolLM2-135M-Instruct.Q4_1.gguf] [--out /work/peers/models]

1. <out>/SmolLM2-135M-Instruct.F32.gguf: every tensor of the shared Q4_1 file dequantized to
   float32 exactly as gguf-py does (gguf.quants.dequantize), all metadata kept (architecture,
   hyperparameters, tokenizer, chat template) except general.file_type (now ALL_F32).
2. <out>/SmolLM2-135M-Instruct.Q8_0.gguf: that F32 file quantized by llama.cpp itself
   (llama_cpp.llama_model_quantize, LLAMA_FTYPE_MOSTLY_Q8_0), as llama-quantize would.

Our engine loads the F32 file as fp32 and the Q8_0 file as int8 (its Q8_0 blocks map exactly
to int8 groups of 32), so both engines run the same weights. Needs gguf (gguf-py) and
llama-cpp-python; nothing here is a test dependency, and nothing it writes is committed.
Files that exist are kept (--force rewrites them).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama2c.bench import PEER_GGUFS, SMOLLM2_GGUF, find_model  # noqa: E402


def write_f32(src: Path, dst: Path) -> None:
    """src GGUF -> dst GGUF with every tensor dequantized to float32, metadata kept."""
    import gguf
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for fld in reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer adds the architecture itself
        if fld.name.startswith("GGUF.") or fld.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if fld.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(fld.name, fld.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, np.ascontiguousarray(w))
        print(f"  {t.name}: {t.tensor_type.name} {tuple(w.shape)} -> F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_q8_0(src: Path, dst: Path, threads: int) -> None:
    """src GGUF -> dst GGUF quantized to Q8_0 by llama.cpp."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with status {rc}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", help=f"the Q4_1 file (default: {SMOLLM2_GGUF} in the shared models)")
    ap.add_argument("--out", default=str(Path(os.environ.get("LLAMA2C_PEERS", "/work/peers")) / "models"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    src = Path(args.src) if args.src else find_model(SMOLLM2_GGUF)
    if src is None or not src.is_file():
        ap.error(f"cannot find {args.src or SMOLLM2_GGUF} (set LLAMA2C_TEST_DATA or --src)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f32, q8 = out / PEER_GGUFS[0], out / PEER_GGUFS[1]
    if args.force or not f32.exists():
        print(f"{src} -> {f32}")
        write_f32(src, f32.with_suffix(".tmp"))
        f32.with_suffix(".tmp").rename(f32)
    if args.force or not q8.exists():
        print(f"{f32} -> {q8}")
        write_q8_0(f32, q8.with_suffix(".tmp"), args.threads)
        q8.with_suffix(".tmp").rename(q8)
    for p in (f32, q8):
        print(f"{p}: {p.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
