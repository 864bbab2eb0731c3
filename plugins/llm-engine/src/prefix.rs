//! Keys and values of prompts already prefilled, kept so that a later prompt beginning with the
//! same tokens (a shared system prompt, a template's opening, a client asking again) computes
//! only the rest. This is what serving stacks call prompt or prefix caching; OpenAI reports it
//! as `usage.prompt_tokens_details.cached_tokens`.
//!
//! A token's key and value depend only on the tokens before it (causal attention), and the int8
//! and candle kernels compute each row of a batch on its own, so stored entries are what a fresh
//! prefill would compute, up to one thing: rotary positions. A batch row left-padded by `p` holds
//! its tokens at columns `p, p+1, ...`; an entry records the padding it was computed with, and
//! its keys are rotated by the difference when reused ([`crate::model::Model::move_kv`]).

use candle_core::Tensor;

/// One stored prompt.
struct Entry {
    tokens: Vec<u32>,
    /// The left padding (first column) its keys were computed at.
    pad: usize,
    /// Per layer, keys and values of `tokens` (`1 × kv_heads × tokens × head_dim`).
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
}

/// What a prompt can reuse: the first `tokens` of an entry's keys and values (`kv`, which may
/// hold more), computed at column `pad`.
pub struct Hit {
    pub tokens: usize,
    pub pad: usize,
    pub kv: Vec<(Tensor, Tensor)>,
}

/// Stored prompts, least recently used first, within a byte budget (0 stores nothing).
pub struct PrefixStore {
    entries: Vec<Entry>,
    bytes: usize,
    budget: usize,
    /// Bytes of keys and values per token (every layer).
    per_token: usize,
}

impl PrefixStore {
    pub fn new(budget: usize, per_token: usize) -> Self {
        Self { entries: Vec::new(), bytes: 0, budget, per_token }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// The longest stored beginning of `prompt`, at most `prompt.len() - 1` tokens (the last
    /// token is always computed: its logits start the answer); `None` below `min` tokens.
    pub fn lookup(&mut self, prompt: &[u32], min: usize) -> Option<Hit> {
        let usable = |e: &Entry| e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len().saturating_sub(1));
        let (best, tokens) = self.entries.iter().enumerate().map(|(i, e)| (i, usable(e))).max_by_key(|&(i, n)| (n, i))?;
        if tokens < min.max(1) {
            return None;
        }
        let entry = self.entries.remove(best);
        let hit = Hit { tokens, pad: entry.pad, kv: entry.kv.clone() };
        self.entries.push(entry); // most recently used
        Some(hit)
    }

    /// Whether a stored entry already holds all of `prompt`.
    pub fn holds(&self, prompt: &[u32]) -> bool {
        self.entries.iter().any(|e| e.tokens.starts_with(prompt))
    }

    /// Stores a prompt's keys and values (computed at column `pad`); entries it extends are
    /// dropped, then the least recently used until the store fits its budget.
    pub fn insert(&mut self, tokens: Vec<u32>, pad: usize, kv: Vec<(Tensor, Tensor)>) {
        let bytes = tokens.len() * self.per_token;
        if bytes > self.budget || self.holds(&tokens) {
            return;
        }
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        self.entries.push(Entry { tokens, pad, kv, bytes });
        self.bytes = self.entries.iter().map(|e| e.bytes).sum();
        while self.bytes > self.budget {
            let old = self.entries.remove(0);
            self.bytes -= old.bytes;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn kv(n: usize) -> Vec<(Tensor, Tensor)> {
        let t = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap().reshape((1, 1, n, 1)).unwrap();
        vec![(t.clone(), t)]
    }

    #[test]
    fn longest_prefix_wins_and_the_budget_evicts_least_recently_used() {
        let mut store = PrefixStore::new(10, 1);
        assert!(store.lookup(&[1, 2, 3], 1).is_none());
        store.insert(vec![1, 2, 3, 4], 0, kv(4));
        store.insert(vec![1, 2, 9], 2, kv(3));
        // Prompt [1,2,3,4,5]: 4 tokens from the first entry.
        let hit = store.lookup(&[1, 2, 3, 4, 5], 1).unwrap();
        assert_eq!((hit.tokens, hit.pad, hit.kv[0].0.dim(2).unwrap()), (4, 0, 4));
        // The same prompt again: all but its last token.
        assert_eq!(store.lookup(&[1, 2, 3, 4], 1).unwrap().tokens, 3);
        // Below the minimum: nothing.
        assert!(store.lookup(&[1, 2, 7], 3).is_none());
        assert!(store.holds(&[1, 2]) && !store.holds(&[2]));
        // A prompt extending an entry replaces it; over budget, the least recently used goes.
        store.insert(vec![1, 2, 3, 4, 5, 6], 0, kv(6));
        assert_eq!(store.bytes(), 9);
        store.insert(vec![8, 8, 8, 8], 0, kv(4));
        assert!(store.bytes() <= 10);
        assert!(!store.holds(&[1, 2, 9]), "the least recently used entry stayed");
        assert!(store.holds(&[8, 8, 8, 8]) && store.holds(&[1, 2, 3, 4, 5, 6]));
        // An entry larger than the budget is not stored.
        store.insert((0..11).collect(), 0, kv(11));
        assert!(!store.holds(&[0, 1]));
    }
}
