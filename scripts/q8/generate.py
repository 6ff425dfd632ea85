#!/usr/bin/env python3
"""llama.cpp's own log-probabilities for the real test models: the reference of
`--activations q8` (tests/activations_q8.rs).

Stock llama.cpp (llama-cpp-python's vendored copy, built by scripts/families.sh; without
GGML_GELU_F32 in the environment its GELU is the stock f16 table), on the CPU, with its defaults:
f16 keys and values, activations quantized for every quantized weight. Each prompt is evaluated
twice: without flash attention (llama-cpp-python's default, `-fa off`) and with it (llama-server's
default on the CPU, `-fa auto`); the two differ in how attention weights meet the f16 values.

Writes OUT_DIR/index.json and, per model, prompt and attention path, the log-probabilities at
some positions over the whole vocabulary (little-endian f32, positions × vocab; f64 log-softmax
of llama.cpp's f32 logits). Gemma 3's vocabulary is 262,144 tokens, so the long prompt keeps
every 8th position and the last.

Also, per weight format, ggml's own kernels on random data (libggml-cpu through ctypes: the
activations quantized by the format's `from_float` of its dot type, then its `vec_dot`): the
quantized weight rows as ggml_quantize_chunk writes them, the f32 inputs and ggml's products.

Usage: generate.py OUT_DIR MODEL.gguf...
"""

import ctypes
import glob
import json
import os
import sys

if os.environ.get("GGML_GELU_F32"):
    sys.exit("q8: GGML_GELU_F32 is set; the reference must be stock llama.cpp")

import numpy as np
from llama_cpp import Llama

CONTEXT = 512
PROMPTS = [
    "The capital of France is",
    # Long enough to pass the fused path's 48 tokens and to give attention some context.
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker named Elias. Every morning he opened his shop, wound the hundred clocks that "
    "hung on its walls, and listened to them tick together like a quiet orchestra. Children "
    "from the village would press their noses against the window to watch him work, and he "
    "would wave at them with a tiny screwdriver. One winter evening, as snow began to fall, a "
    "stranger in a grey coat knocked on the door and asked him to repair a clock that had "
    "stopped at exactly midnight",
]


def log_softmax64(scores):
    x = scores.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ggml_type values (ggml.h).
FORMATS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13,
           "Q6_K": 14, "F16": 1}


class TypeTraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


def kernels(out_dir):
    """ggml's quantized matmul of random inputs, per format."""
    import llama_cpp
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = ctypes.CDLL(glob.glob(os.path.join(lib_dir, "libggml-base.so"))[0])
    cpu = ctypes.CDLL(glob.glob(os.path.join(lib_dir, "libggml-cpu.so"))[0])
    cpu.ggml_cpu_init()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCpu)
    base.ggml_row_size.restype = ctypes.c_size_t
    base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_void_p]
    from_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    vec_dot_t = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                                 ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                 ctypes.c_size_t, ctypes.c_int)
    rng = np.random.default_rng(7)
    rows, cols, n = 24, 1024, 3
    entries = []
    for name, ty in FORMATS.items():
        w = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
        x = rng.normal(0, 1.0, (n, cols)).astype(np.float32)
        x[:, rng.integers(0, cols, 5)] *= 40  # outliers, as real activations have
        x[1, 100:400] = 0  # blocks of zeros
        row_bytes = base.ggml_row_size(ty, cols)
        wq = ctypes.create_string_buffer(rows * row_bytes)
        base.ggml_quantize_chunk(ty, w.ctypes.data, wq, 0, rows, cols, None)
        traits = cpu.ggml_get_type_traits_cpu(ty).contents
        dot_ty = traits.vec_dot_type
        from_float = from_float_t(cpu.ggml_get_type_traits_cpu(dot_ty).contents.from_float)
        vec_dot = vec_dot_t(traits.vec_dot)
        y = np.zeros((n, rows), dtype=np.float32)
        act_bytes = base.ggml_row_size(dot_ty, cols)
        for t in range(n):
            xq = ctypes.create_string_buffer(act_bytes)
            xt = np.ascontiguousarray(x[t])
            from_float(xt.ctypes.data, xq, cols)
            for r in range(rows):
                s = ctypes.c_float(0)
                vec_dot(cols, ctypes.addressof(s), 0,
                        ctypes.addressof(wq) + r * row_bytes, 0, xq, 0, 1)
                y[t, r] = s.value
        prefix = f"kernel-{name}"
        open(os.path.join(out_dir, prefix + ".w"), "wb").write(wq.raw)
        x.astype("<f4").tofile(os.path.join(out_dir, prefix + ".x"))
        y.astype("<f4").tofile(os.path.join(out_dir, prefix + ".y"))
        entries.append({"format": name, "rows": rows, "cols": cols, "n": n, "prefix": prefix})
    return entries


def main():
    out_dir, models = sys.argv[1], sys.argv[2:]
    os.makedirs(out_dir, exist_ok=True)
    index = {"models": {}, "kernels": kernels(out_dir)}
    for mi, path in enumerate(models):
        entries = []
        for fa in (False, True):
            llm = Llama(model_path=path, n_ctx=CONTEXT, n_batch=CONTEXT, n_threads=2,
                        logits_all=True, verbose=False, flash_attn=fa)
            for pi, prompt in enumerate(PROMPTS):
                ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
                llm.reset()
                llm.eval(ids)
                n = len(ids)
                positions = list(range(n)) if n <= 16 else sorted(set(range(0, n, 8)) | {n - 1})
                scores = np.array(llm.scores[:n], dtype=np.float32)[positions]
                lp = log_softmax64(scores).astype("<f4")
                fname = f"m{mi}-p{pi}-{'fa' if fa else 'nofa'}.f32"
                lp.tofile(os.path.join(out_dir, fname))
                if not fa:
                    entries.append({"prompt": prompt, "ids": [int(t) for t in ids],
                                    "positions": positions, "vocab": int(scores.shape[1])})
                entries[pi]["fa" if fa else "nofa"] = fname
            del llm
        index["models"][os.path.basename(path)] = entries
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)


if __name__ == "__main__":
    main()
