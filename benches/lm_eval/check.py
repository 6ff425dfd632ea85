#!/usr/bin/env python3
"""Cross-check lm-evaluation-harness results against tokenscope's own log-probabilities.

Runs ``lm_eval`` (tasks ``tokenscope_mc`` and ``tokenscope_ppl`` from this folder) against a
running tokenscope server through its OpenAI-compatible ``POST /v1/completions`` (echo +
logprobs), then recomputes every logged log-likelihood with tokenscope's native
``POST /generate`` (``prompt_logprobs``) and ``POST /tokenize`` and compares them.

* multiple choice (``loglikelihood``): for each choice, lm-eval's ``_encode_pair`` is mirrored
  (trailing whitespace of the context moves onto the continuation; the continuation's tokens are
  the tokens of ``context + continuation`` beyond the token count of ``context`` alone). The sum of
  their prompt log-probs must equal the logged value, and ``is_greedy`` must be True iff every
  continuation token was the rank-1 token.
* perplexity (``loglikelihood_rolling``): lm-eval scores the whole text after one prefix token
  (the tokenizer's BOS, or EOS if there is none); we score ``prefix + text`` and sum every entry
  after the prefix. Texts must fit in a single rolling window.

Usage (from anywhere; lm_eval itself runs in the repository root)::

    python3 benches/lm_eval/check.py --base-url http://127.0.0.1:PORT \
        [--lm-eval PATH_TO_lm_eval] [--api-key KEY] [--break-echo]

``--break-echo`` puts a small proxy between lm_eval and the server that deletes ``"echo"``
from JSON bodies of ``POST /v1/completions`` (the bug of servers that ignore echo, e.g.
llama.cpp). lm_eval then gets no prompt log-probs, so the check must fail (exit 1).

Exit status: 0 when every value matches within the tolerance (default 1e-6), 1 on any mismatch,
when no samples were logged, or when lm_eval fails. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import glob
import http.server
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TASKS = "tokenscope_mc,tokenscope_ppl"
# lm-eval's API models default to max_length=2048 and keep one token for generation, so
# self.max_length == 2047; rolling windows hold max_length - 1 predicted tokens.
LM_EVAL_MAX_LENGTH = 2047
ROLLING_WINDOW = LM_EVAL_MAX_LENGTH - 1


# --------------------------------------------------------------------------------------------
# tokenscope native API client
# --------------------------------------------------------------------------------------------


class ServerError(RuntimeError):
    pass


class Tokenscope:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 120.0):
        self.base = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._tok_cache: dict[str, list[int]] = {}
        self._gen_cache: dict[str, list[dict]] = {}
        self._info: dict | None = None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:500]
            raise ServerError(f"{method} {path} -> HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{method} {path} failed: {e}") from None

    def health(self) -> None:
        req = urllib.request.Request(self.base + "/health")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                if resp.status != 200:
                    raise ServerError(f"GET /health -> HTTP {resp.status}")
        except urllib.error.HTTPError as e:
            raise ServerError(f"GET /health -> HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"GET /health failed: {e}") from None

    def tokenizer_info(self) -> dict:
        if self._info is None:
            self._info = self._request("GET", "/tokenizer_info")
        return self._info

    def tokenize(self, text: str) -> list[int]:
        if text not in self._tok_cache:
            out = self._request("POST", "/tokenize", {"prompt": text, "add_special_tokens": False})
            tokens = out.get("tokens")
            if not isinstance(tokens, list):
                raise ServerError(f"POST /tokenize returned no token list: {out!r:.200}")
            self._tok_cache[text] = [int(t) for t in tokens]
        return self._tok_cache[text]

    def prompt_logprobs(self, text: str) -> list[dict]:
        """Per-token entries {token_id, logprob (None for the first), rank} of ``text``."""
        if text not in self._gen_cache:
            out = self._request(
                "POST",
                "/generate",
                {
                    "prompt": text,
                    "prompt_logprobs": True,
                    "max_tokens": 1,
                    "temperature": 0,
                    "top_k": 1,
                },
            )
            entries = out.get("prompt")
            if not isinstance(entries, list) or not entries:
                raise ServerError(f"POST /generate returned no prompt log-probs: {out!r:.200}")
            self._gen_cache[text] = entries
        return self._gen_cache[text]


# --------------------------------------------------------------------------------------------
# --break-echo proxy
# --------------------------------------------------------------------------------------------

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
}


def make_echo_stripping_proxy(upstream: str) -> tuple[http.server.ThreadingHTTPServer, dict]:
    """A loopback proxy forwarding everything to ``upstream`` but deleting "echo" from the JSON
    body of POST /v1/completions. Returns (server, stats)."""
    upstream = upstream.rstrip("/")
    stats = {"requests": 0, "echo_removed": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep the checker's output clean
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            path_only = self.path.split("?", 1)[0].rstrip("/")
            if self.command == "POST" and path_only.endswith("/v1/completions") and body:
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = None
                if isinstance(payload, dict) and "echo" in payload:
                    del payload["echo"]
                    body = json.dumps(payload).encode("utf-8")
                    with lock:
                        stats["echo_removed"] += 1
            with lock:
                stats["requests"] += 1
            req = urllib.request.Request(upstream + self.path, data=body, method=self.command)
            for k, v in self.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    req.add_header(k, v)
            try:
                resp = urllib.request.urlopen(req, timeout=600)
                status, headers, data = resp.status, resp.headers, resp.read()
                resp.close()
            except urllib.error.HTTPError as e:
                status, headers, data = e.code, e.headers, e.read()
            except (urllib.error.URLError, OSError) as e:
                status, headers = 502, None
                data = json.dumps({"error": f"proxy: upstream failed: {e}"}).encode()
            self.send_response(status)
            if headers is not None:
                for k, v in headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
            else:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, stats


# --------------------------------------------------------------------------------------------
# running lm_eval
# --------------------------------------------------------------------------------------------


def run_lm_eval(args, completions_base: str, output_path: Path) -> tuple[int, str]:
    model_args = [
        f"model={args.model}",
        f"base_url={completions_base.rstrip('/')}/v1/completions",
        "tokenizer_backend=remote",
        "tokenized_requests=True",
        "num_concurrent=1",
        "max_retries=1",
    ]
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    if args.api_key:
        env["OPENAI_API_KEY"] = args.api_key
        model_args.append(f"auth_token={args.api_key}")
    cmd = [
        args.lm_eval,
        "run",
        "--model",
        "local-completions",
        "--model_args",
        ",".join(model_args),
        "--tasks",
        args.tasks,
        "--include_path",
        args.include_path,
        "--batch_size",
        str(args.batch_size),
        "--output_path",
        str(output_path),
        "--log_samples",
    ]
    shown = " ".join(cmd)
    if args.api_key:
        shown = shown.replace(args.api_key, "***")
    print(f"running (cwd {REPO_ROOT}): {shown}", flush=True)
    log_file = output_path / "lm_eval.log"
    output_path.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        with open(log_file, "w", encoding="utf-8") as log:
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            )
        rc = proc.returncode
    except FileNotFoundError:
        return 127, f"lm_eval executable not found: {args.lm_eval}"
    except subprocess.TimeoutExpired:
        rc = 124
    log_text = log_file.read_text(encoding="utf-8", errors="replace")
    kept = f" (log: {log_file})" if args.output_path else ""
    print(f"lm_eval exited with status {rc} after {time.monotonic() - t0:.1f}s{kept}")
    return rc, log_text


# --------------------------------------------------------------------------------------------
# checking samples
# --------------------------------------------------------------------------------------------


class Report:
    def __init__(self, tol: float):
        self.tol = tol
        self.rows: dict[str, dict] = {}
        self.failures: list[str] = []

    def row(self, task: str, kind: str) -> dict:
        return self.rows.setdefault(
            task, {"kind": kind, "samples": 0, "values": 0, "max_diff": 0.0, "greedy": 0, "fails": 0}
        )

    def fail(self, task: str, msg: str) -> None:
        self.row(task, "?")["fails"] += 1
        self.failures.append(f"FAIL {task}: {msg}")

    def compare(self, task: str, where: str, logged: float, ours: float) -> None:
        r = self.rows[task]
        r["values"] += 1
        diff = abs(logged - ours) if math.isfinite(logged) and math.isfinite(ours) else math.inf
        r["max_diff"] = max(r["max_diff"], diff)
        if not diff <= self.tol:
            self.fail(task, f"{where}: logged {logged!r} vs tokenscope {ours!r} (|diff| = {diff:.3g})")


def parse_resp(resp) -> list:
    """resps entries are [[ll, is_greedy]] (loglikelihood) or [ll] (rolling); unwrap one level."""
    if isinstance(resp, list) and len(resp) == 1 and isinstance(resp[0], list):
        return resp[0]
    return resp if isinstance(resp, list) else [resp]


def as_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() == "true"


def encode_pair(ts: Tokenscope, context: str, continuation: str) -> tuple[list[int], list[dict]]:
    """Mirror lm-eval's TemplateLM._encode_pair; returns (context tokens, continuation entries)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx_tokens = ts.tokenize(context)
    whole = ts.prompt_logprobs(context + continuation)
    whole_ids = [int(e["token_id"]) for e in whole]
    expected_ids = ts.tokenize(context + continuation)
    if whole_ids != expected_ids:
        raise ServerError(
            "POST /generate tokenized the prompt differently from POST /tokenize "
            f"({len(whole_ids)} vs {len(expected_ids)} tokens)"
        )
    n_cont = len(whole) - len(ctx_tokens)
    return ctx_tokens, whole[len(whole) - n_cont :] if n_cont > 0 else []


def check_loglikelihood(ts: Tokenscope, rep: Report, task: str, sample: dict) -> None:
    gen_args = sample.get("arguments") or {}
    resps = sample.get("resps") or []
    filtered = sample.get("filtered_resps")
    doc = sample.get("doc_id")
    n = len([k for k in gen_args if k.startswith("gen_args_")])
    if n != len(resps):
        rep.fail(task, f"doc {doc}: {n} requests but {len(resps)} responses")
        return
    for i in range(n):
        a = gen_args[f"gen_args_{i}"]
        context, continuation = a["arg_0"], a["arg_1"]
        where = f"doc {doc} choice {i} {continuation!r}"
        logged = parse_resp(resps[i])
        if filtered is not None and i < len(filtered) and parse_resp(filtered[i]) != logged:
            rep.fail(task, f"{where}: resps {logged!r} != filtered_resps {filtered[i]!r}")
        try:
            logged_ll, logged_greedy = float(logged[0]), as_bool(logged[1])
        except (IndexError, TypeError, ValueError):
            rep.fail(task, f"{where}: cannot parse logged response {logged!r}")
            continue
        if context == "":
            rep.fail(task, f"{where}: empty context is not supported by this checker")
            continue
        try:
            ctx_tokens, cont = encode_pair(ts, context, continuation)
        except ServerError as e:
            rep.fail(task, f"{where}: {e}")
            continue
        if not ctx_tokens or not cont:
            rep.fail(task, f"{where}: {len(ctx_tokens)} context / {len(cont)} continuation tokens")
            continue
        if len(ctx_tokens) + len(cont) > LM_EVAL_MAX_LENGTH:
            rep.fail(task, f"{where}: longer than lm-eval's max_length {LM_EVAL_MAX_LENGTH}")
            continue
        if any(e.get("logprob") is None for e in cont):
            rep.fail(task, f"{where}: tokenscope returned a null log-prob inside the continuation")
            continue
        ours_ll = math.fsum(float(e["logprob"]) for e in cont)
        ours_greedy = all(e.get("rank") == 1 for e in cont)
        rep.compare(task, where, logged_ll, ours_ll)
        if logged_greedy != ours_greedy:
            rep.rows[task]["greedy"] += 1
            rep.fail(task, f"{where}: logged is_greedy={logged_greedy} but tokenscope ranks say {ours_greedy}")


def rolling_prefix(ts: Tokenscope) -> tuple[int, str]:
    """lm-eval (remote tokenizer): prefix_token_id = bos_token_id or eos_token_id, where each id
    is encode(token_string)[0]."""
    info = ts.tokenizer_info()
    for name in ("bos_token", "eos_token"):
        tok = info.get(name)
        if not tok:
            continue
        ids = ts.tokenize(tok)
        if ids and ids[0]:  # lm-eval uses `bos_id or eos_id`, so an id of 0 falls through
            if len(ids) != 1:
                raise ServerError(f"{name} {tok!r} does not tokenize to a single token: {ids}")
            declared = info.get(f"{name}_id")
            if declared is not None and int(declared) != ids[0]:
                raise ServerError(f"{name}_id {declared} != /tokenize({tok!r}) = {ids}")
            return ids[0], tok
    raise ServerError("tokenizer_info has neither a usable bos_token nor eos_token")


def check_rolling(ts: Tokenscope, rep: Report, task: str, sample: dict) -> None:
    gen_args = sample.get("arguments") or {}
    doc = sample.get("doc_id")
    where = f"doc {doc}"
    text = gen_args.get("gen_args_0", {}).get("arg_0")
    resps = sample.get("resps") or []
    if text is None or len(resps) != 1:
        rep.fail(task, f"{where}: expected one rolling request, got {len(resps)} responses")
        return
    logged = parse_resp(resps[0])
    filtered = sample.get("filtered_resps")
    if filtered is not None and len(filtered) == 1 and parse_resp(filtered[0]) != logged:
        rep.fail(task, f"{where}: resps {logged!r} != filtered_resps {filtered!r}")
    try:
        logged_ll = float(logged[0])
    except (IndexError, TypeError, ValueError):
        rep.fail(task, f"{where}: cannot parse logged response {logged!r}")
        return
    try:
        prefix_id, prefix = rolling_prefix(ts)
        text_tokens = ts.tokenize(text)
        if not text_tokens:
            rep.compare(task, where, logged_ll, 0.0)
            return
        if len(text_tokens) > ROLLING_WINDOW:
            rep.fail(task, f"{where}: {len(text_tokens)} tokens > one rolling window ({ROLLING_WINDOW})")
            return
        entries = ts.prompt_logprobs(prefix + text)
    except ServerError as e:
        rep.fail(task, f"{where}: {e}")
        return
    ids = [int(e["token_id"]) for e in entries]
    if ids[0] != prefix_id or ids[1:] != text_tokens:
        rep.fail(
            task,
            f"{where}: /generate tokens of prefix+text ({ids[:3]}... , {len(ids)}) != "
            f"[{prefix_id}] + /tokenize(text) ({len(text_tokens) + 1})",
        )
        return
    if any(e.get("logprob") is None for e in entries[1:]):
        rep.fail(task, f"{where}: tokenscope returned a null log-prob after the prefix")
        return
    ours = math.fsum(float(e["logprob"]) for e in entries[1:])
    rep.compare(task, where, logged_ll, ours)


SAMPLES_RE = re.compile(r"^samples_(?P<task>.+)_\d{4}-\d{2}-\d{2}T[\d.\-]+\.jsonl$")


def check_samples(ts: Tokenscope, output_path: Path, tasks: list[str], tol: float) -> Report:
    rep = Report(tol)
    files = sorted(glob.glob(str(output_path / "**" / "samples_*.jsonl"), recursive=True))
    by_task: dict[str, list[Path]] = {}
    for f in files:
        m = SAMPLES_RE.match(Path(f).name)
        by_task.setdefault(m.group("task") if m else Path(f).stem, []).append(Path(f))
    for task in tasks:
        if task not in by_task:
            rep.row(task, "?")
            rep.fail(task, f"no samples_{task}_*.jsonl under {output_path}")
    for task, paths in sorted(by_task.items()):
        for path in paths:
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        sample = json.loads(line)
                    except ValueError as e:
                        rep.row(task, "?")
                        rep.fail(task, f"{path.name}:{lineno}: bad JSON: {e}")
                        continue
                    first = (sample.get("arguments") or {}).get("gen_args_0") or {}
                    kind = "loglikelihood" if "arg_1" in first else "rolling"
                    rep.row(task, kind)["samples"] += 1
                    if kind == "loglikelihood":
                        check_loglikelihood(ts, rep, task, sample)
                    else:
                        check_rolling(ts, rep, task, sample)
        r = rep.rows.get(task)
        if r is not None and r["samples"] == 0:
            rep.fail(task, "samples file(s) hold no samples")
    return rep


def print_report(rep: Report) -> None:
    header = ("task", "type", "samples", "values", "max abs diff", "greedy mism.", "failures")
    rows = [
        (
            t,
            r["kind"],
            str(r["samples"]),
            str(r["values"]),
            f"{r['max_diff']:.3e}",
            str(r["greedy"]) if r["kind"] == "loglikelihood" else "-",
            str(r["fails"]),
        )
        for t, r in sorted(rep.rows.items())
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True, help="tokenscope server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--lm-eval", default=shutil.which("lm_eval") or "lm_eval", help="lm_eval executable")
    ap.add_argument("--api-key", default=None, help="server API key (OPENAI_API_KEY + auth_token)")
    ap.add_argument("--break-echo", action="store_true", help="strip 'echo' via a proxy (must fail)")
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--include-path", default="benches/lm_eval", help="lm_eval --include_path (relative to the repo root)")
    ap.add_argument("--model", default=None, help="model id lm_eval sends (default: the server's default model, from /v1/models)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=1e-6)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed for lm_eval")
    ap.add_argument("--output-path", default=None, help="keep lm_eval output here (default: temp dir)")
    args = ap.parse_args()

    base = args.base_url.rstrip("/")
    if base.endswith("/v1/completions"):
        base = base[: -len("/v1/completions")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    ts = Tokenscope(base, args.api_key)
    try:
        ts.health()
        ts.tokenizer_info()
        if args.model is None:
            args.model = ts._request("GET", "/v1/models")["data"][0]["id"]
    except ServerError as e:
        print(f"FAIL: tokenscope at {base} is not usable: {e}")
        return 1

    tmp = None
    if args.output_path:
        output_path = Path(args.output_path).resolve()
    else:
        tmp = tempfile.mkdtemp(prefix="tokenscope-lm-eval-")
        output_path = Path(tmp)

    proxy = None
    try:
        lm_base = base
        if args.break_echo:
            proxy, stats = make_echo_stripping_proxy(base)
            lm_base = f"http://127.0.0.1:{proxy.server_address[1]}"
            print(f"--break-echo: lm_eval talks to {lm_base}, which strips 'echo' from POST /v1/completions")
        rc, log_text = run_lm_eval(args, lm_base, output_path)
        if proxy is not None:
            print(f"proxy: {stats['requests']} requests forwarded, 'echo' removed from {stats['echo_removed']}")
        ok = True
        if rc != 0:
            ok = False
            tail = "\n".join(log_text.strip().splitlines()[-25:])
            print(f"FAIL: lm_eval exited with status {rc}; last lines of its log:\n{tail}")
        rep = check_samples(ts, output_path, tasks, args.tolerance)
        print()
        print_report(rep)
        total = sum(r["values"] for r in rep.rows.values())
        max_diff = max((r["max_diff"] for r in rep.rows.values()), default=0.0)
        shown = 0
        for f in rep.failures:
            if shown < 40:
                print(f)
            shown += 1
        if shown > 40:
            print(f"... and {shown - 40} more FAIL lines")
        if total == 0 and not rep.failures:
            rep.failures.append("FAIL: no values were checked")
            print(rep.failures[-1])
        ok = ok and not rep.failures
        print(
            f"checked {total} values, max |logged - tokenscope| = {max_diff:.3e} "
            f"(tolerance {args.tolerance:g}), {len(rep.failures)} failure(s)"
        )
        print("RESULT: PASS" if ok else "RESULT: FAIL")
        return 0 if ok else 1
    finally:
        if proxy is not None:
            proxy.shutdown()
            proxy.server_close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
