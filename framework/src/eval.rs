//! Ranking evaluation of the test item, overall and per segment (cold-start users: at most
//! `cold_start_max` train events; warm: the others).
//!
//! * `full` protocol (default): every item the user has not interacted with in train or
//!   validation is a candidate.
//! * `sampled` protocol: the test item against `negatives` items sampled (uniformly or by train
//!   popularity, seeded) from those the user never interacted with.
//!
//! HR@k, NDCG@k and MRR@k come from the test item's rank. AUC (pooled over users) and UAUC
//! (averaged per user) come from the test item against the sampled negatives, under both
//! protocols: the yes/no view of the same scores. Ties are broken at their expected position:
//! rank = #higher + #equal/2 (rounded down); in AUC a tie counts one half. A constant scorer
//! therefore lands in the middle, not at the top.

use crate::config::{EvalSection, NegativePool, Protocol, Sampling, SplitMethod};
use crate::handles::RankerHandle;
use crate::split::SplitData;
use anyhow::{bail, Result};
use recfuse_sdk::records::*;
use recfuse_sdk::SeededRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

pub use recfuse_sdk::metrics::rank_of;
use recfuse_sdk::metrics::ndcg_at;

/// Per-user metrics of one segment, summed, then averaged by `finish`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Segment {
    pub users: usize,
    pub metrics: BTreeMap<String, f64>,
    /// Positive and negative scores for the pooled AUC; dropped once computed.
    #[serde(skip)]
    positives: Vec<f32>,
    #[serde(skip)]
    negatives: Vec<f32>,
    /// Running sums by cut-off: (k, [HR, NDCG, MRR]); named only by `finish` (the hot loop
    /// must not format metric names).
    #[serde(skip)]
    sums: Vec<(usize, [f64; 3])>,
    /// Sum of per-user AUCs, and whether any user had negatives.
    #[serde(skip)]
    uauc: Option<f64>,
}

impl Segment {
    pub fn add(&mut self, rank: usize, ks: &[usize]) {
        self.users += 1;
        for &k in ks {
            let i = match self.sums.iter().position(|(c, _)| *c == k) {
                Some(i) => i,
                None => {
                    self.sums.push((k, [0.0; 3]));
                    self.sums.len() - 1
                }
            };
            let hit = rank < k;
            let s = &mut self.sums[i].1;
            s[0] += hit as u8 as f64;
            s[1] += ndcg_at(rank, k);
            s[2] += if hit { 1.0 / (rank + 1) as f64 } else { 0.0 };
        }
    }

    /// Adds one user's positive score against its negatives' scores (AUC and UAUC).
    pub fn add_pairs(&mut self, positive: f32, negatives: &[f32]) {
        if negatives.is_empty() {
            return;
        }
        let wins: f64 = negatives.iter().map(|&n| if positive > n { 1.0 } else if positive == n { 0.5 } else { 0.0 }).sum();
        *self.uauc.get_or_insert(0.0) += wins / negatives.len() as f64;
        self.positives.push(positive);
        self.negatives.extend_from_slice(negatives);
    }

    fn finish(mut self) -> Self {
        let n = self.users.max(1) as f64;
        for (k, [hr, ndcg, mrr]) in std::mem::take(&mut self.sums) {
            self.metrics.insert(format!("HR@{k}"), hr / n);
            self.metrics.insert(format!("NDCG@{k}"), ndcg / n);
            self.metrics.insert(format!("MRR@{k}"), mrr / n);
        }
        if let Some(u) = self.uauc.take() {
            self.metrics.insert("UAUC".into(), u / n);
        }
        if !self.positives.is_empty() {
            self.metrics.insert("AUC".into(), pooled_auc(&mut self.positives, &self.negatives));
        }
        (self.positives, self.negatives) = (Vec::new(), Vec::new());
        self
    }
}

/// Area under the ROC curve of pooled scores (Mann-Whitney: the share of (positive, negative)
/// pairs ordered right, ties counting ½). Sorts the positives only (one per user) and places
/// each negative among them by binary search: no sort of the far larger negative set.
pub fn pooled_auc(positives: &mut [f32], negatives: &[f32]) -> f64 {
    if positives.is_empty() || negatives.is_empty() {
        return 0.5;
    }
    positives.sort_unstable_by(f32::total_cmp);
    let positives: &[f32] = positives;
    let p = positives.len();
    // Wins of the positives over one negative: those above it, and half of those tied.
    let wins = |negs: &[f32]| -> f64 {
        negs.iter()
            .map(|&n| {
                let below = positives.partition_point(|&x| x < n);
                let tied = match positives.get(below) {
                    Some(&x) if x == n => positives[below..].partition_point(|&x| x <= n),
                    _ => 0,
                };
                (p - below - tied) as f64 + 0.5 * tied as f64
            })
            .sum()
    };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let part = negatives.len().div_ceil(threads).max(1 << 16);
    let total: f64 = std::thread::scope(|scope| {
        let handles: Vec<_> = negatives.chunks(part).map(|c| scope.spawn(move || wins(c))).collect();
        handles.into_iter().map(|h| h.join().expect("AUC thread")).sum()
    });
    total / (p as f64 * negatives.len() as f64)
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub model: String,
    pub protocol: String,
    pub items: usize,
    pub cold_start_max: usize,
    /// `all`, `cold`, `warm`.
    pub segments: BTreeMap<String, Segment>,
    /// Two-stage ranking: the first-stage ranker and how many of its top candidates this
    /// ranker reranked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reranked: Option<RerankInfo>,
    /// Wall time of scoring (both stages when reranking) per evaluated user.
    #[serde(default)]
    pub seconds_per_user: f64,
    /// Set when the model failed (fit, scoring, a panic): it has no figures, and the run's exit
    /// status says a model failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RerankInfo {
    pub from: String,
    pub top: usize,
}

/// Two-stage scores as one list: the `top` candidates (indices into `first`) ordered by their
/// second-stage scores, above every other candidate, which keep the first stage's order.
/// Returned as `-(final rank)`, ties kept as ties, so the single-stage metric code applies
/// unchanged; masked candidates keep whatever value (they are skipped).
pub fn compose_two_stage(first: &[f32], masked: impl Fn(usize) -> bool, top: &[usize], second: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NEG_INFINITY; first.len()];
    let mut in_top = vec![false; first.len()];
    top.iter().for_each(|&i| in_top[i] = true);
    for (j, &i) in top.iter().enumerate() {
        out[i] = -(second.iter().filter(|&&x| x > second[j]).count() as f32);
    }
    let mut rest: Vec<usize> = (0..first.len()).filter(|&i| !in_top[i] && !masked(i)).collect();
    rest.sort_by(|&a, &b| first[b].total_cmp(&first[a]));
    let mut rank = 0usize;
    for (pos, &i) in rest.iter().enumerate() {
        if pos > 0 && first[i] != first[rest[pos - 1]] {
            rank = pos;
        }
        out[i] = -((top.len() + rank) as f32);
    }
    out
}

/// The first stage's best `n` unmasked candidates (ties by index), best first.
pub fn top_n(scores: &[f32], masked: impl Fn(usize) -> bool, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).filter(|&i| !masked(i)).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx
}

/// How a run evaluates, in words (the reports' `protocol`).
fn protocol_name(split: &SplitData, cfg: &EvalSection) -> String {
    let split_name = match split.method {
        SplitMethod::LeaveOneOut => "leave-one-out",
        SplitMethod::Temporal => "temporal split",
    };
    match cfg.protocol {
        Protocol::Full => format!("{split_name}, full ranking (train and validation items masked)"),
        Protocol::Sampled => format!("{split_name}, {} {:?}-sampled negatives", cfg.negatives, cfg.sampling).to_lowercase(),
    }
}

impl Report {
    /// Metric names by family, then cut-off: HR@5, HR@10, NDCG@5, ..., AUC, UAUC.
    pub fn metric_names(&self) -> Vec<String> {
        let mut metrics: Vec<String> = self.segments.get("all").map(|s| s.metrics.keys().cloned().collect()).unwrap_or_default();
        let family = |m: &str| ["HR@", "NDCG@", "MRR@", "AUC", "UAUC"].iter().position(|f| m.starts_with(f)).unwrap_or(5);
        let cutoff = |m: &str| m.rsplit('@').next().and_then(|k| k.parse::<usize>().ok()).unwrap_or(0);
        metrics.sort_by_key(|m| (family(m), cutoff(m)));
        metrics
    }

}

/// All reports of a run as one Markdown document: a table per segment, a row per model.
pub fn markdown(all: &[Report]) -> String {
    let failed: Vec<&Report> = all.iter().filter(|r| r.error.is_some()).collect();
    let reports: Vec<&Report> = all.iter().filter(|r| r.error.is_none()).collect();
    let mut out = markdown_tables(&reports);
    if !reports.is_empty() {
        // What each model cost: LLM rankers take seconds per user where baselines take microseconds.
        out.push_str("\n## scoring time\n\n| model | seconds per user |\n|---|---:|\n");
        for r in &reports {
            out.push_str(&format!("| {} | {:.3e} |\n", r.model, r.seconds_per_user));
        }
    }
    if !failed.is_empty() {
        out.push_str("\n## failed models\n\n| model | error |\n|---|---|\n");
        for r in failed {
            let error = r.error.as_deref().unwrap_or_default().replace('|', "\\|").replace('\n', " ");
            out.push_str(&format!("| {} | {error} |\n", r.model));
        }
    }
    out
}

fn markdown_tables(reports: &[&Report]) -> String {
    let Some(first) = reports.first() else { return String::new() };
    let metrics = first.metric_names();
    let mut out = format!(
        "# Evaluation\n\n{} over {} items; cold-start = at most {} train events.\n",
        first.protocol, first.items, first.cold_start_max
    );
    for segment in ["all", "cold", "warm"] {
        let users = first.segments.get(segment).map(|s| s.users).unwrap_or(0);
        out.push_str(&format!("\n## {segment} ({users} users)\n\n| model | {} |\n|---|{}\n", metrics.join(" | "), "---:|".repeat(metrics.len())));
        for r in reports.iter() {
            if let Some(s) = r.segments.get(segment) {
                let vals: Vec<String> = metrics
                    .iter()
                    .map(|m| match s.metrics.get(m) {
                        Some(v) if s.users > 0 => format!("{v:.4}"),
                        _ => "n/a".into(),
                    })
                    .collect();
                let name = match &r.reranked {
                    Some(rr) => format!("{} (top {} of {})", r.model, rr.top, rr.from),
                    None => r.model.clone(),
                };
                out.push_str(&format!("| {name} | {} |\n", vals.join(" | ")));
            }
        }
    }
    out
}

/// Users to evaluate: all with a test item, or an evenly spaced subset of `max_users`.
pub fn pick_users(split: &SplitData, max_users: usize) -> Vec<UserIdx> {
    let all = split.evaluable_users();
    if max_users == 0 || all.len() <= max_users {
        return all;
    }
    (0..max_users).map(|i| all[i * all.len() / max_users]).collect()
}

/// Draws negatives for a user: items the user never interacted with (in any event of the
/// dataset), uniformly or by train popularity. Used for instruction examples and evaluation.
pub struct NegativeSampler {
    touched: Vec<HashSet<ItemIdx>>,
    /// Items uniform sampling draws from (see [`NegativePool`]).
    pool: Vec<ItemIdx>,
    /// Cumulative train popularity (empty for uniform sampling).
    cumulative: Vec<f64>,
    n_items: usize,
}

impl NegativeSampler {
    pub fn new(split: &SplitData, dataset: &Dataset, sampling: Sampling, pool: NegativePool) -> Self {
        let n_items = dataset.catalog.items.len();
        let pool: Vec<ItemIdx> = match pool {
            NegativePool::Catalog => (0..n_items as ItemIdx).collect(),
            NegativePool::Interacted => {
                let mut seen = vec![false; n_items];
                dataset.events.iter().filter(|e| e.item != NONE).for_each(|e| seen[e.item as usize] = true);
                (0..n_items as ItemIdx).filter(|&i| seen[i as usize]).collect()
            }
        };
        let mut touched: Vec<HashSet<ItemIdx>> = vec![HashSet::new(); dataset.catalog.users.len()];
        for e in dataset.events.iter().filter(|e| e.item != NONE) {
            touched[e.user as usize].insert(e.item);
        }
        let mut cumulative = Vec::new();
        if sampling == Sampling::Popularity {
            cumulative = vec![0f64; n_items];
            for e in split.train.events.iter().filter(|e| e.item != NONE) {
                cumulative[e.item as usize] += 1.0;
            }
            let mut acc = 0.0;
            for c in cumulative.iter_mut() {
                acc += *c;
                *c = acc;
            }
        }
        Self { touched, pool, cumulative, n_items }
    }

    /// Up to `want` distinct negatives for `user` (fewer only when the catalog runs out).
    pub fn sample(&self, user: UserIdx, want: usize, rng: &mut SeededRng) -> Vec<ItemIdx> {
        let seen = &self.touched[user as usize];
        let want = want.min(self.pool.len().saturating_sub(seen.len())).min(self.n_items.saturating_sub(seen.len()));
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let mut out: Vec<ItemIdx> = Vec::with_capacity(want);
        let mut chosen: HashSet<ItemIdx> = HashSet::with_capacity(want);
        let mut tries = 0usize;
        while out.len() < want && tries < 1000 * (want + 1) {
            tries += 1;
            let item = if total > 0.0 {
                let x = rng.unit() * total;
                self.cumulative.partition_point(|&c| c <= x).min(self.n_items - 1) as ItemIdx
            } else {
                self.pool[rng.below(self.pool.len())]
            };
            if !seen.contains(&item) && chosen.insert(item) {
                out.push(item);
            }
        }
        out
    }
}

/// Evaluation negatives for each of `users`, drawn with the run's seed so every model sees the
/// same ones.
pub fn sample_negatives(split: &SplitData, dataset: &Dataset, users: &[UserIdx], cfg: &EvalSection, seed: u64) -> Vec<Vec<ItemIdx>> {
    let sampler = NegativeSampler::new(split, dataset, cfg.sampling, cfg.negative_pool);
    users
        .iter()
        .map(|&u| sampler.sample(u, cfg.negatives, &mut SeededRng::new(seed ^ (u as u64).wrapping_mul(0x9E37_79B9))))
        .collect()
}

/// Sets (or clears) the items the host masks for `user` under full ranking: its train items
/// and its validation item, which are not candidates for the test item.
fn mark_seen(masked: &mut [bool], split: &SplitData, user: UserIdx, on: bool) {
    let t = split.targets[user as usize];
    for e in split.train.view().history(user).iter().filter(|e| e.item != NONE) {
        masked[e.item as usize] = on;
    }
    if t.valid != NONE && t.valid != t.test {
        masked[t.valid as usize] = on;
    }
}

/// What every ranker of a run is evaluated on.
#[derive(Clone, Copy)]
pub struct EvalContext<'a> {
    pub split: &'a SplitData,
    pub cfg: &'a EvalSection,
    pub users: &'a [UserIdx],
    pub negatives: &'a [Vec<ItemIdx>],
    pub batch_size: usize,
}

/// One evaluated user: everything its metrics come from. Evaluation journals these
/// (`reports/<label>.outcomes.jsonl`), so an interrupted evaluation resumes, and the reports of
/// a sharded run are computed from the shards' outcomes exactly as from an unsharded run's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub user: UserIdx,
    /// Rank of the test item among the candidates (0 = first).
    pub rank: usize,
    /// At most `cold_start_max` train events.
    pub cold: bool,
    /// Score of the test item, and of the sampled negatives (AUC, UAUC).
    #[serde(with = "json_f32")]
    pub positive: f32,
    #[serde(with = "json_f32s")]
    pub negatives: Vec<f32>,
    /// Wall time of scoring, the user's share of its batch.
    pub seconds: f64,
}

/// What a report says besides its figures: the run's protocol and the catalog size.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReportFrame {
    pub protocol: String,
    pub items: usize,
    pub cold_start_max: usize,
    pub ks: Vec<usize>,
}

impl ReportFrame {
    pub fn new(split: &SplitData, cfg: &EvalSection) -> Self {
        Self { protocol: protocol_name(split, cfg), items: split.history.catalog.items.len(), cold_start_max: cfg.cold_start_max, ks: cfg.ks.clone() }
    }

    /// The report of `outcomes`, accumulated in user order whatever order they came in (from
    /// batches, resumed journals or shards), so the same outcomes always give the same figures
    /// to the last bit.
    pub fn report(&self, model: &str, reranked: Option<RerankInfo>, outcomes: &mut [Outcome]) -> Report {
        outcomes.sort_by_key(|o| o.user);
        let (mut all, mut cold, mut warm) = (Segment::default(), Segment::default(), Segment::default());
        for o in outcomes.iter() {
            for seg in [&mut all, if o.cold { &mut cold } else { &mut warm }] {
                seg.add(o.rank, &self.ks);
                seg.add_pairs(o.positive, &o.negatives);
            }
        }
        let seconds: f64 = outcomes.iter().map(|o| o.seconds).sum();
        Report {
            model: model.to_string(),
            protocol: self.protocol.clone(),
            items: self.items,
            cold_start_max: self.cold_start_max,
            segments: BTreeMap::from([("all".to_string(), all.finish()), ("cold".to_string(), cold.finish()), ("warm".to_string(), warm.finish())]),
            reranked,
            seconds_per_user: seconds / outcomes.len().max(1) as f64,
            error: None,
        }
    }

    /// A report with the run's protocol and no figures, for a model that failed.
    pub fn failed(&self, model: &str, error: String) -> Report {
        Report {
            model: model.to_string(),
            protocol: self.protocol.clone(),
            items: self.items,
            cold_start_max: self.cold_start_max,
            segments: BTreeMap::new(),
            reranked: None,
            seconds_per_user: 0.0,
            error: Some(error),
        }
    }
}

/// Scores as JSON numbers; a ranker may score an item `-inf` (never), which JSON has no number
/// for: infinities are written as the strings "inf" and "-inf".
mod json_f32 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    pub enum Repr {
        Number(f32),
        Text(String),
    }
    pub fn to_repr(x: f32) -> Repr {
        if x.is_finite() {
            Repr::Number(x)
        } else {
            Repr::Text(if x > 0.0 { "inf" } else if x < 0.0 { "-inf" } else { "nan" }.into())
        }
    }
    pub fn from_repr<E: serde::de::Error>(r: Repr) -> Result<f32, E> {
        match r {
            Repr::Number(x) => Ok(x),
            Repr::Text(t) => match t.as_str() {
                "inf" => Ok(f32::INFINITY),
                "-inf" => Ok(f32::NEG_INFINITY),
                "nan" => Ok(f32::NAN),
                _ => Err(E::custom(format!("`{t}` is not a score"))),
            },
        }
    }
    pub fn serialize<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
        to_repr(*x).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        from_repr(Repr::deserialize(d)?)
    }
}

mod json_f32s {
    use super::json_f32::{from_repr, to_repr, Repr};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(xs: &[f32], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(xs.iter().map(|&x| to_repr(x)))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        Vec::<Repr>::deserialize(d)?.into_iter().map(from_repr).collect()
    }
}

/// Scores the context's users in batches under the configured protocol and returns the report.
pub fn evaluate(
    ranker: &RankerHandle,
    first_stage: Option<(&RankerHandle, &RerankInfo)>,
    label: &str,
    ctx: &EvalContext<'_>,
    mut on_batch: impl FnMut(usize) -> Result<()>,
) -> Result<Report> {
    let mut outcomes = Vec::with_capacity(ctx.users.len());
    evaluate_outcomes(ranker, first_stage, label, ctx, |batch| {
        outcomes.extend_from_slice(batch);
        on_batch(batch.len())
    })?;
    Ok(ReportFrame::new(ctx.split, ctx.cfg).report(label, first_stage.map(|(_, info)| info.clone()), &mut outcomes))
}

/// Scores the context's users in batches under the configured protocol (`negatives[i]` are the
/// sampled negatives of `users[i]`), handing each batch's outcomes to `on_batch` (which
/// journals them, or stops the run by returning an error).
pub fn evaluate_outcomes(
    ranker: &RankerHandle,
    first_stage: Option<(&RankerHandle, &RerankInfo)>,
    label: &str,
    ctx: &EvalContext<'_>,
    mut on_batch: impl FnMut(&[Outcome]) -> Result<()>,
) -> Result<()> {
    let EvalContext { split, cfg, users, negatives, batch_size } = *ctx;
    let n_items = split.train.catalog.items.len();
    let all_items: Vec<ItemIdx> = (0..n_items as u32).collect();
    let per_user = match cfg.protocol {
        Protocol::Full => n_items,
        Protocol::Sampled => 1 + cfg.negatives,
    };
    let mut scores = vec![0f32; batch_size * per_user];
    let mut candidates: Vec<ItemIdx> = Vec::with_capacity(batch_size * per_user);
    let no_mask = vec![false; per_user];
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut second: Vec<f32> = Vec::new();
    let mut second_items: Vec<ItemIdx> = Vec::new();
    let mut tops: Vec<Vec<usize>> = Vec::new();
    let mut masked = vec![false; n_items];
    for (chunk_no, chunk) in users.chunks(batch_size).enumerate() {
        let started = std::time::Instant::now();
        let negs = &negatives[chunk_no * batch_size..chunk_no * batch_size + chunk.len()];
        let out = &mut scores[..chunk.len() * per_user];
        // Without reranking the ranker scores every candidate; with it, the first stage does.
        let scorer = first_stage.map(|(f, _)| f).unwrap_or(ranker);
        match cfg.protocol {
            Protocol::Full => scorer.score(&ScoreBatch { users: chunk, items: &all_items, shared: true }, out)?,
            Protocol::Sampled => {
                candidates.clear();
                for (&u, neg) in chunk.iter().zip(negs) {
                    if neg.len() != cfg.negatives {
                        bail!("user {u}: only {} items left to sample {} negatives from", neg.len(), cfg.negatives);
                    }
                    candidates.push(split.targets[u as usize].test);
                    candidates.extend_from_slice(neg);
                }
                scorer.score(&ScoreBatch { users: chunk, items: &candidates, shared: false }, out)?;
            }
        }
        if let Some((first, info)) = first_stage {
            // Second stage: the ranker scores each user's first-stage top N only.
            tops.clear();
            second_items.clear();
            for (row, &u) in chunk.iter().enumerate() {
                let s = &out[row * per_user..(row + 1) * per_user];
                let top = match cfg.protocol {
                    Protocol::Full => {
                        mark_seen(&mut masked, split, u, true);
                        let top = top_n(s, |i| masked[i], info.top);
                        mark_seen(&mut masked, split, u, false);
                        top
                    }
                    Protocol::Sampled => top_n(s, |_| false, info.top),
                };
                if top.len() < info.top {
                    bail!("user {u}: the first stage `{}` has only {} candidates to rerank, {} asked", first.provenance.name, top.len(), info.top);
                }
                let row_items = |j: usize| match cfg.protocol {
                    Protocol::Full => j as ItemIdx,
                    Protocol::Sampled => candidates[row * per_user + j],
                };
                second_items.extend(top.iter().map(|&j| row_items(j)));
                tops.push(top);
            }
            second.resize(second_items.len(), 0.0);
            ranker.score(&ScoreBatch { users: chunk, items: &second_items, shared: false }, &mut second)?;
            for (row, &u) in chunk.iter().enumerate() {
                let s2 = &second[row * info.top..(row + 1) * info.top];
                if let Some(bad) = s2.iter().position(|x| x.is_nan()) {
                    bail!("ranker `{label}` returned NaN for user {u} (reranked candidate {bad})");
                }
                let s = &mut out[row * per_user..(row + 1) * per_user];
                let composed = match cfg.protocol {
                    Protocol::Full => {
                        mark_seen(&mut masked, split, u, true);
                        let composed = compose_two_stage(s, |i| masked[i], &tops[row], s2);
                        mark_seen(&mut masked, split, u, false);
                        composed
                    }
                    Protocol::Sampled => compose_two_stage(s, |_| false, &tops[row], s2),
                };
                s.copy_from_slice(&composed);
            }
        }
        // Ranking the rows is the host's own work: spread it over every core.
        let out: &[f32] = out;
        let scorer_name = &scorer.provenance.name;
        let rank_rows = |rows: std::ops::Range<usize>| -> Result<Vec<Outcome>> {
            let mut outcomes = Vec::with_capacity(rows.len());
            let mut masked = vec![false; n_items];
            for row in rows {
                let (u, neg) = (chunk[row], &negs[row]);
                let s = &out[row * per_user..(row + 1) * per_user];
                if let Some(bad) = s.iter().position(|x| x.is_nan()) {
                    bail!("ranker `{scorer_name}` returned NaN for user {u} (candidate {bad})");
                }
                let t = split.targets[u as usize];
                let history = split.train.view().history(u);
                let (rank, positive, negatives) = match cfg.protocol {
                    Protocol::Full => {
                        mark_seen(&mut masked, split, u, true);
                        let rank = rank_of(s, t.test as usize, &masked);
                        mark_seen(&mut masked, split, u, false);
                        (rank, s[t.test as usize], neg.iter().map(|&i| s[i as usize]).collect())
                    }
                    Protocol::Sampled => (rank_of(s, 0, &no_mask), s[0], s[1..].to_vec()),
                };
                let cold = history.len() <= cfg.cold_start_max;
                outcomes.push(Outcome { user: u, rank, cold, positive, negatives, seconds: 0.0 });
            }
            Ok(outcomes)
        };
        let parts = threads.min(chunk.len()).max(1);
        let bounds: Vec<std::ops::Range<usize>> = (0..parts).map(|p| p * chunk.len() / parts..(p + 1) * chunk.len() / parts).collect();
        let results: Vec<Result<Vec<Outcome>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = bounds.into_iter().map(|r| scope.spawn(move || rank_rows(r))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("evaluation thread panicked")))).collect()
        });
        let mut outcomes = Vec::with_capacity(chunk.len());
        for part in results {
            outcomes.extend(part?);
        }
        let share = started.elapsed().as_secs_f64() / chunk.len() as f64;
        outcomes.iter_mut().for_each(|o| o.seconds = share);
        on_batch(&outcomes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Negatives come from items someone interacted with unless the whole catalog is asked for.
    #[test]
    fn negatives_are_drawn_from_interacted_items_by_default() {
        let ev = |user: u32, item: u32, t: i64| Event { user, item, kind: 0, scenario: 0, subject: NONE, value: 1.0, timestamp: t };
        // Items 0..=5 have events; 6..=19 nobody touched.
        let events: Vec<Event> = (0..6).map(|i| ev(0, i, i as i64)).chain((0..3).map(|i| ev(1, i, 10 + i as i64))).collect();
        let catalog = Catalog {
            items: (0..20).map(|i| Item { id: format!("i{i}"), ..Default::default() }).collect(),
            users: (0..2).map(|i| User { id: format!("u{i}"), ..Default::default() }).collect(),
            kinds: vec!["click".into()],
            ..Default::default()
        };
        let ds = Dataset { catalog, events, ..Default::default() };
        let split = crate::split::split_dataset(&ds, &crate::config::SplitSection::default());
        let mut rng = SeededRng::new(1);
        let interacted = NegativeSampler::new(&split, &ds, Sampling::Uniform, NegativePool::Interacted);
        let drawn = interacted.sample(1, 10, &mut rng);
        assert_eq!(drawn.len(), 3, "only items 3, 4, 5 are interacted and unseen by user 1: {drawn:?}");
        assert!(drawn.iter().all(|&i| (3..6).contains(&i)));
        let catalog = NegativeSampler::new(&split, &ds, Sampling::Uniform, NegativePool::Catalog);
        let drawn = catalog.sample(1, 10, &mut rng);
        assert_eq!(drawn.len(), 10);
        assert!(drawn.iter().any(|&i| i >= 6), "{drawn:?}");
    }

    #[test]
    fn two_stage_reranks_the_top_and_keeps_the_first_stage_order_below() {
        // first stage: item 0 best, then 3, 1, 4, 2; item 5 masked.
        let first = [0.9, 0.5, 0.1, 0.7, 0.3, 0.99];
        let masked = |i: usize| i == 5;
        let top = top_n(&first, masked, 2);
        assert_eq!(top, vec![0, 3]);
        // the second stage prefers 3 over 0
        let composed = compose_two_stage(&first, masked, &top, &[0.2, 0.8]);
        let mut order: Vec<usize> = (0..6).filter(|&i| !masked(i)).collect();
        order.sort_by(|&a, &b| composed[b].total_cmp(&composed[a]));
        assert_eq!(order, vec![3, 0, 1, 4, 2]);
        assert_eq!(rank_of(&composed, 1, &[false, false, false, false, false, true]), 2);
        // ties in the second stage stay ties
        let tied = compose_two_stage(&first, masked, &top, &[0.5, 0.5]);
        assert_eq!(tied[0], tied[3]);
    }

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
    fn auc_matches_hand_computed_values() {
        // positives 0.9, 0.4; negatives 0.8, 0.4, 0.1: pairs won 3 + 1.5 = 4.5 of 6
        assert!((pooled_auc(&mut [0.9, 0.4], &[0.8, 0.4, 0.1]) - 0.75).abs() < 1e-12);
        assert!((pooled_auc(&mut [0.4, 0.4], &[0.4]) - 0.5).abs() < 1e-12);
        let mut s = Segment::default();
        s.add(0, &[1]);
        s.add_pairs(0.9, &[0.8, 0.4, 0.1]); // 1.0
        s.add(1, &[1]);
        s.add_pairs(0.4, &[0.8, 0.4, 0.1]); // (0 + 0.5 + 1) / 3 = 0.5
        let s = s.finish();
        assert!((s.metrics["UAUC"] - 0.75).abs() < 1e-12);
        assert!((s.metrics["AUC"] - 0.75).abs() < 1e-12);
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
