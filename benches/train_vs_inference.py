#!/usr/bin/env python3
"""What a training job costs inference: /generate latency on the default model with no job,
then while a fine-tuning job of that same model runs, for each --train-threads given.

    python3 benches/train_vs_inference.py [--threads 1 2] [--requests 30]

Starts target/debug/tokenscope (build it first) on a free port with a fresh state directory per
setting; prints p50/p95 latency of a short next-token request and the job's tokens/s.
"""

import argparse
import json
import random
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

WORDS = ("river stone music garden winter coffee planet silver engine doctor forest "
         "market window island candle letter summer mountain pocket thunder").split()
CORPUS = " ".join(
    f"Recipe {i}: mix flour, water and a pinch of cardamom, then bake for {10 + i % 20} minutes."
    for i in range(400)
)


def call(base, method, path, body=None, content_type="application/json"):
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def latencies(base, n):
    """Each prompt starts differently (a short sentence of random words), so the prefix cache
    cannot answer from memory: every request runs the model on ~10 tokens."""
    out = []
    for _ in range(n):
        prompt = " ".join(random.choice(WORDS) for _ in range(8)).capitalize() + " is"
        t = time.perf_counter()
        call(base, "POST", "/generate", {"prompt": prompt, "top_k": 5, "temperature": 0})
        out.append((time.perf_counter() - t) * 1000)
    return out


def summary(ms):
    ms = sorted(ms)
    return f"p50 {statistics.median(ms):7.1f} ms  p95 {ms[int(0.95 * (len(ms) - 1))]:7.1f} ms"


def run(threads, n):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    port_n = port.getsockname()[1]
    port.close()
    state = tempfile.mkdtemp(prefix="tokenscope-bench-state-")
    server = subprocess.Popen(
        ["target/debug/tokenscope", "serve", "--port", str(port_n), "--state-dir", state,
         "--train-threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port_n}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except Exception:
                time.sleep(0.2)
        model = call(base, "GET", "/models")[0]["id"]
        latencies(base, 3)  # warm-up
        idle = latencies(base, n)
        upload = call(base, "POST", "/train/uploads", CORPUS.encode(), "text/plain")
        job = call(base, "POST", "/train/jobs", {
            "base_model": model, "data": {"upload_id": upload["id"]}, "output_name": "bench",
            "steps": 1000, "batch_size": 4, "seq_len": 128, "eval_every": 0, "save_every": 1000,
        })
        while call(base, "GET", f"/train/jobs/{job['id']}")["step"] < 1:
            time.sleep(0.5)
        busy = latencies(base, n)
        tps = call(base, "GET", f"/train/jobs/{job['id']}").get("tokens_per_s", 0)
        call(base, "POST", f"/train/jobs/{job['id']}/cancel", {})
        print(f"--train-threads {threads}: no job: {summary(idle)} | "
              f"job running: {summary(busy)} | job {tps:.0f} tokens/s")
    finally:
        server.kill()
        server.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--requests", type=int, default=30)
    args = ap.parse_args()
    for t in args.threads:
        run(t, args.requests)


if __name__ == "__main__":
    main()
