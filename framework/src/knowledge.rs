//! The run's knowledge store: what fusers said about users and items. Texts and failures are
//! journaled as JSONL (`knowledge.jsonl`, `item_knowledge.jsonl`), one line per user or item,
//! so a killed fuse stage resumes; vectors go to binary safetensors side files, one per
//! journaled batch (`knowledge.vectors/`, `item_knowledge.vectors/`), written before the
//! batch's lines so a journaled line never points at a missing vector. A batch whose lines were
//! lost in a crash is fused again and its side file overwritten.

use crate::runstore::write_atomic;
use anyhow::{Context, Result};
use recfuse_sdk::records::*;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One line of `knowledge.jsonl` (users) or `item_knowledge.jsonl` (items).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KnowledgeRecord {
    /// User or item index.
    #[serde(alias = "user", alias = "item")]
    pub index: u32,
    /// User or item id, for people reading the file.
    pub id: String,
    pub text: String,
    /// Names of the vectors this record has in the side files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vectors: Vec<String>,
    /// Fusers that produced nothing for this user, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// User side or item side of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Users,
    Items,
}

impl Side {
    pub fn journal(self) -> &'static str {
        match self {
            Side::Users => "knowledge.jsonl",
            Side::Items => "item_knowledge.jsonl",
        }
    }
    pub fn vector_dir(self) -> &'static str {
        match self {
            Side::Users => "knowledge.vectors",
            Side::Items => "item_knowledge.vectors",
        }
    }
}

/// Writes the vectors of one batch (`(index, name, values)`) as one safetensors file; tensors
/// are named `<index>/<name>`. Nothing is written for a batch without vectors.
pub fn write_batch_vectors(dir: &Path, seq: usize, vectors: &[(u32, &NamedVector)]) -> Result<()> {
    if vectors.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes: Vec<(String, Vec<u8>, usize)> = vectors
        .iter()
        .map(|(i, v)| (format!("{i}/{}", v.name), v.values.iter().flat_map(|x| x.to_le_bytes()).collect(), v.values.len()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, data, n)| Ok((name.clone(), TensorView::new(Dtype::F32, vec![*n], data)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let meta = Some(std::collections::HashMap::from([("format".to_string(), "recfuse-knowledge".to_string())]));
    let data = safetensors::serialize(views, meta)?;
    // Named by the journal position of the batch, so a retried user's vectors land in a later
    // file (read after, so they win) and never overwrite another batch's.
    write_atomic(&dir.join(format!("batch-{seq:010}.safetensors")), &data)
}

/// Every vector in `dir`, by (index, name).
pub fn read_vectors(dir: &Path) -> Result<BTreeMap<(u32, String), Vec<f32>>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(out) };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    files.sort();
    for path in files {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is not a safetensors file", path.display()))?;
        for (name, view) in st.tensors() {
            let (index, vname) = name
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<u32>().ok()?, n.to_string())))
                .with_context(|| format!("{}: tensor `{name}` is not named <index>/<vector>", path.display()))?;
            anyhow::ensure!(view.dtype() == Dtype::F32, "{}: tensor `{name}` is not f32", path.display());
            let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            out.insert((index, vname), values);
        }
    }
    Ok(out)
}

/// Journal records joined with their vectors, for one side of a run directory.
pub fn load_side(run_root: &Path, side: Side) -> Result<Vec<(KnowledgeRecord, Vec<NamedVector>)>> {
    let path = run_root.join(side.journal());
    if !path.exists() {
        return Ok(vec![]);
    }
    let records = latest_records(crate::runstore::read_journal(&path)?);
    let mut vectors = read_vectors(&run_root.join(side.vector_dir()))?;
    records
        .into_iter()
        .map(|r| {
            let vs = r
                .vectors
                .iter()
                .map(|name| {
                    let values = vectors.remove(&(r.index, name.clone())).with_context(|| {
                        format!("{}: vector `{name}` of {} is missing from {}/", side.journal(), r.index, side.vector_dir())
                    })?;
                    Ok(NamedVector { name: name.clone(), values })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((r, vs))
        })
        .collect()
}

/// One record per index, the last one journaled: a user the fuse stage retried (an earlier
/// attempt failed) has several lines, and the retry is what counts.
pub fn latest_records(records: Vec<KnowledgeRecord>) -> Vec<KnowledgeRecord> {
    let mut by_index: BTreeMap<u32, KnowledgeRecord> = BTreeMap::new();
    for r in records {
        by_index.insert(r.index, r);
    }
    by_index.into_values().collect()
}

/// The knowledge of a run as stages after fusion receive it, sorted by index.
#[derive(Default, Debug, Clone)]
pub struct KnowledgeBase {
    pub users: Vec<Knowledge>,
    pub items: Vec<ItemKnowledge>,
}

impl KnowledgeBase {
    pub fn load(run_root: &Path) -> Result<Self> {
        let mut users: Vec<Knowledge> = load_side(run_root, Side::Users)?
            .into_iter()
            .map(|(r, vectors)| Knowledge { user: r.index, text: r.text, vectors })
            .collect();
        let mut items: Vec<ItemKnowledge> = load_side(run_root, Side::Items)?
            .into_iter()
            .map(|(r, vectors)| ItemKnowledge { item: r.index, text: r.text, vectors })
            .collect();
        users.sort_by_key(|k| k.user);
        items.sort_by_key(|k| k.item);
        Ok(Self { users, items })
    }
    pub fn view(&self) -> KnowledgeView<'_> {
        KnowledgeView { users: &self.users, items: &self.items }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_through_side_files() {
        let d = tempfile::tempdir().unwrap();
        let a = NamedVector { name: "cf".into(), values: vec![0.5, -1.25, 3.0] };
        let b = NamedVector { name: "text".into(), values: vec![1e-7; 384] };
        write_batch_vectors(d.path(), 0, &[(0, &a), (1, &b)]).unwrap();
        write_batch_vectors(d.path(), 2, &[(2, &a)]).unwrap();
        let v = read_vectors(d.path()).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[&(0, "cf".to_string())], a.values);
        assert_eq!(v[&(1, "text".to_string())], b.values);
        // Binary, not JSON floats: 384 floats take 1536 bytes plus a small header.
        let size = std::fs::metadata(d.path().join("batch-0000000000.safetensors")).unwrap().len();
        assert!(size < 1536 + 12 + 400, "{size}");
    }
}
