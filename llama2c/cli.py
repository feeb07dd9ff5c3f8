"""The `llama2c` command line (also `python -m llama2c`).

    llama2c run [MODEL] -i "Once upon a time" -n 256 --stop "."          generate, like llama2.c's run
    llama2c chat [MODEL] -y "You are terse."                             interactive chat
    llama2c pull [NAME]                                                  download a model
    llama2c quantize IN OUT [--group-size N]                             -> llama2.c v2 int8 file
    llama2c convert IN OUT --dtype fp32|int8 [--format v1|v2|hf]         between formats
    llama2c perplexity MODEL FILE [--compare]                            perplexity of a text
    llama2c bench [MODEL...] [--simd L] [--threads L] [--peers L]        speed vs the machine's limits
    llama2c info MODEL                                                   what a model file holds
    llama2c serve [MODEL] [--port 8000] [--api-key KEY] [--ray]          OpenAI-compatible server
    llama2c batch MODEL IN.jsonl OUT.jsonl [--ray auto]                  offline batch job, resumable

Every command returns an exit code: 0 on success, 2 for a bad command line or parameter,
1 when the work itself fails (missing or malformed file, ...). Such failures are reported
as `llama2c: error: ...` on stderr, never as a traceback; warnings as `llama2c: warning: ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from .errors import Llama2cError, TokenizerError
from .weights import fit_group_size

PROG = "llama2c"
LLAMA2C_BOS_ID = 1        # llama2.c's BOS, the prompt of `run` without a tokenizer or text
DEFAULT_GROUP_SIZE = 64


class UsageError(Exception):
    """A bad command line or parameter: reported with exit code 2."""

    def __init__(self, message: str, usage: str = ""):
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing and exiting, so that
    main() returns the exit code (and formats the message) itself."""

    def error(self, message):
        raise UsageError(message, self.format_usage())


# ---- argument types ----------------------------------------------------------------------------

def _ranged(convert, what: str, lo=None, hi=None, note: str = ""):
    """An argparse type: `convert` the text, then check lo <= value <= hi (finite)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or (
                lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo:g}" if hi is None else f"in [{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}{note}, got {text}")
        return value
    return parse


TEMPERATURE = _ranged(float, "a number", 0.0, note=" (0 is greedy decoding)")
TOP_P = _ranged(float, "a number", 0.0, 1.0)
PENALTY = _ranged(float, "a number", -2.0, 2.0)
REPEAT_PENALTY = _ranged(float, "a number", 1e-6, note=" (1 is off)")
COUNT = _ranged(int, "an integer", 0)
POSITIVE = _ranged(int, "an integer", 1)
SEED = _ranged(int, "an integer", 0, 2**64 - 1)


def KV_DTYPE(text: str) -> str:
    """A KV cache type for --kv-dtype: f16, f32, q8, or keys/values as f16/q8."""
    from ._engine import kv_dtype_name
    try:
        return kv_dtype_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---- parser ------------------------------------------------------------------------------------

def _add_model(p, optional: bool) -> None:
    """The MODEL positional, optional where a default model exists."""
    if optional:
        p.add_argument("model", nargs="?", metavar="MODEL",
                       help="model file or directory (default: the default model, downloaded "
                            "on first use)")
    else:
        p.add_argument("model", metavar="MODEL",
                       help="model file: llama2.c .bin (v0/v1/v2), GGUF, or a Hugging Face directory")


def _add_load_options(p, tokenizer: bool = True) -> None:
    """Options passed to Model.load."""
    if tokenizer:
        p.add_argument("-z", "--tokenizer", metavar="TOKENIZER",
                       help="tokenizer (tokenizer.bin, tokenizer.json or a directory); default: "
                            "the model's own, or a matching tokenizer.bin beside it")
    p.add_argument("--threads", type=POSITIVE, metavar="N",
                   help="threads for the kernels (default: OMP_NUM_THREADS or the available cores)")
    p.add_argument("--dtype", choices=("auto", "fp32", "int8", "q4"),
                   help="weight type (default auto: as stored; int8 / q4 quantize other "
                        "weights at load)")
    p.add_argument("--simd", choices=("auto", "generic", "avx2", "avxvnni", "avx512"),
                   help="kernel table (default: LLAMA2C_SIMD or the best the CPU supports)")
    p.add_argument("--act-bits", type=int, choices=(8, 16), default=16,
                   help="activations of int8 matmuls: 16 (two int8 planes, default) or 8 "
                        "(llama2.c runq.c's: faster prefill, coarser)")
    p.add_argument("--kv-dtype", type=KV_DTYPE, default="f16", metavar="T",
                   help="KV cache element type: f16 (default), f32 (as run.c), q8 (int8), or "
                        "keys/values as f16/q8")


def _add_generation(p) -> None:
    """Generation flags shared by run and chat (same meaning and defaults in both)."""
    p.add_argument("-t", "--temperature", type=TEMPERATURE, default=1.0, metavar="TEMP",
                   help="sampling temperature, 0 = greedy (default 1.0)")
    p.add_argument("-p", "--top-p", type=TOP_P, default=0.9, metavar="TOPP",
                   help="nucleus sampling threshold in [0, 1], 1 = off (default 0.9)")
    p.add_argument("-k", "--top-k", type=COUNT, default=0, metavar="TOPK",
                   help="sample from the K most likely tokens only, 0 = off (default 0)")
    p.add_argument("--min-p", type=TOP_P, default=0.0, metavar="P",
                   help="drop tokens less likely than P x the most likely one, 0 = off "
                        "(default 0)")
    p.add_argument("--repeat-penalty", type=REPEAT_PENALTY, default=1.0, metavar="R",
                   help="divide the positive logits (multiply the negative ones) of tokens "
                        "seen in the last --repeat-last-n tokens, 1 = off (default 1.0)")
    p.add_argument("--presence-penalty", type=PENALTY, default=0.0, metavar="P",
                   help="subtract P from the logits of tokens seen (default 0)")
    p.add_argument("--frequency-penalty", type=PENALTY, default=0.0, metavar="F",
                   help="subtract F x count from the logits of tokens seen (default 0)")
    p.add_argument("--repeat-last-n", type=COUNT, default=64, metavar="N",
                   help="tokens (prompt included) the penalties look back over (default 64)")
    p.add_argument("-s", "--seed", type=SEED, metavar="SEED",
                   help="random seed (default: random)")
    p.add_argument("-n", "--max-new-tokens", type=COUNT, default=256, metavar="N",
                   help="most tokens to generate (per reply in chat); 0 = until the context "
                        "is full (default 256)")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop before this text (repeatable)")
    p.add_argument("--context", type=POSITIVE, dest="context_length", metavar="N",
                   help="positions of the KV cache (default: the model's context length)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = _Parser(prog=PROG, description="Fast CPU inference of Llama-architecture models.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="generate text from a prompt (llama2.c's run)",
                       description="Generate text from a prompt, streaming it to stdout; speed "
                                   "statistics go to stderr. Flags follow llama2.c's run "
                                   "(-m chat: chat, as `llama2c chat`). Ctrl-C stops the "
                                   "generation and prints the statistics so far.")
    _add_model(p, optional=True)
    p.add_argument("-i", "--prompt", metavar="PROMPT",
                   help="input prompt (with --ids: space-separated token ids; -m chat: the "
                        "first user message)")
    p.add_argument("-f", "--file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    _add_generation(p)
    p.add_argument("-m", "--mode", choices=("generate", "chat"), default="generate",
                   help="generate (default) or chat, as llama2.c's run")
    p.add_argument("-y", "--system", metavar="SYSTEM", help="system prompt (chat mode)")
    p.add_argument("--ids", action="store_true",
                   help="the prompt is token ids; without a tokenizer the output is ids too")
    p.add_argument("--special", action="store_true",
                   help="parse control-token text in the prompt (e.g. <|im_start|>) as control "
                        "tokens; by default it is plain text")
    _add_load_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="chat interactively with an instruction-tuned model",
                       description="Chat with a model that has a chat template; the KV cache "
                                   "is kept between turns. /reset starts over, /exit quits; "
                                   "Ctrl-C stops a reply.")
    _add_model(p, optional=True)
    p.add_argument("-y", "--system", metavar="SYSTEM", help="system prompt")
    p.add_argument("-i", "--prompt", metavar="PROMPT", help="first user message")
    p.add_argument("-f", "--file", metavar="FILE", help="read the first user message from a file")
    _add_generation(p)
    _add_load_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("pull", help="download a model into the cache and print its path",
                       description="Download a model (once) and print the path of its file.")
    p.add_argument("name", nargs="?", default="smollm2", metavar="NAME",
                   help="model name (default: smollm2)")
    p.add_argument("--cache-dir", metavar="DIR", help="download directory (default: the user cache)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("quantize", help="convert a model to a llama2.c v2 int8 file",
                       description="Quantize any loadable model to int8 (one scale per group "
                                   "of inputs) as a llama2.c version 2 file, reporting the "
                                   "quantization error of every tensor on stderr.")
    p.add_argument("input", metavar="IN", help="model to quantize (any supported format)")
    p.add_argument("output", metavar="OUT", help="llama2.c v2 file to write")
    p.add_argument("--group-size", type=POSITIVE, metavar="N",
                   help=f"inputs per scale; must divide the model's widths (default "
                        f"{DEFAULT_GROUP_SIZE}, halved until it does)")
    p.add_argument("--format", choices=("v2",), default="v2", help="output format (default v2)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("convert", help="convert a model between formats",
                       description="Convert any supported model to a llama2.c v1 (fp32) or v2 "
                                   "(int8) file or a Hugging Face directory (fp32 safetensors).")
    p.add_argument("input", metavar="IN", help="model to convert (any supported format)")
    p.add_argument("output", metavar="OUT", help="file (v1, v2) or directory (hf) to write")
    p.add_argument("--dtype", choices=("fp32", "int8"),
                   help="weight type (default: int8 for v2, else fp32)")
    p.add_argument("--format", choices=("v1", "v2", "hf"),
                   help="output format (default: v2 for --dtype int8, else v1)")
    p.add_argument("--group-size", type=POSITIVE, metavar="N",
                   help="int8 group size (default: the input's, or 64, halved until it fits)")
    p.add_argument("--tokenizer-dir", metavar="DIR",
                   help="hf: copy tokenizer files from DIR (default: IN when it is a directory)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("perplexity", help="perplexity of a model on a text file",
                       description="Token-level perplexity of a text file (windows of up to "
                                   "--context tokens, see llama2c.evaluate).")
    _add_model(p, optional=False)
    p.add_argument("file", metavar="FILE", help="UTF-8 text file")
    p.add_argument("--context", type=_ranged(int, "an integer", 2), metavar="N",
                   help="tokens per window (default: min(context length, 512))")
    p.add_argument("--compare", action="store_true",
                   help="load the model as fp32 and as --dtype (default int8; q4, auto); "
                        "report both perplexities, top-1 agreement and mean KL(fp32 || it)")
    _add_load_options(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="measure decode and prefill speed against the machine's limits",
                       description="Decode and prefill tok/s against the memory bandwidth probe "
                                   "and the kernel table's peak, 1 and 2 threads, interleaved "
                                   "with optional peers (llama.cpp, the NumPy reference); prints "
                                   "Markdown tables. See llama2c/bench.py.")
    from .bench import add_arguments as add_bench_arguments
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="serve a model with an OpenAI-compatible HTTP API",
                       description="Serve a model over HTTP with OpenAI's API (/v1/models, "
                                   "/v1/completions, /v1/chat/completions, /health, /metrics), "
                                   "requests batched together (continuous batching over one KV "
                                   "pool). Needs the server extra: pip install \"llama2c[server]\".")
    _add_model(p, optional=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_ranged(int, "a port", 0, 65535), default=8000,
                   help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("LLAMA2C_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LLAMA2C_API_KEY, "
                        "else no key)")
    p.add_argument("--model-name", metavar="NAME",
                   help="the model id clients send (default: the model file's name without "
                        "extension)")
    p.add_argument("--max-queue", type=COUNT, default=256, metavar="N",
                   help="sequences waiting for the batch before requests get 429 (default 256)")
    p.add_argument("--kv-budget", default="512MB", metavar="SIZE",
                   help="KV cache pool shared by all sequences: bytes (512MB, 2GiB) or "
                        "positions (8192) (default 512MB)")
    p.add_argument("--max-batch", type=POSITIVE, default=16, metavar="N",
                   help="most sequences decoded together in one step (default 16)")
    p.add_argument("--prefill-chunk", type=POSITIVE, default=32, metavar="N",
                   help="most prompt tokens prefilled per step, between decodes (default 32)")
    p.add_argument("--max-body", type=POSITIVE, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (default 1 MiB; beyond: 413)")
    p.add_argument("--max-n", type=POSITIVE, default=16, metavar="N",
                   help="most choices (n) per request (default 16)")
    p.add_argument("--context", type=POSITIVE, dest="context_length", metavar="N",
                   help="positions per sequence (default: the model's context length)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="serve with Ray Serve: replicas of the server behind Serve's proxy, on "
                        "the Ray cluster at ADDRESS ('auto': the one `ray start` runs here), or "
                        "without ADDRESS on a private Ray instance on this machine. Needs the "
                        "ray extra: pip install \"llama2c[ray]\"")
    p.add_argument("--replicas", type=POSITIVE, default=1, metavar="N",
                   help="with --ray: replicas, each a model and a scheduler with --threads "
                        "threads (default 1); with --max-replicas, the fewest")
    p.add_argument("--max-replicas", type=POSITIVE, metavar="N",
                   help="with --ray: autoscale between --replicas and N replicas on the "
                        "requests in flight (--max-batch per replica as the target)")
    _add_load_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", help="generate for every row of a JSONL file (resumable; "
                                     "locally or on a Ray cluster)",
                       description="Generate (or score) every row of IN.jsonl and append the "
                                   "results to OUT.jsonl. A row is {\"id\": ..., \"prompt\": "
                                   "...} or {\"id\": ..., \"messages\": [...]} with optional "
                                   "sampling fields (max_tokens, temperature, top_p, top_k, "
                                   "min_p, seed, stop, repetition_penalty, presence_penalty, "
                                   "frequency_penalty, penalty_last_n, logit_bias, logprobs); "
                                   "an output row has the id, text, token_ids, finish_reason, "
                                   "prompt_tokens, completion_tokens (and logprobs, or error). "
                                   "A row without a seed gets one derived from its id. Rows "
                                   "whose id is in OUT.jsonl already are skipped, so an "
                                   "interrupted job resumes where it stopped.")
    _add_model(p, optional=False)
    p.add_argument("input", metavar="IN.jsonl", help="input rows, one JSON object per line")
    p.add_argument("output", metavar="OUT.jsonl", help="output rows (appended)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run on a Ray cluster through Ray Data: 'auto' (the cluster `ray start` "
                        "runs here), an address (HOST:PORT or ray://HOST:PORT), or 'local' (a "
                        "private Ray instance on this machine); default: in this process")
    p.add_argument("--workers", type=POSITIVE, default=1, metavar="N",
                   help="with --ray: model actors (default 1)")
    p.add_argument("--threads-per-worker", type=POSITIVE, metavar="T",
                   help="kernel threads of each actor (default 1), or of this process "
                        "without --ray (default: the cores available)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, metavar="B",
                   help="rows per batch: decoded together, written when done (default 32)")
    p.add_argument("--mode", choices=("generate", "score"), default="generate",
                   help="generate (default) or score: each prompt's token logprobs and their "
                        "sum (Model.score)")
    p.add_argument("-n", "--max-new-tokens", type=COUNT, metavar="N",
                   help="default max_new_tokens of rows that do not set it (default 256)")
    p.add_argument("-t", "--temperature", type=TEMPERATURE, metavar="TEMP",
                   help="default temperature of rows that do not set it (default 1.0)")
    p.add_argument("--dtype", choices=("fp32", "int8", "q4"),
                   help="weight type (default: as stored)")
    p.add_argument("--kv-dtype", type=KV_DTYPE, default="f16", metavar="T",
                   help="KV cache element type (default f16; keys/values as f16/q8)")
    p.add_argument("--context", type=POSITIVE, dest="context_length", metavar="N",
                   help="positions per sequence (default: the model's context length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("info", help="describe a model file and what it costs",
                       description="Print a model's config, weight type, tensor count, file "
                                   "format, tokenizer, the kernels that would run it, and what "
                                   "it costs: weight bytes read per token, resident weight "
                                   "memory, KV cache bytes per 1,000 tokens (--kv-dtype) and "
                                   "the total at 1k/4k/8k tokens of context.")
    _add_model(p, optional=False)
    p.add_argument("-z", "--tokenizer", metavar="TOKENIZER", help="tokenizer to load with it")
    _add_load_options(p, tokenizer=False)
    p.set_defaults(func=cmd_info)
    return parser


# ---- shared helpers ----------------------------------------------------------------------------

def _note(message: str) -> None:
    """A `llama2c: ...` line on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr)


def _model_path(args) -> str:
    """MODEL (a path or a registry name such as smollm2), or the default model (downloaded
    on first use)."""
    if args.model is not None:
        from .model import resolve_model_path
        return resolve_model_path(args.model)
    from .hub import default_model_path
    return str(default_model_path(pull=True))


def _load(args, path: str, dtype: str | None = None):
    """Model.load with the command's load options (dtype overrides --dtype)."""
    from .model import Model
    return Model.load(path, tokenizer=getattr(args, "tokenizer", None),
                      dtype=dtype or getattr(args, "dtype", None),
                      n_threads=getattr(args, "threads", None), simd=getattr(args, "simd", None),
                      act_bits=getattr(args, "act_bits", 16),
                      context_length=getattr(args, "context_length", None),
                      kv_dtype=getattr(args, "kv_dtype", "f16"))


def _size(nbytes: float) -> str:
    """A byte count in decimal units: "538.1 MB"."""
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000


def _same_file(a, b) -> bool:
    """Whether path b exists and is the same file as a."""
    return os.path.exists(b) and Path(a).resolve() == Path(b).resolve()


# ---- run ---------------------------------------------------------------------------------------

def _parse_ids(text: str) -> list:
    """--ids prompt: integers separated by spaces or commas."""
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"argument -i/--prompt: with --ids the prompt must be integers, got {text!r}") from None
    if not ids:
        raise UsageError("argument -i/--prompt: with --ids give at least one token id")
    return ids


def _prompt_text(args):
    """-i PROMPT or the contents of -f FILE (not both), or None."""
    if args.file is not None:
        if args.prompt is not None:
            raise UsageError("argument -f/--file: not allowed with -i/--prompt")
        return _read_text(args.file)
    return args.prompt


def _prompt_ids(model, args, text) -> list:
    """The prompt as token ids: --ids, text through the tokenizer, or just BOS."""
    tok = model.tokenizer
    if args.ids and text is not None:
        return _parse_ids(text)
    if tok is None:
        if text:
            raise UsageError("argument -i/--prompt: the model has no tokenizer; give one with "
                             "-z TOKENIZER, or pass token ids with --ids")
        return [LLAMA2C_BOS_ID]
    ids = list(tok.encode(text or "", bos=True, special=args.special))
    if not ids and tok.bos_id is None:
        raise UsageError("argument -i/--prompt: this model needs a prompt (its tokenizer adds no BOS)")
    return ids or [int(tok.bos_id)]


def generation_options(args, context_length: int) -> dict:
    """Model.generate options from the flags of run/chat."""
    return dict(max_new_tokens=args.max_new_tokens or context_length,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                penalty_last_n=args.repeat_last_n, seed=args.seed, stop=args.stop)


def _write(text: str) -> None:
    """Write to stdout at once (streaming output)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_run(args) -> int:
    """Generate from a prompt like run.c: prompt then continuation on stdout, speed on stderr;
    -m chat runs the chat loop instead."""
    if args.mode == "chat":
        return cmd_chat(args)
    if args.system is not None:
        raise UsageError("argument -y/--system: only with -m chat")
    from .chat import sigint_cancels
    from .generation import CancelToken
    text = _prompt_text(args)
    model = _load(args, _model_path(args))
    ids = _prompt_ids(model, args, text)
    tok = model.tokenizer
    if tok is None:
        _write(" ".join(map(str, ids)))
    else:
        _write(text if text is not None and not args.ids else tok.decode(ids))
    token = CancelToken()
    with sigint_cancels(token):
        stream = model.generate(ids, stream=True, cancel=token,
                                **generation_options(args, model.context_length))
        try:
            for chunk in stream:
                _write("".join(f" {t}" for t in chunk.token_ids) if tok is None else chunk.text)
        finally:
            stream.close()
    _write("\n")
    _report_speed(stream.usage, stream.finish_reason)
    return 130 if stream.finish_reason == "cancelled" and token.is_set() else 0


def _report_speed(usage, finish_reason) -> None:
    """run.c's `achieved tok/s` (decode) and the prompt's statistics, on stderr."""
    if usage.completion_tokens:
        _note(f"prompt: {usage.prompt_tokens} tokens ({usage.cached_tokens} cached), first token "
              f"after {usage.prefill_seconds * 1000:.1f} ms "
              f"({usage.prefill_tokens_per_second:.1f} tok/s prefill)")
    stopped = ", stopped" if finish_reason == "cancelled" else ""
    print(f"achieved tok/s: {usage.decode_tokens_per_second:.2f} ({usage.completion_tokens} "
          f"tokens generated{stopped})", file=sys.stderr)


# ---- chat, pull --------------------------------------------------------------------------------

def cmd_chat(args) -> int:
    """Interactive chat (llama2c.chat.run_chat_cli) with the generation flags."""
    from . import chat
    first = _prompt_text(args)
    model = _load(args, _model_path(args))
    chat.run_chat_cli(model, system=args.system, first=first,
                      **generation_options(args, model.context_length))
    return 0


def cmd_pull(args) -> int:
    """Download a model (llama2c.hub.pull) and print its path."""
    from .hub import pull
    print(pull(args.name, cache_dir=args.cache_dir))
    return 0


# ---- quantize, convert -------------------------------------------------------------------------

def _matrix_widths(cfg) -> list:
    """Input widths of the model's matrices: an int8 group size must divide each."""
    return sorted({cfg.dim, cfg.hidden_dim, cfg.q_dim})


def _group_size(cfg, requested: int | None, default: int = DEFAULT_GROUP_SIZE) -> int:
    """An explicit --group-size must fit; the default is halved until it does (with a note)."""
    widths = _matrix_widths(cfg)
    if requested is not None:
        if any(w % requested for w in widths):
            raise UsageError(f"argument --group-size: {requested} does not divide the model's "
                             f"matrix widths {widths}")
        return requested
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gs = fit_group_size(cfg, default)
    for w in caught:
        _note(f"note: {w.message}")
    return gs


def _peek_config(path):
    """The config of a model, read without loading its weights; None if that fails (the
    full load then reports the problem)."""
    p = Path(path)
    try:
        if p.is_dir():
            from .loaders.hf import hf_config
            return hf_config(json.loads((p / "config.json").read_text()), str(p))
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from .loaders.gguf import gguf_config, read_gguf
            return gguf_config(read_gguf(p))
        from .loaders.llama2c_bin import load_llama2c_bin
        return load_llama2c_bin(p)[0]
    except (OSError, ValueError):
        return None


def weights_nbytes(cfg, dtype: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of a model's weights in memory: fp32, or int8 matrices (+ one float32 scale per
    group) with fp32 norms."""
    import numpy as np
    from .weights import expected_shapes
    total = 0
    for shape in expected_shapes(cfg).values():
        n = int(np.prod(shape))
        total += n + 4 * (n // group_size) if dtype == "int8" and len(shape) == 2 else 4 * n
    return total


def _load_weights(path, dtype: str, group_size: int | None = None):
    """load_any, after printing how much memory the weights will take."""
    from .loaders import load_any
    cfg = _peek_config(path)
    if cfg is not None:
        gs = group_size or DEFAULT_GROUP_SIZE
        _note(f"loading {path}: about {_size(weights_nbytes(cfg, dtype, gs))} of {dtype} weights")
    return load_any(path, dtype=None)


def _error_row(name: str, original, quantized) -> tuple:
    """(name, shape, max |w - deq|, max |w - deq| / scale) of one quantized tensor."""
    import numpy as np
    from .weights import as_fp32
    w = as_fp32(original)
    rows, cols = w.shape
    err = np.abs(w - quantized.dequantize()).reshape(rows, cols // quantized.group_size, -1)
    s = quantized.s[:, :, None]
    rel = np.divide(err, s, out=np.zeros_like(err), where=s > 0)
    return name, "x".join(map(str, w.shape)), float(err.max()), float(rel.max())


def _print_error_table(rows: list) -> None:
    width = max([len(r[0]) for r in rows] + [6])
    print(f"{'tensor':<{width}}  {'shape':>12}  {'max error':>10}  {'/ scale':>7}", file=sys.stderr)
    for name, shape, err, rel in rows:
        print(f"{name:<{width}}  {shape:>12}  {err:>10.3e}  {rel:>7.3f}", file=sys.stderr)
    worst = max((r[3] for r in rows), default=0.0)
    print(f"worst error: {worst:.3f} of a scale step (rounding bounds it by 0.5)", file=sys.stderr)


def _quantize(cfg, weights: dict, group_size: int) -> dict:
    """quantize_weights with a progress bar and the per-tensor error table on stderr."""
    from tqdm import tqdm
    from .weights import QTensor, quantize_weights
    rows = []
    with tqdm(total=len(weights), desc="quantizing", unit="tensor", file=sys.stderr) as bar:
        def progress(name, original, quantized):
            if isinstance(quantized, QTensor):
                rows.append(_error_row(name, original, quantized))
            bar.update()
        out = quantize_weights(cfg, weights, group_size, progress=progress)
    _print_error_table(rows)
    return out


def cmd_quantize(args) -> int:
    """Any model -> llama2.c v2 int8 file, with the per-tensor error report."""
    from .loaders.llama2c_bin import write_llama2c_bin
    if _same_file(args.input, args.output):
        raise UsageError("OUT must differ from IN (IN is memory-mapped while OUT is written)")
    cfg, weights, _ = _load_weights(args.input, "int8", args.group_size)
    gs = _group_size(cfg, args.group_size)
    write_llama2c_bin(args.output, cfg, _quantize(cfg, weights, gs), version=2, group_size=gs)
    _note(f"wrote {args.output} (llama2.c v2, int8, group size {gs})")
    return 0


_FORMAT_DTYPE = {"v1": "fp32", "v2": "int8", "hf": "fp32"}


def _convert_target(fmt: str | None, dtype: str | None) -> tuple:
    """(format, dtype) from --format/--dtype: one implies the other; they must agree."""
    if fmt is None and dtype is None:
        raise UsageError("give --dtype fp32|int8 and/or --format v1|v2|hf")
    fmt = fmt or ("v2" if dtype == "int8" else "v1")
    if dtype is not None and dtype != _FORMAT_DTYPE[fmt]:
        raise UsageError(f"argument --dtype: format {fmt} stores {_FORMAT_DTYPE[fmt]} weights, "
                         f"not {dtype}")
    return fmt, _FORMAT_DTYPE[fmt]


def cmd_convert(args) -> int:
    """Any model -> llama2.c v1 / v2 file or Hugging Face directory."""
    from .loaders.hf import write_hf_dir
    from .loaders.llama2c_bin import write_llama2c_bin
    fmt, dtype = _convert_target(args.format, args.dtype)
    if _same_file(args.input, args.output):
        raise UsageError("OUT must differ from IN (IN is memory-mapped while OUT is written)")
    cfg, weights, meta = _load_weights(args.input, dtype, args.group_size)
    if fmt == "hf":
        tok_dir = args.tokenizer_dir or (args.input if Path(args.input).is_dir() else None)
        if tok_dir is None:
            _note("note: no tokenizer files written (give --tokenizer-dir DIR to copy them)")
        write_hf_dir(cfg, weights, args.output, tok_dir)
    elif fmt == "v1":
        write_llama2c_bin(args.output, cfg, weights, version=1)
    else:
        gs = _group_size(cfg, args.group_size, meta.get("group_size") or DEFAULT_GROUP_SIZE)
        write_llama2c_bin(args.output, cfg, weights, version=2, group_size=gs)
    _note(f"wrote {args.output} ({fmt}, {dtype})")
    return 0


# ---- perplexity --------------------------------------------------------------------------------

def _read_text(path: str) -> str:
    """A UTF-8 text file, with a clear error for other encodings."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _require_tokenizer(model) -> None:
    """Text commands need a tokenizer: fail early with the flag that supplies one."""
    if model.tokenizer is None:
        raise TokenizerError("the model has no tokenizer: give one with -z TOKENIZER")


def cmd_perplexity(args) -> int:
    """Perplexity of a text file, or (--compare) fp32 vs int8 on it."""
    from .evaluate import compare_int8, perplexity
    text = _read_text(args.file)
    if args.compare:
        other = args.dtype or "int8"
        if other == "fp32":
            raise UsageError("argument --dtype: --compare compares fp32 with another dtype "
                             "(int8, q4 or auto)")
        fp32 = _load(args, args.model, "fp32")
        _require_tokenizer(fp32)
        quant = _load(args, args.model, other)
        r = compare_int8(fp32, quant, text, context=args.context)
        label = f"{other} ({quant.dtype})" if other == "auto" else other
        print(f"tokens: {r['n_tokens']}")
        print(f"perplexity fp32: {r['ppl_fp32']:.4f}")
        print(f"perplexity {label}: {r['ppl_int8']:.4f}")
        print(f"top-1 agreement: {r['top1_agreement']:.4f}")
        print(f"mean KL(fp32 || {label}): {r['mean_kl']:.3g} nats")
        return 0
    model = _load(args, args.model)
    _require_tokenizer(model)
    r = perplexity(model, text, context=args.context)
    print(f"tokens: {r['n_tokens']}")
    print(f"mean NLL: {r['nll']:.4f} nats/token")
    print(f"perplexity ({model.dtype}): {r['perplexity']:.4f}")
    return 0


# ---- bench -------------------------------------------------------------------------------------

def _kernel_line(info: dict) -> str:
    """kernel_info() as one `key=value, ...` line."""
    return ", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in info.items())


def cmd_bench(args) -> int:
    """Speed against the machine's limits: the harness in llama2c/bench.py."""
    from . import bench
    return bench.run_command(args)


# ---- info --------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    """What a model file holds, what it costs and which kernels would run it."""
    from collections import Counter

    from . import _engine
    model = _load(args, args.model)
    meta, tok = model.metadata, model.tokenizer
    print(f"model: {args.model}")
    print(f"format: {meta.get('format', 'unknown')}")
    kinds = Counter(t.dtype for t in model.manifest.values() if len(t.shape) == 2)
    print(f"dtype: {model.dtype}" + (f" (group size {meta['group_size']})" if model.dtype == "int8"
                                     and meta.get("group_size") else "")
          + (" (" + ", ".join(f"{k}: {n} {'matrix' if n == 1 else 'matrices'}"
                              for k, n in sorted(kinds.items())) + ")"
             if len(kinds) > 1 else ""))
    print(f"tensors: {len(model.manifest)}")
    _print_costs(model)
    print("config:")
    for key, value in model.config.to_dict().items():
        print(f"  {key}: {value}")
    print(f"tokenizer: {f'{tok.kind} ({tok.vocab_size} tokens)' if tok is not None else 'none'}")
    print(f"kernel_info: {_kernel_line(_engine.kernel_info())}")
    return 0


def cmd_serve(args) -> int:
    # OpenMP waits as libgomp does by default (a short spin, then sleep): the scheduler thread is
    # the only one that keeps OpenMP workers (the loading thread releases its own), so the spin
    # stays on; OMP_WAIT_POLICY=passive in the environment suits a machine shared with other
    # busy processes (README, "Threads and OpenMP waiting").
    from .batch import parse_kv_budget
    try:
        for name in ("fastapi", "sse_starlette", "uvicorn"):
            importlib.import_module(name)
    except ImportError as e:
        from .server import EXTRA_HINT
        raise UsageError(f"{EXTRA_HINT} (missing: {e.name})") from None
    from .server import ServerSettings, run_server
    try:
        parse_kv_budget(args.kv_budget)
    except ValueError as e:
        raise UsageError(f"--kv-budget: {e}") from None
    if args.ray is not None:
        return _serve_ray(args)
    if args.max_replicas is not None or args.replicas != 1:
        raise UsageError("--replicas / --max-replicas need --ray")
    model = _load(args, _model_path(args))
    if model.tokenizer is None:
        _note("warning: the model has no tokenizer: only /v1/completions with token ids works")
    settings = ServerSettings(model_name=args.model_name, api_key=args.api_key,
                              max_queue=args.max_queue, max_body_bytes=args.max_body,
                              max_n=args.max_n, kv_budget=args.kv_budget,
                              max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                              threads=args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        _note(f"warning: serving on {args.host} without --api-key: anyone who can reach it "
              f"may use it")
    run_server(model, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _import_ray():
    """llama2c.ray, or a UsageError naming the extra."""
    import importlib
    try:
        return importlib.import_module("llama2c.ray")
    except ImportError as e:
        raise UsageError(str(e)) from None


def _serve_ray(args) -> int:
    """`serve --ray`: the server's replicas on Ray Serve, until interrupted."""
    l2c_ray = _import_ray()
    from ray import serve

    from .server import ServerSettings
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise UsageError(f"argument --max-replicas: must be >= --replicas ({args.replicas})")
    if args.simd is not None or args.act_bits != 16 or args.tokenizer is not None:
        raise UsageError("--simd, --act-bits and -z are not supported with --ray")
    threads = args.threads or 1
    settings = ServerSettings(model_name=args.model_name, api_key=args.api_key,
                              max_queue=args.max_queue, max_body_bytes=args.max_body,
                              max_n=args.max_n, kv_budget=args.kv_budget,
                              max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                              threads=threads)
    autoscaling = None
    if args.max_replicas is not None:
        autoscaling = {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                       "target_ongoing_requests": args.max_batch}
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        _note(f"warning: serving on {args.host} without --api-key: anyone who can reach it "
              f"may use it")
    # a registry name is resolved (and fetched) on each replica's node
    model = args.model if args.model is not None else "smollm2"
    app = l2c_ray.serve_app(model, settings=settings, threads_per_replica=threads,
                            num_replicas=args.replicas, autoscaling_config=autoscaling,
                            dtype=args.dtype, kv_dtype=args.kv_dtype,
                            context_length=args.context_length)
    started = l2c_ray.connect(args.ray)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        _note(f"starting {args.replicas} replica(s) of {model} on Ray Serve")
        serve.run(app, name="llama2c", route_prefix="/")
        _note(f"serving {settings.model_name or model} on http://{args.host}:{args.port}/v1 "
              f"with Ray Serve ({args.replicas}"
              + (f" to {args.max_replicas}" if autoscaling else "") + " replicas); Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        if started:
            import ray
            ray.shutdown()


def cmd_batch(args) -> int:
    """An offline job over a JSONL file (llama2c.batchjob.run_jsonl_job)."""
    from .batchjob import run_jsonl_job
    if args.ray is None and args.workers != 1:
        raise UsageError("argument --workers: more than one worker needs --ray")
    if args.ray is not None:
        _import_ray()
    if _same_file(args.input, args.output):
        raise UsageError("OUT.jsonl must differ from IN.jsonl")
    defaults = {}
    if args.max_new_tokens is not None:
        defaults["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        defaults["temperature"] = args.temperature
    load = dict(dtype=args.dtype, kv_dtype=args.kv_dtype, context_length=args.context_length)
    model = args.model if args.ray is not None else _model_path(args)
    counts = run_jsonl_job(model, args.input, args.output, ray_address=args.ray,
                           workers=args.workers, threads_per_worker=args.threads_per_worker,
                           batch_size=args.batch_size, defaults=defaults, mode=args.mode,
                           load_kwargs=load, progress=not args.no_progress)
    _note(f"{args.output}: {counts['written']} rows written, {counts['skipped']} already there, "
          f"{counts['total']} in {args.input}")
    if counts["errors"]:
        _note(f"error: {counts['errors']} rows failed (their \"error\" field says why)")
        return 1
    return 0


def _print_costs(model) -> None:
    """What the model costs: weights read per token, resident weights, KV cache, totals."""
    cost = model.memory((1000, 4000, 8000))
    print(f"weight bytes/token: {cost['weight_bytes_per_token']} "
          f"({_size(cost['weight_bytes_per_token'])})")
    mapped = "".join(f"; {t.name} read in place from the file ({_size(t.nbytes)}, resident as "
                     f"rows are looked up)" for t in model.manifest.values() if t.mapped)
    print(f"resident weights: {cost['resident_weights']} ({_size(cost['resident_weights'])}, "
          f"packed in the engine's memory{mapped})")
    kv = cost["kv_bytes_per_1000_tokens"]
    print(f"kv cache ({cost['kv_dtype']}): {kv} bytes per 1,000 tokens ({_size(kv)}; memory is "
          f"touched as positions fill)")
    over = [f"{n // 1000}k" for n in cost["total"] if n > model.context_length]
    print(f"memory at {' / '.join(f'{n // 1000}k' for n in cost['total'])} tokens: "
          f"{' / '.join(_size(b) for b in cost['total'].values())} (resident weights + kv "
          f"cache; context {model.context_length}"
          + (f", {', '.join(over)} beyond it" if over else "") + ")")


# ---- entry point -------------------------------------------------------------------------------

@contextlib.contextmanager
def _warnings_as_notes():
    """Show warnings as `llama2c: warning: ...` lines instead of Python's file:line form."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest, **kw: _note(f"warning: {message}")
        yield


def main(argv=None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        sys.stderr.write(e.usage)
        _note(f"error: {e}")
        return 2
    except SystemExit as e:      # --help, --version
        return e.code if isinstance(e.code, int) else 0
    try:
        with _warnings_as_notes():
            return args.func(args)
    except UsageError as e:
        _note(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:      # e.g. `llama2c run ... | head`: stop quietly
        sys.stdout = open(os.devnull, "w")
        return 1
    except (Llama2cError, ValueError, OSError, MemoryError) as e:
        _note(f"error: {e}")
        return 1
