"""The independent reference for tests/evaluations.rs: reads {"pairs": [[hypothesis,
reference], ...]} on stdin and prints sacreBLEU's corpus BLEU (defaults: 13a, exp smoothing)
and rouge-score's ROUGE-L F1 per pair (no stemmer), as JSON."""
import json
import sys

import sacrebleu
from rouge_score import rouge_scorer

pairs = json.load(sys.stdin)["pairs"]
hyps = [h for h, _ in pairs]
refs = [r for _, r in pairs]
bleu = sacrebleu.corpus_bleu(hyps, [refs])
scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in pairs]

# Distinct-2 over whitespace words (n-grams within each hypothesis) and mean words.
bigrams = [tuple(w[i:i + 2]) for w in (h.split() for h in hyps) for i in range(len(w) - 1)]
distinct_2 = len(set(bigrams)) / len(bigrams) if bigrams else None
mean_words = sum(len(h.split()) for h in hyps) / len(hyps) if hyps else None
print(json.dumps({"bleu": bleu.score, "counts": bleu.counts, "totals": bleu.totals,
                  "sys_len": bleu.sys_len, "ref_len": bleu.ref_len, "rouge_l": rouge,
                  "distinct_2": distinct_2, "mean_words": mean_words}))
