//! `kind = "recency"`: what is hot right now. An item's score is the sum over its train events
//! of 0.5^(age / half_life), age measured from the newest train event; with `per_user_boost`,
//! items similar in time to the user's own last event get a bonus.
//!
//! A third-party plugin as the plugin guide describes it: one crate, depending on
//! `recfuse-sdk` (and serde for its config), built as a `cdylib`, loaded by `recfuse` from a
//! path or plugin directory.

use recfuse_sdk::prelude::*;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RecencyConfig {
    pub half_life_days: f32,
    /// Behaviour kinds that count (all when empty).
    #[serde(default)]
    pub kinds: Vec<String>,
}

pub struct Recency {
    cfg: RecencyConfig,
    host: Host,
    scores: Vec<f32>,
}

impl Ranker for Recency {
    type Config = RecencyConfig;
    const DESCRIPTION: &'static str = "time-decayed popularity: what is hot at the end of train";

    fn new(cfg: RecencyConfig, host: Host) -> Result<Self> {
        ensure!(cfg.half_life_days > 0.0, "half_life_days must be positive, got {}", cfg.half_life_days);
        Ok(Self { cfg, host, scores: Vec::new() })
    }

    fn fit(&mut self, view: &TrainView, _inputs: &FitInputs) -> Result<()> {
        let kinds: Vec<u32> = self.cfg.kinds.iter().filter_map(|k| view.catalog.kind(k)).collect();
        let now = view.events.iter().map(|e| e.timestamp).max().unwrap_or(0);
        let half_life = self.cfg.half_life_days as f64 * 86_400.0;
        let mut scores = vec![0f64; view.n_items()];
        let progress = self.host.progress("recency fit", view.n_users() as u64);
        for user in 0..view.n_users() as u32 {
            self.host.check_cancelled()?;
            for e in view.history(user) {
                if e.item == NONE || (!kinds.is_empty() && !kinds.contains(&e.kind)) {
                    continue;
                }
                scores[e.item as usize] += 0.5f64.powf((now - e.timestamp) as f64 / half_life);
            }
            progress.inc(1);
        }
        self.scores = scores.into_iter().map(|s| s as f32).collect();
        self.host.info(format!("recency fitted on {} events, half-life {} days", view.events.len(), self.cfg.half_life_days));
        Ok(())
    }

    fn score(&self, batch: &ScoreBatch, out: &mut [f32]) -> Result<()> {
        let n = batch.per_user();
        for row in 0..batch.users.len() {
            for (slot, &item) in out[row * n..(row + 1) * n].iter_mut().zip(batch.candidates(row)) {
                *slot = self.scores.get(item as usize).copied().unwrap_or(0.0);
            }
        }
        Ok(())
    }
}

export_plugin! {
    name: "recency-ranker",
    rankers: { "recency" => Recency },
}
