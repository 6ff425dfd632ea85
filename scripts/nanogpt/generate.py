"""nanoGPT checkpoints with random weights, saved as nanoGPT's train.py saves them, and an
independent reference for their log-probs (tests/nanogpt.rs).

Each checkpoint is what `torch.save(checkpoint, 'out/ckpt.pt')` writes in nanoGPT's train.py:
{'model': state_dict, 'optimizer': AdamW state, 'model_args', 'iter_num', 'best_val_loss',
'config'}, with the state dict of a module laid out as nanoGPT's `GPT` (transformer.wte,
wpe, h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_f, lm_head tied to
wte; `bias` on or off), keys behind torch.compile's `_orig_mod.` where the run compiled.

The reference is Hugging Face transformers' GPT2LMHeadModel (activation "gelu", the exact GELU
nanoGPT's nn.GELU() computes), given the same weights: another implementation of the same
maths, in float64. Token ids come from tiktoken's gpt2 encoding (built from the same published
files, which tiktoken checks by hash) or from the run's meta.pkl (stoi), as nanoGPT's sample.py
encodes.

Usage: generate.py OUT_DIR GPT2_TOKENIZER_DIR
"""

import json
import os
import pickle
import sys
from collections import OrderedDict

import numpy as np
import tiktoken
import torch
import torch.nn as nn
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from transformers import GPT2Config, GPT2LMHeadModel

OUT, GPT2_DIR = sys.argv[1], sys.argv[2]

TEXTS_GPT2 = [
    "The quick brown fox jumps over the lazy dog.",
    "nanoGPT: a repository for training/finetuning medium-sized GPTs. It's 300 lines!\n\n  def f(x): return x ** 2  # naïve café 東京 😀",
]
SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n"
    "MENENIUS:\nWhy, masters, my good friends, mine honest neighbours,\nWill you undo yourselves?\n"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz !$&',-.3:;?\n"
)
TEXTS_CHAR = ["First Citizen:\nSpeak, speak.", "MENENIUS:\nWhy, masters, my good friends"]


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias."""

    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None


class Attn(nn.Module):
    def __init__(self, c, bias):
        super().__init__()
        self.c_attn = nn.Linear(c, 3 * c, bias=bias)
        self.c_proj = nn.Linear(c, c, bias=bias)


class Mlp(nn.Module):
    def __init__(self, c, bias):
        super().__init__()
        self.c_fc = nn.Linear(c, 4 * c, bias=bias)
        self.c_proj = nn.Linear(4 * c, c, bias=bias)


class Block(nn.Module):
    def __init__(self, c, bias):
        super().__init__()
        self.ln_1 = LayerNorm(c, bias)
        self.attn = Attn(c, bias)
        self.ln_2 = LayerNorm(c, bias)
        self.mlp = Mlp(c, bias)


class GPT(nn.Module):
    """nanoGPT's GPT module tree (parameters only: the forward is the reference's)."""

    def __init__(self, a):
        super().__init__()
        c = a["n_embd"]
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(a["vocab_size"], c),
                wpe=nn.Embedding(a["block_size"], c),
                h=nn.ModuleList([Block(c, a["bias"]) for _ in range(a["n_layer"])]),
                ln_f=LayerNorm(c, a["bias"]),
            )
        )
        self.lm_head = nn.Linear(c, a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # nanoGPT's weight tying
        gen = torch.Generator().manual_seed(a["n_layer"] * 1000 + c + a["vocab_size"])
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("weight") and p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                else:  # LayerNorm weights and every bias: not their identity values
                    base = 1.0 if "ln_" in name and name.endswith("weight") else 0.0
                    p.copy_(base + torch.randn(p.shape, generator=gen) * 0.1)


def save_checkpoint(folder, a, compiled, iter_num, best_val_loss, dataset):
    os.makedirs(folder, exist_ok=True)
    model = GPT(a)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.lm_head.weight.grad = torch.zeros_like(model.lm_head.weight)
    opt.step()  # the optimizer state train.py saves beside the model
    state = model.state_dict()
    if compiled:
        state = OrderedDict(("_orig_mod." + k, v) for k, v in state.items())
    checkpoint = {
        "model": state,
        "optimizer": opt.state_dict(),
        "model_args": dict(a, dropout=0.0),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "config": {"dataset": dataset, "batch_size": 12, "learning_rate": 6e-4, "compile": compiled},
    }
    torch.save(checkpoint, os.path.join(folder, "ckpt.pt"))
    return model


def reference_logprobs(model, a, ids, tokens):
    """GPT2LMHeadModel on the same weights (Conv1D takes (in, out): Linear weights transposed;
    a bias-free layer is a zero bias), in float64; log-softmax over the `tokens` real tokens."""
    c = a["n_embd"]
    cfg = GPT2Config(
        vocab_size=a["vocab_size"], n_positions=a["block_size"], n_embd=c, n_layer=a["n_layer"],
        n_head=a["n_head"], activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(cfg).double().eval()
    src = {k: v.double() for k, v in model.state_dict().items()}
    dst = hf.state_dict()
    with torch.no_grad():
        for k in dst:
            if k.endswith(".attn.bias") and dst[k].dim() == 4 or k.endswith("masked_bias"):
                continue
            if k == "lm_head.weight":
                dst[k].copy_(src["lm_head.weight"])
                continue
            if k in src:
                v = src[k]
                conv = any(s in k for s in ("c_attn.weight", "c_proj.weight", "c_fc.weight"))
                dst[k].copy_(v.t() if conv else v)
            else:
                assert k.endswith(".bias") and not a["bias"], k
                dst[k].zero_()
        hf.load_state_dict(dst)
        logits = hf(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits[:, :tokens], dim=-1).float().numpy()


def write_reference(folder, model, a, texts, encode, tokens):
    prompts = []
    for i, text in enumerate(texts):
        ids = encode(text)
        lp = reference_logprobs(model, a, ids, tokens)
        name = f"logprobs{i}.f32"
        lp.astype("<f4").tofile(os.path.join(folder, name))
        prompts.append({"prompt": text, "ids": ids, "vocab": tokens, "file": name})
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump({"prompts": prompts, "model_args": a}, f, indent=1)


def main():
    os.makedirs(OUT, exist_ok=True)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(GPT2_DIR, "vocab.bpe"),
        encoder_json_file=os.path.join(GPT2_DIR, "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    # tiktoken's own gpt2 encoding (tiktoken_ext.openai_public.gpt2), from the local files.
    import tiktoken_ext.openai_public as op

    enc = tiktoken.Encoding(
        name="gpt2", pat_str=op.r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257,
    )

    # GPT-2 tokens, vocab padded to 50304 as nanoGPT does, biases on, compiled.
    a = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, bias=True, vocab_size=50304)
    folder = os.path.join(OUT, "gpt2-bias")
    model = save_checkpoint(folder, a, True, 5000, torch.tensor(3.2875), "openwebtext")
    write_reference(folder, model, a, TEXTS_GPT2, enc.encode_ordinary, 50257)
    # Tokens of other texts, for the tokenizer test alone.
    with open(os.path.join(OUT, "gpt2-tokens.json"), "w") as f:
        texts = TEXTS_GPT2 + [SHAKESPEARE, "  leading spaces\ttabs\r\nCRLF   ", "'s 've 're 'll 'd 'm 't", "1234567 3.14159 $100"]
        json.dump([{"text": t, "ids": enc.encode_ordinary(t)} for t in texts], f)

    # A character-level run (the shakespeare_char quickstart's meta.pkl), biases off, not
    # compiled, with meta.pkl beside the checkpoint.
    chars = sorted(set(SHAKESPEARE))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    a = dict(n_layer=3, n_head=2, n_embd=16, block_size=96, bias=False, vocab_size=len(chars))
    folder = os.path.join(OUT, "char-nobias")
    model = save_checkpoint(folder, a, False, 250, torch.tensor(1.4697), "shakespeare_char")
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    write_reference(folder, model, a, TEXTS_CHAR, lambda s: [stoi[c] for c in s], len(chars))

    # Bad files: a missing key, a shape against model_args, a foreign class, a truncated zip.
    bad = os.path.join(OUT, "bad")
    os.makedirs(bad, exist_ok=True)
    good = torch.load(os.path.join(OUT, "char-nobias", "ckpt.pt"), weights_only=True)
    missing = dict(good, model=OrderedDict((k, v) for k, v in good["model"].items() if "ln_2" not in k))
    torch.save(missing, os.path.join(bad, "missing-key.pt"))
    shape = dict(good, model_args=dict(good["model_args"], n_embd=24))
    torch.save(shape, os.path.join(bad, "wrong-shape.pt"))
    foreign = dict(good, config=np.float64(1.5))  # a numpy object: not plain data
    torch.save(foreign, os.path.join(bad, "foreign-class.pt"))
    with open(os.path.join(OUT, "char-nobias", "ckpt.pt"), "rb") as f:
        data = f.read()
    with open(os.path.join(bad, "truncated.pt"), "wb") as f:
        f.write(data[: len(data) * 2 // 3])


if __name__ == "__main__":
    main()
