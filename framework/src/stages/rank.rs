//! Ranker stages: fit (or restore) each ranker once per run directory, save it under
//! `rankers/<label>/`, and evaluate it, alone or as the second stage of two-stage ranking.
//!
//! `rankers/<label>/fit.json` records the key of the fit (data, knowledge, tuner artifact,
//! ranker config and version, seed) and whether the ranker saved itself. A later process with
//! the same key restores the saved model instead of refitting; a different key empties the
//! directory first, so checkpoints of another configuration are never resumed.

use super::Runner;
use crate::eval::{self, Outcome, RerankInfo, Report};
use crate::handles::{FitData, RankerHandle};
use crate::runstore::{write_atomic, Journal};
use anyhow::{Context, Result};
use recfuse_sdk::records::{ItemIdx, UserIdx};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
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

/// Whether `dir` (a `rankers/<label>/`) holds a model its ranker saved after fitting.
pub fn saved_model(dir: &Path) -> bool {
    read_state(dir).is_some_and(|s| s.saved)
}

/// Whether `dir` holds a model saved after a fit under `key`.
pub fn saved_under(dir: &Path, key: &str) -> bool {
    read_state(dir).is_some_and(|s| s.saved && s.key == key)
}

fn read_state(dir: &Path) -> Option<FitState> {
    std::fs::read_to_string(dir.join("fit.json")).ok().and_then(|t| serde_json::from_str(&t).ok())
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
    let state = read_state(&dir);
    let data = FitData { model_dir: Some(&dir), ..*data };
    if let Some(prepared) = &r.prepared {
        // A shard restores what `prepare` saved (its own journals, e.g. the llm ranker's
        // scores, stay in the shard's directory); a ranker that cannot save is fitted here.
        let saved_dir = prepared.join("rankers").join(&slot.label);
        match read_state(&saved_dir) {
            Some(s) if s.key == slot.fit_key && s.saved => {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                anyhow::ensure!(slot.handle.load(&data, &saved_dir)?, "ranker `{}` could not load the model `prepare` saved in {}", slot.label, saved_dir.display());
                slot.obtained = Some(ModelStart::Restored);
                return Ok(());
            }
            Some(s) if s.key == slot.fit_key => {}
            _ => anyhow::bail!("ranker `{}` was not fitted by `recfuse prepare` with this config (no matching {}/fit.json)", slot.label, saved_dir.display()),
        }
    }
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

/// Evaluates `slots[i]`, reranking the top of `first` (an earlier slot) when given. Every
/// batch's outcomes are journaled in `outcomes` first: a rerun evaluates only the users not
/// there yet (and fits nothing when none are left). The report covers every user of `ctx`.
pub fn evaluate(
    r: &Runner,
    slots: &mut [RankerSlot],
    i: usize,
    first: Option<(usize, usize)>,
    data: &FitData<'_>,
    ctx: &eval::EvalContext<'_>,
    outcomes: &Path,
) -> Result<Report> {
    let (mut journal, mut done) = Journal::open::<Outcome>(outcomes)?;
    let seen: HashSet<UserIdx> = done.iter().map(|o| o.user).collect();
    let todo: Vec<usize> = (0..ctx.users.len()).filter(|&j| !seen.contains(&ctx.users[j])).collect();
    let label = slots[i].label.clone();
    let bar = r.progress.bar(&label, ctx.users.len() as u64);
    bar.inc((ctx.users.len() - todo.len()) as u64);
    if !done.is_empty() {
        tracing::info!(ranker = label.as_str(), done = done.len(), todo = todo.len(), "resuming evaluation from its journal");
    }
    let info = first.map(|(f, top)| RerankInfo { from: slots[f].label.clone(), top });
    if !todo.is_empty() {
        if let Some((f, _)) = first {
            ensure_fitted(r, &mut slots[f], data)?;
        }
        ensure_fitted(r, &mut slots[i], data)?;
        let users: Vec<UserIdx> = todo.iter().map(|&j| ctx.users[j]).collect();
        let negatives: Vec<Vec<ItemIdx>> = todo.iter().map(|&j| ctx.negatives[j].clone()).collect();
        let t = Instant::now();
        let first_stage = first.map(|(f, _)| &slots[f].handle).zip(info.as_ref());
        let todo_ctx = eval::EvalContext { users: &users, negatives: &negatives, ..*ctx };
        eval::evaluate_outcomes(&slots[i].handle, first_stage, &label, &todo_ctx, |batch| {
            journal.append(batch)?;
            done.extend_from_slice(batch);
            bar.inc(batch.len() as u64);
            r.check_cancel()
        })?;
        tracing::info!(ranker = label.as_str(), seconds = t.elapsed().as_secs_f64(), "evaluated");
    }
    bar.finish_and_clear();
    Ok(eval::ReportFrame::new(ctx.split, ctx.cfg).report(&label, info, &mut done))
}
