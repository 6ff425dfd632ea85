//! A prefix KV cache (LRU, bounded by cached tokens): a prompt that repeats or extends a cached
//! one only computes its new tokens; an identical prompt reuses the cached last-position logits
//! without any forward pass. Owned by the worker thread, so it needs no locking.
//!
//! The bound is on memory, in KV-cache tokens: an entry costs its prompt's tokens plus its
//! stored logits counted as the tokens of equal KV memory (Gemma 3's 262 144 logits weigh as
//! much as 28 positions of its KV cache; bounding by prompt tokens alone let 170 short entries
//! hold 170 MiB of logits).

use crate::model::Cache;

struct Entry {
    ids: Vec<u32>,
    cache: Cache,
    /// Logits of the last prompt position.
    logits: Vec<f32>,
    last_used: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    max_tokens: usize,
    /// What one entry's logits cost, in KV-cache tokens.
    logits_tokens: usize,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
}

/// What a lookup found.
pub enum Reuse {
    /// The whole prompt is cached: its KV cache and its last logits.
    Exact(Cache, Vec<f32>),
    /// The first `n` prompt tokens are cached (n < prompt length).
    Prefix(Cache, usize),
    None,
}

impl PrefixCache {
    /// `max_tokens` = 0 disables caching; `logits_tokens`: what one entry's stored logits
    /// cost, in tokens of KV memory (see [`logits_cost`]).
    pub fn new(max_tokens: usize, logits_tokens: usize) -> Self {
        Self {
            entries: Vec::new(),
            max_tokens,
            logits_tokens,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn cached_tokens(&self) -> usize {
        self.entries.iter().map(|e| e.ids.len()).sum()
    }

    /// Memory held, in KV-cache tokens (what `max_tokens` bounds).
    fn cost(&self) -> usize {
        self.cached_tokens() + self.entries.len() * self.logits_tokens
    }

    pub fn lookup(&mut self, ids: &[u32]) -> Reuse {
        self.clock += 1;
        let best = self
            .entries
            .iter_mut()
            .map(|e| {
                let common = e.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
                (common, e)
            })
            .filter(|(common, _)| *common > 0)
            .max_by_key(|(common, _)| *common);
        let Some((common, entry)) = best else {
            self.misses += 1;
            return Reuse::None;
        };
        entry.last_used = self.clock;
        self.hits += 1;
        if common == ids.len() && entry.ids.len() == ids.len() {
            return Reuse::Exact(entry.cache.clone(), entry.logits.clone());
        }
        // At least the last prompt token must be run to get its logits.
        let usable = common.min(ids.len() - 1);
        if usable == 0 {
            self.hits -= 1;
            self.misses += 1;
            return Reuse::None;
        }
        match entry.cache.truncated(usable) {
            Ok(c) => Reuse::Prefix(c, usable),
            Err(_) => Reuse::None,
        }
    }

    /// Remembers a prompt's KV cache and last logits, evicting least recently used entries.
    pub fn insert(&mut self, ids: &[u32], cache: &Cache, logits: &[f32]) {
        let cost = ids.len() + self.logits_tokens;
        if self.max_tokens == 0 || cost > self.max_tokens {
            return;
        }
        self.clock += 1;
        // An entry that is a prefix of this one adds nothing once this one is stored.
        self.entries
            .retain(|e| !(e.ids.len() <= ids.len() && ids.starts_with(&e.ids)));
        while self.cost() + cost > self.max_tokens {
            let Some((i, _)) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            self.entries.swap_remove(i);
        }
        self.entries.push(Entry {
            ids: ids.to_vec(),
            cache: cache.clone(),
            logits: logits.to_vec(),
            last_used: self.clock,
        });
    }
}

/// One entry's logits (`vocab` f32 values) in tokens of KV memory: a position holds keys and
/// values of `kv_values_per_token` f32 values (layers × 2 × kv heads × head_dim), rounded up.
pub fn logits_cost(vocab: usize, kv_values_per_token: usize) -> usize {
    vocab.div_ceil(kv_values_per_token.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_logits_count_against_the_bound() {
        // 10-token prompts whose logits cost 30 tokens each: two fit in 100, not three.
        let mut cache = PrefixCache::new(100, 30);
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|p| (0..10).map(|i| p * 100 + i).collect())
            .collect();
        for ids in &prompts {
            cache.insert(ids, &Cache::default(), &[0.0; 4]);
        }
        assert_eq!(cache.cached_tokens(), 20);
        assert!(
            matches!(cache.lookup(&prompts[0]), Reuse::None),
            "the oldest was evicted"
        );
        assert!(matches!(cache.lookup(&prompts[2]), Reuse::Exact(..)));
        // An entry whose logits alone exceed the bound is not stored.
        let mut tiny = PrefixCache::new(20, 30);
        tiny.insert(&prompts[0], &Cache::default(), &[0.0; 4]);
        assert_eq!(tiny.cached_tokens(), 0);
        assert_eq!(logits_cost(262_144, 18 * 2 * 256), 29);
    }
}
