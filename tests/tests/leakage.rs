//! Leakage guard on real data (MovieLens-100K): no stage before the ranker ever sees an item it
//! is asked to predict. Checked on the split itself and on what the pipeline wrote.

use recfuse::config::{ConfigSources, LoadedConfig, SplitMethod, SplitSection};
use recfuse::pipeline::{run, InstructionRecord, KnowledgeRecord, RunOptions};
use recfuse::registry::Registry;
use recfuse::runstore::read_journal;
use recfuse::split::{split_dataset, SplitData};
use recfuse_e2e::*;
use recfuse_sdk::records::*;
use std::collections::HashSet;

fn ml100k() -> Dataset {
    let reg = Registry::with_builtins().unwrap();
    let services = recfuse::host::HostServices::detached("source", std::env::temp_dir(), 0);
    let cfg = serde_json::json!({"dir": ml100k_dir(), "name": "ml-100k"});
    reg.source("recbole-atomic", &cfg, services.into_ffi()).unwrap().load().unwrap()
}

/// Asserts the split's invariants for every evaluated user; returns how many were checked.
fn check_split(ds: &Dataset, split: &SplitData) -> usize {
    let mut checked = 0;
    for u in split.evaluable_users() {
        let t = split.targets[u as usize];
        let train = split.train.view().history(u);
        let hist = split.history.view().history(u);
        let train_items: HashSet<u32> = train.iter().map(|e| e.item).collect();
        let hist_items: HashSet<u32> = hist.iter().map(|e| e.item).collect();
        // ML-100K has one rating per (user, item): a target seen in train would be a leak.
        assert!(!train_items.contains(&t.test), "user {u}: test item in train");
        assert!(t.valid == NONE || !train_items.contains(&t.valid), "user {u}: validation item in train");
        assert!(train_items.contains(&t.train), "user {u}: train target missing from train");
        assert!(!hist_items.contains(&t.train) && !hist_items.contains(&t.test), "user {u}: a target in history");
        // Nothing in train happens after the test event.
        let test_time = ds.events.iter().find(|e| e.user == u && e.item == t.test).unwrap().timestamp;
        assert!(train.iter().all(|e| e.timestamp <= test_time), "user {u}: train event after the test event");
        assert_eq!(train.len(), hist.len() + 1);
        // The prediction-time context holds the validation event but never the test event.
        let context = split.context.view().history(u);
        assert!(!context.iter().any(|e| e.item == t.test), "user {u}: test item in context");
        assert!(t.valid == NONE || context.iter().any(|e| e.item == t.valid), "user {u}: validation item missing from context");
        checked += 1;
    }
    checked
}

#[test]
fn splits_never_put_a_target_in_train_or_history() {
    let ds = ml100k();
    let loo = split_dataset(&ds, &SplitSection::default());
    assert_eq!(check_split(&ds, &loo), 943);
    let temporal = SplitSection { method: SplitMethod::Temporal, ..Default::default() };
    let checked = check_split(&ds, &split_dataset(&ds, &temporal));
    assert!(checked > 50, "temporal split evaluates {checked} users");
}

#[test]
fn knowledge_and_instructions_never_mention_their_targets() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(
        d.path(),
        "leak",
        r#"
[[fusers]]
kind = "template"
max_per_kind = 100000
profile = ""
[fusers.templates]
default = "{% for i in items %}[{{ i }}]{% endfor %}"

[[instructions]]
kind = "ctr"
[[instructions]]
kind = "next-item"
[[instructions]]
kind = "rating"
[[instructions]]
kind = "explanation"
"#,
    );
    let loaded = LoadedConfig::load(&ConfigSources { base: cfg, ..Default::default() }).unwrap();
    let outcome = run(&loaded, &RunOptions::default()).unwrap();
    let ds = ml100k();
    let split = split_dataset(&ds, &SplitSection::default());
    let title = |i: u32| format!("[{}]", ds.catalog.items[i as usize].title);

    let knowledge: Vec<KnowledgeRecord> = read_journal(&outcome.run_dir.join("knowledge.jsonl")).unwrap();
    assert_eq!(knowledge.len(), 943);
    let mut mentioned_history = 0;
    for k in &knowledge {
        let t = split.targets[k.index as usize];
        // Ground truth independent of the split's own views: the user's other movies.
        let targets = [t.train, t.valid, t.test];
        let others: HashSet<String> =
            ds.events.iter().filter(|e| e.user == k.index && !targets.contains(&e.item)).map(|e| title(e.item)).collect();
        let hist_titles: HashSet<String> = split.history.view().history(k.index).iter().map(|e| title(e.item)).collect();
        for target in targets {
            let name = title(target);
            // A different movie with the same title may legitimately appear.
            if !others.contains(&name) {
                assert!(!k.text.contains(&name), "user {}: knowledge mentions target {name}", k.index);
            }
        }
        mentioned_history += hist_titles.iter().filter(|h| k.text.contains(h.as_str())).count();
    }
    assert!(mentioned_history > 90_000, "the template really lists the history ({mentioned_history})");

    let instructions: Vec<InstructionRecord> = read_journal(&outcome.run_dir.join("instructions.jsonl")).unwrap();
    let tasks: HashSet<&str> = instructions.iter().flat_map(|r| r.instructions.iter().map(|i| i.task.as_str())).collect();
    assert_eq!(tasks, HashSet::from(["ctr", "next-item", "rating", "explanation"]));
    for rec in &instructions {
        let t = split.targets[rec.user as usize];
        for i in &rec.instructions {
            // Every task's input: the knowledge, then a part starting with `Candidate`.
            let knowledge_part = i.input.split("\nCandidate").next().unwrap();
            let name = title(i.item);
            let targets = [t.train, t.valid, t.test];
            let elsewhere = ds.events.iter().any(|e| e.user == rec.user && !targets.contains(&e.item) && title(e.item) == name);
            if i.label > 0.5 && !elsewhere {
                assert!(!knowledge_part.contains(&name), "user {}: instruction input leaks {name}", rec.user);
            }
            let expected = match i.split {
                Split::Train => t.train,
                Split::Valid => t.valid,
                Split::Test => t.test,
            };
            assert!(i.label < 0.5 || i.item == expected, "positive of the wrong split");
            // Answers carry train and validation labels only: a test rating is never handed out.
            if i.task == "rating" && i.split == Split::Test {
                assert_eq!(i.output, "", "user {}: test rating leaked", rec.user);
            }
            // An explanation cites history items ("The user enjoyed A, B; <target> shares ..."),
            // never the example's own target.
            if i.task == "explanation" && !elsewhere {
                let target = &ds.catalog.items[i.item as usize].title;
                let cited = i.output.strip_prefix("The user enjoyed ").map(|r| r.split("; ").next().unwrap_or(""));
                assert!(!cited.is_some_and(|c| c.split(", ").any(|t| t == target)), "user {}: explanation cites its target", rec.user);
            }
        }
    }
}
