//! Splits by time, and the views each stage is allowed to see.
//!
//! **Leave-one-out** (default):
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
//!
//! **Temporal**: one global time line. Event timestamps are cut at the quantiles
//! `1 - test_fraction - valid_fraction` and `1 - test_fraction` (ties at a cut go to the later
//! period). A user's test item is their first target event in the test period, the validation
//! item their first in the validation period (absent if none); train is everything before the
//! validation period. Users without a train target or a test item are not evaluated.
//!
//! Both: the train target is the user's last target event in train, and *history* is train
//! minus that event.

use crate::config::{SplitMethod, SplitSection};
use crate::handles::ViewData;
use recfuse_sdk::ffi::CatalogFfi;
use recfuse_sdk::records::*;
use std::sync::Arc;

/// The targets of one user (all `NONE` for users too short to evaluate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Targets {
    pub train: ItemIdx,
    pub valid: ItemIdx,
    pub test: ItemIdx,
    /// The event values (a rating, a quantity) of the train and validation targets, for tasks
    /// that predict them (NaN when absent). The test value is deliberately not kept: nothing
    /// before evaluation may see it.
    pub train_value: f32,
    pub valid_value: f32,
}

pub struct SplitData {
    /// Everything before each user's validation event.
    pub train: ViewData,
    /// Train minus each user's train target: what knowledge is built from. Shared with the
    /// host service that renders instruction prompts for rankers.
    pub history: Arc<ViewData>,
    /// Each user's events before the test event (train plus validation): what a sequence
    /// model conditions on when it predicts the test item. Never trained on.
    pub context: ViewData,
    pub targets: Vec<Targets>,
    pub method: SplitMethod,
}

impl SplitData {
    /// Users with a test item, in index order.
    pub fn evaluable_users(&self) -> Vec<UserIdx> {
        (0..self.targets.len() as u32).filter(|&u| self.targets[u as usize].test != NONE).collect()
    }
    /// Users with a validation target, and those targets (for rankers that select on them;
    /// never the test items).
    pub fn validation_targets(&self) -> (Vec<UserIdx>, Vec<ItemIdx>) {
        (0..self.targets.len() as u32).filter(|&u| self.targets[u as usize].valid != NONE).map(|u| (u, self.targets[u as usize].valid)).unzip()
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

/// Splits by the configured method.
pub fn split_dataset(dataset: &Dataset, cfg: &SplitSection) -> SplitData {
    let mut split = match cfg.method {
        SplitMethod::LeaveOneOut => leave_one_out(dataset, cfg),
        SplitMethod::Temporal => temporal(dataset, cfg),
    };
    split.method = cfg.method;
    split
}

/// Events grouped by user, each user's sorted by (timestamp, position in the source).
fn per_user_sorted(dataset: &Dataset) -> Vec<Vec<Event>> {
    let mut order: Vec<u32> = (0..dataset.events.len() as u32).collect();
    order.sort_unstable_by_key(|&i| {
        let e = &dataset.events[i as usize];
        (e.user, e.timestamp, i)
    });
    let mut per_user: Vec<Vec<Event>> = vec![Vec::new(); dataset.catalog.users.len()];
    for i in order {
        let e = dataset.events[i as usize];
        per_user[e.user as usize].push(e);
    }
    per_user
}

fn finish(
    catalog: &Catalog,
    train: Vec<Vec<Event>>,
    history: Vec<Vec<Event>>,
    context: Vec<Vec<Event>>,
    targets: Vec<Targets>,
) -> SplitData {
    let n_users = catalog.users.len();
    let shared = Arc::new(catalog.clone());
    let shared_ffi = Arc::new(CatalogFfi::from_catalog(catalog));
    let view = |per_user: &[Vec<Event>]| {
        let (events, offsets) = group(n_users, per_user);
        ViewData::new(shared.clone(), shared_ffi.clone(), events, offsets)
    };
    SplitData { train: view(&train), history: Arc::new(view(&history)), context: view(&context), targets, method: SplitMethod::default() }
}

pub fn temporal(dataset: &Dataset, cfg: &SplitSection) -> SplitData {
    let catalog = &dataset.catalog;
    let target_kinds: Vec<u32> = cfg.target_kinds.iter().filter_map(|k| catalog.kind(k)).collect();
    let is_target = |e: &Event| e.item != NONE && (cfg.target_kinds.is_empty() || target_kinds.contains(&e.kind));
    let mut times: Vec<i64> = dataset.events.iter().map(|e| e.timestamp).collect();
    times.sort_unstable();
    let cut = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let (t_valid, t_test) = (cut(1.0 - cfg.test_fraction - cfg.valid_fraction), cut(1.0 - cfg.test_fraction));
    let none = Targets { train: NONE, valid: NONE, test: NONE, train_value: f32::NAN, valid_value: f32::NAN };
    let n_users = catalog.users.len();
    let (mut train, mut history, mut targets) = (vec![Vec::new(); n_users], vec![Vec::new(); n_users], vec![none; n_users]);
    let mut context = vec![Vec::new(); n_users];
    for (u, evs) in per_user_sorted(dataset).into_iter().enumerate() {
        let train_end = evs.partition_point(|e| e.timestamp < t_valid);
        context[u] = evs[..evs.partition_point(|e| e.timestamp < t_test)].to_vec();
        let valid_event = evs[train_end..].iter().find(|e| e.timestamp < t_test && is_target(e));
        let valid = valid_event.map(|e| e.item).unwrap_or(NONE);
        let valid_value = valid_event.map(|e| e.value).unwrap_or(f32::NAN);
        let test = evs[train_end..].iter().find(|e| e.timestamp >= t_test && is_target(e)).map(|e| e.item).unwrap_or(NONE);
        let tr: Vec<Event> = evs[..train_end].to_vec();
        let train_pos = tr.iter().rposition(|e| is_target(e));
        let mut hist = tr.clone();
        match (train_pos, test) {
            (Some(p), t) if t != NONE => {
                targets[u] = Targets { train: tr[p].item, valid, test, train_value: tr[p].value, valid_value };
                hist.remove(p);
            }
            _ => {}
        }
        train[u] = tr;
        history[u] = hist;
    }
    finish(catalog, train, history, context, targets)
}

pub fn leave_one_out(dataset: &Dataset, cfg: &SplitSection) -> SplitData {
    let catalog = &dataset.catalog;
    let n_users = catalog.users.len();
    let target_kinds: Vec<u32> = cfg.target_kinds.iter().filter_map(|k| catalog.kind(k)).collect();
    let is_target = |e: &Event| e.item != NONE && (cfg.target_kinds.is_empty() || target_kinds.contains(&e.kind));

    let none = Targets { train: NONE, valid: NONE, test: NONE, train_value: f32::NAN, valid_value: f32::NAN };
    let mut targets = vec![none; n_users];
    let mut train: Vec<Vec<Event>> = vec![Vec::new(); n_users];
    let mut history: Vec<Vec<Event>> = vec![Vec::new(); n_users];
    let mut context: Vec<Vec<Event>> = vec![Vec::new(); n_users];
    let mut positions = Vec::new();
    for (user, evs) in per_user_sorted(dataset).into_iter().enumerate() {
        positions.clear();
        positions.extend(evs.iter().enumerate().filter(|(_, e)| is_target(e)).map(|(i, _)| i));
        if positions.len() < cfg.min_events.max(3) {
            history[user] = evs.clone();
            context[user] = evs.clone();
            train[user] = evs;
            continue;
        }
        let n = positions.len();
        let (train_pos, valid_pos, test_pos) = (positions[n - 3], positions[n - 2], positions[n - 1]);
        targets[user] = Targets {
            train: evs[train_pos].item,
            valid: evs[valid_pos].item,
            test: evs[test_pos].item,
            train_value: evs[train_pos].value,
            valid_value: evs[valid_pos].value,
        };
        let mut hist = evs[..valid_pos].to_vec();
        hist.remove(train_pos);
        history[user] = hist;
        train[user] = evs[..valid_pos].to_vec();
        context[user] = evs[..test_pos].to_vec();
    }
    finish(catalog, train, history, context, targets)
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
        assert_eq!((s.targets[0].train, s.targets[0].valid, s.targets[0].test), (3, 4, 5));
        let train: Vec<u32> = s.train.view().history(0).iter().map(|e| e.item).collect();
        assert_eq!(train, vec![1, 2, 3]);
        let hist: Vec<u32> = s.history.view().history(0).iter().map(|e| e.item).collect();
        assert_eq!(hist, vec![1, 2]);
        let ctx: Vec<u32> = s.context.view().history(0).iter().map(|e| e.item).collect();
        assert_eq!(ctx, vec![1, 2, 3, 4], "context ends before the test event");
        assert_eq!(s.targets[1].test, NONE);
        assert_eq!(s.train.view().history(1).len(), 1);
        assert_eq!(s.evaluable_users(), vec![0]);
    }

    #[test]
    fn temporal_split_cuts_one_global_time_line() {
        // times 1..=10 for user 0, 2 and 3 for user 1: 12 timestamps [1,2,2,3,3,4,5,6,7,8,9,10];
        // cut(0.7) = times[8] = 7 starts validation, cut(0.8) = times[9] = 8 starts test.
        let mut events: Vec<Event> = (1..=10).map(|t| ev(0, t as u32 % 10, 0, t)).collect();
        events.push(ev(1, 5, 0, 2));
        events.push(ev(1, 6, 0, 3));
        let cfg = SplitSection { method: SplitMethod::Temporal, valid_fraction: 0.1, test_fraction: 0.2, ..Default::default() };
        let s = split_dataset(&dataset(events), &cfg);
        assert_eq!((s.targets[0].train, s.targets[0].valid, s.targets[0].test), (6, 7, 8));
        let train: Vec<i64> = s.train.view().history(0).iter().map(|e| e.timestamp).collect();
        assert_eq!(train, vec![1, 2, 3, 4, 5, 6]);
        assert!(s.history.view().history(0).iter().all(|e| e.timestamp != 6));
        assert_eq!(s.targets[1].test, NONE, "no event in the test period: not evaluated");
        assert_eq!(s.evaluable_users(), vec![0]);
    }

    #[test]
    fn target_kinds_restrict_targets() {
        let events = vec![ev(0, 1, 0, 1), ev(0, 2, 1, 2), ev(0, 3, 0, 3), ev(0, 4, 0, 4), ev(0, 5, 1, 5)];
        let cfg = SplitSection { target_kinds: vec!["click".into()], ..Default::default() };
        let s = leave_one_out(&dataset(events), &cfg);
        assert_eq!((s.targets[0].train, s.targets[0].valid, s.targets[0].test), (1, 3, 4));
        let train: Vec<u32> = s.train.view().history(0).iter().map(|e| e.item).collect();
        assert_eq!(train, vec![1, 2]);
    }
}
