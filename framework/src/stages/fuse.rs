//! The fuse stage: every fuser's knowledge of every user (combined: texts joined, vectors
//! gathered), then every item, journaled batch by batch (see [`crate::knowledge`]).

use super::Runner;
use crate::embed::Embedder;
use crate::handles::{FuserHandle, ViewData};
use crate::knowledge::{latest_records, write_batch_vectors, KnowledgeRecord, Side};
use crate::runstore::Journal;
use crate::shard::ShardSpec;
use anyhow::{bail, Result};
use recfuse_sdk::records::*;
use std::collections::{BTreeMap, HashSet};

/// The stage's outputs, for its key check.
pub const OUTPUTS: [&str; 2] = ["knowledge.jsonl", "item_knowledge.jsonl"];

/// Fuses every user and item, or those of `shard` (by id) in a sharded run; with `embedder`,
/// each record's text also becomes a knowledge vector (see [`crate::embed`]).
pub fn run(r: &mut Runner, fusers: &mut [FuserHandle], mut embedder: Option<&mut Embedder>, history: &ViewData, batch: usize, shard: Option<ShardSpec>) -> Result<()> {
    for f in fusers.iter_mut() {
        f.prepare(history)?;
    }
    if let Some(e) = embedder.as_deref_mut() {
        e.open_cache(&r.run.path(""))?;
    }
    let catalog = &history.catalog;
    let names: Vec<String> = fusers.iter().map(|f| f.provenance.name.clone()).collect();
    let mine = |id: &str| shard.is_none_or(|s| s.owns(id));
    let users: Vec<(u32, String)> = catalog.users.iter().enumerate().filter(|(_, u)| mine(&u.id)).map(|(i, u)| (i as u32, u.id.clone())).collect();
    let failed = fuse_side(r, Side::Users, &users, batch, embedder.as_deref_mut(), |_| String::new(), |users| {
        let mut out: Vec<Vec<(u32, String, Vec<NamedVector>)>> = Vec::new();
        for f in fusers.iter_mut() {
            out.push(f.fuse(history, users)?.into_iter().map(|k| (k.user, k.text, k.vectors)).collect());
        }
        Ok(out)
    }, &names)?;
    if let Some(first) = failed.first() {
        // Not done: the stage stays open, the run fails, and the next run asks again for
        // exactly these users (the others are journaled and kept).
        r.manifest.stages.insert("fuse".into(), serde_json::json!({"failed_users": failed.len()}));
        r.save_manifest()?;
        bail!(
            "{} of {} users got no knowledge (user {}: {}); they are not recorded as done: rerun the same command to ask again for them",
            failed.len(),
            users.len(),
            first.id,
            first.errors.join("; ")
        );
    }
    let items: Vec<(u32, String)> = catalog.items.iter().enumerate().filter(|(_, it)| mine(&it.id)).map(|(i, it)| (i as u32, it.id.clone())).collect();
    fuse_side(r, Side::Items, &items, batch, embedder, |i| catalog_text(&catalog.items[i as usize]), |items| {
        let mut out = Vec::new();
        for f in fusers.iter_mut() {
            out.push(f.fuse_items(history, items)?.into_iter().map(|k| (k.item, k.text, k.vectors)).collect());
        }
        Ok(out)
    }, &[])?;
    Ok(())
}

/// What an item without fused text is embedded from: its title and attributes.
fn catalog_text(item: &Item) -> String {
    let attrs: Vec<String> = item.attrs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}: {v}")).collect();
    match (item.title.is_empty(), attrs.is_empty()) {
        (_, true) => item.title.clone(),
        (true, false) => attrs.join("; "),
        (false, false) => format!("{}. {}", item.title, attrs.join("; ")),
    }
}

/// Fuses one side in batches, resuming after the indices already journaled. `fuse` returns, per
/// fuser, what it said about the batch; `embedder` turns each successful record's text (or
/// `fallback_text` of its index, when the fusers gave none) into a vector. For users, a fuser that says nothing about a user is a
/// recorded failure (named after `fusers`); for items, silence means "no item knowledge".
/// A user whose last record is a failure is not done: it is fused again (the new record
/// supersedes the old, see [`latest_records`]). Returns the records still failing.
#[allow(clippy::too_many_arguments)] // the side's inputs, then its two text sources
fn fuse_side(
    r: &mut Runner,
    side: Side,
    all: &[(u32, String)],
    batch: usize,
    mut embedder: Option<&mut Embedder>,
    fallback_text: impl Fn(u32) -> String,
    mut fuse: impl FnMut(&[u32]) -> Result<Vec<Vec<(u32, String, Vec<NamedVector>)>>>,
    fusers: &[String],
) -> Result<Vec<KnowledgeRecord>> {
    let (mut journal, journaled) = Journal::open::<KnowledgeRecord>(&r.run.path(side.journal()))?;
    let mut seq = journaled.len();
    let done: HashSet<u32> = latest_records(journaled).iter().filter(|k| k.errors.is_empty()).map(|k| k.index).collect();
    let mut failed = Vec::new();
    let todo: Vec<&(u32, String)> = all.iter().filter(|(i, _)| !done.contains(i)).collect();
    let label = match side {
        Side::Users => "fuse users",
        Side::Items => "fuse items",
    };
    tracing::info!(done = done.len(), todo = todo.len(), "{label}");
    let bar = r.progress.bar(label, all.len() as u64);
    bar.inc(done.len() as u64);
    for chunk in todo.chunks(batch) {
        r.check_cancel()?;
        let indices: Vec<u32> = chunk.iter().map(|(i, _)| *i).collect();
        let mut records: Vec<KnowledgeRecord> = chunk
            .iter()
            .map(|(i, id)| KnowledgeRecord { index: *i, id: id.clone(), text: String::new(), vectors: vec![], errors: vec![] })
            .collect();
        let mut vectors: Vec<(u32, NamedVector)> = Vec::new();
        for (f, out) in fuse(&indices)?.into_iter().enumerate() {
            let mut got: BTreeMap<u32, (String, Vec<NamedVector>)> = out.into_iter().map(|(i, t, v)| (i, (t, v))).collect();
            for rec in records.iter_mut() {
                match got.remove(&rec.index) {
                    Some((text, vs)) => {
                        if !text.is_empty() {
                            if !rec.text.is_empty() {
                                rec.text.push('\n');
                            }
                            rec.text.push_str(&text);
                        }
                        for v in vs {
                            rec.vectors.push(v.name.clone());
                            vectors.push((rec.index, v));
                        }
                    }
                    None if side == Side::Users => {
                        rec.errors.push(format!("fuser `{}` returned no knowledge", fusers[f]))
                    }
                    None => {}
                }
            }
        }
        if let Some(e) = embedder.as_deref_mut() {
            let texts: Vec<(usize, String)> = records
                .iter()
                .enumerate()
                .filter(|(_, rec)| rec.errors.is_empty())
                .map(|(k, rec)| (k, if rec.text.is_empty() { fallback_text(rec.index) } else { rec.text.clone() }))
                .filter(|(_, t)| !t.is_empty())
                .collect();
            let embedded = e.embed(&texts.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>())?;
            for ((k, _), values) in texts.iter().zip(embedded) {
                records[*k].vectors.push(e.name.clone());
                vectors.push((records[*k].index, NamedVector { name: e.name.clone(), values }));
            }
        }
        if side == Side::Items {
            records.retain(|r| !r.text.is_empty() || !r.vectors.is_empty());
        }
        // Vectors first: a journaled line never points at a vector that is not on disk.
        let refs: Vec<(u32, &NamedVector)> = vectors.iter().map(|(i, v)| (*i, v)).collect();
        write_batch_vectors(&r.run.path(side.vector_dir()), seq, &refs)?;
        journal.append(&records)?;
        seq += records.len();
        failed.extend(records.into_iter().filter(|r| !r.errors.is_empty()));
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(failed)
}
