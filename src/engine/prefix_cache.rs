//! A prefix KV cache (LRU, bounded by cached tokens): a prompt that repeats or extends a cached
//! one only computes its new tokens; an identical prompt reuses the cached last-position logits
//! without any forward pass. Owned by the worker thread, so it needs no locking.

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
    /// `max_tokens` = 0 disables caching.
    pub fn new(max_tokens: usize) -> Self {
        Self {
            entries: Vec::new(),
            max_tokens,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    pub fn cached_tokens(&self) -> usize {
        self.entries.iter().map(|e| e.ids.len()).sum()
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
        if self.max_tokens == 0 || ids.len() > self.max_tokens {
            return;
        }
        self.clock += 1;
        // An entry that is a prefix of this one adds nothing once this one is stored.
        self.entries
            .retain(|e| !(e.ids.len() <= ids.len() && ids.starts_with(&e.ids)));
        while self.cached_tokens() + ids.len() > self.max_tokens {
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
