//! Full-ranking evaluation: every item the user has not interacted with in train (or
//! validation) is a candidate; the test item's rank gives HR@k, NDCG@k and MRR@k, overall and
//! per segment (cold-start users: at most `cold_start_max` train events).
//!
//! Ties are broken at their expected position: rank = #higher + #equal/2 (rounded down). A
//! constant scorer therefore lands in the middle, not at the top.

use crate::config::EvalSection;
use crate::handles::RankerHandle;
use crate::split::SplitData;
use anyhow::{bail, Result};
use recfuse_sdk::records::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// 0-based rank of `target` among the unmasked items.
pub fn rank_of(scores: &[f32], target: usize, masked: &[bool]) -> usize {
    let t = scores[target];
    let (mut higher, mut equal) = (0usize, 0usize);
    for (i, &s) in scores.iter().enumerate() {
        if i == target || masked[i] {
            continue;
        }
        if s > t {
            higher += 1;
        } else if s == t {
            equal += 1;
        }
    }
    higher + equal / 2
}

/// Sums of per-user metrics for one segment.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Segment {
    pub users: usize,
    pub metrics: BTreeMap<String, f64>,
}

impl Segment {
    pub fn add(&mut self, rank: usize, ks: &[usize]) {
        self.users += 1;
        for &k in ks {
            let hit = rank < k;
            *self.metrics.entry(format!("HR@{k}")).or_default() += hit as u8 as f64;
            *self.metrics.entry(format!("NDCG@{k}")).or_default() += if hit { 1.0 / ((rank + 2) as f64).log2() } else { 0.0 };
            *self.metrics.entry(format!("MRR@{k}")).or_default() += if hit { 1.0 / (rank + 1) as f64 } else { 0.0 };
        }
    }
    fn finish(mut self) -> Self {
        let n = self.users.max(1) as f64;
        self.metrics.values_mut().for_each(|v| *v /= n);
        self
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub model: String,
    pub protocol: String,
    pub items: usize,
    pub cold_start_max: usize,
    /// `all`, `cold`, `warm`.
    pub segments: BTreeMap<String, Segment>,
}

impl Report {
    pub fn markdown(&self) -> String {
        // Columns by family, then cut-off: HR@5, HR@10, NDCG@5, ...
        let mut metrics: Vec<String> = self.segments.get("all").map(|s| s.metrics.keys().cloned().collect()).unwrap_or_default();
        let family = |m: &str| ["HR@", "NDCG@", "MRR@"].iter().position(|f| m.starts_with(f)).unwrap_or(3);
        let cutoff = |m: &str| m.rsplit('@').next().and_then(|k| k.parse::<usize>().ok()).unwrap_or(0);
        metrics.sort_by_key(|m| (family(m), cutoff(m)));
        let mut out = format!(
            "# Evaluation: {}\n\n{} over {} items; cold-start = at most {} train events.\n\n| segment | users | {} |\n|---|---:|{}\n",
            self.model,
            self.protocol,
            self.items,
            self.cold_start_max,
            metrics.join(" | "),
            "---:|".repeat(metrics.len())
        );
        for name in ["all", "cold", "warm"] {
            if let Some(s) = self.segments.get(name) {
                let vals: Vec<String> = metrics.iter().map(|m| format!("{:.4}", s.metrics.get(m).copied().unwrap_or(0.0))).collect();
                out.push_str(&format!("| {name} | {} | {} |\n", s.users, vals.join(" | ")));
            }
        }
        out
    }
}

/// Users to evaluate: all with a test item, or an evenly spaced subset of `max_users`.
pub fn pick_users(split: &SplitData, max_users: usize) -> Vec<UserIdx> {
    let all = split.evaluable_users();
    if max_users == 0 || all.len() <= max_users {
        return all;
    }
    (0..max_users).map(|i| all[i * all.len() / max_users]).collect()
}

/// Scores `users` against every item in batches and accumulates the metrics.
pub fn evaluate(
    ranker: &RankerHandle,
    split: &SplitData,
    cfg: &EvalSection,
    users: &[UserIdx],
    batch_size: usize,
    mut on_batch: impl FnMut(usize) -> Result<()>,
) -> Result<Report> {
    let n_items = split.train.catalog.items.len();
    let items: Vec<ItemIdx> = (0..n_items as u32).collect();
    let mut scores = vec![0f32; batch_size * n_items];
    let mut masked = vec![false; n_items];
    let (mut all, mut cold, mut warm) = (Segment::default(), Segment::default(), Segment::default());
    for chunk in users.chunks(batch_size) {
        let out = &mut scores[..chunk.len() * n_items];
        ranker.score(&ScoreBatch { users: chunk, items: &items, shared: true }, out)?;
        for (row, &u) in chunk.iter().enumerate() {
            let s = &out[row * n_items..(row + 1) * n_items];
            if let Some(bad) = s.iter().position(|x| x.is_nan()) {
                bail!("ranker `{}` returned NaN for user {} item {}", ranker.provenance.name, u, bad);
            }
            let t = split.targets[u as usize];
            let history = split.train.view().history(u);
            for e in history.iter().filter(|e| e.item != NONE) {
                masked[e.item as usize] = true;
            }
            masked[t.valid as usize] = t.valid != t.test;
            let rank = rank_of(s, t.test as usize, &masked);
            for e in history.iter().filter(|e| e.item != NONE) {
                masked[e.item as usize] = false;
            }
            masked[t.valid as usize] = false;
            all.add(rank, &cfg.ks);
            if history.len() <= cfg.cold_start_max {
                cold.add(rank, &cfg.ks);
            } else {
                warm.add(rank, &cfg.ks);
            }
        }
        on_batch(chunk.len())?;
    }
    let mut segments = BTreeMap::new();
    segments.insert("all".to_string(), all.finish());
    segments.insert("cold".to_string(), cold.finish());
    segments.insert("warm".to_string(), warm.finish());
    Ok(Report {
        model: ranker.provenance.name.clone(),
        protocol: "leave-one-out, full ranking (train and validation items masked)".into(),
        items: n_items,
        cold_start_max: cfg.cold_start_max,
        segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_counts_higher_and_half_the_ties_skipping_masked() {
        let scores = [0.9, 0.5, 0.7, 0.5, 0.5, 0.95];
        let mut masked = [false; 6];
        assert_eq!(rank_of(&scores, 2, &masked), 2); // 0.9 and 0.95 above
        masked[5] = true;
        assert_eq!(rank_of(&scores, 2, &masked), 1);
        // target 1 at 0.5: 0.9, 0.7 above; two ties (3, 4) -> +1
        assert_eq!(rank_of(&scores, 1, &masked), 3);
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        let mut s = Segment::default();
        s.add(0, &[5, 10]); // hit at 1: ndcg 1, mrr 1
        s.add(3, &[5, 10]); // hit at 4: ndcg 1/log2(5), mrr 1/4
        s.add(7, &[5, 10]); // hit only @10 at 8: ndcg 1/log2(9), mrr 1/8
        s.add(50, &[5, 10]); // miss
        let s = s.finish();
        let m = |k: &str| s.metrics[k];
        assert_eq!(s.users, 4);
        assert!((m("HR@5") - 0.5).abs() < 1e-12);
        assert!((m("HR@10") - 0.75).abs() < 1e-12);
        let ndcg5 = (1.0 + 1.0 / 5f64.log2()) / 4.0;
        assert!((m("NDCG@5") - ndcg5).abs() < 1e-12);
        let ndcg10 = (1.0 + 1.0 / 5f64.log2() + 1.0 / 9f64.log2()) / 4.0;
        assert!((m("NDCG@10") - ndcg10).abs() < 1e-12);
        assert!((m("MRR@10") - (1.0 + 0.25 + 0.125) / 4.0).abs() < 1e-12);
    }
}
