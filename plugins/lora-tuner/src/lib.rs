//! `kind = "lora"`: instruction tuning of an LLM with LoRA (HKFR) or Multi-LoRA (CKF: one
//! shared adapter plus one per task, each example trained through the shared adapter and its
//! task's), on CPU with candle.
//!
//! Base models: a Llama-family GGUF file (SmolLM2-135M-Instruct by default; weights
//! dequantized to f32 for training) or a ChatGLM2/3 checkpoint directory. Each example is the
//! task's instruction and input in the model's chat format, and the loss is on the answer
//! tokens only. AdamW with warm-up then cosine decay, gradient accumulation over micro-batches,
//! global gradient-norm clipping.
//!
//! The tuner's directory holds a checkpoint every `checkpoint_every` steps (adapters, AdamW
//! moments, loss curve); a run killed and started again resumes from the last one and ends
//! with the same adapters as an uninterrupted run (data order and dropout masks derive from
//! the run seed and the step). Results: `adapters/<name>/` in PEFT's format
//! (`adapter_model.safetensors`, `adapter_config.json`) and `lora.json`, the artifact.

pub mod optim;

use candle_core::Var;
use optim::{accumulate, clip, AdamW, MicroBatch};
use recfuse_llm_engine::tunable::lora::{
    write_file, write_safetensors, Adapter, LoraSpec, LoraStack,
};
use recfuse_llm_engine::tunable::{answer_log_probs, family_of, Base, Sequence};
use recfuse_sdk::prelude::*;
use recfuse_sdk::SeededRng;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LoraTunerConfig {
    /// A Llama-family GGUF file or a ChatGLM2/3 checkpoint directory.
    pub model: PathBuf,
    #[serde(default = "d_rank")]
    pub rank: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    #[serde(default = "d_dropout")]
    pub dropout: f32,
    /// Default: `q_proj`, `v_proj` (Llama); `query_key_value` (ChatGLM), as PEFT's defaults.
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// One shared adapter plus one per task (CKF); otherwise one adapter for all tasks.
    #[serde(default)]
    pub multi_lora: bool,
    /// Tasks to train on (default: every task of the instruction set).
    #[serde(default)]
    pub tasks: Option<Vec<String>>,
    /// Use at most this many train examples of each task (a seeded sample).
    #[serde(default)]
    pub max_examples_per_task: Option<usize>,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: all epochs).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Examples per optimizer step.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Examples per forward pass; `batch_size / micro_batch` passes accumulate per step.
    #[serde(default = "d_micro")]
    pub micro_batch: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Fraction of the steps spent warming the learning rate up linearly from 0.
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Longest example in tokens (default: the model's context); a longer one is an error.
    #[serde(default)]
    pub max_len: Option<usize>,
    #[serde(default = "d_checkpoint")]
    pub checkpoint_every: usize,
    /// Validation examples whose loss is measured before and after training.
    #[serde(default = "d_valid")]
    pub valid_examples: usize,
    #[serde(default = "d_log")]
    pub log_every: usize,
}
fn d_rank() -> usize {
    8
}
fn d_alpha() -> f64 {
    16.0
}
fn d_dropout() -> f32 {
    0.05
}
fn d_epochs() -> usize {
    1
}
fn d_batch() -> usize {
    8
}
fn d_micro() -> usize {
    2
}
fn d_lr() -> f64 {
    2e-4
}
fn d_warmup() -> f64 {
    0.05
}
fn d_clip() -> f64 {
    1.0
}
fn d_checkpoint() -> usize {
    50
}
fn d_valid() -> usize {
    64
}
fn d_log() -> usize {
    10
}

pub struct LoraTuner {
    cfg: LoraTunerConfig,
    host: Host,
}

/// PEFT's default target modules of a family.
fn default_targets(family: &str) -> Vec<String> {
    match family {
        "chatglm" => vec!["query_key_value".into()],
        _ => vec!["q_proj".into(), "v_proj".into()],
    }
}

impl Tuner for LoraTuner {
    type Config = LoraTunerConfig;
    const DESCRIPTION: &'static str =
        "LoRA / Multi-LoRA instruction tuning (Llama GGUF, ChatGLM2/3) with PEFT-format adapters";

    fn new(cfg: LoraTunerConfig, host: Host) -> Result<Self> {
        ensure!(
            cfg.model.exists(),
            "`model`: {} does not exist (scripts/fetch-data.sh smollm2 fetches SmolLM2)",
            cfg.model.display()
        );
        ensure!(cfg.rank > 0, "`rank` must be at least 1");
        ensure!(cfg.alpha > 0.0, "`alpha` must be positive");
        ensure!(
            (0.0..1.0).contains(&cfg.dropout),
            "`dropout` must be in [0, 1)"
        );
        ensure!(
            cfg.batch_size > 0 && cfg.micro_batch > 0,
            "`batch_size` and `micro_batch` must be at least 1"
        );
        ensure!(
            cfg.micro_batch <= cfg.batch_size,
            "`micro_batch` ({}) exceeds `batch_size` ({})",
            cfg.micro_batch,
            cfg.batch_size
        );
        ensure!(cfg.epochs > 0, "`epochs` must be at least 1");
        ensure!(cfg.learning_rate > 0.0, "`learning_rate` must be positive");
        ensure!(
            (0.0..1.0).contains(&cfg.warmup_ratio),
            "`warmup_ratio` must be in [0, 1)"
        );
        ensure!(
            cfg.checkpoint_every > 0,
            "`checkpoint_every` must be at least 1"
        );
        // The model's family from its metadata alone, so `recfuse validate` catches a wrong
        // file or target module without loading weights.
        let (family, modules) = family_of(&cfg.model).with_context(|| format!("`model` ({})", cfg.model.display()))?;
        if let Some(t) = &cfg.target_modules {
            ensure!(!t.is_empty(), "`target_modules` is empty");
            for m in t {
                ensure!(modules.contains(&m.as_str()), "`target_modules`: the {family} model has no module `{m}` (it has {})", modules.join(", "));
            }
        }
        Ok(Self { cfg, host })
    }

    fn tune(&mut self, _view: &TrainView, inputs: &TuneInputs, out_dir: &Path) -> Result<Artifact> {
        let base = Base::load(&self.cfg.model)
            .with_context(|| format!("`model` ({})", self.cfg.model.display()))?;
        let trainer = Trainer::new(&self.cfg, &self.host, base, inputs)?;
        trainer.run(out_dir)
    }
}

struct Example {
    task: String,
    seq: Sequence,
}

/// Everything one training run needs, prepared.
struct Trainer<'a> {
    cfg: &'a LoraTunerConfig,
    host: &'a Host,
    base: Base,
    spec: LoraSpec,
    train: Vec<Example>,
    valid: Vec<Example>,
    /// Adapter names in a fixed order: `default`, or `shared` then each task.
    adapters: Vec<String>,
    tasks: Vec<String>,
    seed: u64,
}

/// The state a checkpoint holds besides tensors.
#[derive(Serialize, Deserialize, Clone, Default)]
struct Progress {
    fingerprint: String,
    step: usize,
    /// (step, mean answer-token loss of the step's batch).
    losses: Vec<(usize, f64)>,
    tokens: u64,
    seconds: f64,
    valid_loss_before: Option<f64>,
    /// AdamW steps taken by each variable (an adapter not in a batch is not updated).
    adam_steps: Vec<u64>,
}

impl<'a> Trainer<'a> {
    fn new(
        cfg: &'a LoraTunerConfig,
        host: &'a Host,
        base: Base,
        inputs: &TuneInputs,
    ) -> Result<Self> {
        let family = base.model.family();
        let spec = LoraSpec {
            r: cfg.rank,
            alpha: cfg.alpha,
            dropout: cfg.dropout,
            targets: cfg
                .target_modules
                .clone()
                .unwrap_or_else(|| default_targets(family)),
        };
        spec.check(base.model.as_ref())?;
        let available: BTreeSet<String> = inputs.train.iter().map(|i| i.task.clone()).collect();
        let tasks: Vec<String> = match &cfg.tasks {
            Some(t) => {
                for task in t {
                    ensure!(available.contains(task), "`tasks`: the instruction set has no train examples of task `{task}` (it has: {available:?})");
                }
                t.clone()
            }
            None => available.into_iter().collect(),
        };
        ensure!(!tasks.is_empty(), "no train examples: the instruction set is empty (is there an `[[instructions]]` stage, and did it produce train examples?)");
        let seed = host.seed() ^ 0x4C6F_5241; // "LoRA": this tuner's own stream
        let max_len = cfg
            .max_len
            .unwrap_or(base.model.context())
            .min(base.model.context());
        let pick = |set: &[Instruction], limit: Option<usize>, salt: u64| -> Result<Vec<Example>> {
            let mut out = Vec::new();
            for task in &tasks {
                let mut of_task: Vec<&Instruction> = set
                    .iter()
                    .filter(|i| &i.task == task && !i.output.is_empty())
                    .collect();
                if let Some(n) = limit {
                    SeededRng::new(seed ^ salt).shuffle(&mut of_task);
                    of_task.truncate(n);
                }
                for i in of_task {
                    let seq = base.sequence(&i.instruction, &i.input, &i.output)?;
                    ensure!(
                        seq.ids.len() <= max_len,
                        "an example of task `{task}` (user {}) is {} tokens, longer than {} (`max_len`; the model's context is {})",
                        i.user,
                        seq.ids.len(),
                        max_len,
                        base.model.context()
                    );
                    out.push(Example {
                        task: task.clone(),
                        seq,
                    });
                }
            }
            Ok(out)
        };
        let train = pick(inputs.train, cfg.max_examples_per_task, 1)?;
        ensure!(
            !train.is_empty(),
            "no train examples with an answer for tasks {tasks:?}"
        );
        let mut valid = pick(inputs.valid, None, 2)?;
        SeededRng::new(seed ^ 3).shuffle(&mut valid);
        valid.truncate(cfg.valid_examples);
        let adapters = if cfg.multi_lora {
            std::iter::once("shared".to_string())
                .chain(tasks.iter().cloned())
                .collect()
        } else {
            vec!["default".to_string()]
        };
        Ok(Self {
            cfg,
            host,
            base,
            spec,
            train,
            valid,
            adapters,
            tasks,
            seed,
        })
    }

    /// The adapters an example of `task` trains (by index into `adapters`).
    fn active(&self, task: &str) -> Vec<usize> {
        if self.cfg.multi_lora {
            vec![
                0,
                self.adapters
                    .iter()
                    .position(|a| a == task)
                    .expect("every task has an adapter"),
            ]
        } else {
            vec![0]
        }
    }

    fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch_size)
    }

    fn total_steps(&self) -> usize {
        let all = self.steps_per_epoch() * self.cfg.epochs;
        self.cfg.max_steps.map_or(all, |m| m.min(all))
    }

    fn lr_at(&self, step: usize) -> f64 {
        let total = self.total_steps();
        let warmup = (self.cfg.warmup_ratio * total as f64).round() as usize;
        if step < warmup {
            return self.cfg.learning_rate * (step + 1) as f64 / warmup as f64;
        }
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        self.cfg.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// The examples of optimizer step `step`, grouped into micro-batches of one task each (and
    /// of similar lengths).
    fn micro_batches(&self, step: usize) -> Vec<Vec<usize>> {
        let (epoch, within) = (step / self.steps_per_epoch(), step % self.steps_per_epoch());
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        SeededRng::new(self.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9))
            .shuffle(&mut order);
        let batch = &order
            [within * self.cfg.batch_size..((within + 1) * self.cfg.batch_size).min(order.len())];
        let mut by_task: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for &i in batch {
            let key = if self.cfg.multi_lora {
                self.train[i].task.as_str()
            } else {
                ""
            };
            by_task.entry(key).or_default().push(i);
        }
        by_task
            .into_values()
            .flat_map(|mut ids| {
                // Similar lengths share a micro-batch: rows are padded to the longest of theirs,
                // and the gradient of the step does not depend on how it is split.
                ids.sort_by_key(|&i| (self.train[i].seq.ids.len(), i));
                ids.chunks(self.cfg.micro_batch)
                    .map(<[usize]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Identifies what a checkpoint was made from: a checkpoint of other data or settings is
    /// not resumed.
    fn fingerprint(&self) -> Result<String> {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(self.cfg)?);
        h.update(self.base.sha256.as_bytes());
        h.update(self.seed.to_le_bytes());
        for e in &self.train {
            h.update(e.task.as_bytes());
            for id in &e.seq.ids {
                h.update(id.to_le_bytes());
            }
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Mean answer-token loss of the validation examples under the current adapters.
    fn valid_loss(&self, adapters: &[Adapter]) -> Result<Option<f64>> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in self.valid.chunks(self.cfg.micro_batch) {
            // Chunks may mix tasks: score each task's examples through its adapters.
            let mut by_task: BTreeMap<&str, Vec<Sequence>> = BTreeMap::new();
            for e in chunk {
                by_task.entry(&e.task).or_default().push(e.seq.clone());
            }
            for (task, seqs) in by_task {
                let stack = LoraStack::eval(
                    self.active(task)
                        .into_iter()
                        .map(|i| &adapters[i])
                        .collect(),
                );
                let lp = answer_log_probs(self.base.model.as_ref(), &seqs, None, &stack)?;
                sum -= lp.sum_all()?.to_scalar::<f32>()? as f64;
                n += lp.elem_count();
            }
        }
        Ok(Some(sum / n as f64))
    }

    fn run(self, out_dir: &Path) -> Result<Artifact> {
        let model = self.base.model.as_ref();
        let mut rng = SeededRng::new(self.seed);
        let adapters: Vec<Adapter> = self
            .adapters
            .iter()
            .map(|name| Adapter::new(name, &self.spec, model, &mut rng))
            .collect::<Result<_>>()?;
        let named: Vec<(String, Var)> = adapters
            .iter()
            .flat_map(|a| {
                a.named_vars(model)
                    .into_iter()
                    .map(move |(k, v)| (format!("{}/{k}", a.name), v))
            })
            .collect();
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let mut adam = AdamW::new(&vars)?;
        let fingerprint = self.fingerprint()?;
        let checkpoints = Checkpoints {
            dir: out_dir.to_path_buf(),
        };
        let mut state = match checkpoints.load(&fingerprint, &named, &mut adam)? {
            Some(s) => {
                self.host.info(format!(
                    "lora: resuming from the checkpoint at step {}",
                    s.step
                ));
                s
            }
            None => Progress {
                fingerprint: fingerprint.clone(),
                valid_loss_before: self.valid_loss(&adapters)?,
                ..Default::default()
            },
        };
        let total = self.total_steps();
        self.host.info(format!(
            "lora: {} train examples ({} tasks), {} steps of {} (micro-batches of {}), adapters {:?} on {:?}",
            self.train.len(),
            self.tasks.len(),
            total,
            self.cfg.batch_size,
            self.cfg.micro_batch,
            self.adapters,
            self.spec.targets
        ));
        let bar = self.host.progress("lora tuning (steps)", total as u64);
        bar.inc(state.step as u64);
        let (mut window_tokens, mut window_start) = (0u64, Instant::now());
        while state.step < total {
            self.host.check_cancelled()?;
            let t0 = Instant::now();
            let step = state.step;
            let micro = self.micro_batches(step);
            let mut tokens = 0u64;
            let mut batches = Vec::with_capacity(micro.len());
            for (m, ids) in micro.iter().enumerate() {
                let task = &self.train[ids[0]].task;
                let seqs: Vec<Sequence> = ids.iter().map(|&i| self.train[i].seq.clone()).collect();
                tokens += seqs.iter().map(|s| s.ids.len() as u64).sum::<u64>();
                let dropout_seed = self.seed ^ ((step as u64) << 16) ^ m as u64;
                let lora = LoraStack::train(
                    self.active(task)
                        .into_iter()
                        .map(|i| &adapters[i])
                        .collect(),
                    dropout_seed,
                );
                batches.push(MicroBatch { seqs, lora });
            }
            let (mut grads, loss_sum) = accumulate(model, &batches, &vars)?;
            clip(&mut grads, self.cfg.max_grad_norm)?;
            adam.step(&vars, &grads, self.lr_at(step), self.cfg.weight_decay)?;
            state.step += 1;
            state.tokens += tokens;
            state.seconds += t0.elapsed().as_secs_f64();
            state.losses.push((step, loss_sum));
            bar.inc(1);
            window_tokens += tokens;
            if state.step % self.cfg.log_every == 0 || state.step == total {
                let rate = window_tokens as f64 / window_start.elapsed().as_secs_f64();
                self.host.info(format!(
                    "lora: step {}/{total} loss {loss_sum:.4} lr {:.2e} {rate:.0} tokens/s",
                    state.step,
                    self.lr_at(step)
                ));
                (window_tokens, window_start) = (0, Instant::now());
            }
            if state.step % self.cfg.checkpoint_every == 0 && state.step < total {
                state.adam_steps = adam.steps.clone();
                checkpoints.save(&state, &named, &adam)?;
            }
        }
        drop(bar);
        let valid_after = self.valid_loss(&adapters)?;
        self.finish(out_dir, &adapters, &state, valid_after)
    }

    /// Writes the adapters in PEFT's format and the artifact.
    fn finish(
        &self,
        out_dir: &Path,
        adapters: &[Adapter],
        state: &Progress,
        valid_after: Option<f64>,
    ) -> Result<Artifact> {
        let model = self.base.model.as_ref();
        let mut listed = Vec::new();
        for a in adapters {
            let dir = out_dir.join("adapters").join(&a.name);
            a.save_peft(&dir, model, &self.base.path.display().to_string())?;
            let tasks: Vec<&String> = if a.name == "shared" || a.name == "default" {
                self.tasks.iter().collect()
            } else {
                vec![&a.name]
            };
            listed.push(serde_json::json!({"name": a.name, "dir": dir, "tasks": tasks}));
        }
        let per_task: BTreeMap<&str, usize> = self
            .tasks
            .iter()
            .map(|t| {
                (
                    t.as_str(),
                    self.train.iter().filter(|e| &e.task == t).count(),
                )
            })
            .collect();
        let first = state.losses.first().map(|l| l.1);
        let last = {
            // The mean of the last tenth of the curve: one batch's loss is noisy.
            let tail = (state.losses.len() / 10).max(1);
            let xs = &state.losses[state.losses.len().saturating_sub(tail)..];
            (!xs.is_empty()).then(|| xs.iter().map(|l| l.1).sum::<f64>() / xs.len() as f64)
        };
        let meta = serde_json::json!({
            "base_model": {
                "path": self.base.path,
                "sha256": self.base.sha256,
                "family": model.family(),
                "name": self.base.name,
            },
            "lora": self.spec,
            "multi_lora": self.cfg.multi_lora,
            "adapters": listed,
            "tasks": self.tasks,
            "train": {
                "examples": self.train.len(),
                "examples_per_task": per_task,
                "valid_examples": self.valid.len(),
                "steps": state.step,
                "batch_size": self.cfg.batch_size,
                "micro_batch": self.cfg.micro_batch,
                "learning_rate": self.cfg.learning_rate,
                "tokens": state.tokens,
                "seconds": state.seconds,
                "tokens_per_second": state.tokens as f64 / state.seconds.max(1e-9),
                "first_loss": first,
                "final_loss": last,
                "valid_loss_before": state.valid_loss_before,
                "valid_loss_after": valid_after,
                "loss_curve": state.losses,
            },
        });
        let path = out_dir.join("lora.json");
        let text = serde_json::to_string_pretty(&meta)?;
        write_file(&path, text.as_bytes())?;
        self.host.info(format!(
            "lora: trained {} steps, loss {:.3} → {:.3}, validation {:?} → {:?}, {:.0} tokens/s",
            state.step,
            first.unwrap_or(f64::NAN),
            last.unwrap_or(f64::NAN),
            state.valid_loss_before,
            valid_after,
            state.tokens as f64 / state.seconds.max(1e-9)
        ));
        Ok(Artifact {
            kind: "lora".into(),
            path: path.display().to_string(),
            meta: text,
        })
    }
}

/// `checkpoint-<step>/` directories (tensors + progress) and `checkpoint.json` naming the
/// latest complete one: the pointer is replaced only after the directory is written, so a
/// kill at any moment leaves a loadable checkpoint or none.
struct Checkpoints {
    dir: PathBuf,
}

impl Checkpoints {
    fn pointer(&self) -> PathBuf {
        self.dir.join("checkpoint.json")
    }

    fn save(&self, state: &Progress, named: &[(String, Var)], adam: &AdamW) -> Result<()> {
        let name = format!("checkpoint-{}", state.step);
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let mut tensors = Vec::with_capacity(named.len() * 3);
        for (i, (key, var)) in named.iter().enumerate() {
            tensors.push((format!("param/{key}"), var.as_tensor().clone()));
            tensors.push((format!("adam_m/{key}"), adam.m[i].clone()));
            tensors.push((format!("adam_v/{key}"), adam.v[i].clone()));
        }
        write_safetensors(&dir.join("state.safetensors"), &tensors, &[])?;
        write_file(
            &dir.join("progress.json"),
            serde_json::to_string(state)?.as_bytes(),
        )?;
        let previous = self.latest();
        write_file(
            &self.pointer(),
            serde_json::to_string(&serde_json::json!({"latest": name}))?.as_bytes(),
        )?;
        if let Some(old) = previous.filter(|o| *o != name) {
            std::fs::remove_dir_all(self.dir.join(old)).ok();
        }
        Ok(())
    }

    fn latest(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.pointer()).ok()?;
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()?
            .get("latest")?
            .as_str()
            .map(str::to_string)
    }

    /// Restores the latest checkpoint into the variables and optimizer if it was made from
    /// the same fingerprint.
    fn load(
        &self,
        fingerprint: &str,
        named: &[(String, Var)],
        adam: &mut AdamW,
    ) -> Result<Option<Progress>> {
        let Some(name) = self.latest() else {
            return Ok(None);
        };
        let dir = self.dir.join(&name);
        let progress_path = dir.join("progress.json");
        let text = std::fs::read_to_string(&progress_path)
            .with_context(|| format!("reading {}", progress_path.display()))?;
        let state: Progress =
            serde_json::from_str(&text).with_context(|| format!("{}", progress_path.display()))?;
        if state.fingerprint != fingerprint {
            return Ok(None); // made from other data or settings: start over
        }
        let path = dir.join("state.safetensors");
        let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        let get = |k: String| {
            tensors
                .get(&k)
                .cloned()
                .with_context(|| format!("{}: `{k}` missing", path.display()))
        };
        for (i, (key, var)) in named.iter().enumerate() {
            var.set(&get(format!("param/{key}"))?)?;
            adam.m[i] = get(format!("adam_m/{key}"))?;
            adam.v[i] = get(format!("adam_v/{key}"))?;
        }
        ensure!(
            state.adam_steps.len() == named.len(),
            "{}: optimizer state does not match",
            progress_path.display()
        );
        adam.steps = state.adam_steps.clone();
        Ok(Some(state))
    }
}

export_plugin! {
    name: "lora-tuner",
    tuners: { "lora" => LoraTuner },
}

#[cfg(test)]
mod tests {
    use super::*;
    use recfuse_llm_engine::tunable::chatglm::{write_random_checkpoint, ChatGlmConfig};

    const WORDS: &[&str] = &[
        "user", "likes", "red", "green", "blue", "apple", "leaf", "sky", "rate", "it", "4", "2",
        "why",
    ];

    fn checkpoint(dir: &Path) -> PathBuf {
        let model = dir.join("tiny-chatglm");
        write_random_checkpoint(&model, &ChatGlmConfig::tiny(24), WORDS, 11).unwrap();
        model
    }

    fn ex(task: &str, user: u32, input: &str, output: &str, split: Split) -> Instruction {
        Instruction {
            user,
            item: 0,
            split,
            task: task.into(),
            instruction: String::new(),
            input: input.into(),
            output: output.into(),
            label: 1.0,
        }
    }

    /// A tiny memorisation task: colour → thing (task `a`), colour → rating (task `b`).
    fn examples(split: Split) -> Vec<Instruction> {
        let mut v = Vec::new();
        for (u, (c, thing, rate)) in [
            ("red", "apple", "4"),
            ("green", "leaf", "2"),
            ("blue", "sky", "4"),
        ]
        .into_iter()
        .enumerate()
        {
            v.push(ex("a", u as u32, &format!("user likes {c}"), thing, split));
            v.push(ex("b", u as u32, &format!("rate {c}"), rate, split));
        }
        v
    }

    fn config(model: &Path, extra: serde_json::Value) -> LoraTunerConfig {
        let mut v = serde_json::json!({
            "model": model, "rank": 4, "alpha": 8, "dropout": 0.0, "batch_size": 6, "micro_batch": 3,
            "learning_rate": 0.02, "epochs": 40, "checkpoint_every": 10, "log_every": 1000,
            "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    fn tune(cfg: LoraTunerConfig, out: &Path) -> Result<Artifact> {
        let (train, valid) = (examples(Split::Train), examples(Split::Valid));
        let inputs = TuneInputs {
            train: &train,
            valid: &valid,
            knowledge: &[],
            item_knowledge: &[],
        };
        let cat = Catalog::default();
        let view = TrainView {
            catalog: &cat,
            events: &[],
            offsets: &[],
        };
        LoraTuner::new(cfg, Host::standalone(out, 7))?.tune(&view, &inputs, out)
    }

    fn meta(a: &Artifact) -> serde_json::Value {
        serde_json::from_str(&a.meta).unwrap()
    }

    /// Answer log-probabilities of `examples` under the saved adapters `names` (PEFT dirs).
    fn scores(base: &Base, out: &Path, names: &[&str], set: &[Instruction]) -> Vec<f32> {
        let model = base.model.as_ref();
        let adapters: Vec<Adapter> = names
            .iter()
            .map(|n| Adapter::load_peft(n, &out.join("adapters").join(n), model).unwrap())
            .collect();
        let seqs: Vec<Sequence> = set
            .iter()
            .map(|i| base.sequence(&i.instruction, &i.input, &i.output).unwrap())
            .collect();
        answer_log_probs(
            model,
            &seqs,
            None,
            &LoraStack::eval(adapters.iter().collect()),
        )
        .unwrap()
        .to_vec1()
        .unwrap()
    }

    #[test]
    fn loss_halves_and_saved_adapters_reload_identically_leaving_the_base_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let model = checkpoint(d.path());
        let base = Base::load(&model).unwrap();
        let set = examples(Split::Valid);
        let before = scores(&base, d.path(), &[], &set);
        let out = d.path().join("tuner");
        let a = tune(config(&model, serde_json::json!({})), &out).unwrap();
        let m = meta(&a);
        assert_eq!(a.kind, "lora");
        let (first, last) = (
            m["train"]["first_loss"].as_f64().unwrap(),
            m["train"]["final_loss"].as_f64().unwrap(),
        );
        assert!(last < first / 2.0, "loss {first} → {last}");
        assert_eq!(m["train"]["steps"], 40);
        assert_eq!(m["train"]["loss_curve"].as_array().unwrap().len(), 40);
        assert_eq!(m["base_model"]["sha256"], base.sha256);
        assert_eq!(m["tasks"], serde_json::json!(["a", "b"]));
        // The saved adapter reproduces the validation loss the tuner measured in memory.
        let after = scores(&base, &out, &["default"], &set);
        let mean = -after.iter().map(|&x| x as f64).sum::<f64>() / after.len() as f64;
        assert!((mean - m["train"]["valid_loss_after"].as_f64().unwrap()).abs() < 1e-5);
        assert!(mean < m["train"]["valid_loss_before"].as_f64().unwrap() / 2.0);
        // The base model is untouched: same file, same outputs without adapters.
        assert_eq!(Base::load(&model).unwrap().sha256, base.sha256);
        assert_eq!(scores(&base, &out, &[], &set), before);
        assert!(out
            .join("adapters/default/adapter_model.safetensors")
            .exists());
        assert!(!out.join("checkpoint.json").exists() || out.join("checkpoint-30").exists());
    }

    #[test]
    fn multi_lora_task_adapters_only_change_their_own_task() {
        let d = tempfile::tempdir().unwrap();
        let model = checkpoint(d.path());
        let out = d.path().join("tuner");
        let a = tune(
            config(
                &model,
                serde_json::json!({"multi_lora": true, "epochs": 10}),
            ),
            &out,
        )
        .unwrap();
        let names: Vec<String> = meta(&a)["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["shared", "a", "b"]);
        let base = Base::load(&model).unwrap();
        let set = examples(Split::Valid);
        let (task_a, task_b): (Vec<Instruction>, Vec<Instruction>) =
            set.into_iter().partition(|i| i.task == "a");
        let a_before = scores(&base, &out, &["shared", "a"], &task_a);
        let b_before = scores(&base, &out, &["shared", "b"], &task_b);
        // Training moved every adapter away from its zero-B start.
        for n in &names {
            assert_ne!(
                scores(&base, &out, &[n.as_str()], &task_a),
                scores(&base, &out, &[], &task_a),
                "adapter {n} untrained"
            );
        }
        // Replace task a's adapter by a retrained one: a's outputs change, b's do not.
        let out2 = d.path().join("tuner2");
        tune(
            config(
                &model,
                serde_json::json!({"multi_lora": true, "epochs": 10, "learning_rate": 0.05}),
            ),
            &out2,
        )
        .unwrap();
        std::fs::remove_dir_all(out.join("adapters/a")).unwrap();
        std::fs::rename(out2.join("adapters/a"), out.join("adapters/a")).unwrap();
        assert_ne!(scores(&base, &out, &["shared", "a"], &task_a), a_before);
        assert_eq!(scores(&base, &out, &["shared", "b"], &task_b), b_before);
    }

    #[test]
    fn interrupted_run_resumes_to_the_same_adapters() {
        let d = tempfile::tempdir().unwrap();
        let model = checkpoint(d.path());
        let cfg = || {
            config(
                &model,
                serde_json::json!({"epochs": 8, "checkpoint_every": 3, "dropout": 0.1}),
            )
        };
        let whole = d.path().join("whole");
        tune(cfg(), &whole).unwrap();
        // Interrupt after the checkpoint at step 6 by cancelling from the host.
        let part = d.path().join("part");
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (cancel, ptr) = (cancel.clone(), part.join("checkpoint.json"));
            std::thread::spawn(move || {
                while !std::fs::read_to_string(&ptr).is_ok_and(|t| t.contains("checkpoint-6")) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            })
        };
        let (train, valid) = (examples(Split::Train), examples(Split::Valid));
        let inputs = TuneInputs {
            train: &train,
            valid: &valid,
            knowledge: &[],
            item_knowledge: &[],
        };
        let cat = Catalog::default();
        let view = TrainView {
            catalog: &cat,
            events: &[],
            offsets: &[],
        };
        let host = Host::standalone_with_cancel(&part, 7, cancel);
        assert!(
            LoraTuner::new(cfg(), host)
                .unwrap()
                .tune(&view, &inputs, &part)
                .is_err(),
            "cancelled"
        );
        watcher.join().unwrap();
        assert!(!part.join("lora.json").exists());
        let resumed = tune(cfg(), &part).unwrap();
        let file = |dir: &Path| {
            std::fs::read(dir.join("adapters/default/adapter_model.safetensors")).unwrap()
        };
        assert_eq!(
            file(&part),
            file(&whole),
            "resumed adapters differ from an uninterrupted run's"
        );
        let curve = |dir: &Path| {
            serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(dir.join("lora.json")).unwrap(),
            )
            .unwrap()["train"]["loss_curve"]
                .clone()
        };
        assert_eq!(curve(&part), curve(&whole));
        assert_eq!(meta(&resumed)["train"]["steps"], 8);
    }

    #[test]
    fn bad_input_names_the_key() {
        let d = tempfile::tempdir().unwrap();
        let model = checkpoint(d.path());
        let host = || Host::standalone(d.path(), 0);
        let err = |r: Result<Artifact>| format!("{:#}", r.err().expect("an error"));
        let missing = serde_json::from_value::<LoraTunerConfig>(
            serde_json::json!({"model": d.path().join("nope.gguf")}),
        )
        .unwrap();
        assert!(LoraTuner::new(missing, host())
            .err()
            .unwrap()
            .to_string()
            .contains("`model`"));
        let not_gguf = d.path().join("x.gguf");
        std::fs::write(&not_gguf, b"hello").unwrap();
        assert!(
            err(tune(config(&not_gguf, serde_json::json!({})), d.path()))
                .contains("not a GGUF file")
        );
        assert!(
            LoraTuner::new(config(&model, serde_json::json!({"rank": 0})), host())
                .err()
                .unwrap()
                .to_string()
                .contains("`rank`")
        );
        let e = err(tune(
            config(&model, serde_json::json!({"target_modules": ["q_proj"]})),
            d.path(),
        ));
        assert!(
            e.contains("`target_modules`") && e.contains("no module `q_proj`"),
            "{e}"
        );
        let e = err(tune(
            config(&model, serde_json::json!({"max_len": 5})),
            d.path(),
        ));
        assert!(e.contains("`max_len`") && e.contains("task `a`"), "{e}");
        let e = err(tune(
            config(&model, serde_json::json!({"tasks": ["ctr"]})),
            d.path(),
        ));
        assert!(e.contains("`tasks`") && e.contains("`ctr`"), "{e}");
        let cat = Catalog::default();
        let view = TrainView {
            catalog: &cat,
            events: &[],
            offsets: &[],
        };
        let e = format!(
            "{:#}",
            LoraTuner::new(config(&model, serde_json::json!({})), host())
                .unwrap()
                .tune(&view, &TuneInputs::default(), d.path())
                .err()
                .unwrap()
        );
        assert!(e.contains("instruction set is empty"), "{e}");
    }
}
