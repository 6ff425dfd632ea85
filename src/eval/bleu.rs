//! Corpus BLEU-4 exactly as sacreBLEU (2.x) computes it with its defaults: the `13a`
//! tokenizer (mteval-v13a's rules), case kept, one reference per hypothesis, exponential
//! smoothing of zero n-gram matches (`smooth_method="exp"`), no effective order. The score is
//! reported as a fraction (sacreBLEU's `score` / 100). `tests/evaluations.rs` compares it
//! with sacreBLEU itself on the same strings.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

/// The highest n-gram order (BLEU-4).
pub const MAX_ORDER: usize = 4;

/// sacreBLEU's `TokenizerRegexp` rules, in its order. Python's `re.sub` and regex's
/// `replace_all` both replace leftmost-first, non-overlapping matches, so the sequence gives
/// the same text. `[0-9]` is ASCII in both.
static RULES: LazyLock<[(Regex, &'static str); 4]> = LazyLock::new(|| {
    let re = |p: &str| Regex::new(p).expect("constant pattern");
    [
        // Punctuation and symbols of the Western ranges: {-~, [-`, space-&, (-+, :-@, /.
        (re(r"([\{-~\[-` -&\(-\+:-@/])"), " $1 "),
        // Period and comma unless preceded by a digit...
        (re(r"([^0-9])([\.,])"), "$1 $2 "),
        // ... and unless followed by a digit.
        (re(r"([\.,])([^0-9])"), " $1 $2"),
        // A dash after a digit.
        (re(r"([0-9])(-)"), "$1 $2 "),
    ]
});

/// sacreBLEU's `13a` tokenization of one segment (after its `rstrip()`), as words.
pub fn tokenize_13a(segment: &str) -> Vec<String> {
    let line = segment
        .trim_end_matches(is_python_space)
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    let line = if line.contains('&') {
        line.replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
    } else {
        line
    };
    let mut line = format!(" {line} ");
    for (re, replacement) in RULES.iter() {
        line = re.replace_all(&line, *replacement).into_owned();
    }
    line.split(is_python_space)
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Python's `str.isspace()`, which sacreBLEU's `rstrip()` and `split()` use: Unicode's
/// White_Space and the four information separators U+001C to U+001F.
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Corpus BLEU's sufficient statistics: per order, matched and total n-grams, and the
/// hypothesis and reference lengths.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BleuStats {
    pub matches: [u64; MAX_ORDER],
    pub totals: [u64; MAX_ORDER],
    pub hyp_len: u64,
    pub ref_len: u64,
}

fn ngram_counts(words: &[String], n: usize) -> HashMap<&[String], u64> {
    let mut counts = HashMap::new();
    if words.len() >= n {
        for gram in words.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

impl BleuStats {
    /// Adds one hypothesis and its reference.
    pub fn add(&mut self, hypothesis: &str, reference: &str) {
        let hyp = tokenize_13a(hypothesis);
        let reference = tokenize_13a(reference);
        self.hyp_len += hyp.len() as u64;
        self.ref_len += reference.len() as u64;
        for n in 1..=MAX_ORDER {
            let ref_counts = ngram_counts(&reference, n);
            for (gram, count) in ngram_counts(&hyp, n) {
                self.matches[n - 1] += count.min(ref_counts.get(gram).copied().unwrap_or(0));
            }
            self.totals[n - 1] += hyp.len().saturating_sub(n - 1) as u64;
        }
    }

    /// The score in [0, 1] (sacreBLEU's `compute_bleu` with `smooth_method="exp"`, / 100).
    pub fn score(&self) -> f64 {
        // sacreBLEU stops early when no n-gram of any order matches (its issue #141).
        if self.matches.iter().all(|&m| m == 0) {
            return 0.0;
        }
        let mut precisions = [0.0f64; MAX_ORDER];
        let mut smooth = 1.0f64;
        for ((p, &matches), &total) in precisions.iter_mut().zip(&self.matches).zip(&self.totals) {
            if total == 0 {
                break;
            }
            *p = if matches == 0 {
                smooth *= 2.0;
                100.0 / (smooth * total as f64)
            } else {
                100.0 * matches as f64 / total as f64
            };
        }
        // sacreBLEU's `my_log(0)` is −9999999999: any zero precision makes the score 0.
        if precisions.contains(&0.0) {
            return 0.0;
        }
        let brevity = if self.hyp_len < self.ref_len {
            if self.hyp_len == 0 {
                0.0
            } else {
                (1.0 - self.ref_len as f64 / self.hyp_len as f64).exp()
            }
        } else {
            1.0
        };
        let mean_log = precisions.iter().map(|p| p.ln()).sum::<f64>() / MAX_ORDER as f64;
        brevity * mean_log.exp() / 100.0
    }
}

/// Corpus BLEU-4 of `pairs` (hypothesis, reference), in [0, 1].
pub fn corpus_bleu<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let mut stats = BleuStats::default();
    for (hyp, reference) in pairs {
        stats.add(hyp, reference);
    }
    stats.score()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_13a_rules_split_punctuation_but_not_numbers() {
        assert_eq!(
            tokenize_13a("Hello, world. It costs $3.50, or 1,000-2,000 (approx.)!"),
            [
                "Hello", ",", "world", ".", "It", "costs", "$", "3.50", ",", "or", "1,000", "-",
                "2,000", "(", "approx", ".", ")", "!"
            ]
        );
        assert_eq!(tokenize_13a("a &amp; b&quot;"), ["a", "&", "b", "\""]);
    }

    #[test]
    fn identical_text_scores_one_and_disjoint_text_zero() {
        let s = "the cat sat on the mat today";
        assert!((corpus_bleu([(s, s)]) - 1.0).abs() < 1e-12);
        assert_eq!(corpus_bleu([("alpha beta", "gamma delta epsilon")]), 0.0);
        assert_eq!(corpus_bleu([("", "gamma delta")]), 0.0);
    }
}
