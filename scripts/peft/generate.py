"""LoRA adapters made by Hugging Face PEFT, and PEFT's log-probs for them (tests/peft.rs).

A tiny random Llama (transformers' LlamaForCausalLM: 2 layers, grouped-query attention, GPT-2's
BPE as its tokenizer) is saved as a Hugging Face folder; PEFT wraps it with LoRA adapters
(random A and B: `init_lora_weights=False`, so the adapter changes the output) and saves them
with `save_pretrained`, as a user's PEFT run would. The reference is
`PeftModel.from_pretrained(base, adapter)` itself, in float64: log-softmax over the whole
vocabulary at every position of each text, as little-endian f32.

Usage: generate.py OUT_DIR GPT2_TOKENIZER_DIR
"""

import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

OUT, GPT2_DIR = sys.argv[1], sys.argv[2]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adds a low-rank update beside each targeted projection: W x + (alpha / r) B A x.",
]

ADAPTERS = {
    # Every projection, plain scaling (alpha / r).
    "all-modules": dict(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    # Attention only, rank-stabilised scaling (alpha / sqrt(r)).
    "attention-rslora": dict(r=8, lora_alpha=4, use_rslora=True,
                             target_modules=["q_proj", "v_proj"]),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tok = GPT2TokenizerFast(vocab_file=os.path.join(GPT2_DIR, "encoder.json"),
                            merges_file=os.path.join(GPT2_DIR, "vocab.bpe"))
    cfg = LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256)
    base_dir = os.path.abspath(os.path.join(OUT, "base"))
    LlamaForCausalLM(cfg).save_pretrained(base_dir, safe_serialization=True)
    tok.save_pretrained(base_dir)
    prompts = [{"prompt": t, "ids": tok(t)["input_ids"]} for t in TEXTS]
    with open(os.path.join(OUT, "prompts.json"), "w") as f:
        json.dump(prompts, f)

    for name, settings in ADAPTERS.items():
        base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        lcfg = LoraConfig(lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                          **settings)
        adapter_dir = os.path.join(OUT, name)
        get_peft_model(base, lcfg).save_pretrained(adapter_dir)
        # The base by a path relative to the adapter (PEFT wrote this machine's absolute path).
        config_path = os.path.join(adapter_dir, "adapter_config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["base_model_name_or_path"] = "../base"
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        # The reference: a fresh base and the adapter as saved, the way users load one.
        base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
        model = PeftModel.from_pretrained(base, adapter_dir).double().eval()
        plain = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
        for i, p in enumerate(prompts):
            ids = torch.tensor([p["ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0], dim=-1)
                moved = (lp - torch.log_softmax(plain(ids).logits[0], dim=-1)).abs().max()
            assert moved > 0.05, f"{name}: the adapter barely changes the output ({moved})"
            lp.float().numpy().astype("<f4").tofile(os.path.join(adapter_dir, f"logprobs{i}.f32"))


main()
