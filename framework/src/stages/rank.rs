//! Ranker stages: fit (or restore) each ranker once per run directory, save it under
//! `rankers/<label>/`, and evaluate it, alone or as the second stage of two-stage ranking.
//!
//! `rankers/<label>/fit.json` records the key of the fit (data, knowledge, tuner artifact,
//! ranker config and version, seed) and whether the ranker saved itself. A later process with
//! the same key restores the saved model instead of refitting; a different key empties the
//! directory first, so checkpoints of another configuration are never resumed.

use super::Runner;
use crate::eval::{self, RerankInfo, Report};
use crate::handles::{FitData, RankerHandle};
use crate::runstore::write_atomic;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct FitState {
    key: String,
    /// The ranker saved itself after fitting (`false`: it cannot, and is refitted when needed).
    saved: bool,
}

/// A ranker of the run with its fit key, fitted at most once per process.
pub struct RankerSlot {
    pub label: String,
    pub fit_key: String,
    pub handle: RankerHandle,
    /// How this process got the model: `None` until then.
    pub obtained: Option<ModelStart>,
}

/// How a ranker's model was obtained in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStart {
    /// Fitted (from scratch, or resumed from its own checkpoints).
    Fitted,
    /// Restored from the model it saved earlier, without fitting.
    Restored,
}

pub fn model_dir(r: &Runner, label: &str) -> PathBuf {
    r.run.path(&format!("rankers/{label}"))
}

/// Makes sure `slot` is fitted: restores its saved model when the key matches, else fits it
/// (checkpointing into its directory) and saves it.
pub fn ensure_fitted(r: &Runner, slot: &mut RankerSlot, data: &FitData<'_>) -> Result<()> {
    if slot.obtained.is_some() {
        return Ok(());
    }
    let dir = model_dir(r, &slot.label);
    let state_path = dir.join("fit.json");
    let state: Option<FitState> = std::fs::read_to_string(&state_path).ok().and_then(|t| serde_json::from_str(&t).ok());
    let data = FitData { model_dir: Some(&dir), ..*data };
    match state {
        Some(s) if s.key == slot.fit_key && s.saved => {
            let t = Instant::now();
            if slot.handle.load(&data, &dir)? {
                tracing::info!(ranker = slot.label.as_str(), seconds = t.elapsed().as_secs_f64(), "restored saved model");
                slot.obtained = Some(ModelStart::Restored);
                return Ok(());
            }
        }
        Some(s) if s.key == slot.fit_key => {} // same fit, interrupted or unsaveable: keep its checkpoints
        _ => {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
            }
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&state_path, serde_json::to_string(&FitState { key: slot.fit_key.clone(), saved: false })?.as_bytes())?;
    let t = Instant::now();
    slot.handle.fit(&data)?;
    tracing::info!(ranker = slot.label.as_str(), seconds = t.elapsed().as_secs_f64(), "ranker fitted");
    let saved = slot.handle.save(&dir)?;
    write_atomic(&state_path, serde_json::to_string(&FitState { key: slot.fit_key.clone(), saved })?.as_bytes())?;
    slot.obtained = Some(ModelStart::Fitted);
    Ok(())
}

/// Evaluates `slots[i]`, reranking the top of `first` (an earlier slot) when given.
pub fn evaluate(
    r: &Runner,
    slots: &mut [RankerSlot],
    i: usize,
    first: Option<(usize, usize)>,
    data: &FitData<'_>,
    ctx: &eval::EvalContext<'_>,
) -> Result<Report> {
    if let Some((f, _)) = first {
        ensure_fitted(r, &mut slots[f], data)?;
    }
    ensure_fitted(r, &mut slots[i], data)?;
    let label = slots[i].label.clone();
    let bar = r.progress.bar(&label, ctx.users.len() as u64);
    let t = Instant::now();
    let info = first.map(|(f, top)| RerankInfo { from: slots[f].label.clone(), top });
    let first_stage = first.map(|(f, _)| &slots[f].handle).zip(info.as_ref());
    let rep = eval::evaluate(&slots[i].handle, first_stage, &label, ctx.split, ctx.cfg, ctx.users, ctx.negatives, ctx.batch_size, |n| {
        bar.inc(n as u64);
        r.check_cancel()
    })?;
    bar.finish_and_clear();
    tracing::info!(ranker = label.as_str(), seconds = t.elapsed().as_secs_f64(), "evaluated");
    Ok(rep)
}
