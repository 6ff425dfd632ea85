"""nanochat checkpoints with random weights, saved as nanochat's scripts/base_train.py saves them,
a tokenizer.pkl as nanochat's tokenizer.py saves it, and an independent reference for their
log-probs (the nanochat tests).

Transcribed from karpathy/nanochat at commit 92d63d4e8bb4df75c3b71618f31ddde2378b2bcd
(2026-07-03): nanochat/gpt.py (GPT, GPTConfig, init_weights, forward with kv_cache=None),
nanochat/flash_attention.py (_sdpa_attention's sliding-window mask), nanochat/tokenizer.py
(SPLIT_PATTERN, SPECIAL_TOKENS, RustBPETokenizer.train_from_iterator / save),
nanochat/checkpoint_manager.py (save_checkpoint, build_model) and scripts/base_train.py (the
meta json). nanochat itself is not imported: it is not on PyPI and needs rustbpe, CUDA-minded
globals (COMPUTE_DTYPE) and a base dir; the module tree below has upstream's parameter names
and shapes, and the forward follows upstream's line by line.

What it writes under OUT_DIR:
- base/tokenizer/tokenizer.pkl: `pickle.dump(tiktoken.Encoding)` (default protocol), as
  RustBPETokenizer.save does, of a byte-level BPE trained here in plain Python on a small
  built-in corpus (pieces from SPLIT_PATTERN, ~300 merges, then nanochat's special tokens).
  tokens.json: [{"text", "ids"}] with ids = enc.encode_ordinary(text) for tricky texts.
- base/base_checkpoints/d4/: GQA, window_pattern "SL"; steps 10 (float32) and 20 (wte and
  value_embeds in bfloat16, as upstream saves them when COMPUTE_DTYPE is bf16):
  model_{step:06d}.pt (`torch.save(model.state_dict())`), meta_{step:06d}.json (base_train's
  keys), reference_{step:06d}.json and its .f32 files.
- mha/: n_kv_head == n_head, window_pattern "L", step 5, with tokenizer.pkl beside it.
- bad/<name>/: model_000001.pt + meta_000001.json + tokenizer.pkl, each broken in one way.

reference_{step:06d}.json: {"prompts": [{"prompt", "ids", "vocab", "file"}], "model_config"},
ids = [<|bos|>] + encode_ordinary(prompt), "file" a little-endian f32 (len(ids) x vocab) array
of log_softmax over the real vocab_size logits after the soft-cap, at every position.

The reference is this PyTorch transcription of upstream's forward evaluated in float64, on
the weights read back from the saved file (bf16 tensors converted to float as build_model does
on CPU); tokenscope's model is a separate Rust/candle implementation of the same maths.
Upstream on CPU computes in float32, where F.rms_norm's default eps is finfo(float32).eps:
the float64 reference passes that eps explicitly, so it computes upstream's float32 maths in
more precision. The rotary tables are computed as upstream does (float32) and then cast to
float64. As a self-check the same weights are also run in float32 with upstream's exact calls
(F.rms_norm with its default eps, F.scaled_dot_product_attention with enable_gqa and a boolean
mask) and must agree with the float64 reference (manual attention, repeat_interleave) to 1e-4.

Usage: generate.py OUT_DIR
"""

import json
import math
import os
import pickle
import re
import shutil
import sys
import unicodedata
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = sys.argv[1]

# --- tokenizer (nanochat/tokenizer.py) ------------------------------------------------------

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
N_MERGES = 300

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog didn't move; it's a very lazy dog, and
the fox knew it. They're friends now, and they'll stay friends: we've seen it, I'd say, and
I'm sure you'll agree. THE FOX SAID: "IT'S FINE, WE'RE FINE, DON'T WORRY."

Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning the fisherman went out to sea in his little boat, and every evening he came back
with fish for the market. The people of the village liked him, and the children loved to hear
his stories about the storms, the stars, and the strange things that live under the water.
One day he caught a golden fish that could speak. "Let me go," said the fish, "and I will give
you anything you wish for." The fisherman was kind, so he let the fish go without asking for
anything at all. When he told his wife, she was not pleased. "Go back," she said, "and ask for
a new house." And so the story goes on, as stories do, until the end.

In 2024 the model was trained for 12345 steps on 8 GPUs at 3.14 TFLOPS each; the loss fell
from 10.25 to 2.75, and the validation bits per byte reached 0.81 after 1000000 tokens.
Prices: $100, $250.50, 99% of 1,000 items; dates 2023-01-15 and 07/03/2026; version 1.2.3.

def tokenize(text, merges):
    ids = list(text.encode("utf-8"))
    for pair, idx in merges.items():
        ids = merge(ids, pair, idx)  # replace every occurrence of pair
    return ids

class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x

for (int i = 0; i < n; i++) { sum += a[i] * b[i]; }  // dot product
if (x != NULL && x->next == NULL) return -1;
	indented with a tab
	and another tab line

Unicode text: naïve café, résumé, façade, jalapeño, über, Straße, smörgåsbord.
Tokyo is 東京 and Kyoto is 京都; 東京 is big, 東京 is busy, 東京 is the capital of 日本.
Moscow is Москва; Москва is big, Москва is old. Привет, мир! Как дела? Хорошо, спасибо.
Athens is Αθήνα; γεια σου κόσμε. Emoji: 😀 😀 🚀 🚀 👍 ❤️ 🎉. Math: α + β = γ, ∑ x² ≤ ∞.
नमस्ते दुनिया. مرحبا بالعالم. 안녕하세요 세계. 你好，世界！你好，世界！

Whitespace matters:   three spaces,    four spaces,
trailing spaces   
Windows line ends\r\nare here\r\nand here\r\n

and blank lines above and below.

Repeated: aaaaaaaaaaaaaaaa abababababababab the the the the and and and of of of to to to.
It's, it'S, IT'S, you're, YOU'RE, we've, WE'VE, he'll, HE'LL, she'd, SHE'D, I'm, I'M, can't.
"""

TOKEN_TEXTS = [
    "'s 've 're 'll 'd 'm 't It's we've they're you'll I'd I'm don't IT'S WE'VE SHE'LL I'M 'S",
    "1234567 12 123 3.14159 $100,000 2024-07-03 v1.2.3 ①②③ ٣٤٥ 1e-10",
    "   leading spaces and trailing spaces   ",
    "tabs\there\t\tand\r\nCRLF\r\n\r\nline\n\n\nruns \n  \n x",
    "Punctuation!!! ...??? (a, b); {x: [1, 2]} --> #include <stdio.h> // ok\n",
    "naïve café 東京 Москва 😀 Ελληνικά नमस्ते 🇫🇷 e\u0301 ❤️",
    "aaaaaaaaaaaa abababab aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbb",
    "def f(x):\n    return x ** 2  # square\n\n\tpass\n",
    " ",
    "\n\n",
    "The fisherman was kind, so he let the golden fish go without asking for anything at all. "
    "When he told his wife, she was not pleased: \"Go back,\" she said, \"and ask for a new "
    "house!\" In 2024 the model trained for 12345 steps; the loss fell from 10.25 to 2.75. "
    "Москва and 東京 are capitals; naïve cafés serve jalapeños. It's done, isn't it? Yes.",
]


def _unicode_class(categories):
    """The code points whose general category starts with one of `categories`, as the body of
    a Python re character class (Python's re has no \\p{..})."""
    out, start, prev = [], None, None
    for cp in range(0x110000):
        if unicodedata.category(chr(cp))[0] in categories:
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            out.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
            start = None
    if start is not None:
        out.append(f"\\U{start:08x}-\\U{prev:08x}")
    return "".join(out)


def split_regex():
    """SPLIT_PATTERN for Python's re (3.11+: possessive quantifiers): only for training here;
    every id written to a file comes from tiktoken, which compiles SPLIT_PATTERN itself."""
    L, N = _unicode_class("L"), _unicode_class("N")
    pat = SPLIT_PATTERN.replace(r"[^\r\n\p{L}\p{N}]", f"[^\\r\\n{L}{N}]")
    pat = pat.replace(r"[^\s\p{L}\p{N}]", f"[^\\s{L}{N}]")
    pat = pat.replace(r"\p{L}", f"[{L}]").replace(r"\p{N}", f"[{N}]")
    return re.compile(pat)


def train_bpe(text, n_merges, splitter):
    """Byte-level BPE as rustbpe trains it: count the regex pieces, then repeatedly merge the
    most frequent adjacent pair (ties: the smallest pair) inside pieces. Returns tiktoken's
    mergeable_ranks: the 256 single bytes at 0..255, then the merged tokens in order."""
    pieces = Counter(splitter.findall(text))
    words = [[list(p.encode("utf-8")), c] for p, c in sorted(pieces.items())]
    vocab = {i: bytes([i]) for i in range(256)}
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < 256 + n_merges:
        pairs = Counter()
        for w, c in words:
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = vocab[best[0]] + vocab[best[1]]
        if merged not in ranks:  # the same bytes reached through another pair keep their id
            ranks[merged] = len(ranks)
            vocab[ranks[merged]] = merged
        new = ranks[merged]
        for entry in words:
            w, out, i = entry[0], [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            entry[0] = out
    return ranks


def check_splitter(splitter, texts):
    """Checks the Python transcription of SPLIT_PATTERN against tiktoken's on `texts`: with
    every piece as a token, tiktoken must return exactly our pieces."""
    pieces = [p for t in texts for p in splitter.findall(t)]
    assert all("".join(splitter.findall(t)) == t for t in texts)
    ranks = {bytes([i]): i for i in range(256)}
    for p in pieces:
        ranks.setdefault(p.encode("utf-8"), len(ranks))
    enc = tiktoken.Encoding(name="split", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for t in texts:
        got = [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(t)]
        want = [p.encode("utf-8") for p in splitter.findall(t)]
        assert got == want, (t, got, want)


def build_tokenizer():
    splitter = split_regex()
    check_splitter(splitter, [CORPUS] + TOKEN_TEXTS)
    ranks = train_bpe(CORPUS, N_MERGES, splitter)
    special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


# --- model (nanochat/gpt.py) ----------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


F32_EPS = torch.finfo(torch.float32).eps


def norm(x, exact_upstream):
    # upstream: F.rms_norm(x, (x.size(-1),)), eps=None = finfo(x.dtype).eps: float32's on CPU.
    if exact_upstream:
        return F.rms_norm(x, (x.size(-1),))
    return F.rms_norm(x, (x.size(-1),), eps=F32_EPS)


class Linear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


def has_ve(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    # upstream: rotates by -theta (the transpose of the textbook convention)
    assert x.ndim == 4
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = self.n_embd // self.n_head
        assert self.n_embd % self.n_head == 0
        assert self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate_channels = 12
        self.ve_gate = Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window_size, exact_upstream):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q, exact_upstream), norm(k, exact_upstream)
        q = q * 1.2
        k = k * 1.2
        y = attention(q, k, v, window_size, exact_upstream)
        y = y.contiguous().view(B, T, -1)
        return self.c_proj(y)


def attention(q, k, v, window_size, exact_upstream):
    """flash_attn_func(q, k, v, causal=True, window_size) through upstream's SDPA fallback
    (_sdpa_attention): key j is visible to query i iff j <= i and i - j <= window (window + 1
    keys); a window >= T is plain causal attention. (B, T, H, D) in and out."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    T = q.size(2)
    window = window_size[0]
    row = torch.arange(T).unsqueeze(1)
    col = torch.arange(T).unsqueeze(0)
    mask = col <= row
    if 0 <= window < T:
        mask = mask & ((row - col) <= window)
    if exact_upstream:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    else:  # the same maths by hand: SDPA's enable_gqa repeats each kv head n_head/n_kv_head times
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = att @ v
    return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square()
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, exact_upstream):
        x = x + self.attn(norm(x, exact_upstream), ve, cos_sin, window_size, exact_upstream)
        x = x + self.mlp(norm(x, exact_upstream))
        return x


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        padded_vocab_size = ((config.vocab_size + pad_vocab_size_to - 1) // pad_vocab_size_to) * pad_vocab_size_to
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, layer_idx) for layer_idx in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, padded_vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(24, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(padded_vocab_size, kv_dim) for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Upstream's init_weights (COMPUTE_DTYPE float32: no embedding cast here)."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        n_embd = self.config.n_embd
        s = 3**0.5 * n_embd**-0.5
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_q.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_k.weight, -s, s)
            torch.nn.init.uniform_(block.attn.c_v.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -s * 0.4, s * 0.4)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        n_layer = self.config.n_layer
        for i in range(n_layer):
            self.resid_lambdas.data[i] = 1.15 - (0.10 * i / max(n_layer - 1, 1))
        for i in range(n_layer):
            self.x0_lambdas.data[i] = 0.20 - (0.15 * i / max(n_layer - 1, 1))
        torch.nn.init.zeros_(self.smear_lambda)
        torch.nn.init.constant_(self.backout_lambda, 0.2)
        torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)

    @torch.no_grad()
    def make_nontrivial(self):
        """Not upstream: after init_weights, every part gets weights that matter (a trained
        model's are: upstream's zero projections and near-zero gates would hide code paths)."""
        s = 3**0.5 * self.config.n_embd**-0.5
        for block in self.transformer.h:
            torch.nn.init.uniform_(block.attn.c_proj.weight, -s, s)
            torch.nn.init.uniform_(block.mlp.c_proj.weight, -s, s)
            if block.attn.ve_gate is not None:
                torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.5)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=1.0)  # logits reach the soft cap
        torch.nn.init.constant_(self.smear_lambda, 0.7)
        torch.nn.init.constant_(self.backout_lambda, 0.3)
        torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.5)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=100000):
        # upstream, with COMPUTE_DTYPE = float32 (CPU)
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        return cos[None, :, None, :], sin[None, :, None, :]

    def _compute_window_sizes(self, config):
        pattern = config.window_pattern.upper()
        assert all(c in "SL" for c in pattern)
        long_window = config.sequence_len
        short_window = -(-long_window // 4 // 128) * 128
        char_to_window = {"L": (long_window, 0), "S": (short_window, 0)}
        window_sizes = [char_to_window[pattern[i % len(pattern)]] for i in range(config.n_layer)]
        window_sizes[-1] = (long_window, 0)
        return window_sizes

    def forward(self, idx, exact_upstream=False):
        """Upstream's GPT.forward with targets=None, kv_cache=None; the result's dtype is the
        model's (upstream's .float() of the logits is left out, to keep float64 here)."""
        B, T = idx.size()
        assert T <= self.cos.size(1)
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = self.transformer.wte(idx)
        x = norm(x, exact_upstream)
        assert T > 1
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :24]))
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0 = x
        n_layer = self.config.n_layer
        backout_layer = n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], exact_upstream)
            if i == backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x, exact_upstream)
        softcap = 15
        logits = self.lm_head(x)
        logits = logits[..., : self.config.vocab_size]
        self.last_max_abs_logit = logits.abs().max().item()
        logits = softcap * torch.tanh(logits / softcap)
        return logits


# --- checkpoints (checkpoint_manager.save_checkpoint, base_train.py's meta) -----------------


def meta(step, config, val_bpb, depth, window_pattern):
    return {
        "step": step,
        "val_bpb": val_bpb,
        "model_config": asdict(config),
        "user_config": {
            "run": "dummy", "device_type": "", "depth": depth, "aspect_ratio": 16, "head_dim": 16,
            "max_seq_len": config.sequence_len, "window_pattern": window_pattern,
            "num_iterations": step, "device_batch_size": 4, "total_batch_size": 8192,
            "model_tag": None,
        },
        "device_batch_size": 4,
        "max_seq_len": config.sequence_len,
        "total_batch_size": 8192,
        "dataloader_state_dict": {"pq_idx": 0, "rg_idx": step // 10, "epoch": 1},
        "loop_state": {"min_val_bpb": val_bpb, "smooth_train_loss": 4.25 - step / 100, "total_training_time": 1.5 * step},
    }


def save_checkpoint(folder, step, model, meta_data, bf16_embeddings):
    os.makedirs(folder, exist_ok=True)
    state = model.state_dict()
    if bf16_embeddings:  # init_weights' cast when COMPUTE_DTYPE is bfloat16 (CUDA sm80+)
        state = OrderedDict(
            (k, v.to(torch.bfloat16) if k == "transformer.wte.weight" or k.startswith("value_embeds.") else v)
            for k, v in state.items()
        )
        state._metadata = model.state_dict()._metadata
    torch.save(state, os.path.join(folder, f"model_{step:06d}.pt"))
    with open(os.path.join(folder, f"meta_{step:06d}.json"), "w", encoding="utf-8") as f:
        json.dump(meta_data, f, indent=2)


def load_model(folder, step):
    """checkpoint_manager.build_model on CPU: bf16 tensors become float32, strict load."""
    data = torch.load(os.path.join(folder, f"model_{step:06d}.pt"), map_location="cpu", weights_only=True)
    data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in data.items()}
    with open(os.path.join(folder, f"meta_{step:06d}.json"), encoding="utf-8") as f:
        config = GPTConfig(**json.load(f)["model_config"])
    model = GPT(config)
    model.load_state_dict(data, strict=True)
    return model.eval()


MAX_DELTA = [0.0]


def write_reference(folder, step, enc, prompts):
    model = load_model(folder, step)
    bos = enc.encode_single_token("<|bos|>")
    vocab = model.config.vocab_size
    m64 = load_model(folder, step).double()
    out = []
    for i, prompt in enumerate(prompts):
        ids = [bos] + enc.encode_ordinary(prompt)
        assert len(ids) <= model.config.sequence_len
        idx = torch.tensor([ids])
        with torch.no_grad():
            lp64 = torch.log_softmax(m64(idx)[0], dim=-1)
            lp32 = torch.log_softmax(model(idx, exact_upstream=True)[0].float(), dim=-1)
        assert lp64.shape == (len(ids), vocab)
        delta = (lp64 - lp32.double()).abs().max().item()
        MAX_DELTA[0] = max(MAX_DELTA[0], delta)
        print(f"  {folder} step {step} prompt {i}: {len(ids)} ids, max |logit| before cap "
              f"{m64.last_max_abs_logit:.2f}, max |f64 - f32 log-prob| {delta:.2e}")
        name = f"logprobs_{step:06d}_{i}.f32"
        lp64.numpy().astype("<f4").tofile(os.path.join(folder, name))
        out.append({"prompt": prompt, "ids": ids, "vocab": vocab, "file": name})
    with open(os.path.join(folder, f"reference_{step:06d}.json"), "w", encoding="utf-8") as f:
        json.dump({"prompts": out, "model_config": asdict(model.config)}, f, indent=1, ensure_ascii=False)


PROMPT_SHORT = "The quick brown fox"
PROMPT_UNICODE = "Hello, world! naïve café in 東京 and Москва 😀 — it's 2024.\n\tdef f(x): return x ** 2"
PROMPT_LONG = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. "
    "Every morning he went out in his little boat; every evening he came back with fish. "
    "The children loved his stories about storms, stars and the strange things under the water. "
    "One day he caught a golden fish that could speak: \"Let me go, and I will give you anything "
    "you wish for.\" He let it go and asked for nothing. His wife wasn't pleased. \"Go back,\" she "
    "said, \"and ask for a new house!\" So he went back, and the sea was a little darker.\n\n"
    "In 2024 the model was trained for 12345 steps on 8 GPUs; the loss fell from 10.25 to 2.75 "
    "and the validation bits per byte reached 0.81. Prices: $100, $250.50, 99% of 1,000 items.\n"
    "def tokenize(text, merges):\n    ids = list(text.encode(\"utf-8\"))\n    for pair, idx in "
    "merges.items():\n        ids = merge(ids, pair, idx)\n    return ids\n\n"
    "Tokyo is 東京 and Moscow is Москва; Athens is Αθήνα. Привет, мир! 😀 🚀 👍 — naïve café, "
    "résumé, Straße. They're sure we'll see it; I'd say you've got it, and I'm done. THE END."
)
PROMPT_MHA = (
    "The fisherman was kind, so he let the golden fish go without asking for anything at all. "
    "When he told his wife, she was not pleased. \"Go back,\" she said. Москва, 東京, 😀!"
)


def main():
    torch.manual_seed(0)
    np.random.seed(0)
    os.makedirs(OUT, exist_ok=True)

    enc = build_tokenizer()
    n_vocab, bos = enc.n_vocab, enc.encode_single_token("<|bos|>")
    assert n_vocab == 256 + N_MERGES + len(SPECIAL_TOKENS) and n_vocab % 64 != 0
    print(f"tokenizer: n_vocab {n_vocab}, <|bos|> {bos}")
    tok_dir = os.path.join(OUT, "base", "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    tok_path = os.path.join(tok_dir, "tokenizer.pkl")
    with open(tok_path, "wb") as f:  # RustBPETokenizer.save
        pickle.dump(enc, f)
    with open(tok_path, "rb") as f:
        enc2 = pickle.load(f)
    assert enc2._mergeable_ranks == enc._mergeable_ranks and enc2._special_tokens == enc._special_tokens
    with open(os.path.join(OUT, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump([{"text": t, "ids": enc.encode_ordinary(t)} for t in TOKEN_TEXTS], f, indent=1, ensure_ascii=False)

    # d4: GQA, sliding window "SL" (short window 256 with sequence_len 1024).
    d4 = os.path.join(OUT, "base", "base_checkpoints", "d4")
    cfg = GPTConfig(sequence_len=1024, vocab_size=n_vocab, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    for step, bf16, val_bpb in ((10, False, 2.5625), (20, True, 2.125)):
        torch.manual_seed(1000 + step)
        model = GPT(cfg)
        model.init_weights()
        model.make_nontrivial()
        save_checkpoint(d4, step, model, meta(step, cfg, val_bpb, 4, "SL"), bf16)
        write_reference(d4, step, enc, [PROMPT_SHORT, PROMPT_UNICODE, PROMPT_LONG])
    assert GPT(cfg).window_sizes == [(256, 0), (1024, 0), (256, 0), (1024, 0)]

    # mha: n_kv_head == n_head, full context; tokenizer.pkl beside the checkpoint.
    mha = os.path.join(OUT, "mha")
    cfg = GPTConfig(sequence_len=256, vocab_size=n_vocab, n_layer=3, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    torch.manual_seed(5)
    model = GPT(cfg)
    model.init_weights()
    model.make_nontrivial()
    save_checkpoint(mha, 5, model, meta(5, cfg, 3.0, 3, "L"), False)
    shutil.copyfile(tok_path, os.path.join(mha, "tokenizer.pkl"))
    write_reference(mha, 5, enc, [PROMPT_SHORT, PROMPT_UNICODE, PROMPT_MHA])

    print(f"self-check: max |float64 - float32| log-prob over all prompts: {MAX_DELTA[0]:.3e}")
    assert MAX_DELTA[0] < 1e-4, MAX_DELTA[0]

    # Bad folders, from the mha model.
    good = torch.load(os.path.join(mha, "model_000005.pt"), weights_only=True)
    with open(os.path.join(mha, "meta_000005.json"), encoding="utf-8") as f:
        good_meta = dict(json.load(f), step=1)

    def bad(name, state=good, meta_data=good_meta, tokenizer=None):
        folder = os.path.join(OUT, "bad", name)
        os.makedirs(folder, exist_ok=True)
        torch.save(state, os.path.join(folder, "model_000001.pt"))
        with open(os.path.join(folder, "meta_000001.json"), "w", encoding="utf-8") as f:
            json.dump(meta_data, f, indent=2)
        if tokenizer is None:
            shutil.copyfile(tok_path, os.path.join(folder, "tokenizer.pkl"))
        else:
            with open(os.path.join(folder, "tokenizer.pkl"), "wb") as f:
                f.write(tokenizer)
        return folder

    bad("missing-key", state=OrderedDict((k, v) for k, v in good.items() if k != "smear_gate.weight"))
    bad("wrong-shape", meta_data=dict(good_meta, model_config=dict(good_meta["model_config"], n_embd=48)))
    bad("foreign-class", state=OrderedDict(list(good.items()) + [("x", np.float64(1.5))]))
    folder = bad("truncated")
    path = os.path.join(folder, "model_000001.pt")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    # A protocol-0 pickle that calls os.system('echo pwned') when loaded: written by hand.
    bad("bad-tokenizer", tokenizer=b"cos\nsystem\n(S'echo pwned'\ntR.")


if __name__ == "__main__":
    main()
