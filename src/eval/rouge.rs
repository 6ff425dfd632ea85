//! ROUGE-L F1 as Google's `rouge-score` package computes it (`RougeScorer(["rougeL"])`,
//! no stemmer): text lower-cased, every run of characters other than `a-z0-9` a separator,
//! tokens compared by their longest common subsequence. An empty side scores 0.
//! `tests/evaluations.rs` compares it with `rouge-score` on the same strings.

/// rouge-score's tokenizer: Python's `lower()`, then the runs of ASCII letters and digits.
pub fn tokenize(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence (one row of the table at a time).
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            row[j + 1] = if x == y {
                prev[j] + 1
            } else {
                row[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

/// ROUGE-L F1 of `prediction` against `target` (rouge-score's `score(target, prediction)`).
pub fn rouge_l_f1(target: &str, prediction: &str) -> f64 {
    let target = tokenize(target);
    let prediction = tokenize(prediction);
    if target.is_empty() || prediction.is_empty() {
        return 0.0;
    }
    let common = lcs(&target, &prediction) as f64;
    let precision = common / prediction.len() as f64;
    let recall = common / target.len() as f64;
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_lowercase_alphanumeric_runs() {
        assert_eq!(
            tokenize("The cat's HAT, 2x!"),
            ["the", "cat", "s", "hat", "2x"]
        );
        assert_eq!(tokenize("café"), ["caf"]);
    }

    #[test]
    fn lcs_f1_of_a_reordered_sentence() {
        // LCS of "police killed the gunman" and "police kill the gunman" is 3 of 4 each.
        let f = rouge_l_f1("police killed the gunman", "police kill the gunman");
        assert!((f - 0.75).abs() < 1e-12);
        assert_eq!(rouge_l_f1("", "anything"), 0.0);
        assert_eq!(rouge_l_f1("a b", "c d"), 0.0);
    }
}
