//! Response diversity and length over a set of generated responses. Words are the text split
//! at whitespace as Python's `str.split()` splits it (no tokenizer's rules: the numbers mean
//! the same for every model).

use std::collections::HashSet;

use super::bleu::is_python_space;

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_python_space).filter(|w| !w.is_empty())
}

/// The n of [`distinct_n`] reported as `response_diversity`.
pub const DIVERSITY_N: usize = 2;

/// Distinct-n (Li et al., 2016): distinct word n-grams over all responses divided by all
/// word n-grams, n-grams never crossing responses. `None` when no response has n words.
pub fn distinct_n<S: AsRef<str>>(responses: &[S], n: usize) -> Option<f64> {
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for response in responses {
        let words: Vec<&str> = words(response.as_ref()).collect();
        if words.len() >= n {
            for gram in words.windows(n) {
                seen.insert(gram.to_vec());
                total += 1;
            }
        }
    }
    (total > 0).then(|| seen.len() as f64 / total as f64)
}

/// Mean number of words per response (`None` for no responses).
pub fn mean_words<S: AsRef<str>>(responses: &[S]) -> Option<f64> {
    (!responses.is_empty()).then(|| {
        let words: usize = responses.iter().map(|r| words(r.as_ref()).count()).sum();
        words as f64 / responses.len() as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_bigrams_over_all_responses() {
        // Bigrams: (a b) (b a) (a b) | (a b) (b c): 3 distinct of 5.
        let d = distinct_n(&["a b a b", "a b c"], 2).unwrap();
        assert!((d - 0.6).abs() < 1e-12);
        assert_eq!(distinct_n(&["one"], 2), None);
        assert_eq!(mean_words(&["a b", "c d e f"]), Some(3.0));
    }
}
