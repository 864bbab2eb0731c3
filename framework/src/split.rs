//! Leave-one-out split by time, and the views each stage is allowed to see.
//!
//! Per user, events are ordered by `(timestamp, position in the source)`: same-second events
//! keep the order the source gave them, which makes the split deterministic and documented.
//! Among the user's *target* events (events with an item, of a target kind), the last is the
//! test item and the one before it the validation item; train is everything before the
//! validation event. The last target event of train is the train target of instruction
//! examples, and the *history* view (what fusers and instruction builders see) is train minus
//! that event. So knowledge never contains a target it is asked to predict.
//!
//! Users with fewer than `min_events` target events keep all their events in train and are not
//! evaluated.

use crate::config::SplitSection;
use crate::handles::ViewData;
use recfuse_sdk::records::*;

/// The targets of one user (all `NONE` for users too short to evaluate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Targets {
    pub train: ItemIdx,
    pub valid: ItemIdx,
    pub test: ItemIdx,
}

pub struct SplitData {
    /// Everything before each user's validation event.
    pub train: ViewData,
    /// Train minus each user's train target: what knowledge is built from.
    pub history: ViewData,
    pub targets: Vec<Targets>,
}

impl SplitData {
    /// Users with a test item, in index order.
    pub fn evaluable_users(&self) -> Vec<UserIdx> {
        (0..self.targets.len() as u32).filter(|&u| self.targets[u as usize].test != NONE).collect()
    }
    /// Number of train events of a user.
    pub fn train_len(&self, user: UserIdx) -> usize {
        self.train.view().history(user).len()
    }
}

fn group(n_users: usize, per_user: &[Vec<Event>]) -> (Vec<Event>, Vec<u32>) {
    let mut events = Vec::with_capacity(per_user.iter().map(Vec::len).sum());
    let mut offsets = Vec::with_capacity(n_users + 1);
    offsets.push(0);
    for evs in per_user {
        events.extend_from_slice(evs);
        offsets.push(events.len() as u32);
    }
    (events, offsets)
}

pub fn leave_one_out(dataset: &Dataset, cfg: &SplitSection) -> SplitData {
    let catalog = &dataset.catalog;
    let n_users = catalog.users.len();
    let target_kinds: Vec<u32> = cfg.target_kinds.iter().filter_map(|k| catalog.kind(k)).collect();
    let is_target = |e: &Event| e.item != NONE && (cfg.target_kinds.is_empty() || target_kinds.contains(&e.kind));

    // Sort by (user, timestamp, position in the source): ties keep source order.
    let mut order: Vec<u32> = (0..dataset.events.len() as u32).collect();
    order.sort_unstable_by_key(|&i| {
        let e = &dataset.events[i as usize];
        (e.user, e.timestamp, i)
    });
    let none = Targets { train: NONE, valid: NONE, test: NONE };
    let mut targets = vec![none; n_users];
    let mut train: Vec<Vec<Event>> = vec![Vec::new(); n_users];
    let mut history: Vec<Vec<Event>> = vec![Vec::new(); n_users];
    let mut start = 0;
    let mut positions = Vec::new();
    while start < order.len() {
        let user = dataset.events[order[start] as usize].user as usize;
        let mut end = start;
        while end < order.len() && dataset.events[order[end] as usize].user as usize == user {
            end += 1;
        }
        let evs: Vec<Event> = order[start..end].iter().map(|&i| dataset.events[i as usize]).collect();
        start = end;
        positions.clear();
        positions.extend(evs.iter().enumerate().filter(|(_, e)| is_target(e)).map(|(i, _)| i));
        if positions.len() < cfg.min_events.max(3) {
            history[user] = evs.clone();
            train[user] = evs;
            continue;
        }
        let n = positions.len();
        let (train_pos, valid_pos, test_pos) = (positions[n - 3], positions[n - 2], positions[n - 1]);
        targets[user] = Targets { train: evs[train_pos].item, valid: evs[valid_pos].item, test: evs[test_pos].item };
        let mut hist = evs[..valid_pos].to_vec();
        hist.remove(train_pos);
        history[user] = hist;
        train[user] = evs[..valid_pos].to_vec();
    }
    let (te, to) = group(n_users, &train);
    let (he, ho) = group(n_users, &history);
    SplitData {
        train: ViewData::new(catalog.clone(), te, to),
        history: ViewData::new(catalog.clone(), he, ho),
        targets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(user: u32, item: u32, kind: u32, ts: i64) -> Event {
        Event { user, item, kind, scenario: 0, subject: NONE, value: 1.0, timestamp: ts }
    }

    fn dataset(events: Vec<Event>) -> Dataset {
        let catalog = Catalog {
            items: (0..10).map(|i| Item { id: format!("i{i}"), ..Default::default() }).collect(),
            users: (0..2).map(|i| User { id: format!("u{i}"), ..Default::default() }).collect(),
            kinds: vec!["click".into(), "search".into()],
            ..Default::default()
        };
        Dataset { catalog, events, ..Default::default() }
    }

    #[test]
    fn last_is_test_ties_keep_source_order_and_targets_never_leak() {
        // user 0: items 1..=5, with 4 and 5 in the same second (source order decides: 4 then 5).
        let events = vec![
            ev(0, 3, 0, 30),
            ev(0, 1, 0, 10),
            ev(0, 4, 0, 50),
            ev(0, 2, 0, 20),
            ev(0, 5, 0, 50),
            ev(0, NONE, 1, 60), // a search after the last item: not a target, not in train
            ev(1, 7, 0, 1),     // user 1: too short, all train
        ];
        let s = leave_one_out(&dataset(events), &SplitSection::default());
        assert_eq!(s.targets[0], Targets { train: 3, valid: 4, test: 5 });
        let train: Vec<u32> = s.train.view().history(0).iter().map(|e| e.item).collect();
        assert_eq!(train, vec![1, 2, 3]);
        let hist: Vec<u32> = s.history.view().history(0).iter().map(|e| e.item).collect();
        assert_eq!(hist, vec![1, 2]);
        assert_eq!(s.targets[1].test, NONE);
        assert_eq!(s.train.view().history(1).len(), 1);
        assert_eq!(s.evaluable_users(), vec![0]);
    }

    #[test]
    fn target_kinds_restrict_targets() {
        let events = vec![ev(0, 1, 0, 1), ev(0, 2, 1, 2), ev(0, 3, 0, 3), ev(0, 4, 0, 4), ev(0, 5, 1, 5)];
        let cfg = SplitSection { target_kinds: vec!["click".into()], ..Default::default() };
        let s = leave_one_out(&dataset(events), &cfg);
        assert_eq!(s.targets[0], Targets { train: 1, valid: 3, test: 4 });
        let train: Vec<u32> = s.train.view().history(0).iter().map(|e| e.item).collect();
        assert_eq!(train, vec![1, 2]);
    }
}
