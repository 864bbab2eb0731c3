//! `kind = "popularity"`: scores an item by how often it occurs in train, optionally limited to
//! some behaviour kinds and decayed by age. The baseline every other model must beat.

use recfuse_sdk::prelude::*;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct PopularityConfig {
    /// Behaviour kinds that count (all when empty).
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Weight an event by 0.5^(age / half_life), age measured from the last train event.
    #[serde(default)]
    pub half_life_days: Option<f64>,
}

pub struct Popularity {
    cfg: PopularityConfig,
    scores: Vec<f32>,
}

impl Ranker for Popularity {
    type Config = PopularityConfig;
    const DESCRIPTION: &'static str = "train popularity, optionally per behaviour kind and time-decayed";

    fn new(cfg: PopularityConfig, _host: Host) -> Result<Self> {
        if let Some(h) = cfg.half_life_days {
            ensure!(h > 0.0, "half_life_days must be positive, got {h}");
        }
        Ok(Self { cfg, scores: Vec::new() })
    }

    fn fit(&mut self, view: &TrainView, _inputs: &FitInputs) -> Result<()> {
        let kinds: Vec<u32> = self.cfg.kinds.iter().filter_map(|k| view.catalog.kind(k)).collect();
        let now = view.events.iter().map(|e| e.timestamp).max().unwrap_or(0);
        let mut scores = vec![0f64; view.n_items()];
        for e in view.events {
            if e.item == NONE || (!self.cfg.kinds.is_empty() && !kinds.contains(&e.kind)) {
                continue;
            }
            let w = match self.cfg.half_life_days {
                Some(h) => 0.5f64.powf((now - e.timestamp) as f64 / 86_400.0 / h),
                None => 1.0,
            };
            scores[e.item as usize] += w;
        }
        self.scores = scores.into_iter().map(|s| s as f32).collect();
        Ok(())
    }

    fn score(&self, batch: &ScoreBatch, out: &mut [f32]) -> Result<()> {
        ensure!(!self.scores.is_empty() || batch.items.is_empty(), "popularity ranker scored before fit");
        let n = batch.per_user();
        for (row, chunk) in out.chunks_mut(n.max(1)).enumerate().take(batch.users.len()) {
            for (slot, &item) in chunk.iter_mut().zip(batch.candidates(row)) {
                *slot = self.scores.get(item as usize).copied().unwrap_or(0.0);
            }
        }
        Ok(())
    }
}

export_plugin! {
    name: "popularity-ranker",
    rankers: { "popularity" => Popularity },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(user: u32, item: u32, kind: u32, ts: i64) -> Event {
        Event { user, item, kind, scenario: 0, subject: NONE, value: 1.0, timestamp: ts }
    }

    fn catalog() -> Catalog {
        Catalog {
            items: (0..3).map(|i| Item { id: i.to_string(), ..Default::default() }).collect(),
            users: (0..2).map(|i| User { id: i.to_string(), ..Default::default() }).collect(),
            kinds: vec!["click".into(), "order".into()],
            ..Default::default()
        }
    }

    #[test]
    fn counts_and_filters_kinds() {
        let cat = catalog();
        let events = vec![ev(0, 0, 0, 1), ev(0, 1, 1, 2), ev(1, 1, 0, 3), ev(1, 2, 1, 4)];
        let view = TrainView { catalog: &cat, events: &events, offsets: &[0, 2, 4] };
        let host = Host::standalone(std::env::temp_dir(), 0);

        let mut all = Popularity::new(PopularityConfig::default(), host.clone()).unwrap();
        all.fit(&view, &FitInputs::default()).unwrap();
        let mut out = vec![0.0; 6];
        all.score(&ScoreBatch { users: &[0, 1], items: &[0, 1, 2], shared: true }, &mut out).unwrap();
        assert_eq!(out, vec![1.0, 2.0, 1.0, 1.0, 2.0, 1.0]);

        let cfg = PopularityConfig { kinds: vec!["order".into()], half_life_days: None };
        let mut orders = Popularity::new(cfg, host).unwrap();
        orders.fit(&view, &FitInputs::default()).unwrap();
        let mut out = vec![0.0; 4];
        orders.score(&ScoreBatch { users: &[0, 1], items: &[2, 0, 1, 2], shared: false }, &mut out).unwrap();
        assert_eq!(out, vec![1.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn decay_prefers_recent_items() {
        let cat = catalog();
        let day = 86_400;
        let events = vec![ev(0, 0, 0, 0), ev(1, 1, 0, 10 * day)];
        let view = TrainView { catalog: &cat, events: &events, offsets: &[0, 1, 2] };
        let cfg = PopularityConfig { kinds: vec![], half_life_days: Some(5.0) };
        let mut r = Popularity::new(cfg, Host::standalone(std::env::temp_dir(), 0)).unwrap();
        r.fit(&view, &FitInputs::default()).unwrap();
        let mut out = vec![0.0; 2];
        r.score(&ScoreBatch { users: &[0], items: &[0, 1], shared: true }, &mut out).unwrap();
        assert!((out[0] - 0.25).abs() < 1e-6 && out[1] == 1.0, "{out:?}");
    }
}
