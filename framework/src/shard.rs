//! Sharded runs (docs/scale-out.md): the per-user stages of one run split across processes or
//! machines, by a stable hash of the user id, through the engines teams already run
//! (Kubernetes Indexed Jobs, Slurm arrays).
//!
//! The flow, for a pipeline with fusers and a tuner:
//! 1. `recfuse run CONFIG --shard i/n` for every i: each fuses its users (and items) into
//!    `RUN/shards/<i>-of-<n>/`, resuming from its own journal if killed.
//! 2. `recfuse prepare CONFIG`: merges the shards' knowledge into the run directory, then runs
//!    the stages that need every user at once (instructions, tuning, ranker fits).
//! 3. `recfuse run CONFIG --shard i/n` again: now that the run is prepared, each shard
//!    evaluates its users with every ranker (LLM reranking is the costly part), journaling
//!    per-user outcomes.
//! 4. `recfuse merge RUN`: one report from every shard's outcomes, equal to an unsharded run's.
//!
//! Without fusers, step 1 has nothing to do. Every step refuses shards that are missing, of
//! another count, or keyed by another config or dataset.

use crate::eval::{Outcome, ReportFrame, RerankInfo, Report};
use crate::knowledge::{latest_records, read_vectors, write_batch_vectors, KnowledgeRecord, Side};
use crate::runstore::{hash_parts, read_journal, write_atomic, Journal, RunDir};
use anyhow::{bail, ensure, Context, Result};
use recfuse_sdk::records::{NamedVector, UserIdx};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for ShardSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (i, n) = s.split_once('/').with_context(|| format!("`{s}` is not a shard: write INDEX/COUNT, e.g. 0/4"))?;
        let index: usize = i.trim().parse().with_context(|| format!("shard index `{i}` is not a number"))?;
        let count: usize = n.trim().parse().with_context(|| format!("shard count `{n}` is not a number"))?;
        Self::new(index, count)
    }
}

impl ShardSpec {
    pub fn new(index: usize, count: usize) -> Result<Self> {
        ensure!(count >= 1, "the shard count must be at least 1");
        ensure!(index < count, "shard index {index} is out of range for {count} shards (indices run from 0 to {})", count - 1);
        Ok(Self { index, count })
    }

    /// The shard from the environment of the engine running this process:
    /// * Slurm job arrays: `SLURM_ARRAY_TASK_ID` (minus `SLURM_ARRAY_TASK_MIN`, so `--array=1-8`
    ///   works too) of `SLURM_ARRAY_TASK_COUNT`;
    /// * Kubernetes Indexed Jobs: `JOB_COMPLETION_INDEX` of `count` (the Job's `completions`,
    ///   given by `--shards` or `run.shards`, as the Job does not export it).
    pub fn from_env(env: impl Fn(&str) -> Option<String>, count: Option<usize>) -> Result<Self> {
        let num = |name: &str| -> Result<Option<usize>> {
            env(name).map(|v| v.trim().parse::<usize>().with_context(|| format!("environment variable {name}=`{v}` is not a number"))).transpose()
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let n = num("SLURM_ARRAY_TASK_COUNT")?.context("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")?;
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            ensure!(id >= min, "SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}");
            return Self::new(id - min, n).context("from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (the array must be a contiguous range)");
        }
        if let Some(i) = num("JOB_COMPLETION_INDEX")? {
            let n = count.context("JOB_COMPLETION_INDEX is set, but not the shard count: give `--shards N` or `run.shards` (the Job's completions)")?;
            return Self::new(i, n).context("from JOB_COMPLETION_INDEX");
        }
        bail!("`--shard` without INDEX/COUNT reads them from the engine: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set")
    }

    /// The shard a user or item id belongs to: the first 8 bytes of its sha256, modulo the
    /// count. Stable across processes, machines, resumes and catalog order.
    pub fn of(id: &str, count: usize) -> usize {
        let h = hash_parts(&[id.as_bytes()]);
        (u64::from_str_radix(&h[..16], 16).expect("hex") % count as u64) as usize
    }

    pub fn owns(&self, id: &str) -> bool {
        Self::of(id, self.count) == self.index
    }

    /// The shard's directory under the run directory.
    pub fn dir(&self, run_root: &Path) -> PathBuf {
        run_root.join("shards").join(format!("{}-of-{}", self.index, self.count))
    }
}

/// Written by `recfuse prepare` once every global stage is done: the keys the shards' work
/// must have been done under, and what the report needs. Shards evaluate only when it matches
/// their own keys; `merge` checks their outcomes against it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Plan {
    /// Hash of every stage key of the run.
    pub key: String,
    pub frame: ReportFrame,
    /// Users to evaluate, and the sha256 of their sorted indices.
    pub users: usize,
    pub users_sha256: String,
    pub rankers: Vec<PlannedRanker>,
    /// Malformed lines the source skipped (lenient mode), for the report.
    pub skipped_lines: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PlannedRanker {
    pub label: String,
    /// Key of its `evaluate.<label>` stage.
    pub key: String,
    pub reranked: Option<RerankInfo>,
}

pub const PLAN: &str = "plan.json";

impl Plan {
    pub fn users_hash(users: &[UserIdx]) -> String {
        let mut sorted = users.to_vec();
        sorted.sort_unstable();
        let bytes: Vec<u8> = sorted.iter().flat_map(|u| u.to_le_bytes()).collect();
        hash_parts(&[&bytes])
    }

    /// The plan `recfuse prepare` left in `run_root`, if any.
    pub fn read(run_root: &Path) -> Result<Option<Plan>> {
        let path = run_root.join(PLAN);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not a plan", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn write(&self, run_root: &Path) -> Result<()> {
        write_atomic(&run_root.join(PLAN), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// The shard directories of a run that ran `stage` (a state file in their `stages/`; a stage
/// ending in `.` means any stage of that family, e.g. `evaluate.`), checked to be one complete
/// set: a single count, every index present. Empty when no shard ran it.
pub fn shards_with(run_root: &Path, stage: &str) -> Result<Vec<(ShardSpec, RunDir)>> {
    let ran = |dir: &Path| -> bool {
        let Ok(entries) = std::fs::read_dir(dir.join("stages")) else { return false };
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(name) = name.strip_suffix(".json") else { return false };
            if stage.ends_with('.') { name.starts_with(stage) } else { name == stage }
        })
    };
    let dir = run_root.join("shards");
    let mut found: Vec<ShardSpec> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((i, n)) = name.split_once("-of-") else { continue };
            let (Ok(i), Ok(n)) = (i.parse(), n.parse()) else { continue };
            let Ok(spec) = ShardSpec::new(i, n) else { continue };
            if ran(&e.path()) {
                found.push(spec);
            }
        }
    }
    let shown = if stage.ends_with('.') { format!("{stage}*") } else { stage.to_string() };
    if found.is_empty() {
        return Ok(vec![]);
    }
    found.sort_by_key(|s| (s.count, s.index));
    let counts: std::collections::BTreeSet<usize> = found.iter().map(|s| s.count).collect();
    if counts.len() > 1 {
        let names: Vec<String> = found.iter().map(|s| format!("{}-of-{}", s.index, s.count)).collect();
        bail!(
            "shards of different counts ({}) in {} ran `{shown}`: {}; keep one set (delete the directories of the other count)",
            counts.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" and "),
            dir.display(),
            names.join(", ")
        );
    }
    let count = found[0].count;
    let have: HashSet<usize> = found.iter().map(|s| s.index).collect();
    let missing: Vec<String> = (0..count).filter(|i| !have.contains(i)).map(|i| format!("{i}/{count}")).collect();
    ensure!(
        missing.is_empty(),
        "shard {} missing: {} has no `{shown}` state of it (run the shard, then this again)",
        missing.join(", "),
        dir.display()
    );
    found.sort_by_key(|s| s.index);
    found.into_iter().map(|s| Ok((s, RunDir::open(s.dir(run_root))?))).collect()
}

/// Checks every shard finished `stage` under `key`, naming the ones that did not.
fn check_done(shards: &[(ShardSpec, RunDir)], stage: &str, key: &str) -> Result<()> {
    let mut problems = Vec::new();
    for (spec, dir) in shards {
        match dir.state(stage) {
            Some(s) if s.key != key => problems.push(format!("shard {spec} ran `{stage}` with another config or dataset (key {} ≠ {})", &s.key[..12], &key[..12])),
            Some(s) if !s.done => problems.push(format!("shard {spec} has not finished `{stage}`: rerun it")),
            Some(_) => {}
            None => problems.push(format!("shard {spec} has no `{stage}` state")),
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// Merges the shards' knowledge (`fuse` stage done under `key`) into the run directory, as an
/// unsharded run would have written it: records in index order, vectors in batches of
/// `batch` records. Marks the run's `fuse` stage done. Also sums the components' usage.
pub fn merge_knowledge(run: &RunDir, key: &str, batch: usize) -> Result<usize> {
    let shards = shards_with(&run.root, "fuse")?;
    ensure!(!shards.is_empty(), "no shard in {} has fused", run.path("shards").display());
    check_done(&shards, "fuse", key)?;
    let outputs = crate::stages::fuse::OUTPUTS;
    run.begin("fuse", key, &outputs)?;
    for side in [Side::Users, Side::Items] {
        for p in [run.path(side.journal()), run.path(side.vector_dir())] {
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else if p.exists() {
                std::fs::remove_file(&p)?;
            }
        }
        let mut records: BTreeMap<u32, (KnowledgeRecord, ShardSpec)> = BTreeMap::new();
        let mut vectors: BTreeMap<(u32, String), Vec<f32>> = BTreeMap::new();
        for (spec, dir) in &shards {
            let path = dir.path(side.journal());
            if !path.exists() {
                continue;
            }
            for r in latest_records(read_journal(&path)?) {
                ensure!(r.errors.is_empty(), "shard {spec}: {} {} has no knowledge ({}); rerun the shard", side.journal(), r.id, r.errors.join("; "));
                if let Some((other, s)) = records.get(&r.index) {
                    bail!("{} {} was fused by two shards ({s} and {spec}): the shards were not run with the same count", side.journal(), other.id);
                }
                records.insert(r.index, (r, *spec));
            }
            vectors.extend(read_vectors(&dir.path(side.vector_dir()))?);
        }
        let (mut journal, _) = Journal::open::<KnowledgeRecord>(&run.path(side.journal()))?;
        let all: Vec<KnowledgeRecord> = records.into_values().map(|(r, _)| r).collect();
        let mut seq = 0;
        for chunk in all.chunks(batch.max(1)) {
            let mut batch_vectors: Vec<(u32, NamedVector)> = Vec::new();
            for r in chunk {
                for name in &r.vectors {
                    let values = vectors
                        .remove(&(r.index, name.clone()))
                        .with_context(|| format!("{}: vector `{name}` of {} is missing from its shard", side.journal(), r.id))?;
                    batch_vectors.push((r.index, NamedVector { name: name.clone(), values }));
                }
            }
            let refs: Vec<(u32, &NamedVector)> = batch_vectors.iter().map(|(i, v)| (*i, v)).collect();
            write_batch_vectors(&run.path(side.vector_dir()), seq, &refs)?;
            journal.append(chunk)?;
            seq += chunk.len();
        }
    }
    merge_usage(run, &shards)?;
    run.finish("fuse", key, 0.0)?;
    let users = read_journal::<KnowledgeRecord>(&run.path(Side::Users.journal()))?.len();
    tracing::info!(shards = shards.len(), users, "merged the shards' knowledge");
    Ok(shards.len())
}

/// Each component's `usage.json` summed over the shards (numbers added, the rest kept), so the
/// manifest counts every request and token the run paid for.
fn merge_usage(run: &RunDir, shards: &[(ShardSpec, RunDir)]) -> Result<()> {
    let mut total: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (_, dir) in shards {
        let Ok(entries) = std::fs::read_dir(dir.path("components")) else { continue };
        for e in entries.flatten() {
            let path = e.path().join("usage.json");
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            match total.get_mut(&name) {
                Some(acc) => add_json(acc, &v),
                None => {
                    total.insert(name, v);
                }
            }
        }
    }
    for (name, v) in total {
        let dir = run.path("components").join(&name);
        std::fs::create_dir_all(&dir)?;
        write_atomic(&dir.join("usage.json"), serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}

fn add_json(acc: &mut serde_json::Value, v: &serde_json::Value) {
    use serde_json::Value;
    match (acc, v) {
        (Value::Number(a), Value::Number(b)) => {
            *a = match (a.as_u64(), b.as_u64()) {
                (Some(x), Some(y)) => (x + y).into(),
                _ => serde_json::Number::from_f64(a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0)).unwrap_or_else(|| a.clone()),
            }
        }
        (Value::Object(a), Value::Object(b)) => {
            for (k, bv) in b {
                match a.get_mut(k) {
                    Some(av) => add_json(av, bv),
                    None => {
                        a.insert(k.clone(), bv.clone());
                    }
                }
            }
        }
        _ => {}
    }
}

/// What `recfuse merge` merged.
pub struct Merged {
    /// Shards whose knowledge was merged (0: none, or merged earlier by `prepare`).
    pub knowledge_shards: usize,
    /// Whether `prepare` has run (its plan is there).
    pub prepared: bool,
    /// Shards whose evaluation was merged, and the reports (empty: not prepared, or no rankers).
    pub shards: usize,
    pub reports: Vec<Report>,
}

impl Merged {
    pub fn failed(&self) -> Vec<&str> {
        self.reports.iter().filter(|r| r.error.is_some()).map(|r| r.model.as_str()).collect()
    }
}

/// `recfuse merge RUN`: whatever the shards have done that the run directory lacks.
/// * Knowledge the shards fused and `prepare` has not merged yet (all shards must have fused
///   under one key; `prepare` later checks that key against its config).
/// * Once the run is prepared, each ranker's report from the outcomes of every shard, computed
///   as an unsharded run computes it (so equal to it), written where an unsharded run writes
///   it. A ranker that a shard could not evaluate is reported as failed with the shard's error.
pub fn merge(run_root: &Path) -> Result<Merged> {
    let run = RunDir::open(run_root.to_path_buf())?;
    let mut knowledge_shards = 0;
    let fused = shards_with(run_root, "fuse")?;
    if let Some(key) = fused.first().and_then(|(_, dir)| dir.state("fuse")).map(|s| s.key) {
        if !run.is_done("fuse", &key) {
            knowledge_shards = merge_knowledge(&run, &key, batch_size_of(&fused[0].1))?;
        }
    }
    let Some(plan) = Plan::read(run_root)? else {
        ensure!(
            knowledge_shards > 0,
            "{} is not prepared (no {PLAN}) and no shard has knowledge to merge: run the shards, then `recfuse prepare CONFIG`",
            run_root.display()
        );
        return Ok(Merged { knowledge_shards, prepared: false, shards: 0, reports: vec![] });
    };
    if plan.rankers.is_empty() {
        return Ok(Merged { knowledge_shards, prepared: true, shards: 0, reports: vec![] });
    }
    let shards = shards_with(run_root, "evaluate.")?;
    ensure!(!shards.is_empty(), "no shard in {} has evaluated: run the shards (`recfuse run CONFIG --shard i/n`) first", run.path("shards").display());
    let mut reports = Vec::new();
    std::fs::create_dir_all(run.path("reports"))?;
    for ranker in &plan.rankers {
        let stage = format!("evaluate.{}", ranker.label);
        match gather_outcomes(&shards, &stage, &ranker.key, &ranker.label) {
            Ok(mut outcomes) => {
                let users: Vec<UserIdx> = outcomes.iter().map(|o| o.user).collect();
                ensure!(
                    users.len() == plan.users && Plan::users_hash(&users) == plan.users_sha256,
                    "`{}`: the shards evaluated {} users, not the {} users the run was prepared for (shards of another count or config?)",
                    ranker.label,
                    users.len(),
                    plan.users
                );
                let report = plan.frame.report(&ranker.label, ranker.reranked.clone(), &mut outcomes);
                // The run directory as an unsharded run leaves it: outcomes, report, stage done.
                let outcomes_path = run.path(&format!("reports/{}.outcomes.jsonl", ranker.label));
                let _ = std::fs::remove_file(&outcomes_path);
                run.begin(&stage, &ranker.key, &[])?;
                Journal::open::<Outcome>(&outcomes_path)?.0.append(&outcomes)?;
                write_atomic(&run.path(&format!("reports/{}.json", ranker.label)), serde_json::to_string_pretty(&report)?.as_bytes())?;
                run.finish(&stage, &ranker.key, 0.0)?;
                reports.push(report);
            }
            Err(e) => reports.push(plan.frame.failed(&ranker.label, format!("{e:#}"))),
        }
    }
    crate::pipeline::write_run_reports(&run, &reports, plan.skipped_lines)?;
    Ok(Merged { knowledge_shards, prepared: true, shards: shards.len(), reports })
}

/// `run.batch_size` of the config a shard ran with (vectors are merged in batches of it, as an
/// unsharded run writes them).
fn batch_size_of(shard: &RunDir) -> usize {
    let text = std::fs::read_to_string(shard.path("config.resolved.toml")).unwrap_or_default();
    let value: toml::Value = toml::from_str(&text).unwrap_or(toml::Value::Table(Default::default()));
    value.get("run").and_then(|r| r.get("batch_size")).and_then(|b| b.as_integer()).map(|b| b as usize).unwrap_or(crate::config::DEFAULT_BATCH_SIZE)
}

/// Every shard's outcomes of one ranker; an error names the shards that did not finish it (with
/// the error a shard recorded) or ran it under another key.
fn gather_outcomes(shards: &[(ShardSpec, RunDir)], stage: &str, key: &str, label: &str) -> Result<Vec<Outcome>> {
    if let Err(e) = check_done(shards, stage, key) {
        let why: Vec<String> = shards
            .iter()
            .filter_map(|(spec, dir)| {
                let text = std::fs::read_to_string(dir.path(&format!("reports/{label}.json"))).ok()?;
                let r: Report = serde_json::from_str(&text).ok()?;
                Some(format!("shard {spec}: {}", r.error?))
            })
            .collect();
        return Err(if why.is_empty() { e } else { e.context(why.join("; ")) });
    }
    let mut all: Vec<Outcome> = Vec::new();
    let mut seen: HashSet<UserIdx> = HashSet::new();
    for (spec, dir) in shards {
        for o in read_journal::<Outcome>(&dir.path(&format!("reports/{label}.outcomes.jsonl")))? {
            ensure!(seen.insert(o.user), "user {} was evaluated by two shards (the second is {spec})", o.user);
            all.push(o);
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_and_come_from_the_engines() {
        assert_eq!("2/4".parse::<ShardSpec>().unwrap(), ShardSpec { index: 2, count: 4 });
        assert!("4/4".parse::<ShardSpec>().unwrap_err().to_string().contains("out of range"));
        assert!("a/4".parse::<ShardSpec>().is_err());
        let env = |vars: &'static [(&'static str, &'static str)]| move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let slurm = env(&[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "3"), ("SLURM_ARRAY_TASK_MIN", "1")]);
        assert_eq!(ShardSpec::from_env(slurm, None).unwrap(), ShardSpec { index: 2, count: 3 });
        let k8s = env(&[("JOB_COMPLETION_INDEX", "1")]);
        assert_eq!(ShardSpec::from_env(k8s, Some(4)).unwrap(), ShardSpec { index: 1, count: 4 });
        assert!(ShardSpec::from_env(k8s, None).unwrap_err().to_string().contains("--shards"));
        assert!(ShardSpec::from_env(env(&[]), Some(2)).is_err());
    }

    #[test]
    fn every_id_has_exactly_one_shard_and_keeps_it() {
        let ids: Vec<String> = (0..2000).map(|i| format!("user{i}")).collect();
        let specs: Vec<ShardSpec> = (0..4).map(|i| ShardSpec::new(i, 4).unwrap()).collect();
        let mut sizes = [0usize; 4];
        for id in &ids {
            let owners: Vec<usize> = specs.iter().filter(|s| s.owns(id)).map(|s| s.index).collect();
            assert_eq!(owners.len(), 1, "{id}");
            sizes[owners[0]] += 1;
        }
        // The same hash every time (not a per-process random hasher): a known id, a known shard.
        assert_eq!(ShardSpec::of("user0", 4), ShardSpec::of("user0", 4));
        assert!(sizes.iter().all(|&n| (400..600).contains(&n)), "unbalanced: {sizes:?}");
    }
}
