"""Offline batch jobs: rows of prompts (or chat messages) with their own sampling settings in,
rows of generated text out. The same row logic runs in-process (`llama2c batch` without
--ray) and inside each Ray Data actor (llama2c.ray.LlamaPredictor), so a row gets the same
result wherever it runs.

A row is a dict: "prompt" (a text or token ids) or "messages" (a chat, rendered with the
model's template), an optional "id", and optional sampling fields (ROW_OPTIONS; "max_tokens"
is an alias of "max_new_tokens"). A row without a "seed" gets one derived from its id (or,
without an id, from its prompt), so sampled rows are reproducible and independent of the
batch, worker or node that runs them. Rows are generated together with
Model.generate_batch / Model.chat_batch (continuous batching), which give each row exactly
what generate() / chat() give it alone.

    from llama2c.batchjob import run_rows
    outs = run_rows(model, [{"id": 1, "prompt": "Once upon a time", "max_tokens": 32}])
    # [{"text": ..., "token_ids": [...], "finish_reason": "length", "prompt_tokens": 5,
    #   "completion_tokens": 32, "logprobs": None, "error": None}]

run_jsonl_job is `llama2c batch`: JSONL in, JSONL out, resumable (rows whose id is already in
the output are skipped; whole lines only, each written once and flushed as it completes).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys

from .generation import GenerationOptions

# per-row sampling fields, as generate() names them
ROW_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty", "penalty_last_n", "seed", "stop",
               "stop_token_ids", "logit_bias", "logprobs")
ALIASES = {"max_tokens": "max_new_tokens"}             # OpenAI's name
INPUT_FIELDS = ("id", "prompt", "messages") + ROW_OPTIONS + tuple(ALIASES)
_INTEGER = {"max_new_tokens", "top_k", "penalty_last_n", "seed", "logprobs"}
MODES = ("generate", "score")

# the output columns of each mode (run_rows gives every one, None where it does not apply)
GENERATE_COLUMNS = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens",
                    "logprobs", "error")
SCORE_COLUMNS = ("token_ids", "logprobs", "score", "prompt_tokens", "error")


def output_columns(mode: str) -> tuple:
    return SCORE_COLUMNS if mode == "score" else GENERATE_COLUMNS

# ------------------------------------------------------------------------------------------
# rows


def plain(value):
    """A value from a pandas / NumPy / Arrow batch as plain Python: arrays become lists, NumPy
    scalars Python numbers, a missing value (None, NaN) None."""
    import numpy as np
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value) or _is_na(value):
        return None
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _is_na(value) -> bool:
    """pandas' missing-value markers (pd.NA, pd.NaT)."""
    pd = sys.modules.get("pandas")
    return pd is not None and (value is pd.NA or value is pd.NaT)


def row_seed(key) -> int:
    """The seed of a row without one: a hash of its id (or prompt), in [0, 2**63) — the same
    in every process (unlike Python's hash())."""
    text = json.dumps(key, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(b"llama2c row seed\0" + text.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _integer(name: str, value):
    """An integral float (pandas turns an int column with gaps into float64) as int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_row(row: dict, defaults: dict | None = None, mode: str = "generate") -> tuple:
    """(kind, payload, options) of one row: kind "prompt" (payload a text or ids) or
    "messages" (payload the chat); options for generate(), `defaults` under the row's own
    fields, with a seed derived from the id when neither gives one. ValueError naming the
    field for a malformed row. Fields not in INPUT_FIELDS are ignored."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    row = {k: plain(v) for k, v in row.items()}
    prompt, messages = row.get("prompt"), row.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError("a row needs exactly one of 'prompt' (a text or token ids) or "
                         "'messages' (a chat)" if prompt is None else
                         "a row has both 'prompt' and 'messages': give one")
    if mode == "score" and messages is not None:
        raise ValueError("score mode scores a 'prompt' (a text or token ids), not 'messages'")
    if prompt is not None:
        if isinstance(prompt, list):
            if not prompt or not all(isinstance(t, int) and not isinstance(t, bool)
                                     for t in prompt):
                raise ValueError("'prompt' must be a text or a non-empty list of token ids")
        elif not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a text or a list of token ids, got "
                             f"{type(prompt).__name__}")
        kind, payload = "prompt", prompt
    else:
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
        kind, payload = "messages", messages
    options = dict(defaults or {})
    for alias, name in ALIASES.items():
        if row.get(alias) is not None and row.get(name) is not None:
            raise ValueError(f"give '{name}' or '{alias}', not both")
    for field in ROW_OPTIONS + tuple(ALIASES):
        value = row.get(field)
        if value is None:
            continue
        name = ALIASES.get(field, field)
        if name in _INTEGER:
            value = _integer(name, value)
        if name == "stop" and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise ValueError(f"'stop' must be a string or a list of strings, got {value!r}")
        if name == "logit_bias":
            if not isinstance(value, dict):
                raise ValueError(f"'logit_bias' must be an object {{token id: bias}}, got {value!r}")
            try:
                value = {int(k): v for k, v in value.items()}
            except ValueError:
                raise ValueError(f"'logit_bias' keys must be token ids, got {value!r}") from None
        options[name] = value
    if mode == "score":
        return kind, payload, {}
    if options.get("seed") is None:
        options["seed"] = row_seed(row["id"] if row.get("id") is not None else payload)
    return kind, payload, options


def check_options(options: dict, vocab_size: int = 1 << 30) -> None:
    """ValueError (naming the field) when generate() would refuse these options."""
    try:
        GenerationOptions.make(vocab_size, **options)
    except TypeError as e:
        raise ValueError(str(e)) from None

# ------------------------------------------------------------------------------------------
# running rows on a model


def _logprobs(lps) -> list | None:
    if lps is None:
        return None
    return [{"token_id": int(t.token_id), "logprob": t.logprob,
             "top": [{"token_id": int(i), "logprob": float(lp)} for i, lp in t.top]}
            for t in lps]


def _generated(r) -> dict:
    return {"text": r.text, "token_ids": [int(t) for t in r.token_ids],
            "finish_reason": r.finish_reason, "prompt_tokens": r.usage.prompt_tokens,
            "completion_tokens": r.usage.completion_tokens, "logprobs": _logprobs(r.logprobs),
            "error": None}


def _failed(mode: str, e: Exception) -> dict:
    out = dict.fromkeys(output_columns(mode))
    if mode != "score":
        out["finish_reason"] = "error"
    out["error"] = str(e)
    return out


def run_rows(model, rows: list, *, defaults: dict | None = None, mode: str = "generate",
             max_batch: int | None = None, prefill_chunk: int | None = None,
             kv_budget=None) -> list:
    """One output dict per row (the columns of output_columns(mode)), in order.

    generate: prompts go through model.generate_batch, chats through model.chat_batch, all
    rows of each kind in one continuous batch. score: model.score of each prompt ("logprobs":
    each token's logprob given the ones before it, the first token unscored; "score": their
    sum). A row that cannot run (malformed, a bad option, too long for the context) gets
    "error" (and finish_reason "error") instead of failing the others."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    outs = [None] * len(rows)
    prompts, chats = [], []          # (row index, prompt ids or messages, options)
    for i, row in enumerate(rows):
        try:
            kind, payload, options = parse_row(row, defaults, mode)
            if mode == "score":
                r = model.score(payload)
                outs[i] = {"token_ids": [int(t) for t in r.token_ids],
                           "logprobs": [float(x) for x in r.logprobs], "score": r.total,
                           "prompt_tokens": len(r.token_ids), "error": None}
                continue
            check_options(options, model.vocab_size)
            if kind == "prompt":
                ids = model.encode_prompt(payload).tolist()
            else:
                from .chat import chat_prompt_ids, require_tokenizer
                ids = chat_prompt_ids(require_tokenizer(model), payload)
            if not ids:
                raise ValueError("the prompt is empty")
            if len(ids) > model.context_length:
                raise ValueError(f"the prompt has {len(ids)} tokens but the context holds "
                                 f"{model.context_length}")
            (prompts if kind == "prompt" else chats).append(
                (i, ids if kind == "prompt" else payload, options))
        except (ValueError, TypeError) as e:
            outs[i] = _failed(mode, e)
    kw = dict(max_batch=max_batch, prefill_chunk=prefill_chunk, kv_budget=kv_budget)
    if prompts:
        results = model.generate_batch([p for _, p, _ in prompts], [o for _, _, o in prompts], **kw)
        for (i, _, _), r in zip(prompts, results):
            outs[i] = _generated(r)
    if chats:
        results = model.chat_batch([m for _, m, _ in chats], [o for _, _, o in chats], **kw)
        for (i, _, _), r in zip(chats, results):
            outs[i] = _generated(r)
    return outs

# ------------------------------------------------------------------------------------------
# JSONL files: `llama2c batch`


def id_key(row_id) -> str:
    """A row id as a set key: 1 and "1" are different ids."""
    return json.dumps(row_id, sort_keys=True)


def read_requests(path, mode: str = "generate") -> list:
    """The rows of a JSONL input file as (line number, row, line text), checked before any work:
    every line a JSON object with an "id" (a string or an integer, unique) and a "prompt" or
    "messages", known fields only, valid sampling options. ValueError naming file and line."""
    rows, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "id" not in row:
                raise ValueError(f"{where}: the row has no \"id\" (every row needs a unique id, "
                                 f"a string or an integer, to resume a job)")
            rid = row["id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise ValueError(f"{where}: \"id\" must be a string or an integer, got {rid!r}")
            key = id_key(rid)
            if key in seen:
                raise ValueError(f"{where}: duplicate id {rid!r} (first on line {seen[key]})")
            seen[key] = n
            unknown = sorted(set(row) - set(INPUT_FIELDS))
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; a row has "
                                 f"{', '.join(INPUT_FIELDS)}")
            try:
                _, _, options = parse_row(row, mode=mode)
                check_options(options)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            rows.append((n, row, line))
    return rows


def read_done(path) -> set:
    """The id keys of the rows already in an output file (a job being resumed). A last line
    cut short by an interrupted run is removed from the file (its row runs again); any other
    damage is an error."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):                      # an unfinished last line: cut it off
        with open(path, "r+b") as f:
            f.truncate(end)
        from .cli import _note
        _note(f"note: {path}: dropped an incomplete last line ({len(data) - end} bytes) left "
              f"by an interrupted run; its row runs again")
    done = set()
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}:{n}: not a JSON line: the output file is damaged (or "
                             f"not an output of `llama2c batch`)") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{path}:{n}: an output row without an \"id\"")
        done.add(id_key(row["id"]))
    return done


def output_line(row_id, out: dict) -> str:
    """An output row as one JSON line: the id and the output fields that have a value."""
    row = {"id": row_id, **{k: v for k, v in out.items() if v is not None}}
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


class OutputFile:
    """Appends output rows, each once, flushed as it is written."""

    def __init__(self, path, done: set):
        self.path = path
        self.done = set(done)
        self.written = self.errors = 0
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row_id, out: dict) -> bool:
        key = id_key(row_id)
        if key in self.done:
            return False
        self.f.write(output_line(row_id, out))
        self.f.flush()
        self.done.add(key)
        self.written += 1
        self.errors += out.get("error") is not None
        return True

    def close(self) -> None:
        self.f.close()


def run_jsonl_job(model_path, in_path, out_path, *, ray_address: str | None = None,
                  workers: int = 1, threads_per_worker: int | None = None,
                  batch_size: int = 32, defaults: dict | None = None, mode: str = "generate",
                  load_kwargs: dict | None = None, progress: bool = True) -> dict:
    """`llama2c batch`: generate (or score) every row of the JSONL file in_path that out_path
    does not hold yet, appending each output row to out_path as it completes. In-process
    without ray_address; else on a Ray cluster ("auto", "local" or an address) through Ray
    Data (llama2c.ray). Returns counts: total, skipped (already done), written, errors."""
    from tqdm import tqdm
    requests = read_requests(in_path, mode)
    done = read_done(out_path)
    pending = [(row, line) for _, row, line in requests if id_key(row["id"]) not in done]
    skipped = len(requests) - len(pending)
    out = OutputFile(out_path, done)
    bar = tqdm(total=len(requests), initial=skipped, unit="row", desc="batch", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        if not pending:
            pass
        elif ray_address is None:
            _run_local(model_path, pending, out, bar, threads_per_worker, batch_size, defaults,
                       mode, load_kwargs or {})
        else:
            from .ray import run_jsonl_on_ray
            run_jsonl_on_ray(ray_address, model_path, [line for _, line in pending], out, bar,
                             workers=workers, threads_per_worker=threads_per_worker or 1,
                             batch_size=batch_size, defaults=defaults, mode=mode,
                             load_kwargs=load_kwargs or {})
    finally:
        bar.close()
        out.close()
    return {"total": len(requests), "skipped": skipped, "written": out.written,
            "errors": out.errors}


def _run_local(model_path, pending, out, bar, threads, batch_size, defaults, mode, load_kwargs):
    from .model import Model
    model = Model.load(model_path, n_threads=threads, **load_kwargs)
    for start in range(0, len(pending), batch_size):
        chunk = [row for row, _ in pending[start:start + batch_size]]
        for row, o in zip(chunk, run_rows(model, chunk, defaults=defaults, mode=mode)):
            out.write(row["id"], o)
        bar.update(len(chunk))
