#!/usr/bin/env python3
"""tokenscope against llama.cpp on the same GGUF: tokenization and greedy top-1.

For each prompt (English, code, French, Japanese, numbers) it compares
  - the prompt's token ids: `tokenscope inspect --tokenize` vs llama.cpp's
    `llama_tokenize(add_special=True, parse_special=True)`, which is what llama-server's
    /tokenize and /completion do with a text prompt;
  - the most likely next token: tokenscope's exact f32 distribution vs llama.cpp's (which
    computes with quantized weights and 8-bit activations, so the probabilities differ by
    ~0.01; the argmax should not, except on near-ties, which are reported with both margins).

Run it with a Python that has llama-cpp-python (built from the PyPI sdist, e.g.
`CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python==0.3.36` in a venv outside the
repository):

    /path/to/venv/bin/python benches/compare_llamacpp.py --model models/gemma-3-270m-q4_k_m.gguf

Exits non-zero when a tokenization differs or a top-1 differs on a prompt whose top two are
more than 0.02 apart in llama.cpp's distribution.
"""

import argparse
import json
import math
import pathlib
import subprocess
import sys

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
    top = gen["tokens"]
    return tok["ids"], [(t["token_id"], t["token"], t["probability"]) for t in top]


def theirs(llm, prompt):
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    llm.reset()
    llm.eval(ids)
    logits = llm.scores[len(ids) - 1]
    m = max(logits)
    z = sum(math.exp(x - m) for x in logits)
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[:2]
    top = [(i, llm.detokenize([i]).decode("utf-8", "replace"), math.exp(logits[i] - m) / z) for i in order]
    return list(ids), top


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--bin", default=str(pathlib.Path(__file__).resolve().parent.parent / "target/release/tokenscope"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from llama_cpp import Llama  # noqa: import here so --help works without it

    llm = Llama(model_path=args.model, n_ctx=1024, n_threads=args.threads, verbose=False)
    failures = 0
    for prompt in PROMPTS:
        our_ids, our_top = ours(args.bin, args.model, prompt)
        their_ids, their_top = theirs(llm, prompt)
        same_ids = our_ids == their_ids
        same_top = our_top[0][0] == their_top[0][0]
        margin = their_top[0][2] - their_top[1][2]
        print(f"{prompt!r}")
        print(f"  tokens: {'identical' if same_ids else 'DIFFER'} ({len(our_ids)} vs {len(their_ids)})")
        if not same_ids:
            print(f"    tokenscope {our_ids}\n    llama.cpp  {their_ids}")
            failures += 1
        print(f"  top-1: tokenscope {our_top[0][1]!r} p={our_top[0][2]:.4f} (next {our_top[1][1]!r} {our_top[1][2]:.4f}) | "
              f"llama.cpp {their_top[0][1]!r} p={their_top[0][2]:.4f} (next {their_top[1][1]!r} {their_top[1][2]:.4f})"
              f" -> {'same' if same_top else 'DIFFERENT'}")
        if not same_top and margin > 0.02:
            failures += 1
    print(f"{len(PROMPTS) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
