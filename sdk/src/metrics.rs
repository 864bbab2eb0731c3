//! Ranking metrics, shared by the host's evaluation and by rankers that select their best epoch
//! on validation: one implementation, so a ranker's model selection measures exactly what the
//! report will.

use crate::records::{ItemIdx, TrainView, UserIdx, NONE};

/// 0-based rank of `target` among the unmasked candidates: the number of higher scores plus
/// half the ties (rounded down), so a constant scorer lands in the middle, not at the top.
pub fn rank_of(scores: &[f32], target: usize, masked: &[bool]) -> usize {
    let t = scores[target];
    // Branch-free counts (they vectorise); the target itself counts as one tie, removed below.
    let (mut higher, mut equal) = (0usize, 0usize);
    for (&s, &m) in scores.iter().zip(masked) {
        let keep = !m as usize;
        higher += (s > t) as usize & keep;
        equal += (s == t) as usize & keep;
    }
    if !masked[target] {
        equal -= 1;
    }
    higher + equal / 2
}

/// NDCG@k of one relevant item at 0-based `rank`.
pub fn ndcg_at(rank: usize, k: usize) -> f64 {
    if rank < k {
        1.0 / ((rank + 2) as f64).log2()
    } else {
        0.0
    }
}

/// The validation targets a ranker may select its model on (SDK 1.1): `items[i]` is the
/// validation item of `users[i]`, the event right after the train view's history of that user.
#[derive(Clone, Copy, Debug, Default)]
pub struct Validation<'a> {
    pub users: &'a [UserIdx],
    pub items: &'a [ItemIdx],
}

/// Mean NDCG@k and HR@k over validation users.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ValidationScore {
    pub ndcg: f64,
    pub hr: f64,
    pub users: usize,
}

impl Validation<'_> {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Full-ranking NDCG@k and HR@k of the validation items, the host's protocol: every item is
    /// a candidate except the user's train items. `score(users, out)` writes
    /// `users.len() × n_items` scores, row-major (a ranker's `score` with a shared batch of all
    /// items); users are scored `batch` at a time.
    pub fn evaluate(
        &self,
        view: &TrainView<'_>,
        k: usize,
        batch: usize,
        mut score: impl FnMut(&[UserIdx], &mut [f32]) -> anyhow::Result<()>,
    ) -> anyhow::Result<ValidationScore> {
        let n = view.n_items();
        let batch = batch.max(1);
        let mut out = vec![0f32; batch * n];
        let mut masked = vec![false; n];
        let (mut ndcg, mut hits) = (0f64, 0usize);
        for (users, items) in self.users.chunks(batch).zip(self.items.chunks(batch)) {
            let out = &mut out[..users.len() * n];
            score(users, out)?;
            for (row, (&u, &target)) in users.iter().zip(items).enumerate() {
                let seen = view.history(u).iter().filter(|e| e.item != NONE && e.item != target);
                seen.clone().for_each(|e| masked[e.item as usize] = true);
                let rank = rank_of(&out[row * n..(row + 1) * n], target as usize, &masked);
                seen.for_each(|e| masked[e.item as usize] = false);
                ndcg += ndcg_at(rank, k);
                hits += (rank < k) as usize;
            }
        }
        let m = self.users.len().max(1) as f64;
        Ok(ValidationScore { ndcg: ndcg / m, hr: hits as f64 / m, users: self.users.len() })
    }
}

/// Keeps the best epoch and says when to stop: after `patience` epochs without improvement
/// (0 = never stop early).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EarlyStopping {
    pub patience: usize,
    pub best: f64,
    /// 1-based epoch of the best value (0: none yet).
    pub best_epoch: usize,
    pub since_best: usize,
}

/// What [`EarlyStopping::observe`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A new best: keep this epoch's model.
    Improved,
    /// Not better; go on.
    Continue,
    /// `patience` epochs without improvement: stop and restore the best.
    Stop,
}

impl EarlyStopping {
    pub fn new(patience: usize) -> Self {
        // f64::MIN, not -inf: the state is checkpointed as JSON, which has no infinities.
        Self { patience, best: f64::MIN, best_epoch: 0, since_best: 0 }
    }
    pub fn observe(&mut self, epoch: usize, value: f64) -> Verdict {
        if value > self.best {
            (self.best, self.best_epoch, self.since_best) = (value, epoch, 0);
            return Verdict::Improved;
        }
        self.since_best += 1;
        if self.patience > 0 && self.since_best >= self.patience {
            Verdict::Stop
        } else {
            Verdict::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::*;

    #[test]
    fn early_stopping_keeps_the_best_and_stops_after_patience() {
        let mut s = EarlyStopping::new(2);
        assert_eq!(s.observe(1, 0.1), Verdict::Improved);
        assert_eq!(s.observe(2, 0.3), Verdict::Improved);
        assert_eq!(s.observe(3, 0.2), Verdict::Continue);
        assert_eq!(s.observe(4, 0.3), Verdict::Stop, "equal is not better");
        assert_eq!((s.best, s.best_epoch), (0.3, 2));
    }

    #[test]
    fn validation_masks_train_items_but_not_the_target() {
        let catalog = Catalog { items: vec![Item::default(); 4], users: vec![User::default()], ..Default::default() };
        let ev = |item| Event { user: 0, item, kind: 0, scenario: 0, subject: NONE, value: 1.0, timestamp: 0 };
        let events = [ev(0), ev(1)];
        let view = TrainView { catalog: &catalog, events: &events, offsets: &[0, 2] };
        let v = Validation { users: &[0], items: &[2] };
        // items 0 and 1 (seen) score highest but are masked: the target ranks first.
        let s = v.evaluate(&view, 1, 8, |_, out| {
            out.copy_from_slice(&[9.0, 8.0, 5.0, 1.0]);
            Ok(())
        });
        assert_eq!(s.unwrap(), ValidationScore { ndcg: 1.0, hr: 1.0, users: 1 });
    }
}
