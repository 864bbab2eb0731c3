//! `kind = "llm"`: HKFR's last step. The run's instruction-tuned model (the base model plus
//! the `lora` tuner's adapters for the task) scores candidates through the prompts of the
//! task's own instruction builder (`Host::instructions`), so a candidate is asked about
//! exactly as the tuner's examples were written.
//!
//! * `score = "yes-no"` (CTR): the log-odds of the task's "yes" answer against its "no"
//!   answer at the answer position (their first tokens).
//! * `score = "likelihood"` (next item): the log-likelihood of the candidate's answer text
//!   (summed, or per token with `per_token = true`).
//!
//! A user's candidates share most of their prompt (instruction and knowledge): that prefix
//! runs once and every candidate's suffix attends to its cached keys and values, suffixes
//! batched. Scores are journaled in the ranker's directory (`scores.bin`, keyed by prompt
//! hash) as each user finishes, so an interrupted evaluation resumes without rescoring.
//! Costly: use it as the second stage of two-stage ranking (`rerank = { from, top }`).

pub mod cache;

use cache::ScoreCache;
use recfuse_llm_engine::tunable::lora::{Adapter, LoraStack};
use recfuse_llm_engine::tunable::score::{log_probs, Query, Work};
use recfuse_llm_engine::tunable::Base;
use recfuse_sdk::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LlmRankerConfig {
    /// The instruction task whose prompts ask about candidates.
    #[serde(default = "d_task")]
    pub task: String,
    /// `yes-no` or `likelihood`; default: `yes-no` for the task `ctr`, `likelihood` otherwise.
    pub score: Option<ScoreRule>,
    /// Likelihood: mean log-probability per answer token instead of the sum.
    #[serde(default)]
    pub per_token: bool,
    /// The base model (GGUF file or ChatGLM checkpoint directory). Default: the tuner's base,
    /// as recorded in its artifact; when given with adapters, it must be that model.
    pub model: Option<PathBuf>,
    /// Score with the tuner's adapters (`false`: the base model alone, zero-shot).
    #[serde(default = "d_true")]
    pub use_adapters: bool,
    /// Padded tokens per forward pass (memory bound).
    #[serde(default = "d_batch_tokens")]
    pub batch_tokens: usize,
    /// Run each user's shared prompt prefix once (`false`: every prompt in full, for comparison).
    #[serde(default = "d_true")]
    pub prefix_reuse: bool,
    /// Estimated wall-clock seconds per candidate, for `recfuse validate`'s cost check.
    #[serde(default = "d_cost")]
    pub seconds_per_candidate: f64,
}

fn d_task() -> String {
    "ctr".into()
}
fn d_true() -> bool {
    true
}
fn d_batch_tokens() -> usize {
    2048
}
fn d_cost() -> f64 {
    // Measured wall time on 2 cores: ~27 suffix tokens per ML-100K CTR candidate at ~700
    // tokens/s with prefix reuse (SmolLM2-135M, docs/benchmarks.md).
    0.05
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreRule {
    YesNo,
    Likelihood,
}

/// What the `lora` tuner's artifact (`lora.json`) says, as far as scoring needs it.
#[derive(Deserialize, Debug)]
struct LoraArtifact {
    base_model: BaseRecord,
    adapters: Vec<AdapterRecord>,
    tasks: Vec<String>,
}

#[derive(Deserialize, Debug)]
struct BaseRecord {
    path: PathBuf,
    sha256: String,
}

#[derive(Deserialize, Debug)]
struct AdapterRecord {
    name: String,
    dir: PathBuf,
    tasks: Vec<String>,
}

/// How a candidate's score is read off the model.
#[derive(Clone, Copy, Debug)]
enum Rule {
    /// `log p(yes) − log p(no)` of these first answer tokens.
    YesNo { yes: u32, no: u32 },
    Likelihood { per_token: bool },
}

impl Rule {
    fn tag(&self) -> String {
        match self {
            Rule::YesNo { yes, no } => format!("yes-no:{yes}:{no}"),
            Rule::Likelihood { per_token } => format!("likelihood:{per_token}"),
        }
    }
}

/// Everything `score` needs, ready after `fit`.
struct Loaded {
    base: Base,
    adapters: Vec<Adapter>,
    rule: Rule,
    knowledge: HashMap<UserIdx, String>,
    item_text: HashMap<ItemIdx, String>,
    cache: Mutex<ScoreCache>,
    stats: Mutex<Stats>,
}

#[derive(Default)]
struct Stats {
    candidates: u64,
    cached: u64,
    tokens: u64,
    prefix_tokens: u64,
    seconds: f64,
}

impl std::ops::AddAssign<&Stats> for Stats {
    fn add_assign(&mut self, o: &Stats) {
        self.candidates += o.candidates;
        self.cached += o.cached;
        self.tokens += o.tokens;
        self.prefix_tokens += o.prefix_tokens;
        self.seconds += o.seconds;
    }
}

pub struct LlmRanker {
    cfg: LlmRankerConfig,
    host: Host,
    loaded: Option<Loaded>,
}

impl LlmRanker {
    fn rule_kind(&self) -> ScoreRule {
        self.cfg.score.unwrap_or(if self.cfg.task == "ctr" { ScoreRule::YesNo } else { ScoreRule::Likelihood })
    }

    /// The base model and the adapters of the task, checked against each other and the run.
    fn load_model(&self, artifact: Option<&Artifact>) -> Result<(Base, Vec<Adapter>)> {
        if !self.cfg.use_adapters {
            let path = self.cfg.model.as_ref().context("`model` is required with `use_adapters = false` (the base model to score with)")?;
            self.host.warn("llm ranker: scoring with the base model alone (use_adapters = false)");
            return Ok((Base::load(path).with_context(|| format!("`model` ({})", path.display()))?, vec![]));
        }
        let artifact = artifact.context(
            "the `llm` ranker scores with the run's tuned model, and this run has no tuner artifact: add `[tuner] kind = \"lora\"` (or set `use_adapters = false` and `model` to score with a base model alone)",
        )?;
        ensure!(
            artifact.kind == "lora",
            "the run's tuner artifact is of kind `{}`; the `llm` ranker needs a `lora` tuner's adapters (or `use_adapters = false` and `model`)",
            artifact.kind
        );
        let meta: LoraArtifact = serde_json::from_str(&artifact.meta).with_context(|| format!("the tuner artifact {} is not a `lora` artifact", artifact.path))?;
        let path = self.cfg.model.clone().unwrap_or_else(|| meta.base_model.path.clone());
        let base = Base::load(&path).with_context(|| {
            format!("loading the base model {} (the tuner artifact {} names it; `model` overrides)", path.display(), artifact.path)
        })?;
        ensure!(
            base.sha256 == meta.base_model.sha256,
            "`model` {} (sha256 {}) is not the base model the adapters in {} were trained on ({}, sha256 {}): adapters for another base model",
            path.display(),
            &base.sha256[..12],
            artifact.path,
            meta.base_model.path.display(),
            &meta.base_model.sha256[..meta.base_model.sha256.len().min(12)]
        );
        ensure!(
            meta.tasks.contains(&self.cfg.task),
            "`task`: the adapters in {} were not trained on task `{}` (they were on: {})",
            artifact.path,
            self.cfg.task,
            meta.tasks.join(", ")
        );
        let mut adapters = Vec::new();
        for a in meta.adapters.iter().filter(|a| a.tasks.contains(&self.cfg.task)) {
            adapters.push(Adapter::load_peft(&a.name, &a.dir, base.model.as_ref()).with_context(|| format!("adapter `{}` of {}", a.name, artifact.path))?);
        }
        ensure!(!adapters.is_empty(), "{}: no adapter serves task `{}`", artifact.path, self.cfg.task);
        let names: Vec<&str> = adapters.iter().map(|a| a.name.as_str()).collect();
        self.host.info(format!("llm ranker: {} with adapter(s) {} for task `{}`", base.name, names.join(" + "), self.cfg.task));
        Ok((base, adapters))
    }

    /// The scoring rule; for yes-no, the task's own answers, found by rendering one positive
    /// and one negative target through its builder.
    fn rule(&self, base: &Base, view: &TrainView) -> Result<Rule> {
        Ok(match self.rule_kind() {
            ScoreRule::Likelihood => Rule::Likelihood { per_token: self.cfg.per_token },
            ScoreRule::YesNo => {
                let item = |i: ItemIdx| Target { item: i, label: 0.0, value: None, knowledge: String::new() };
                let n = view.n_items() as ItemIdx;
                let probe = InstructionRequest {
                    user: 0,
                    split: Split::Test,
                    task: self.cfg.task.clone(),
                    knowledge: String::new(),
                    targets: vec![Target { label: 1.0, ..item(0) }, item(1 % n.max(1))],
                };
                let out = self.host.instructions(&self.cfg.task, &[probe]).with_context(|| format!("`task`: rendering a probe of task `{}`", self.cfg.task))?;
                ensure!(out.len() == 2, "`score = \"yes-no\"` needs a task with one example per candidate; task `{}` made {} of 2 (use `score = \"likelihood\"`)", self.cfg.task, out.len());
                let (yes, no) = (&out[0].output, &out[1].output);
                ensure!(yes != no, "`score = \"yes-no\"`: task `{}` answers {yes:?} for both a positive and a negative (use `score = \"likelihood\"`)", self.cfg.task);
                let first = |s: &str| -> Result<u32> { base.answer_ids(s)?.first().copied().context("an empty answer") };
                let (y, n) = (first(yes)?, first(no)?);
                ensure!(y != n, "`score = \"yes-no\"`: the answers {yes:?} and {no:?} start with the same token");
                Rule::YesNo { yes: y, no: n }
            }
        })
    }
}

impl Ranker for LlmRanker {
    type Config = LlmRankerConfig;
    const DESCRIPTION: &'static str = "the run's tuned LLM scores candidates through the task's prompts (yes/no log-odds or likelihood), prompt prefix shared";

    fn new(cfg: LlmRankerConfig, host: Host) -> Result<Self> {
        ensure!(!cfg.task.is_empty(), "`task` is empty");
        ensure!(cfg.batch_tokens >= 16, "`batch_tokens` must be at least 16");
        ensure!(cfg.seconds_per_candidate >= 0.0, "`seconds_per_candidate` must not be negative");
        if let Some(m) = &cfg.model {
            ensure!(m.exists(), "`model`: {} does not exist", m.display());
        }
        ensure!(cfg.use_adapters || cfg.model.is_some(), "`model` is required with `use_adapters = false`");
        let tasks = host.tasks();
        ensure!(tasks.contains(&cfg.task), "`task`: the run has no instruction task `{}` (it has: {})", cfg.task, if tasks.is_empty() { "none".to_string() } else { tasks.join(", ") });
        if cfg.per_token {
            ensure!(cfg.score != Some(ScoreRule::YesNo), "`per_token` applies to `score = \"likelihood\"` only");
        }
        Ok(Self { cfg, host, loaded: None })
    }

    fn fit(&mut self, view: &TrainView, inputs: &FitInputs) -> Result<()> {
        let (base, adapters) = self.load_model(inputs.artifact)?;
        let rule = self.rule(&base, view)?;
        // The identity of what is scored: the cache of another model or rule is not reused.
        let identity = format!(
            "{}|{}|{}|{}",
            base.sha256,
            rule.tag(),
            self.cfg.task,
            inputs.artifact.map(|a| a.meta.as_str()).filter(|_| self.cfg.use_adapters).unwrap_or("")
        );
        let cache = match inputs.model_dir {
            Some(dir) => ScoreCache::open(&dir.join("scores.bin"), &identity)?,
            None => ScoreCache::in_memory(),
        };
        if !cache.is_empty() {
            self.host.info(format!("llm ranker: {} scores journaled by an earlier process are reused", cache.len()));
        }
        self.loaded = Some(Loaded {
            base,
            adapters,
            rule,
            knowledge: inputs.knowledge.iter().map(|k| (k.user, k.text.clone())).collect(),
            item_text: inputs.item_knowledge.iter().map(|k| (k.item, k.text.clone())).collect(),
            cache: Mutex::new(cache),
            stats: Mutex::new(Stats::default()),
        });
        Ok(())
    }

    fn score(&self, batch: &ScoreBatch, out: &mut [f32]) -> Result<()> {
        let l = self.loaded.as_ref().context("score called before fit")?;
        let total = batch.out_len() as u64;
        let bar = self.host.progress(&format!("llm {}", self.cfg.task), total);
        let lora = LoraStack::frozen(l.adapters.iter().collect());
        let started = Instant::now();
        let mut batch_stats = Stats::default();
        for (row, &user) in batch.users.iter().enumerate() {
            self.host.check_cancelled()?;
            let cands = batch.candidates(row);
            let scores = self.score_user(l, &lora, user, cands, &mut batch_stats)?;
            out[row * cands.len()..(row + 1) * cands.len()].copy_from_slice(&scores);
            bar.inc(cands.len() as u64);
        }
        batch_stats.seconds = started.elapsed().as_secs_f64();
        let mut s = l.stats.lock().map_err(|_| anyhow!("stats lock poisoned"))?;
        *s += &batch_stats;
        self.host.info(format!(
            "llm ranker: {} users, {} candidates ({} from the journal) in {:.1} s: {:.1} candidates/s, {:.0} tokens/s, shared prefixes {:.0}% of tokens (run so far: {} candidates, {:.1} s)",
            batch.users.len(),
            batch_stats.candidates,
            batch_stats.cached,
            batch_stats.seconds,
            batch_stats.candidates as f64 / batch_stats.seconds.max(1e-9),
            batch_stats.tokens as f64 / batch_stats.seconds.max(1e-9),
            100.0 * batch_stats.prefix_tokens as f64 / (batch_stats.tokens.max(1)) as f64,
            s.candidates,
            s.seconds
        ));
        Ok(())
    }

    fn save(&self, _dir: &Path) -> Result<bool> {
        // Nothing to save but the journal of scores, written as it goes: the model is the
        // tuner's artifact, reloaded by `load`.
        Ok(true)
    }

    fn load(&mut self, view: &TrainView, inputs: &FitInputs, _dir: &Path) -> Result<bool> {
        self.fit(view, inputs)?;
        Ok(true)
    }

    fn seconds_per_candidate(&self) -> f64 {
        self.cfg.seconds_per_candidate
    }
}

impl LlmRanker {
    /// Scores of one user's candidates: journaled ones looked up, the rest computed together.
    fn score_user(&self, l: &Loaded, lora: &LoraStack, user: UserIdx, cands: &[ItemIdx], stats: &mut Stats) -> Result<Vec<f32>> {
        let request = InstructionRequest {
            user,
            split: Split::Test,
            task: self.cfg.task.clone(),
            knowledge: l.knowledge.get(&user).cloned().unwrap_or_default(),
            targets: cands
                .iter()
                .map(|&item| Target { item, label: 0.0, value: None, knowledge: l.item_text.get(&item).cloned().unwrap_or_default() })
                .collect(),
        };
        let rendered = self.host.instructions(&self.cfg.task, &[request])?;
        let by_item: HashMap<ItemIdx, &Instruction> = rendered.iter().map(|i| (i.item, i)).collect();
        let mut keys = Vec::with_capacity(cands.len());
        let tag = l.rule.tag();
        for &item in cands {
            let i = by_item.get(&item).with_context(|| {
                format!("task `{}` rendered no prompt for candidate item {item} of user {user} (its builder must return one example per candidate when asked to score)", self.cfg.task)
            })?;
            keys.push(cache::key(&[&tag, &i.instruction, &i.input, &i.output]));
        }
        let mut scores = vec![f32::NAN; cands.len()];
        let mut todo = Vec::new();
        {
            let cache = l.cache.lock().map_err(|_| anyhow!("cache lock poisoned"))?;
            for (j, k) in keys.iter().enumerate() {
                match cache.get(k) {
                    Some(s) => scores[j] = s,
                    None => todo.push(j),
                }
            }
        }
        stats.candidates += cands.len() as u64;
        stats.cached += (cands.len() - todo.len()) as u64;
        if todo.is_empty() {
            return Ok(scores);
        }
        let queries: Vec<Query> = todo
            .iter()
            .map(|&j| {
                let i = by_item[&cands[j]];
                Ok(match l.rule {
                    Rule::YesNo { yes, no } => Query::next_token(l.base.prompt_ids(&i.instruction, &i.input)?, &[yes, no]),
                    Rule::Likelihood { .. } => Query::answer(&l.base.sequence(&i.instruction, &i.input, &i.output)?),
                })
            })
            .collect::<Result<_>>()?;
        let (lps, work): (Vec<Vec<f32>>, Work) = log_probs(l.base.model.as_ref(), lora, &queries, self.cfg.prefix_reuse, self.cfg.batch_tokens)?;
        stats.tokens += work.tokens as u64;
        stats.prefix_tokens += work.prefix as u64;
        let mut fresh = Vec::with_capacity(todo.len());
        for (&j, lp) in todo.iter().zip(&lps) {
            let s = match l.rule {
                Rule::YesNo { .. } => lp[0] - lp[1],
                Rule::Likelihood { per_token } => {
                    let sum: f32 = lp.iter().sum();
                    if per_token { sum / lp.len().max(1) as f32 } else { sum }
                }
            };
            ensure!(s.is_finite(), "user {user}, item {}: the model gave a non-finite score", cands[j]);
            scores[j] = s;
            fresh.push((keys[j], s));
        }
        l.cache.lock().map_err(|_| anyhow!("cache lock poisoned"))?.append(&fresh)?;
        Ok(scores)
    }
}

export_plugin! {
    name: "llm-ranker",
    rankers: { "llm" => LlmRanker },
}
