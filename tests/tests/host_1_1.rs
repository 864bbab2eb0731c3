//! Host and SDK 1.1, end to end on MovieLens-100K: a plugin built against the frozen 1.0 SDK
//! still loads and runs; item knowledge and vectors reach instruction builders, tuners and
//! rankers (vectors in binary side files); several instruction tasks in one run with the
//! target's value; prompts rendered for rankers through the host equal the training prompts;
//! two-stage ranking; costly rankers refused without `rerank`; saved rankers restored.
//!
//! The probe components below are linked into this test binary and registered through
//! `inventory`, exactly as built-in plugins are.

use recfuse::pipeline::{run, validate, InstructionRecord, KnowledgeRecord, RunOptions};
use recfuse::runstore::read_journal;
use recfuse::stages::rank::ModelStart;
use recfuse_e2e::*;
use recfuse_sdk::prelude::*;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// User knowledge "user <id>" with a 2-d vector; item knowledge for even items.
struct ProbeFuser;
impl KnowledgeFuser for ProbeFuser {
    type Config = Empty;
    const DESCRIPTION: &'static str = "test probe: user and item knowledge with vectors";
    fn new(_: Empty, _: Host) -> Result<Self> {
        Ok(Self)
    }
    fn fuse(&mut self, view: &TrainView, users: &[UserIdx]) -> Result<Vec<Knowledge>> {
        Ok(users
            .iter()
            .map(|&u| Knowledge {
                user: u,
                text: format!("user {} saw {}", view.catalog.users[u as usize].id, view.history(u).len()),
                vectors: vec![NamedVector { name: "cf".into(), values: vec![u as f32, 0.25] }],
            })
            .collect())
    }
    fn fuse_items(&mut self, view: &TrainView, items: &[ItemIdx]) -> Result<Vec<ItemKnowledge>> {
        Ok(items
            .iter()
            .filter(|&&i| i % 2 == 0)
            .map(|&i| ItemKnowledge {
                item: i,
                text: format!("about {}", view.catalog.items[i as usize].title),
                vectors: vec![NamedVector { name: "emb".into(), values: vec![i as f32; 3] }],
            })
            .collect())
    }
}

/// A rating-style task: the output is the target's value as the host handed it.
struct ProbeRating;
impl InstructionBuilder for ProbeRating {
    type Config = Empty;
    const DESCRIPTION: &'static str = "test probe: outputs the target value";
    fn new(_: Empty, _: Host) -> Result<Self> {
        Ok(Self)
    }
    fn build(&mut self, _view: &TrainView, requests: &[InstructionRequest]) -> Result<Vec<Instruction>> {
        Ok(requests
            .iter()
            .flat_map(|r| {
                r.targets.iter().filter(|t| t.label > 0.5).map(|t| Instruction {
                    user: r.user,
                    item: t.item,
                    split: r.split,
                    task: r.task.clone(),
                    instruction: "rate".into(),
                    input: format!("{} | {}", r.knowledge, t.knowledge),
                    output: match t.value {
                        Some(v) => format!("{v}"),
                        None => "none".into(),
                    },
                    label: t.label,
                })
            })
            .collect())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptConfig {
    #[serde(default)]
    seconds_per_candidate: f64,
}

/// Scores by rendering the `ctr` prompt through the host; in `fit` it renders each user's
/// train-target prompt and writes it down, so the test can compare with the training prompts.
struct ProbePrompt {
    host: Host,
    cfg: PromptConfig,
    knowledge: HashMap<UserIdx, String>,
    items: HashMap<ItemIdx, String>,
}
impl ProbePrompt {
    fn request(&self, user: UserIdx, item: ItemIdx, split: Split) -> InstructionRequest {
        InstructionRequest {
            user,
            split,
            task: "ctr".into(),
            knowledge: self.knowledge.get(&user).cloned().unwrap_or_default(),
            targets: vec![Target { item, label: 0.0, value: None, knowledge: self.items.get(&item).cloned().unwrap_or_default() }],
        }
    }
}
impl Ranker for ProbePrompt {
    type Config = PromptConfig;
    const DESCRIPTION: &'static str = "test probe: scores prompts rendered by the host";
    fn new(cfg: PromptConfig, host: Host) -> Result<Self> {
        Ok(Self { host, cfg, knowledge: HashMap::new(), items: HashMap::new() })
    }
    fn fit(&mut self, view: &TrainView, inputs: &FitInputs) -> Result<()> {
        ensure!(self.host.tasks().contains(&"ctr".to_string()), "tasks: {:?}", self.host.tasks());
        ensure!(!inputs.item_knowledge.is_empty(), "no item knowledge reached the ranker");
        ensure!(inputs.knowledge.iter().all(|k| k.vectors.len() == 1), "user vectors missing");
        self.knowledge = inputs.knowledge.iter().map(|k| (k.user, k.text.clone())).collect();
        self.items = inputs.item_knowledge.iter().map(|k| (k.item, k.text.clone())).collect();
        let mut f = std::fs::File::create(self.host.run_dir().join("rendered.jsonl"))?;
        for u in 0..view.n_users() as u32 {
            if let Some(last) = view.history(u).last() {
                let out = self.host.instructions("ctr", &[self.request(u, last.item, Split::Train)])?;
                writeln!(f, "{}", serde_json::to_string(&(u, last.item, &out[0].input, &out[0].task))?)?;
            }
        }
        Ok(())
    }
    fn score(&self, batch: &ScoreBatch, out: &mut [f32]) -> Result<()> {
        let n = batch.per_user();
        for (row, &u) in batch.users.iter().enumerate() {
            let reqs: Vec<InstructionRequest> = batch.candidates(row).iter().map(|&i| self.request(u, i, Split::Test)).collect();
            let rendered = self.host.instructions("ctr", &reqs)?;
            for (j, ins) in rendered.iter().enumerate() {
                out[row * n + j] = -(ins.input.len() as f32);
            }
        }
        Ok(())
    }
    fn seconds_per_candidate(&self) -> f64 {
        self.cfg.seconds_per_candidate
    }
}

export_plugin! {
    name: "host-1-1-probes",
    fusers: { "probe-fuser" => ProbeFuser },
    instructions: { "probe-rating" => ProbeRating },
    rankers: { "probe-prompt" => ProbePrompt },
}

fn run_config(path: &Path, sets: &[&str]) -> anyhow::Result<recfuse::pipeline::RunOutcome> {
    run(&load_config(path, sets), &RunOptions::default())
}

const PROBE_PIPELINE: &str = r#"
[eval]
max_users = 24

[[fusers]]
kind = "probe-fuser"

[[instructions]]
kind = "ctr"
task = "ctr"

[[instructions]]
kind = "probe-rating"
task = "rating"

[tuner]
kind = "identity"

[[rankers]]
kind = "popularity"

[[rankers]]
kind = "probe-prompt"
label = "prompt"
rerank = { from = "popularity", top = 5 }
"#;

#[test]
fn item_knowledge_tasks_values_rendering_and_two_stage() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "probe", &format!("[run]\nsample_users = 40\n{PROBE_PIPELINE}").replacen("[run]\nsample_users = 40\n", "", 1));
    // sample_users belongs to [run]: add it there.
    let text = std::fs::read_to_string(&cfg).unwrap().replacen("batch_size = 128", "batch_size = 16\nsample_users = 40", 1);
    std::fs::write(&cfg, text).unwrap();
    let out = run_config(&cfg, &[]).unwrap();
    let dir = &out.run_dir;

    // Knowledge: texts in JSONL, vectors in binary side files.
    let users: Vec<KnowledgeRecord> = read_journal(&dir.join("knowledge.jsonl")).unwrap();
    assert_eq!(users.len(), 40);
    assert!(users.iter().all(|k| k.vectors == ["cf"]));
    let raw = std::fs::read_to_string(dir.join("knowledge.jsonl")).unwrap();
    assert!(!raw.contains("0.25"), "vector values must not be JSON floats");
    assert!(std::fs::read_dir(dir.join("knowledge.vectors")).unwrap().count() >= 3, "one side file per batch of 16");
    let items: Vec<KnowledgeRecord> = read_journal(&dir.join("item_knowledge.jsonl")).unwrap();
    assert!(!items.is_empty() && items.iter().all(|k| k.index % 2 == 0 && k.text.starts_with("about ")));
    let kb = recfuse::knowledge::KnowledgeBase::load(dir).unwrap();
    assert_eq!(kb.view().item(2).unwrap().vectors[0].values, vec![2.0; 3]);
    assert_eq!(kb.view().user(7).unwrap().vectors[0].values, vec![7.0, 0.25]);

    // Two tasks per user, tagged; the rating task sees train/valid values, never the test one.
    let records: Vec<InstructionRecord> = read_journal(&dir.join("instructions.jsonl")).unwrap();
    assert!(!records.is_empty());
    let mut seen_value = false;
    for rec in &records {
        let tasks: std::collections::BTreeSet<&str> = rec.instructions.iter().map(|i| i.task.as_str()).collect();
        assert_eq!(tasks.into_iter().collect::<Vec<_>>(), ["ctr", "rating"]);
        for i in rec.instructions.iter().filter(|i| i.task == "rating") {
            match i.split {
                Split::Test => assert_eq!(i.output, "none", "the test target's value leaked"),
                _ => {
                    let v: f32 = i.output.parse().unwrap_or_else(|_| panic!("no value for {:?}", i));
                    assert!((1.0..=5.0).contains(&v));
                    seen_value = true;
                }
            }
        }
        // Item knowledge reached the builders.
        for i in rec.instructions.iter().filter(|i| i.task == "ctr" && i.item % 2 == 0) {
            assert!(i.input.contains("About the candidate: about "), "{}", i.input);
        }
    }
    assert!(seen_value);
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tuner/identity.json")).unwrap()).unwrap();
    assert_eq!(stats["tasks"].as_object().unwrap().len(), 2, "{stats}");
    assert!(stats["items_with_knowledge"].as_u64().unwrap() > 0, "{stats}");

    // Prompts rendered through the host for the ranker = the prompts the tuner trained on.
    let train_prompts: HashMap<(u32, u32), String> = records
        .iter()
        .flat_map(|r| r.instructions.iter())
        .filter(|i| i.task == "ctr" && i.split == Split::Train && i.label > 0.5)
        .map(|i| ((i.user, i.item), i.input.clone()))
        .collect();
    let rendered = std::fs::read_to_string(dir.join("components/rankers1/rendered.jsonl")).unwrap();
    let mut compared = 0;
    for line in rendered.lines() {
        let (u, item, input, task): (u32, u32, String, String) = serde_json::from_str(line).unwrap();
        assert_eq!(task, "ctr");
        if let Some(expected) = train_prompts.get(&(u, item)) {
            assert_eq!(&input, expected, "user {u}: scoring prompt drifted from the training prompt");
            compared += 1;
        }
    }
    assert_eq!(compared, train_prompts.len(), "every training prompt was re-rendered");

    // Two-stage: the reranked list keeps the first stage's top 5 as its top 5.
    let pop = out.report("popularity").unwrap();
    let prompt = out.report("prompt").unwrap();
    let rr = prompt.reranked.as_ref().unwrap();
    assert_eq!((rr.from.as_str(), rr.top), ("popularity", 5));
    assert_eq!(prompt.segments["all"].users, pop.segments["all"].users);
    assert_eq!(prompt.segments["all"].metrics["HR@5"], pop.segments["all"].metrics["HR@5"]);
    assert!(prompt.seconds_per_user > 0.0);
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("prompt (top 5 of popularity)"), "{md}");
}

#[test]
fn reranking_with_the_same_order_gives_the_first_stage_metrics() {
    let d = tempfile::tempdir().unwrap();
    let extra = "[eval]\nmax_users = 200\n\n[[rankers]]\nkind = \"popularity\"\n\n[[rankers]]\nkind = \"popularity\"\nlabel = \"again\"\nrerank = { from = \"popularity\", top = 20 }\n";
    let cfg = ml100k_config(d.path(), "same", extra);
    let out = run_config(&cfg, &[]).unwrap();
    let (a, b) = (out.report("popularity").unwrap(), out.report("again").unwrap());
    for m in ["HR@5", "HR@10", "NDCG@10", "MRR@10", "UAUC"] {
        assert!((a.segments["all"].metrics[m] - b.segments["all"].metrics[m]).abs() < 1e-9, "{m}");
    }
    // Sampled protocol too.
    let out = run_config(&cfg, &["eval.protocol=sampled", "run.name=same-sampled"]).unwrap();
    let (a, b) = (out.report("popularity").unwrap(), out.report("again").unwrap());
    assert!((a.segments["all"].metrics["NDCG@10"] - b.segments["all"].metrics["NDCG@10"]).abs() < 1e-9);
}

#[test]
fn costly_ranker_without_rerank_is_refused_with_an_estimate() {
    let d = tempfile::tempdir().unwrap();
    let extra = "[[rankers]]\nkind = \"popularity\"\n\n[[rankers]]\nkind = \"probe-prompt\"\nseconds_per_candidate = 0.01\n";
    let cfg = ml100k_config(d.path(), "costly", extra);
    let e = format!("{:#}", validate(&load_config(&cfg, &[])).unwrap_err());
    assert!(e.contains("rankers[1]") && e.contains("rerank") && e.contains(" h,"), "{e}");
    assert!(run_config(&cfg, &[]).is_err(), "run refuses too");
    // Reranking the top 20 of 943 users at 0.01 s is ≈ 3 min: accepted.
    let text = std::fs::read_to_string(&cfg).unwrap().replace("seconds_per_candidate = 0.01", "seconds_per_candidate = 0.01\nrerank = { from = \"popularity\", top = 20 }");
    std::fs::write(&cfg, text).unwrap();
    validate(&load_config(&cfg, &[])).unwrap();
    // A first stage that is not an earlier single-stage ranker is a config error naming the key.
    let e = format!("{:#}", recfuse::config::LoadedConfig::load(&recfuse::config::ConfigSources {
        base: cfg.clone(),
        sets: vec!["rankers[1].rerank.from=sasrec".into()],
        ..Default::default()
    }).unwrap_err());
    assert!(e.contains("rankers[1].rerank.from") && e.contains("sasrec"), "{e}");
}

#[test]
fn saved_rankers_are_restored_not_refitted() {
    let d = tempfile::tempdir().unwrap();
    let extra = "[eval]\nmax_users = 100\n\n[[rankers]]\nkind = \"popularity\"\n\n[[rankers]]\nkind = \"bpr\"\nepochs = 3\ndim = 16\n";
    let cfg = ml100k_config(d.path(), "saved", extra);
    let first = run_config(&cfg, &[]).unwrap();
    assert_eq!(first.model("bpr"), Some(ModelStart::Fitted));
    assert!(first.run_dir.join("rankers/bpr/model.safetensors").exists());
    assert!(first.run_dir.join("rankers/bpr/checkpoint.safetensors").exists(), "epoch checkpoint");
    // The report lost but not the journal of outcomes: the report is recomputed from it,
    // nothing is scored or fitted again.
    std::fs::remove_file(first.run_dir.join("reports/bpr.json")).unwrap();
    let again = run_config(&cfg, &[]).unwrap();
    assert_eq!(again.model("bpr"), None);
    assert_eq!(again.report("bpr").unwrap().segments, first.report("bpr").unwrap().segments);
    // As if killed after fitting, before any user was evaluated: the model is restored.
    std::fs::remove_file(first.run_dir.join("reports/bpr.json")).unwrap();
    std::fs::remove_file(first.run_dir.join("reports/bpr.outcomes.jsonl")).unwrap();
    let second = run_config(&cfg, &[]).unwrap();
    assert_eq!(second.model("bpr"), Some(ModelStart::Restored));
    assert_eq!(second.model("popularity"), None, "finished rankers are not touched");
    assert_eq!(first.report("bpr"), second.report("bpr").map(|r| &*r).map(|r| {
        let mut r = r.clone();
        r.seconds_per_user = first.report("bpr").unwrap().seconds_per_user;
        r
    }).as_ref());
    // Another config of the ranker is fitted afresh, never restored from the old save.
    let third = run_config(&cfg, &["rankers[1].epochs=4"]).unwrap();
    assert_eq!(third.model("bpr"), Some(ModelStart::Fitted));
}

/// A plugin built against the frozen 1.0 SDK: checked against the 1.0 layouts, driven through
/// adapters; every component works and the 1.1 features degrade as documented (no item
/// knowledge, no saving: a rerun that needs the ranker fits it again).
#[test]
fn plugin_built_against_sdk_1_0_runs_in_a_1_1_host() {
    let lib = abi_1_0_plugin();
    let d = tempfile::tempdir().unwrap();
    let extra = format!(
        "[plugins]\npaths = [\"{}\"]\n\n[eval]\nmax_users = 50\n\n[[fusers]]\nkind = \"count-1-0\"\n\n[instructions]\nkind = \"plain-1-0\"\n\n[tuner]\nkind = \"count-1-0\"\n\n[[rankers]]\nkind = \"popularity-1-0\"\n\n[[rankers]]\nkind = \"popularity\"\nlabel = \"rerank-1-0\"\nrerank = {{ from = \"popularity-1-0\", top = 10 }}\n",
        lib.display()
    );
    let cfg = ml100k_config(d.path(), "old", &extra);
    let text = std::fs::read_to_string(&cfg).unwrap().replacen("batch_size = 128", "batch_size = 128\nsample_users = 60", 1);
    std::fs::write(&cfg, text).unwrap();
    let out = run_config(&cfg, &[]).unwrap();
    let dir = &out.run_dir;
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let old: Vec<&serde_json::Value> =
        manifest["components"].as_array().unwrap().iter().filter(|c| c["plugin"] == "abi-1-0-plugin").collect();
    assert_eq!(old.len(), 4);
    assert!(old.iter().all(|c| c["abi"]["major"] == 1 && c["abi"]["minor"] == 0), "{old:?}");
    assert_eq!(manifest["sdk_abi"], "1.1");
    // Every 1.0 method answered through the adapters.
    let k: Vec<KnowledgeRecord> = read_journal(&dir.join("knowledge.jsonl")).unwrap();
    assert_eq!(k.len(), 60);
    assert!(k.iter().all(|k| k.text.starts_with("seen ") && k.errors.is_empty()));
    let items: Vec<KnowledgeRecord> = read_journal(&dir.join("item_knowledge.jsonl")).unwrap();
    assert!(items.is_empty(), "a 1.0 fuser knows no items");
    let ins: Vec<InstructionRecord> = read_journal(&dir.join("instructions.jsonl")).unwrap();
    assert!(!ins.is_empty());
    // The host tags examples with the configured task (default: the builder's kind).
    assert!(ins.iter().flat_map(|r| &r.instructions).all(|i| i.task == "plain-1-0" && i.input.contains(" | item ")));
    let counts = std::fs::read_to_string(dir.join("tuner/counts.txt")).unwrap();
    assert!(counts.split(' ').all(|n| n.parse::<usize>().unwrap() > 0), "{counts}");
    let pop = out.report("popularity-1-0").unwrap();
    assert!(pop.segments["all"].metrics["HR@10"] > 0.0);
    assert!(out.report("rerank-1-0").unwrap().reranked.is_some());
    // A 1.0 ranker cannot save: a rerun that needs it fits it again.
    let fits = |dir: &Path| std::fs::read_to_string(dir.join("components/rankers0/fits.txt")).unwrap();
    assert_eq!(fits(dir), "1");
    std::fs::remove_file(dir.join("reports/popularity-1-0.json")).unwrap();
    std::fs::remove_file(dir.join("reports/popularity-1-0.outcomes.jsonl")).unwrap();
    let again = run_config(&cfg, &[]).unwrap();
    assert_eq!(again.model("popularity-1-0"), Some(ModelStart::Fitted));
    assert_eq!(fits(dir), "2");
    // Its `recfuse plugins` line says 1.0.
    let (code, listing) = cli(&["plugins", "--path", lib.to_str().unwrap()]);
    assert_eq!(code, Ok(0));
    assert!(listing.lines().any(|l| l.starts_with("ranker") && l.contains("popularity-1-0") && l.contains(" 1.0 ")), "{listing}");
}
