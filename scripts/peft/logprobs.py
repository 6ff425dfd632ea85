"""PEFT's log-probs for an adapter folder (tests/peft.rs, on adapters tokenscope trained):
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)` in float64,
the log-softmax over the vocabulary at every position of IDS (a JSON list of token ids),
written to OUT as little-endian f32. A BASE ending in .gguf is read by transformers' GGUF
loader (`gguf_file=`: its blocks dequantized by the `gguf` package).

Usage: logprobs.py BASE ADAPTER_DIR IDS_JSON OUT
"""

import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base_dir, adapter_dir, ids, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
if base_dir.endswith(".gguf"):
    folder, name = os.path.split(os.path.abspath(base_dir))
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float64)
else:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
model = PeftModel.from_pretrained(base, adapter_dir).double().eval()
with torch.no_grad():
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
lp.float().numpy().astype("<f4").tofile(out)
