//! The tune stage: the tuner learns from every task's train examples (validation examples for
//! selection) and the run's knowledge, and leaves an artifact that rankers load.

use super::instructions::{InstructionRecord, OUTPUT as INSTRUCTIONS};
use super::Runner;
use crate::handles::{TunerHandle, ViewData};
use crate::knowledge::KnowledgeBase;
use crate::runstore::{read_journal, write_atomic};
use anyhow::{Context, Result};
use recfuse_sdk::records::*;

pub const OUTPUTS: [&str; 2] = ["tuner", "artifact.json"];

pub fn run(r: &mut Runner, tuner: &mut TunerHandle, history: &ViewData, knowledge: &KnowledgeBase) -> Result<()> {
    let records: Vec<InstructionRecord> = read_journal(&r.run.path(INSTRUCTIONS))?;
    let all = records.into_iter().flat_map(|x| x.instructions);
    let (train, rest): (Vec<Instruction>, Vec<Instruction>) = all.partition(|i| i.split == Split::Train);
    let valid: Vec<Instruction> = rest.into_iter().filter(|i| i.split == Split::Valid).collect();
    let out_dir = r.run.path("tuner");
    std::fs::create_dir_all(&out_dir)?;
    let inputs = TuneInputs { train: &train, valid: &valid, knowledge: &knowledge.users, item_knowledge: &knowledge.items };
    let a = tuner.tune(history, &inputs, &out_dir)?;
    plot_loss(&a, &out_dir.join("loss.png"));
    write_atomic(&r.run.path("artifact.json"), serde_json::to_string_pretty(&a)?.as_bytes())
}

/// `tuner/loss.png` when the artifact's metadata has a `train.loss_curve` of `[step, loss]`
/// pairs (the `lora` tuner's); a chart that cannot be drawn (no font) is only a warning.
fn plot_loss(a: &Artifact, path: &std::path::Path) {
    let Ok(meta) = serde_json::from_str::<serde_json::Value>(&a.meta) else { return };
    let Some(curve) = meta.pointer("/train/loss_curve").and_then(|c| c.as_array()) else { return };
    let points: Vec<(f64, f64)> = curve.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect();
    if let Err(e) = crate::plot::loss_curve(&format!("{} tuning loss", a.kind), &points, path) {
        tracing::warn!("loss chart not drawn: {e:#}");
    }
}

/// The artifact a finished tune stage left in the run directory `root`.
pub fn artifact(root: &std::path::Path) -> Result<Artifact> {
    let path = root.join("artifact.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).context("artifact.json")
}
