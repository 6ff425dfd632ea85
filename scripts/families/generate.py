#!/usr/bin/env python3
"""Tiny random-weight models of every supported family, and llama.cpp's logits for them.

For each family this writes, under OUT/<name>/:
  model.gguf        F32 tensors, metadata and tensor names as llama.cpp's converter
                    (convert_hf_to_gguf.py) writes them for that architecture, and a real
                    vocabulary copied from llama.cpp's ggml-vocab-*.gguf test files;
  model-q8_0.gguf   (Phi-3, GPT-2) the layers' matrices in Q8_0, for the packed loading of
                    fused tensors;
  hf/               the same weights as a Hugging Face directory (config.json and
                    model.safetensors with the HF names and layouts: GPT-2's Conv1D
                    transposition and fused c_attn, Phi-3's fused qkv/gate_up, Gemma's
                    norms without the +1, llama's q/k rows unpermuted);
  reference.json    prompts, llama.cpp's token ids, and for each prompt the file holding
                    llama.cpp's log-probabilities at every position over the full vocabulary
                    (little-endian f32, positions × vocab), computed from llama-cpp-python's
                    logits_all=True scores in f64.

The HF weights are the source: the GGUF is derived from them by the converter's transforms
(re-implemented here, each named). llama.cpp computes F32 weights in f32 on the CPU, so its
scores are an independent reference (except GELU, which ggml's CPU backend evaluates through
an f16 lookup table: see the README's family table).

Usage: generate.py OUT_DIR VOCAB_DIR
"""

import json
import math
import os
import sys

# GELU in f32, not through ggml's f16 table (the one patch scripts/families.sh makes to
# llama.cpp reads this; it must be set before llama.cpp first evaluates a GELU).
os.environ["GGML_GELU_F32"] = "1"

import numpy as np
import gguf
from safetensors.numpy import save_file

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FF, LAYERS, CONTEXT = 64, 4, 2, 16, 128, 4, 512
WINDOW = 12  # sliding window of the families that have one: the long prompt exceeds it

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    "every morning rowed out past the lighthouse, singing songs about the weather.",
]


def family_specs():
    """name → (gguf arch, vocab file, hf model_type, extra hparams)."""
    return {
        "llama3": dict(arch="llama", vocab="llama-bpe", model_type="llama",
                       rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64},
                       rope_theta=500000.0),
        "llama2": dict(arch="llama", vocab="llama-spm", model_type="llama"),
        "mistral": dict(arch="llama", vocab="llama-spm", model_type="mistral"),
        "phi3": dict(arch="phi3", vocab="phi-3", model_type="phi3"),
        "gemma2": dict(arch="gemma2", vocab="llama-spm", model_type="gemma2"),
        "gpt2": dict(arch="gpt2", vocab="gpt-2", model_type="gpt2"),
    }


def randn(rng, *shape, std):
    return (rng.standard_normal(shape) * std).astype(np.float32)


def hf_weights(name, spec, vocab_size, rng):
    """Random weights with HF names and layouts. Scales are large enough that the
    distributions are far from uniform (so a 1e-4 agreement means something) and that
    Gemma 2's attention scores reach its soft cap's curved range."""
    w = {}
    p = lambda std, *shape: randn(rng, *shape, std=std)  # noqa: E731
    proj = 1.0 / math.sqrt(HIDDEN)
    norm = lambda: (1.0 + p(0.1, HIDDEN)).astype(np.float32)  # noqa: E731
    if name == "gpt2":
        w["transformer.wte.weight"] = p(1.0, vocab_size, HIDDEN)
        w["transformer.wpe.weight"] = p(0.5, CONTEXT, HIDDEN)
        for i in range(LAYERS):
            b = f"transformer.h.{i}"
            w[f"{b}.ln_1.weight"], w[f"{b}.ln_1.bias"] = norm(), p(0.1, HIDDEN)
            # Conv1D: (in, out).
            w[f"{b}.attn.c_attn.weight"] = p(proj * 2, HIDDEN, 3 * HIDDEN)
            w[f"{b}.attn.c_attn.bias"] = p(0.1, 3 * HIDDEN)
            w[f"{b}.attn.c_proj.weight"] = p(proj, HIDDEN, HIDDEN)
            w[f"{b}.attn.c_proj.bias"] = p(0.1, HIDDEN)
            w[f"{b}.ln_2.weight"], w[f"{b}.ln_2.bias"] = norm(), p(0.1, HIDDEN)
            w[f"{b}.mlp.c_fc.weight"] = p(proj * 2, HIDDEN, 4 * HIDDEN)
            w[f"{b}.mlp.c_fc.bias"] = p(0.1, 4 * HIDDEN)
            w[f"{b}.mlp.c_proj.weight"] = p(1.0 / math.sqrt(4 * HIDDEN), 4 * HIDDEN, HIDDEN)
            w[f"{b}.mlp.c_proj.bias"] = p(0.1, HIDDEN)
        w["transformer.ln_f.weight"], w["transformer.ln_f.bias"] = norm(), p(0.1, HIDDEN)
        return w
    gemma = name == "gemma2"
    # Gemma stores w and multiplies by (1 + w).
    hf_norm = (lambda n: p(0.1, n)) if gemma else (lambda n: (1.0 + p(0.1, n)).astype(np.float32))
    w["model.embed_tokens.weight"] = p(0.3 if gemma else 1.0, vocab_size, HIDDEN)
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        b = f"model.layers.{i}"
        w[f"{b}.input_layernorm.weight"] = hf_norm(HIDDEN)
        q = p(proj * 2, q_rows, HIDDEN)
        k = p(proj * 2, kv_rows, HIDDEN)
        v = p(proj, kv_rows, HIDDEN)
        if name == "phi3":
            w[f"{b}.self_attn.qkv_proj.weight"] = np.concatenate([q, k, v])
        else:
            w[f"{b}.self_attn.q_proj.weight"] = q
            w[f"{b}.self_attn.k_proj.weight"] = k
            w[f"{b}.self_attn.v_proj.weight"] = v
        w[f"{b}.self_attn.o_proj.weight"] = p(proj, HIDDEN, q_rows)
        gate, up = p(proj, FF, HIDDEN), p(proj, FF, HIDDEN)
        if name == "phi3":
            w[f"{b}.mlp.gate_up_proj.weight"] = np.concatenate([gate, up])
        else:
            w[f"{b}.mlp.gate_proj.weight"] = gate
            w[f"{b}.mlp.up_proj.weight"] = up
        w[f"{b}.mlp.down_proj.weight"] = p(1.0 / math.sqrt(FF), HIDDEN, FF)
        w[f"{b}.post_attention_layernorm.weight"] = hf_norm(HIDDEN)
        if gemma:
            w[f"{b}.pre_feedforward_layernorm.weight"] = hf_norm(HIDDEN)
            w[f"{b}.post_feedforward_layernorm.weight"] = hf_norm(HIDDEN)
    w["model.norm.weight"] = hf_norm(HIDDEN)
    if not gemma:
        w["lm_head.weight"] = p(proj * 3, vocab_size, HIDDEN)
    return w


def hf_config(name, spec, vocab_size, bos, eos):
    if name == "gpt2":
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": vocab_size, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS,
            "n_positions": CONTEXT, "n_ctx": CONTEXT, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": True,
        }
    cfg = {
        "model_type": spec["model_type"], "vocab_size": vocab_size, "hidden_size": HIDDEN,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5,
        "rope_theta": spec.get("rope_theta", 10000.0), "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": name == "gemma2", "bos_token_id": bos, "eos_token_id": eos,
        "hidden_act": "silu",
    }
    if "rope_scaling" in spec:
        cfg["rope_scaling"] = spec["rope_scaling"]
    if name == "mistral":
        # Larger than any prompt here: llama.cpp's llama architecture has no window, so the
        # window itself is checked against candle-transformers' Mistral instead.
        cfg["sliding_window"] = 4096
    if name == "phi3":
        cfg["sliding_window"] = None
        cfg["original_max_position_embeddings"] = CONTEXT
    if name == "gemma2":
        cfg.update({
            "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": HEAD_DIM, "sliding_window": WINDOW,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        })
    return cfg


def llama_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: HF (rotate-half) rows → llama.cpp's
    interleaved rope order."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(spec):
    """LlamaModel.generate_extra_tensors: rope_freqs.weight for rope_type llama3."""
    rs, base, dim = spec["rope_scaling"], spec["rope_theta"], HEAD_DIM
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old = rs["original_max_position_embeddings"]
    low_wl, high_wl = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1)
        elif wl > low_wl:
            out.append(rs["factor"])
        else:
            s = (old / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1 / ((1 - s) / rs["factor"] + s))
    return np.array(out, dtype=np.float32)


def gguf_tensors(name, spec, w):
    """HF tensors → GGUF names and layouts, as the converter maps them."""
    out = {}
    if name == "gpt2":
        out["token_embd.weight"] = w["transformer.wte.weight"]
        out["position_embd.weight"] = w["transformer.wpe.weight"]
        out["output_norm.weight"] = w["transformer.ln_f.weight"]
        out["output_norm.bias"] = w["transformer.ln_f.bias"]
        for i in range(LAYERS):
            b, g = f"transformer.h.{i}", f"blk.{i}"
            t = lambda x: np.ascontiguousarray(x.T)  # noqa: E731  (GPT2Model: Conv1D transposed)
            out[f"{g}.attn_norm.weight"] = w[f"{b}.ln_1.weight"]
            out[f"{g}.attn_norm.bias"] = w[f"{b}.ln_1.bias"]
            out[f"{g}.attn_qkv.weight"] = t(w[f"{b}.attn.c_attn.weight"])
            out[f"{g}.attn_qkv.bias"] = w[f"{b}.attn.c_attn.bias"]
            out[f"{g}.attn_output.weight"] = t(w[f"{b}.attn.c_proj.weight"])
            out[f"{g}.attn_output.bias"] = w[f"{b}.attn.c_proj.bias"]
            out[f"{g}.ffn_norm.weight"] = w[f"{b}.ln_2.weight"]
            out[f"{g}.ffn_norm.bias"] = w[f"{b}.ln_2.bias"]
            out[f"{g}.ffn_up.weight"] = t(w[f"{b}.mlp.c_fc.weight"])
            out[f"{g}.ffn_up.bias"] = w[f"{b}.mlp.c_fc.bias"]
            out[f"{g}.ffn_down.weight"] = t(w[f"{b}.mlp.c_proj.weight"])
            out[f"{g}.ffn_down.bias"] = w[f"{b}.mlp.c_proj.bias"]
        return out
    gemma = name == "gemma2"
    # Gemma2Model.modify_tensors: norm weights stored as 1 + w.
    nw = (lambda x: (x + 1).astype(np.float32)) if gemma else (lambda x: x)
    out["token_embd.weight"] = w["model.embed_tokens.weight"]
    out["output_norm.weight"] = nw(w["model.norm.weight"])
    if "lm_head.weight" in w:
        out["output.weight"] = w["lm_head.weight"]
    permute = spec["arch"] == "llama"
    for i in range(LAYERS):
        b, g = f"model.layers.{i}", f"blk.{i}"
        out[f"{g}.attn_norm.weight"] = nw(w[f"{b}.input_layernorm.weight"])
        if name == "phi3":
            out[f"{g}.attn_qkv.weight"] = w[f"{b}.self_attn.qkv_proj.weight"]
            out[f"{g}.ffn_up.weight"] = w[f"{b}.mlp.gate_up_proj.weight"]
        else:
            q, k = w[f"{b}.self_attn.q_proj.weight"], w[f"{b}.self_attn.k_proj.weight"]
            if permute:
                q, k = llama_permute(q, HEADS), llama_permute(k, KV_HEADS)
            out[f"{g}.attn_q.weight"], out[f"{g}.attn_k.weight"] = q, k
            out[f"{g}.attn_v.weight"] = w[f"{b}.self_attn.v_proj.weight"]
            out[f"{g}.ffn_gate.weight"] = w[f"{b}.mlp.gate_proj.weight"]
            out[f"{g}.ffn_up.weight"] = w[f"{b}.mlp.up_proj.weight"]
        out[f"{g}.attn_output.weight"] = w[f"{b}.self_attn.o_proj.weight"]
        out[f"{g}.ffn_down.weight"] = w[f"{b}.mlp.down_proj.weight"]
        if gemma:
            out[f"{g}.post_attention_norm.weight"] = nw(w[f"{b}.post_attention_layernorm.weight"])
            out[f"{g}.ffn_norm.weight"] = nw(w[f"{b}.pre_feedforward_layernorm.weight"])
            out[f"{g}.post_ffw_norm.weight"] = nw(w[f"{b}.post_feedforward_layernorm.weight"])
        else:
            out[f"{g}.ffn_norm.weight"] = w[f"{b}.post_attention_layernorm.weight"]
    if "rope_scaling" in spec:
        out["rope_freqs.weight"] = llama3_rope_factors(spec)
    return out


def write_gguf(path, name, spec, cfg, tensors, vocab_reader, q8_0=False):
    arch = spec["arch"]
    wr = gguf.GGUFWriter(path, arch)
    wr.add_name(f"tokenscope-test-{name}")
    wr.add_block_count(LAYERS)
    wr.add_context_length(CONTEXT)
    wr.add_embedding_length(HIDDEN)
    wr.add_head_count(HEADS)
    if name == "gpt2":
        wr.add_feed_forward_length(4 * HIDDEN)
        wr.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    else:
        wr.add_feed_forward_length(FF)
        wr.add_head_count_kv(KV_HEADS)
        wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        wr.add_key_length(HEAD_DIM)
        wr.add_value_length(HEAD_DIM)
    if arch in ("llama", "phi3"):
        wr.add_rope_freq_base(cfg["rope_theta"])
        wr.add_rope_dimension_count(HEAD_DIM)
    if arch == "phi3":
        wr.add_rope_scaling_orig_ctx_len(CONTEXT)
    if arch == "gemma2":
        wr.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        wr.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        wr.add_sliding_window(cfg["sliding_window"])
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in vocab_reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        wr.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for tname, data in tensors.items():
        data = np.ascontiguousarray(data, dtype=np.float32)
        if q8_0 and tname.startswith("blk.") and data.ndim == 2:
            # The layers' matrices in Q8_0: loaded as packed blocks, fused ones split by rows.
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            wr.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            wr.add_tensor(tname, data)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def log_softmax64(scores):
    x = scores.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference(gguf_path, out_dir, add_bos):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=CONTEXT, n_batch=CONTEXT, n_threads=2,
                logits_all=True, verbose=False,
                # F32 keys and values: the default f16 KV cache rounds them (≈ 3e-3 in log-probs).
                type_k=0, type_v=0)
    entries = []
    for i, prompt in enumerate(PROMPTS):
        ids = llm.tokenize(prompt.encode(), add_bos=add_bos, special=False)
        llm.reset()
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
        lp = log_softmax64(scores).astype("<f4")
        fname = f"logprobs-{i}.f32"
        lp.tofile(os.path.join(out_dir, fname))
        entries.append({"prompt": prompt, "ids": [int(t) for t in ids], "file": fname,
                        "positions": len(ids), "vocab": int(scores.shape[1]),
                        "logprob_min": float(lp.min()), "top1_mean": float(lp.max(axis=1).mean())})
    return entries


def main():
    out_root, vocab_dir = sys.argv[1], sys.argv[2]
    only = set(sys.argv[3:])
    for seed, (name, spec) in enumerate(family_specs().items()):
        if only and name not in only:
            continue
        out = os.path.join(out_root, name)
        os.makedirs(os.path.join(out, "hf"), exist_ok=True)
        vocab = gguf.GGUFReader(os.path.join(vocab_dir, f"ggml-vocab-{spec['vocab']}.gguf"))
        tokens = vocab.fields["tokenizer.ggml.tokens"].contents()
        field = lambda k: vocab.fields[k].contents() if k in vocab.fields else None  # noqa: E731
        bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
        rng = np.random.default_rng(1234 + seed)
        w = hf_weights(name, spec, len(tokens), rng)
        cfg = hf_config(name, spec, len(tokens), bos, eos)
        with open(os.path.join(out, "hf", "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_file({k: np.ascontiguousarray(v) for k, v in w.items()},
                  os.path.join(out, "hf", "model.safetensors"))
        gguf_path = os.path.join(out, "model.gguf")
        write_gguf(gguf_path, name, spec, cfg, gguf_tensors(name, spec, w), vocab)
        if name in ("phi3", "gpt2"):
            write_gguf(os.path.join(out, "model-q8_0.gguf"), name, spec, cfg,
                       gguf_tensors(name, spec, w), vocab, q8_0=True)
        add_bos = field("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = spec["vocab"] in ("llama-spm", "llama-bpe", "phi-3")
        entries = reference(gguf_path, out, bool(add_bos))
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump({"family": name, "arch": spec["arch"], "vocab": spec["vocab"],
                       "llama_cpp_python": __import__("llama_cpp").__version__,
                       "prompts": entries}, f, indent=1)
        print(f"families: {name}: {len(tokens)} tokens, positions "
              f"{[e['positions'] for e in entries]}, mean top-1 log-prob "
              f"{[round(e['top1_mean'], 3) for e in entries]}")


if __name__ == "__main__":
    main()
