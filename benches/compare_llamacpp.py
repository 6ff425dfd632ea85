#!/usr/bin/env python3
"""tokenscope against llama.cpp's llama-server on the same GGUF: tokenization and greedy top-1.

For each prompt (English, code, French, Japanese, numbers, whitespace) it compares
  - the prompt's token ids: `tokenscope inspect --tokenize` vs llama-server's
    `POST /tokenize {"content", "add_special": true, "parse_special": true}` (what its
    completion endpoint does with a text prompt);
  - the most likely next token: tokenscope's exact f32 distribution vs llama-server's
    `POST /completion` with `n_probs` (llama.cpp computes with quantized weights and 8-bit
    activations, so probabilities differ by ~0.01; the argmax should agree except on near-ties,
    which are reported with both margins).

Build llama-server outside the repository (e.g. from the llama-cpp-python sdist's vendored
llama.cpp: cmake -B build -DGGML_NATIVE=OFF && cmake --build build --target llama-server), then

    python3 benches/compare_llamacpp.py --llama-server /path/to/llama-server \\
        --model models/gemma-3-270m-q4_k_m.gguf

Prints one block per prompt and exits non-zero when a tokenization differs or a top-1 differs
on a prompt whose top two are more than 0.02 apart in llama.cpp's distribution.
"""

import argparse
import json
import math
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "La capitale de la France est",
    "日本の首都は",
    "The sum 1234 + 5678 equals",
    "Once upon a time,  there were two spaces\n\nand a blank line. The",
]


def ours(binary, model, prompt):
    base = [binary, "inspect", "--model", model, "-t", "0", "-k", "2", "--json", prompt]
    tok = json.loads(subprocess.run(base + ["--tokenize"], check=True, capture_output=True, text=True).stdout)
    gen = json.loads(subprocess.run(base, check=True, capture_output=True, text=True).stdout)
    return tok["ids"], [(t["token_id"], t["token"], t["probability"]) for t in gen["tokens"]]


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def theirs(port, prompt):
    ids = post(port, "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
    out = post(port, "/completion", {"prompt": ids, "n_predict": 1, "n_probs": 2, "temperature": 0,
                                     "cache_prompt": False})
    first = out["completion_probabilities"][0]
    if "top_probs" in first:  # older llama-server
        return ids, [(t["id"], t["token"], t["prob"]) for t in first["top_probs"]]
    return ids, [(t["id"], t["token"], math.exp(t["logprob"])) for t in first["top_logprobs"]]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--bin", default=str(pathlib.Path(__file__).resolve().parent.parent / "target/release/tokenscope"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
                               "-t", str(args.threads), "-c", "2048", "-np", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except Exception:
                time.sleep(0.2)
        failures = 0
        for prompt in PROMPTS:
            our_ids, our_top = ours(args.bin, args.model, prompt)
            their_ids, their_top = theirs(port, prompt)
            same_ids = our_ids == their_ids
            same_top = our_top[0][0] == their_top[0][0]
            margin = their_top[0][2] - their_top[1][2]
            print(f"{prompt!r}")
            print(f"  tokens: {'identical' if same_ids else 'DIFFER'} ({len(our_ids)} vs {len(their_ids)})")
            if not same_ids:
                print(f"    tokenscope {our_ids}\n    llama.cpp  {their_ids}")
                failures += 1
            print(f"  top-1: tokenscope {our_top[0][1]!r} p={our_top[0][2]:.4f} (next {our_top[1][1]!r} "
                  f"{our_top[1][2]:.4f}) | llama.cpp {their_top[0][1]!r} p={their_top[0][2]:.4f} (next "
                  f"{their_top[1][1]!r} {their_top[1][2]:.4f}) -> {'same' if same_top else 'DIFFERENT'}")
            if not same_top and margin > 0.02:
                failures += 1
        print(f"{len(PROMPTS) - failures} passed, {failures} failed")
        sys.exit(1 if failures else 0)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
