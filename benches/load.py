#!/usr/bin/env python3
"""Load benchmark: tokenscope vs llama.cpp's llama-server vs llama-cpp-python's server.

One run starts the three servers on loopback, on the same GGUF model, each with 2 threads and
OMP_WAIT_POLICY=ACTIVE in its environment, and measures five goals through HTTP:

  1. cold next-token request, short prompt (5-12 tokens): latency p50
  2. ~500-token prompt, next token: latency p50
  3. greedy decoding of 64 tokens: tokens/s = completion tokens / total request time
     (HTTP round trip, short-prompt prefill included; the same definition for every server;
     the number of tokens actually generated is used)
  4. 8 concurrent clients for a fixed duration, distinct prompts: throughput (req/s) and p99
  5. a user typing: the prompt extended by a word each request (llama-server with
     cache_prompt: true; the other two reuse cached prefixes on their own), plus exact repeats

and prints, as Markdown, the date, the machine, the versions, one table with each server's
figure and the ratio tokenscope/peer (and whether the goal "tokenscope is no worse than the peer"
is met), the peak RSS (VmHWM) of each server, and tokenscope's top-5 for
"The capital of France is" next to the peers' (llama.cpp quantizes activations to 8 bits, so
probabilities may differ by ~0.01).

Only one server works at a time: the others are paused with SIGSTOP (with OMP_WAIT_POLICY=ACTIVE
an idle llama.cpp keeps its OpenMP threads spinning, which would steal the 2 cores), and the
phases are interleaved (phase 1 on each server, then phase 2 on each, ...), so slow drifts of the
machine's load hit every server alike. Every phase is bounded by a request count and a time;
the whole run takes about 2-6 minutes. All servers are killed at the end, on errors and on
Ctrl-C. Prompts start with a different first token for every request of phases 1-3 (checked
with llama-server's /tokenize), so no server can reuse a cached prefix there; in phase 4 the
first word cycles through a pool of a few hundred, so a prefix of at most one token can be shared
between requests hundreds apart. The client runs on the same machine (its cost is small:
http.client with one keep-alive connection per client thread).

Build the peers for the CPU this runs on (outside this repository, /tmp/llamacpp by default;
~5-10 min on 2 cores): `benches/build-llama.sh` takes the instruction sets from /proc/cpuinfo
(a fixed list either crashes on a CPU without one of them or handicaps llama.cpp on a CPU with
more), and prints the two paths for the flags below.

Run (from the repository root, after `cargo build --release` and ./scripts/setup.sh):

    python3 benches/load.py \
      --llama-server /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server \
      --llama-python /tmp/llamacpp/venv/bin/python [--tokenscope ./target/release/tokenscope] \
      [--model models/SmolLM2-135M-Instruct.Q4_1.gguf | --models A.gguf B.gguf ...] \
      [--output report.md] [--quick]

llama-server runs as `llama-server -m MODEL -t 2 -np 8 --no-webui --port P` (8 slots, each with
the model's full context: its RSS includes that KV cache; `--llama-server-args "-c 4096"` adds
arguments), the Python server as `python -m llama_cpp.server --model MODEL --n_threads 2
--n_threads_batch 2 --port P` (its defaults: n_ctx 2048, logits_all true) and tokenscope as
`tokenscope serve --model MODEL --port P --max-queue 256` (cwd = the repository root).
Standard library only; Linux (reads /proc).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# First words of prompts. Duplicated first tokens are dropped at startup (llama-server /tokenize).
WORDS = """
Apple Banana Cherry Dragon Eagle Forest Garden Harbor Island Jungle Kitchen Ladder Mountain
Needle Ocean Pencil Quartz River Saddle Tiger Umbrella Valley Window Yellow Zebra Anchor Basket
Candle Desert Engine Falcon Glacier Hammer Insect Jacket Kettle Lemon Mirror Nickel Orange
Pepper Rabbit Silver Tomato Violin Wagon Bridge Castle Dolphin Feather Guitar Helmet Ivory
Jasmine Lantern Marble Napkin Oyster Parrot Rocket Sailor Tunnel Velvet Walnut Blanket Cactus
Donkey Fabric Goblet Honey Jelly Kingdom Lizard Magnet Nutmeg Olive Pillow Quilt Ribbon Spider
Turtle Vessel Wizard Bottle Carpet Diamond Elbow Finger Ginger Hollow Iron Jewel Kernel Lobster
Meadow Noodle Onion Pigeon Rain Shadow Thunder Volcano Whistle Bamboo Copper Dinner Emerald
Fountain Gravel Harvest Icicle Journey Kitten Leather Monkey Nest Orchard Puzzle Rooftop Sunset
Timber Voyage Wheat Blossom Cloud Daisy Echo Frost Glove Horizon Igloo Juice Lake Maple North
Oak Pumpkin Question Robot Storm Tulip Uncle Village Winter Butter Cookie Dinosaur Energy
Festival Galaxy Hospital Invention Judge Knight Library Museum Notebook Opera Painter Queen
Railway School Teacher Uniform Vacation Wallet Bicycle Camera Doctor Elephant Farmer Giraffe
Hotel Internet Justice Keyboard Lawyer Machine Nurse Office Pilot Restaurant Student Theater
Universe Visitor Worker Baker Captain Dancer Engineer Fisher Gardener Hunter Inventor Jockey
King Lion Miner Nomad Officer Prince Ranger Singer Tailor Writer Bear Crow Deer Fox Goat Horse
Koala Llama Moose Owl Panda Raven Seal Swan Wolf Yak Atlas Comet Delta Ember Flint Granite
Haze Inlet Jade Kelp Lava Mist Nova Opal Pearl Reef Sand Tide Vapor Wave Zinc Acorn Birch Cedar
Elm Fern Grape Hazel Ivy Juniper Kiwi Lilac Mango Nectar Peach Radish Spinach Thyme Vanilla
Almond Broccoli Carrot Fig Garlic Lettuce Melon Papaya Raisin Squash Turnip Yogurt Autumn
Breakfast Chocolate December Evening February Holiday January Midnight November October
Saturday Sunday Thursday Tuesday Wednesday Monday Friday Spring Summer Morning Afternoon
Always Maybe Perhaps Quickly Slowly Suddenly Today Tomorrow Tonight Somewhere Everyone Nobody
Every Many Most Some Several Few Both Either Neither Each
""".split()

TEMPLATES = [
    "is the name of a small town in",
    "was the first thing I saw when",
    "can be found in most of the",
    "means something different to every",
    "has always been my favourite",
    "is known for its long history of",
    "was discovered by a group of",
    "became popular after the war because",
    "looks beautiful in the early",
    "is what my grandmother used to",
    "will never be the same after",
    "reminded everyone in the room that",
]

CORRECTNESS_PROMPT = "The capital of France is"
TYPING_SENTENCES = [
    "The capital of France is a city that millions of people visit every single year",
    "Yesterday I walked to the old market and bought some fresh bread for my family",
]
WARMUP_PROMPT = "Hello there, my name is"
LONG_BODY_SEED = 20261123


# --------------------------------------------------------------------------------------------
# HTTP


class Http:
    """One keep-alive connection per (thread, port)."""

    _local = threading.local()

    @classmethod
    def post(cls, port: int, path: str, body: dict, timeout: float = 180.0):
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        for attempt in (0, 1):
            conns = getattr(cls._local, "conns", None)
            if conns is None:
                conns = cls._local.conns = {}
            conn = conns.get(port)
            if conn is None:
                conn = conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                t0 = time.perf_counter()
                conn.request("POST", path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                dt = time.perf_counter() - t0
                return resp.status, raw, dt
            except (http.client.HTTPException, OSError):
                conn.close()
                conns.pop(port, None)
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")

    @staticmethod
    def get_status(port: int, path: str, timeout: float = 2.0) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (http.client.HTTPException, OSError):
            return -1
        finally:
            conn.close()


class Result:
    __slots__ = ("ok", "latency", "prompt_tokens", "completion_tokens", "top", "error")

    def __init__(self, ok, latency, prompt_tokens=None, completion_tokens=None, top=None, error=None):
        self.ok = ok
        self.latency = latency
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.top = top or []  # [(token, probability)] at the first generated position
        self.error = error


# --------------------------------------------------------------------------------------------
# Servers


def free_port(preferred: int) -> int:
    for port in list(range(preferred, preferred + 50)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    name = "?"
    health_path = "/health"

    def __init__(self, port: int, logdir: str):
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(logdir, f"{self.key}.log")
        self.version = "?"
        self.paused = False

    key = "server"

    def command(self) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> str | None:
        return None

    def start(self, threads: int) -> None:
        env = dict(os.environ)
        env["OMP_WAIT_POLICY"] = "ACTIVE"
        env["OMP_NUM_THREADS"] = str(threads)
        env["RAYON_NUM_THREADS"] = str(threads)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.cwd(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before ready; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            if Http.get_status(self.port, self.health_path) == 200:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log {self.log_path}:\n{tail(self.log_path)}")

    def signal(self, sig) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False
        time.sleep(0.3)  # let it settle (rescheduling, spinning threads)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:
            self.log.close()
        except Exception:
            pass

    def memory(self) -> dict:
        out = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmHWM", "VmRSS"):
                        out[k] = int(v.split()[0]) * 1024
        except (OSError, AttributeError):
            pass
        return out

    def next_token(self, prompt: str, max_tokens: int = 1, top_k: int = 5, cache: bool = False,
                   timeout: float = 180.0) -> Result:
        raise NotImplementedError

    def _call(self, path: str, body: dict, timeout: float):
        try:
            status, raw, dt = Http.post(self.port, path, body, timeout)
        except Exception as e:  # noqa: BLE001 - reported as an error of this request
            return None, None, f"{type(e).__name__}: {e}"
        if status != 200:
            return None, dt, f"HTTP {status}: {raw[:200]!r}"
        try:
            return json.loads(raw), dt, None
        except ValueError as e:
            return None, dt, f"bad JSON: {e}"


class Tokenscope(Server):
    name = "tokenscope"
    key = "tokenscope"

    def __init__(self, port, logdir, binary, model, extra):
        super().__init__(port, logdir)
        self.binary = binary
        self.model = model
        self.extra = extra

    def cwd(self):
        return REPO

    def command(self):
        return [self.binary, "serve", "--model", self.model, "--host", "127.0.0.1",
                "--port", str(self.port), "--max-queue", "256", *self.extra]

    def next_token(self, prompt, max_tokens=1, top_k=5, cache=False, timeout=180.0):
        body = {"prompt": prompt, "max_tokens": max_tokens, "top_k": top_k, "temperature": 0}
        d, dt, err = self._call("/generate", body, timeout)
        if err:
            return Result(False, dt, error=err)
        md = d.get("metadata", {})
        top = [(t["token"], float(t["probability"])) for t in d.get("tokens", [])]
        return Result(True, dt, md.get("prompt_tokens"), md.get("completion_tokens"), top)


class LlamaServer(Server):
    name = "llama-server"
    key = "llama-server"

    def __init__(self, port, logdir, binary, model, threads, extra):
        super().__init__(port, logdir)
        self.binary = binary
        self.model = model
        self.threads = threads
        self.extra = extra

    def command(self):
        return [self.binary, "-m", self.model, "-t", str(self.threads), "-np", "8",
                "--no-webui", "--host", "127.0.0.1", "--port", str(self.port), *self.extra]

    def next_token(self, prompt, max_tokens=1, top_k=5, cache=False, timeout=180.0):
        body = {"prompt": prompt, "n_predict": max_tokens, "n_probs": top_k,
                "cache_prompt": cache, "temperature": 0}
        if max_tokens > 1:
            body["ignore_eos"] = True
        d, dt, err = self._call("/completion", body, timeout)
        if err:
            return Result(False, dt, error=err)
        top = []
        probs = d.get("completion_probabilities") or []
        if probs:
            first = probs[0]
            if "top_logprobs" in first:  # recent versions: log-probabilities
                top = [(t["token"], math.exp(t["logprob"])) for t in first["top_logprobs"]]
            elif "top_probs" in first:  # post_sampling_probs / some versions
                top = [(t["token"], float(t["prob"])) for t in first["top_probs"]]
            elif "probs" in first:  # older versions
                top = [(t["tok_str"], float(t["prob"])) for t in first["probs"]]
        timings = d.get("timings", {})
        return Result(True, dt, d.get("tokens_evaluated", timings.get("prompt_n")),
                      d.get("tokens_predicted", timings.get("predicted_n")), top)

    def tokenize(self, text: str) -> list[int] | None:
        status, raw, _ = Http.post(self.port, "/tokenize", {"content": text}, 10)
        if status != 200:
            return None
        toks = json.loads(raw).get("tokens", [])
        return [t if isinstance(t, int) else t.get("id") for t in toks]


class LlamaPython(Server):
    name = "llama-cpp-python"
    key = "llama-cpp-python"
    health_path = "/v1/models"

    def __init__(self, port, logdir, python, model, threads, extra):
        super().__init__(port, logdir)
        self.python = python
        self.model = model
        self.threads = threads
        self.extra = extra

    def command(self):
        return [self.python, "-m", "llama_cpp.server", "--model", self.model,
                "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra]

    def next_token(self, prompt, max_tokens=1, top_k=5, cache=False, timeout=180.0):
        body = {"prompt": prompt, "max_tokens": max_tokens, "logprobs": top_k, "temperature": 0}
        d, dt, err = self._call("/v1/completions", body, timeout)
        if err:
            return Result(False, dt, error=err)
        top = []
        try:
            first = d["choices"][0]["logprobs"]["top_logprobs"][0]
            top = sorted(((t, math.exp(lp)) for t, lp in first.items()), key=lambda x: -x[1])
        except (KeyError, IndexError, TypeError):
            pass
        usage = d.get("usage", {})
        return Result(True, dt, usage.get("prompt_tokens"), usage.get("completion_tokens"), top)


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# Prompts


class Prompts:
    """First words with pairwise distinct first tokens, handed out without reuse."""

    def __init__(self, llama: LlamaServer | None, long_tokens: int):
        reserved_sentences = [CORRECTNESS_PROMPT, WARMUP_PROMPT, *TYPING_SENTENCES]
        seen: set = set()
        # capitalized and lower-case forms: ~2x the distinct first tokens
        words = list(dict.fromkeys(WORDS + [w.lower() for w in WORDS]))
        self.checked = False
        if llama is not None:
            try:
                for s in reserved_sentences:
                    seen.add(llama.tokenize(s)[0])
                kept = []
                for w in words:
                    first = llama.tokenize(f"{w} {TEMPLATES[0]}")[0]
                    if first not in seen:
                        seen.add(first)
                        kept.append(w)
                words = kept
                self.checked = True
            except Exception:  # noqa: BLE001 - fall back to unchecked words
                pass
        reserved_words = {s.split()[0] for s in reserved_sentences}
        words = [w for w in words if w not in reserved_words]
        random.Random(7).shuffle(words)
        self.words = words
        self.next = 0
        self.long_body = self._long_body(llama, long_tokens)

    def take(self, n: int) -> list[str]:
        if self.next + n > len(self.words):
            raise RuntimeError("prompt pool exhausted; lower the request counts")
        out = self.words[self.next:self.next + n]
        self.next += n
        return out

    def short(self, words: list[str]) -> list[str]:
        return [f"{w} {TEMPLATES[i % len(TEMPLATES)]}" for i, w in enumerate(words)]

    def cycle_from(self, start: int):
        """Endless distinct prompts for the concurrent phase (first word cycles over the pool)."""
        i = 0
        while True:
            w = self.words[(start + i) % len(self.words)]
            t = TEMPLATES[(i // len(self.words) + i) % len(TEMPLATES)]
            yield f"{w} {t} {i}" if i >= len(self.words) else f"{w} {t}"
            i += 1

    @staticmethod
    def _long_body(llama, target: int) -> str:
        rng = random.Random(LONG_BODY_SEED)
        pool = [w.lower() for w in WORDS]
        sentences = []
        approx = 0
        while approx < target * 1.3:
            n = rng.randint(6, 14)
            s = " ".join(rng.choice(pool) for _ in range(n))
            sentences.append(s[0].upper() + s[1:] + rng.choice([".", ".", ",", ";", "!"]))
            approx += n + 1
        if llama is not None:
            try:
                lo, hi = 1, len(sentences)
                while lo < hi:  # the longest prefix of sentences with <= target - 2 tokens
                    mid = (lo + hi + 1) // 2
                    if len(llama.tokenize(" ".join(sentences[:mid]))) <= target - 2:
                        lo = mid
                    else:
                        hi = mid - 1
                return " ".join(sentences[:lo])
            except Exception:  # noqa: BLE001
                pass
        return " ".join(sentences[: max(1, int(len(sentences) / 1.3 * 0.75))])

    def long(self, words: list[str]) -> list[str]:
        return [f"{w} {self.long_body}" for w in words]


# --------------------------------------------------------------------------------------------
# Statistics


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(p / 100 * len(v)) - 1))
    return v[k]


def median(values):
    return statistics.median(values) if values else None


class PhaseResult:
    def __init__(self):
        self.values = {}  # metric -> value
        self.n = 0
        self.errors = 0
        self.notes = []
        self.first_error = None


def run_sequential(server: Server, prompts: list[str], max_n: int, max_s: float, **kw):
    results = []
    t0 = time.monotonic()
    for p in prompts[:max_n]:
        if results and time.monotonic() - t0 > max_s:
            break
        results.append(server.next_token(p, **kw))
    return results


def summarize(results, pr: PhaseResult):
    ok = [r for r in results if r.ok]
    pr.n = len(ok)
    pr.errors = len(results) - len(ok)
    bad = [r for r in results if not r.ok]
    if bad:
        pr.first_error = bad[0].error
    return ok


def phase_next_token(server, prompts, max_n, max_s) -> PhaseResult:
    """Sequential next-token requests (the cold and the long-prompt phases): p50 latency."""
    pr = PhaseResult()
    ok = summarize(run_sequential(server, prompts, max_n, max_s, max_tokens=1, top_k=5), pr)
    pr.values["p50_ms"] = median([r.latency * 1000 for r in ok])
    pr.values["prompt_tokens"] = median([r.prompt_tokens for r in ok if r.prompt_tokens is not None])
    return pr


def phase_greedy(server, prompts, args) -> PhaseResult:
    pr = PhaseResult()
    ok = summarize(run_sequential(server, prompts, args.greedy_n, args.greedy_s,
                                  max_tokens=args.greedy_tokens, top_k=1), pr)
    rates = [r.completion_tokens / r.latency for r in ok if r.completion_tokens]
    pr.values["tok_s"] = median(rates)
    pr.values["completion_tokens"] = median([r.completion_tokens for r in ok if r.completion_tokens])
    return pr


def phase_concurrent(server, prompt_iter, args) -> PhaseResult:
    pr = PhaseResult()
    lock = threading.Lock()
    results = []
    done_times = []
    t_start = time.perf_counter()
    deadline = t_start + args.conc_s

    def client():
        while True:
            if time.perf_counter() >= deadline:
                return
            with lock:
                if len(results) >= args.conc_max:
                    return
                prompt = next(prompt_iter)
            r = server.next_token(prompt, max_tokens=1, top_k=5, timeout=args.conc_s + 120)
            with lock:
                results.append(r)
                done_times.append(time.perf_counter())

    with ThreadPoolExecutor(max_workers=args.clients) as ex:
        for f in [ex.submit(client) for _ in range(args.clients)]:
            f.result()
    ok = summarize(results, pr)
    elapsed = (max(done_times) if done_times else time.perf_counter()) - t_start
    pr.values["req_s"] = len(ok) / elapsed if elapsed > 0 else None
    lat = [r.latency * 1000 for r in ok]
    pr.values["p50_ms"] = pct(lat, 50)
    pr.values["p99_ms"] = pct(lat, 99)
    pr.values["elapsed_s"] = elapsed
    return pr


def phase_typing(server, args) -> PhaseResult:
    pr = PhaseResult()
    ext, rep, cold = [], [], []
    t0 = time.monotonic()
    all_results = []
    for sentence in TYPING_SENTENCES:
        words = sentence.split()
        steps = [" ".join(words[:i]) for i in range(3, len(words) + 1)]
        for i, p in enumerate(steps):
            if time.monotonic() - t0 > args.typing_s:
                break
            r = server.next_token(p, max_tokens=1, top_k=5, cache=True)
            all_results.append(r)
            if r.ok:
                (cold if i == 0 else ext).append(r.latency * 1000)
        for _ in range(args.typing_repeats):
            if time.monotonic() - t0 > args.typing_s:
                break
            r = server.next_token(steps[-1], max_tokens=1, top_k=5, cache=True)
            all_results.append(r)
            if r.ok:
                rep.append(r.latency * 1000)
    summarize(all_results, pr)
    pr.values["ext_p50_ms"] = median(ext)
    pr.values["rep_p50_ms"] = median(rep)
    pr.values["first_ms"] = median(cold)
    pr.values["n_ext"] = len(ext)
    pr.values["n_rep"] = len(rep)
    return pr


# --------------------------------------------------------------------------------------------
# Report


def fmt(v, unit="", digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def ratio_cell(ts, peer, higher_is_better, tolerance, target=None):
    """The ratio and whether it meets the goal: ≥ `target` (default 1/tolerance) where higher is
    better, ≤ tolerance otherwise; `target` False: reported without a goal."""
    if ts is None or peer is None or peer == 0:
        return "n/a"
    r = ts / peer
    if target is False:
        return f"{r:.2f}"
    if higher_is_better:
        goal = target if target is not None else 1 / tolerance
        met = r >= goal
        return f"{r:.2f} ({'met' if met else 'NOT met'}: goal ≥ {goal:g})"
    met = r <= tolerance
    return f"{r:.2f} ({'met' if met else 'NOT met'})"


# The goal 4: ≥ 1.2× llama-server's throughput and ≥ 3× the Python server's.
THROUGHPUT_TARGETS = {"llama-server": 1.2, "llama-cpp-python": 3.0}


def machine_info():
    model = "?"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    isa = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
           if f" {x} " in f" {flags} "]
    return model, os.cpu_count(), mem, " ".join(isa)


def run_version(cmd, cwd=None):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)
        text = (out.stdout + out.stderr).strip().splitlines()
        return " / ".join(line.strip() for line in text if line.strip())[:200] or "?"
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def file_digest(path, n=12):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def mib(b):
    return f"{b / 1024 / 1024:.0f} MiB" if b else "n/a"


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenscope", default=os.path.join(REPO, "target", "release", "tokenscope"))
    ap.add_argument("--llama-server", required=True, help="llama.cpp's llama-server binary")
    ap.add_argument("--llama-python", help="python of a venv with llama-cpp-python[server] (optional)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--models", nargs="+",
                    help="several models, benchmarked one after the other (one report each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18090, help="first port to try")
    ap.add_argument("--tokenscope-args", default="", help="extra arguments (shell-quoted)")
    ap.add_argument("--llama-server-args", default="", help="extra arguments (shell-quoted)")
    ap.add_argument("--llama-python-args", default="", help="extra arguments (shell-quoted)")
    ap.add_argument("--output", help="also write the Markdown report to this file")
    ap.add_argument("--logdir", help="server logs (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="fewer requests, shorter phases")
    ap.add_argument("--tolerance", type=float, default=1.0,
                    help="goal met when tokenscope is within this factor of the peer (1.0 = no worse)")
    ap.add_argument("--cold-n", type=int, default=30)
    ap.add_argument("--cold-s", type=float, default=25)
    ap.add_argument("--long-tokens", type=int, default=500)
    ap.add_argument("--long-n", type=int, default=5)
    ap.add_argument("--long-s", type=float, default=40)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--greedy-n", type=int, default=5)
    ap.add_argument("--greedy-s", type=float, default=40)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--conc-s", type=float, default=20)
    ap.add_argument("--conc-max", type=int, default=2000)
    ap.add_argument("--typing-s", type=float, default=40)
    ap.add_argument("--typing-repeats", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.cold_n, args.cold_s = 12, 10
        args.long_n, args.long_s = 3, 20
        args.greedy_n, args.greedy_s = 3, 20
        args.conc_s = 8
        args.typing_s = 15
    models = args.models or [args.model]
    reports = []
    for model in models:
        one = argparse.Namespace(**vars(args))
        one.model = model
        reports.append(run(one))
    report = "\n\n".join(reports)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")


def run(args) -> str:
    """One model: start the servers, run the phases, return the Markdown report."""
    args.model = os.path.abspath(args.model)
    args.tokenscope = os.path.abspath(args.tokenscope)
    for label, path in (("--model", args.model), ("--tokenscope", args.tokenscope),
                        ("--llama-server", args.llama_server)):
        if not os.path.exists(path):
            sys.exit(f"{label}: {path} does not exist")

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)

    logdir = args.logdir or tempfile.mkdtemp(prefix="tokenscope-load-")
    os.makedirs(logdir, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    cpu, ncpu, mem, isa = machine_info()

    p1 = free_port(args.port)
    p2 = free_port(p1 + 1)
    servers: list[Server] = [
        Tokenscope(p1, logdir, args.tokenscope, args.model, shlex.split(args.tokenscope_args)),
        LlamaServer(p2, logdir, args.llama_server, args.model, args.threads,
                    shlex.split(args.llama_server_args)),
    ]
    if args.llama_python:
        servers.append(LlamaPython(free_port(p2 + 1), logdir, args.llama_python, args.model,
                                   args.threads, shlex.split(args.llama_python_args)))
    ts, ls = servers[0], servers[1]
    versions = {
        "tokenscope": f"{run_version([args.tokenscope, '--version'])} "
                      f"(binary sha256 {file_digest(args.tokenscope)}, "
                      f"built {datetime.datetime.fromtimestamp(os.path.getmtime(args.tokenscope)).isoformat(timespec='seconds')})",
        "llama-server": run_version([args.llama_server, "--version"]),
    }
    if args.llama_python:
        versions["llama-cpp-python"] = run_version(
            [args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"])

    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    results: dict[str, dict[str, PhaseResult]] = {s.name: {} for s in servers}
    memory = {}
    correctness = {}
    ready_s = {}
    try:
        for s in servers:
            log(f"starting {s.name} on port {s.port}: {shlex.join(s.command())}")
            s.start(args.threads)
            ready_s[s.name] = s.wait_ready(180)
            log(f"{s.name} ready after {ready_s[s.name]:.1f} s")
            s.pause()

        ls.resume()
        prompts = Prompts(ls, args.long_tokens)
        ls.pause()
        log(f"{len(prompts.words)} first words with distinct first tokens "
            f"({'checked with /tokenize' if prompts.checked else 'NOT checked'})")
        cold_prompts = prompts.short(prompts.take(args.cold_n))
        long_prompts = prompts.long(prompts.take(args.long_n + 1))
        warm_long, long_prompts = long_prompts[0], long_prompts[1:]
        greedy_prompts = [f"{w} was sitting by the window when" for w in prompts.take(args.greedy_n)]
        conc_start = prompts.next

        # warm-up (not measured): a short and a long prompt
        for s in servers:
            s.resume()
            for p in (WARMUP_PROMPT, warm_long):
                r = s.next_token(p, max_tokens=1, top_k=5)
                if not r.ok:
                    raise RuntimeError(f"{s.name} warm-up failed: {r.error}")
            s.pause()

        phases = [
            ("cold", lambda s: phase_next_token(s, cold_prompts, args.cold_n, args.cold_s)),
            ("long", lambda s: phase_next_token(s, long_prompts, args.long_n, args.long_s)),
            ("greedy", lambda s: phase_greedy(s, greedy_prompts, args)),
            ("concurrent", lambda s: phase_concurrent(s, prompts.cycle_from(conc_start), args)),
            ("typing", lambda s: phase_typing(s, args)),
        ]
        for name, fn in phases:
            for s in servers:
                s.resume()
                t0 = time.monotonic()
                pr = fn(s)
                s.pause()
                results[s.name][name] = pr
                vals = ", ".join(f"{k}={fmt(v, digits=2)}" for k, v in pr.values.items())
                log(f"{name:10s} {s.name:17s} {time.monotonic() - t0:5.1f} s  n={pr.n} "
                    f"errors={pr.errors}  {vals}" + (f"  first error: {pr.first_error}" if pr.errors else ""))

        for s in servers:
            s.resume()
            r = s.next_token(CORRECTNESS_PROMPT, max_tokens=1, top_k=5, cache=False)
            correctness[s.name] = r
            s.pause()
        for s in servers:
            memory[s.name] = s.memory()
    finally:
        for s in servers:
            if s.name not in memory:
                memory[s.name] = s.memory()
            s.stop()
    load_after = os.getloadavg()
    finished = datetime.datetime.now(datetime.timezone.utc)

    # ---------------------------------------------------------------- report
    peers = [s.name for s in servers[1:]]
    out = []
    w = out.append
    w(f"# tokenscope load benchmark: {os.path.basename(args.model)}\n")
    w(f"- date: {started.isoformat(timespec='seconds')} → {finished.isoformat(timespec='seconds')} "
      f"({(finished - started).total_seconds():.0f} s)")
    w(f"- machine: {platform.node()}, {ncpu} CPUs (nproc {len(os.sched_getaffinity(0))}), "
      f"{cpu}, {mem} RAM, ISA flags: {isa}; {platform.platform()}")
    w(f"- load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}; "
      f"after: {' '.join(f'{x:.2f}' for x in load_after)}")
    w(f"- model: {args.model} ({os.path.getsize(args.model) / 1e6:.1f} MB, sha256 {file_digest(args.model)})")
    for k, v in versions.items():
        w(f"- {k}: {v}")
    w(f"- client: Python {platform.python_version()}, http.client keep-alive; each server "
      f"{args.threads} threads, OMP_WAIT_POLICY=ACTIVE, the other servers SIGSTOPped meanwhile")
    for s in servers:
        w(f"- `{shlex.join(s.command())}` (ready after {ready_s.get(s.name, float('nan')):.1f} s)")
    w("")

    def val(sname, phase, key):
        pr = results.get(sname, {}).get(phase)
        return None if pr is None else pr.values.get(key)

    def n_of(sname, phase, key=None):
        pr = results.get(sname, {}).get(phase)
        if pr is None:
            return ""
        n = pr.values.get(key) if key else pr.n
        e = f", {pr.errors} err" if pr.errors else ""
        return f" (n={n}{e})"

    rows = [
        ("1. cold next token, short prompt: p50 latency", "cold", "p50_ms", " ms", False, None),
        (f"2. ~{args.long_tokens}-token prompt: p50 latency", "long", "p50_ms", " ms", False, None),
        (f"3. greedy {args.greedy_tokens} tokens: tokens/s (completion tokens / total request time), median",
         "greedy", "tok_s", " tok/s", True, None),
        (f"4. {args.clients} concurrent clients, {args.conc_s:.0f} s: throughput", "concurrent", "req_s", " req/s", True, None),
        (f"4. {args.clients} concurrent clients: p99 latency", "concurrent", "p99_ms", " ms", False, None),
        ("5. typing (prompt extended by one word): p50 latency", "typing", "ext_p50_ms", " ms", False, "n_ext"),
        ("5. typing, exact repeat of the prompt: p50 latency", "typing", "rep_p50_ms", " ms", False, "n_rep"),
    ]
    head = "| goal | " + " | ".join(s.name for s in servers) + " | " + \
        " | ".join(f"tokenscope / {p}" for p in peers) + " |"
    w(head)
    w("|" + "---|" * (1 + len(servers) + len(peers)))
    for label, phase, key, unit, hib, nkey in rows:
        cells = [f"{fmt(val(s.name, phase, key), unit)}{n_of(s.name, phase, nkey)}" for s in servers]
        ratios = [ratio_cell(val(ts.name, phase, key), val(p, phase, key), hib, args.tolerance,
                             THROUGHPUT_TARGETS.get(p) if phase == "concurrent" and hib else None)
                  for p in peers]
        w(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    hwm = {s.name: memory.get(s.name, {}).get("VmHWM") for s in servers}
    cells = [mib(hwm[s.name]) for s in servers]
    ratios = [ratio_cell(hwm[ts.name], hwm[p], False, args.tolerance, False) for p in peers]
    w("| peak RSS (VmHWM) | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    w("")
    w(f"Goal met = tokenscope no worse than the peer (ratio ≤ {args.tolerance:g} for latency, "
      f"≥ {1 / args.tolerance:g} for throughput), except goal 4's throughput: ≥ 1.2× llama-server's "
      f"and ≥ 3× llama-cpp-python's. Memory is reported, without a goal.")
    w("")
    w("Details:")
    for s in servers:
        d = []
        d.append(f"prompt tokens: cold {fmt(val(s.name, 'cold', 'prompt_tokens'), digits=0)}, "
                 f"long {fmt(val(s.name, 'long', 'prompt_tokens'), digits=0)}")
        d.append(f"greedy completion tokens {fmt(val(s.name, 'greedy', 'completion_tokens'), digits=0)}")
        d.append(f"concurrent p50 {fmt(val(s.name, 'concurrent', 'p50_ms'), ' ms')}, "
                 f"{n_of(s.name, 'concurrent').strip()[1:-1]} in {fmt(val(s.name, 'concurrent', 'elapsed_s'), ' s')}")
        d.append(f"typing: first (cold) step p50 {fmt(val(s.name, 'typing', 'first_ms'), ' ms')}")
        m = memory.get(s.name, {})
        d.append(f"RSS at end {mib(m.get('VmRSS'))}")
        w(f"- {s.name}: " + "; ".join(d))
    errs = [(s.name, ph, pr.first_error) for s in servers for ph, pr in results[s.name].items() if pr.errors]
    for sname, ph, e in errs:
        w(f"- errors: {sname} / {ph}: {e}")
    w("")
    w(f'Correctness: top-5 next tokens for "{CORRECTNESS_PROMPT}" (probabilities, T = 0):')
    w("")
    w("| rank | " + " | ".join(s.name for s in servers) + " |")
    w("|" + "---|" * (1 + len(servers)))
    for i in range(5):
        cells = []
        for s in servers:
            r = correctness.get(s.name)
            if r is None or not r.ok or i >= len(r.top):
                cells.append("n/a")
            else:
                tok, p = r.top[i]
                cells.append(f"`{json.dumps(tok)[1:-1]}` {p:.4f}")
        w(f"| {i + 1} | " + " | ".join(cells) + " |")
    tsr = correctness.get(ts.name)
    if tsr is not None and tsr.ok:
        tsp = dict(tsr.top)
        for p in peers:
            r = correctness.get(p)
            if r is None or not r.ok:
                continue
            common = [t for t, _ in r.top if t in tsp]
            diff = max((abs(tsp[t] - dict(r.top)[t]) for t in common), default=float("nan"))
            same_order = [t for t, _ in tsr.top] == [t for t, _ in r.top]
            w(f"\ntokenscope vs {p}: same top-5 order: {same_order}; "
              f"max |Δp| over common tokens: {diff:.4f}")
    w("")
    w(f"Server logs: {logdir}")
    return "\n".join(out)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
