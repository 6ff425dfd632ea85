"""The independent side of tests/compare.rs: every figure POST /compare reports, computed with
numpy in float64 from the two models' raw f32 logits (written by the test), so that the Rust
maths (log-softmax, KL both ways, top-1, perplexity, percentiles, RMS delta-p) is checked
against a separate implementation.

usage: reference.py LOGITS_A LOGITS_B IDS_JSON FIRST_ROW VOCAB OUT_JSON
"""
import json
import sys

import numpy as np


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    s = x - m
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def main():
    path_a, path_b, ids_path, first_row, vocab, out = sys.argv[1:7]
    first_row, vocab = int(first_row), int(vocab)
    ids = json.load(open(ids_path))
    a = np.fromfile(path_a, dtype="<f4").reshape(-1, vocab)
    b = np.fromfile(path_b, dtype="<f4").reshape(-1, vocab)
    rows = range(first_row, len(ids) - 1)
    la, lb = log_softmax(a[first_row:len(ids) - 1]), log_softmax(b[first_row:len(ids) - 1])
    pa, pb = np.exp(la), np.exp(lb)
    kl_ab = np.maximum((pa * (la - lb)).sum(axis=1), 0.0)
    kl_ba = np.maximum((pb * (lb - la)).sum(axis=1), 0.0)
    nxt = np.array([ids[r + 1] for r in rows])
    idx = np.arange(len(nxt))
    lpa, lpb = la[idx, nxt], lb[idx, nxt]
    # Ties in the top-1 go to the lower id, as np.argmax does.
    agree = la.argmax(axis=1) == lb.argmax(axis=1)
    positions = [
        {
            "position": r + 1,
            "token_id": int(ids[r + 1]),
            "logprob_a": float(lpa[i]),
            "logprob_b": float(lpb[i]),
            "kl_ab": float(kl_ab[i]),
            "kl_ba": float(kl_ba[i]),
            "top1_agree": bool(agree[i]),
            "top1_a": int(la[i].argmax()),
            "top1_b": int(lb[i].argmax()),
        }
        for i, r in enumerate(rows)
    ]
    summary = {
        "positions": len(positions),
        "kl_mean": float(kl_ab.mean()),
        "kl_median": float(np.percentile(kl_ab, 50)),
        "kl_p99": float(np.percentile(kl_ab, 99)),
        "kl_max": float(kl_ab.max()),
        "kl_max_position": int(first_row + 1 + kl_ab.argmax()),
        "kl_ba_mean": float(kl_ba.mean()),
        "top1_agreement_percent": float(100.0 * agree.mean()),
        "perplexity_a": float(np.exp(-lpa.mean())),
        "perplexity_b": float(np.exp(-lpb.mean())),
        "rms_delta_p_percent": float(100.0 * np.sqrt(((np.exp(lpb) - np.exp(lpa)) ** 2).mean())),
    }
    json.dump({"positions": positions, "summary": summary}, open(out, "w"))


main()
