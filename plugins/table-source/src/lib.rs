//! `kind = "table"`: heterogeneous behaviour from a platform's own log files (CSV, TSV or JSONL),
//! with the mapping from columns to recfuse's event fields in config. One `[[source.events]]`
//! table per file, so ratings, tags, orders and searches can come from different files and
//! become different behaviour kinds.
//!
//! ```toml
//! [source]
//! kind = "table"
//! [[source.events]]
//! path = "ratings.csv"
//! user = "userId"
//! item = "movieId"
//! value = "rating"
//! timestamp = ["timestamp"]
//! kind = { rules = [{ min = 4.0, kind = "like" }, { max = 2.0, kind = "dislike" }], default = "rate" }
//! [source.items]
//! path = "movies.csv"
//! id = "movieId"
//! title = "title"
//! ```

use recfuse_sdk::prelude::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub min: Option<f32>,
    #[serde(default)]
    pub max: Option<f32>,
    pub kind: String,
}

/// How an event's behaviour kind is found.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum KindSpec {
    /// Every event of the file has this kind.
    Constant(String),
    /// Taken from a column, optionally renamed through `map`.
    Column {
        column: String,
        #[serde(default)]
        map: BTreeMap<String, String>,
        #[serde(default)]
        default: Option<String>,
    },
    /// From the event's value: the first matching rule, else `default`.
    Rules { rules: Vec<Rule>, default: String },
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct EventFile {
    pub path: PathBuf,
    /// Inferred from the extension (`.csv`, `.tsv`, `.jsonl`) when absent.
    #[serde(default)]
    pub format: Option<Format>,
    pub user: String,
    #[serde(default)]
    pub item: Option<String>,
    pub kind: KindSpec,
    /// A template over columns, e.g. "day {order_dow}"; a plain string is a constant.
    #[serde(default)]
    pub scenario: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
    /// Columns combined into an ordinal time: Σ column_i × scale_i (scale defaults to 1 each).
    pub timestamp: Vec<String>,
    #[serde(default)]
    pub timestamp_scale: Vec<f64>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct EntityFile {
    pub path: PathBuf,
    #[serde(default)]
    pub format: Option<Format>,
    pub id: String,
    #[serde(default)]
    pub title: Option<String>,
    /// Columns kept as attributes (all other columns when empty).
    #[serde(default)]
    pub attrs: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub events: Vec<EventFile>,
    #[serde(default)]
    pub items: Option<EntityFile>,
    #[serde(default)]
    pub users: Option<EntityFile>,
    #[serde(default)]
    pub lenient: bool,
}

pub struct TableSource {
    cfg: TableConfig,
    host: Host,
}

fn format_of(path: &Path, given: Option<Format>) -> Result<Format> {
    if let Some(f) = given {
        return Ok(f);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => Ok(Format::Csv),
        Some("tsv") | Some("tab") => Ok(Format::Tsv),
        Some("jsonl") | Some("ndjson") => Ok(Format::Jsonl),
        _ => bail!("{}: cannot tell the format from the extension; set `format`", path.display()),
    }
}

/// One row as column name → text.
type Row<'a> = HashMap<&'a str, String>;

/// Visits every row of a file as a map of column → text; errors name file and line.
fn read_rows(path: &Path, format: Format, lenient: bool, host: &Host, mut f: impl FnMut(usize, &Row) -> Result<()>) -> Result<u64> {
    let mut skipped = 0u64;
    let mut fail = |line: usize, msg: String| -> Result<()> {
        if lenient {
            if skipped < 5 {
                host.warn(format!("{}:{line}: skipped: {msg}", path.display()));
            }
            skipped += 1;
            Ok(())
        } else {
            bail!("{}:{line}: {msg}", path.display())
        }
    };
    match format {
        Format::Jsonl => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let row: Row = match serde_json::from_str::<serde_json::Map<String, Value>>(line) {
                    Ok(obj) => obj
                        .iter()
                        .map(|(k, v)| {
                            let text = match v {
                                Value::String(s) => s.clone(),
                                Value::Null => String::new(),
                                other => other.to_string(),
                            };
                            (leak_key(k), text)
                        })
                        .collect(),
                    Err(e) => {
                        fail(n + 1, e.to_string())?;
                        continue;
                    }
                };
                if let Err(e) = f(n + 1, &row) {
                    fail(n + 1, format!("{e:#}"))?;
                }
            }
        }
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Csv { b',' } else { b'\t' };
            let mut reader = csv::ReaderBuilder::new()
                .delimiter(delimiter)
                .flexible(true)
                .from_path(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let headers: Vec<String> = reader
                .headers()
                .with_context(|| format!("{}:1: cannot read the header", path.display()))?
                .iter()
                .map(str::to_string)
                .collect();
            let keys: Vec<&'static str> = headers.iter().map(|h| leak_key(h)).collect();
            let mut record = csv::StringRecord::new();
            let mut row: Row = HashMap::new();
            loop {
                match reader.read_record(&mut record) {
                    Ok(false) => break,
                    Ok(true) => {}
                    Err(e) => {
                        let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
                        fail(line, e.to_string())?;
                        continue;
                    }
                }
                let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
                if record.len() != keys.len() {
                    fail(line, format!("expected {} columns, found {}", keys.len(), record.len()))?;
                    continue;
                }
                row.clear();
                for (k, v) in keys.iter().zip(record.iter()) {
                    row.insert(k, v.to_string());
                }
                if let Err(e) = f(line, &row) {
                    fail(line, format!("{e:#}"))?;
                }
            }
        }
    }
    Ok(skipped)
}

/// Column names live for the whole load; interning them as `'static` keeps rows borrow-free.
fn leak_key(k: &str) -> &'static str {
    use std::sync::{Mutex, OnceLock};
    static KEYS: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let mut keys = KEYS.get_or_init(Default::default).lock().expect("keys lock");
    if let Some(k) = keys.get(k) {
        return k;
    }
    let leaked: &'static str = Box::leak(k.to_string().into_boxed_str());
    keys.insert(k.to_string(), leaked);
    leaked
}

fn column<'r>(row: &'r Row, name: &str) -> Result<&'r str> {
    row.get(name).map(String::as_str).with_context(|| format!("no column `{name}`"))
}

/// Fills `{column}` placeholders of a template from a row.
fn render(template: &str, row: &Row) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').with_context(|| format!("unclosed `{{` in {template:?}"))? + start;
        out.push_str(column(row, &rest[start + 1..end])?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl TableSource {
    fn load_entities(&self, spec: &EntityFile, b: &mut DatasetBuilder, items: bool) -> Result<u64> {
        let format = format_of(&spec.path, spec.format)?;
        let skipped = read_rows(&spec.path, format, self.cfg.lenient, &self.host, |_, row| {
            let id = column(row, &spec.id)?;
            let mut attrs = BTreeMap::new();
            for (k, v) in row.iter() {
                let keep = if spec.attrs.is_empty() {
                    *k != spec.id && Some(*k) != spec.title.as_deref()
                } else {
                    spec.attrs.iter().any(|a| a == k)
                };
                if keep && !v.is_empty() {
                    attrs.insert(k.to_string(), v.clone());
                }
            }
            if items {
                let title = match &spec.title {
                    Some(t) => column(row, t)?,
                    None => "",
                };
                b.describe_item(id, title, attrs);
            } else {
                b.describe_user(id, attrs);
            }
            Ok(())
        })?;
        b.input(spec.path.display().to_string());
        Ok(skipped)
    }

    fn load_events(&self, spec: &EventFile, b: &mut DatasetBuilder) -> Result<u64> {
        let format = format_of(&spec.path, spec.format)?;
        ensure!(!spec.timestamp.is_empty(), "{}: `timestamp` needs at least one column", spec.path.display());
        ensure!(
            spec.timestamp_scale.is_empty() || spec.timestamp_scale.len() == spec.timestamp.len(),
            "{}: `timestamp_scale` needs one factor per timestamp column",
            spec.path.display()
        );
        let skipped = read_rows(&spec.path, format, self.cfg.lenient, &self.host, |_, row| {
            let user = b.user(column(row, &spec.user)?);
            let item = match &spec.item {
                Some(c) => match column(row, c)? {
                    "" => NONE,
                    id => b.item(id),
                },
                None => NONE,
            };
            let value = match &spec.value {
                Some(c) => {
                    let v = column(row, c)?;
                    let x = v.parse::<f32>().with_context(|| format!("column `{c}`: not a number: {v:?}"))?;
                    ensure!(x.is_finite(), "column `{c}`: not a finite number: {v:?}");
                    x
                }
                None => 1.0,
            };
            let mut timestamp = 0f64;
            for (i, c) in spec.timestamp.iter().enumerate() {
                let v = column(row, c)?;
                let x = if v.is_empty() { 0.0 } else { v.parse::<f64>().with_context(|| format!("column `{c}`: not a number: {v:?}"))? };
                // NaN would become timestamp 0, infinities saturate: refuse both.
                ensure!(x.is_finite(), "column `{c}`: not a finite timestamp: {v:?}");
                timestamp += x * spec.timestamp_scale.get(i).copied().unwrap_or(1.0);
            }
            let kind = match &spec.kind {
                KindSpec::Constant(k) => k.clone(),
                KindSpec::Column { column: c, map, default } => {
                    let v = column(row, c)?;
                    match (map.get(v), default) {
                        (Some(k), _) => k.clone(),
                        (None, Some(d)) if !map.is_empty() => d.clone(),
                        (None, None) if !map.is_empty() => bail!("column `{c}`: value {v:?} is not in `kind.map`"),
                        _ => v.to_string(),
                    }
                }
                KindSpec::Rules { rules, default } => rules
                    .iter()
                    .find(|r| r.min.is_none_or(|m| value >= m) && r.max.is_none_or(|m| value <= m))
                    .map(|r| r.kind.clone())
                    .unwrap_or_else(|| default.clone()),
            };
            let kind = b.kind(&kind);
            let scenario = match &spec.scenario {
                Some(t) => b.scenario(&render(t, row)?),
                None => b.scenario(""),
            };
            let subject = match &spec.subject {
                Some(c) => match column(row, c)? {
                    "" => NONE,
                    s => b.subject(s),
                },
                None => NONE,
            };
            b.event(Event { user, item, kind, scenario, subject, value, timestamp: timestamp as i64 });
            Ok(())
        })?;
        b.input(spec.path.display().to_string());
        Ok(skipped)
    }
}

impl BehaviorSource for TableSource {
    type Config = TableConfig;
    const DESCRIPTION: &'static str = "a platform's own CSV/TSV/JSONL behaviour logs, columns mapped in config";

    fn new(cfg: TableConfig, host: Host) -> Result<Self> {
        ensure!(!cfg.events.is_empty(), "`events` needs at least one file");
        // Checked here so that `recfuse validate` catches a wrong path, not only `run`.
        for (i, e) in cfg.events.iter().enumerate() {
            ensure!(e.path.is_file(), "`events[{i}].path`: {} does not exist", e.path.display());
        }
        for (key, t) in [("items", cfg.items.as_ref()), ("users", cfg.users.as_ref())] {
            if let Some(t) = t {
                ensure!(t.path.is_file(), "`{key}.path`: {} does not exist", t.path.display());
            }
        }
        Ok(Self { cfg, host })
    }

    fn load(&mut self) -> Result<Dataset> {
        let mut b = DatasetBuilder::new();
        let mut skipped = 0;
        if let Some(items) = &self.cfg.items {
            skipped += self.load_entities(items, &mut b, true)?;
        }
        if let Some(users) = &self.cfg.users {
            skipped += self.load_entities(users, &mut b, false)?;
        }
        for spec in &self.cfg.events {
            skipped += self.load_events(spec, &mut b)?;
        }
        b.skipped(skipped);
        Ok(b.finish())
    }
}

export_plugin! {
    name: "table-source",
    sources: { "table" => TableSource },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(dir: &Path, cfg: serde_json::Value) -> Result<Dataset> {
        let cfg: TableConfig = serde_json::from_value(cfg).unwrap();
        TableSource::new(cfg, Host::standalone(dir, 0))?.load()
    }

    #[test]
    fn maps_columns_kinds_scenarios_and_ordinal_time() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("orders.csv"),
            ",order_id,user_id,order_number,order_dow,order_hour_of_day,days_since_prior_order,product_id,add_to_cart_order,reordered\n\
             0,9,1,1,2,8,,196,1.0,0.0\n1,9,1,1,2,8,,14084,2.0,0.0\n2,10,1,2,3,7,15.0,196,1.0,1.0\n",
        )
        .unwrap();
        std::fs::write(d.path().join("tags.jsonl"), "{\"u\": 1, \"m\": 196, \"tag\": \"organic\", \"t\": 5}\n").unwrap();
        let ds = load(
            d.path(),
            serde_json::json!({"events": [
                {"path": d.path().join("orders.csv"), "user": "user_id", "item": "product_id",
                 "kind": {"column": "reordered", "map": {"0.0": "order", "1.0": "reorder"}},
                 "scenario": "day {order_dow}", "timestamp": ["order_number", "add_to_cart_order"], "timestamp_scale": [1000, 1]},
                {"path": d.path().join("tags.jsonl"), "user": "u", "item": "m", "subject": "tag", "kind": "tag", "timestamp": ["t"]},
            ]}),
        )
        .unwrap();
        assert_eq!(ds.events.len(), 4);
        let kinds: Vec<&str> = ds.events.iter().map(|e| ds.catalog.kind_name(e.kind)).collect();
        assert_eq!(kinds, vec!["order", "order", "reorder", "tag"]);
        let ts: Vec<i64> = ds.events.iter().map(|e| e.timestamp).collect();
        assert_eq!(ts, vec![1001, 1002, 2001, 5]);
        assert_eq!(ds.catalog.scenario_name(ds.events[2].scenario), "day 3");
        assert_eq!(ds.catalog.subject_text(ds.events[3].subject), Some("organic"));
        // the JSONL user 1 / item 196 are the same entities as the CSV's
        assert_eq!(ds.catalog.users.len(), 1);
        assert_eq!(ds.events[3].item, ds.events[0].item);
    }

    #[test]
    fn value_rules_items_and_errors_with_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("movies.csv"), "movieId,title,genres\n1,\"Toy Story, The (1995)\",Animation|Comedy\n").unwrap();
        std::fs::write(d.path().join("ratings.csv"), "userId,movieId,rating,timestamp\n1,1,4.5,10\n1,2,1.0,11\n1,3,oops,12\n").unwrap();
        let cfg = |lenient: bool| {
            serde_json::json!({"lenient": lenient,
                "items": {"path": d.path().join("movies.csv"), "id": "movieId", "title": "title"},
                "events": [{"path": d.path().join("ratings.csv"), "user": "userId", "item": "movieId", "value": "rating",
                            "timestamp": ["timestamp"],
                            "kind": {"rules": [{"min": 4.0, "kind": "like"}, {"max": 2.0, "kind": "dislike"}], "default": "rate"}}]})
        };
        let err = format!("{:#}", load(d.path(), cfg(false)).unwrap_err());
        assert!(err.contains("ratings.csv:4:") && err.contains("column `rating`"), "{err}");
        let ds = load(d.path(), cfg(true)).unwrap();
        assert_eq!((ds.events.len(), ds.skipped), (2, 1));
        assert_eq!(ds.catalog.items[0].title, "Toy Story, The (1995)");
        assert_eq!(ds.catalog.items[0].attrs["genres"], "Animation|Comedy");
        let kinds: Vec<&str> = ds.events.iter().map(|e| ds.catalog.kind_name(e.kind)).collect();
        assert_eq!(kinds, vec!["like", "dislike"]);
        // NaN and infinities are refused with file:line (skipped and counted when lenient).
        for (row, col) in [("1,3,NaN,12", "rating"), ("1,3,inf,12", "rating"), ("1,3,4,NaN", "timestamp"), ("1,3,4,-inf", "timestamp")] {
            std::fs::write(d.path().join("ratings.csv"), format!("userId,movieId,rating,timestamp\n1,1,4.5,10\n1,2,1.0,11\n{row}\n")).unwrap();
            let err = format!("{:#}", load(d.path(), cfg(false)).unwrap_err());
            assert!(err.contains("ratings.csv:4:") && err.contains(&format!("column `{col}`")), "{row}: {err}");
            assert_eq!(load(d.path(), cfg(true)).unwrap().skipped, 1, "{row}");
        }
    }
}
