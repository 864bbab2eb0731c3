//! `kind = "jsonl"`: heterogeneous behaviour logs in recfuse's own JSONL schema.
//!
//! ```text
//! events.jsonl  {"user": "u1", "item": "i9", "kind": "click", "scenario": "app",
//!                "subject": "running shoes", "value": 1.0, "timestamp": 1700000000}
//! items.jsonl   {"id": "i9", "title": "Trail runner", "attrs": {"shop": "s1"}}
//! users.jsonl   {"id": "u1", "attrs": {"age": "25"}}
//! ```
//! Only `user`, `kind` and `timestamp` are required in an event; `item` may be absent for
//! behaviour without an item (a search). Paths are relative to the working directory.

use recfuse_sdk::prelude::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    pub events: PathBuf,
    #[serde(default)]
    pub items: Option<PathBuf>,
    #[serde(default)]
    pub users: Option<PathBuf>,
    /// Skip (and count) malformed lines instead of failing on the first one.
    #[serde(default)]
    pub lenient: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    user: String,
    #[serde(default)]
    item: Option<String>,
    kind: String,
    #[serde(default)]
    scenario: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default = "one", deserialize_with = "finite_f32")]
    value: f32,
    timestamp: i64,
}
fn one() -> f32 {
    1.0
}

/// A value that fits an f32: JSON has no NaN, but 1e300 would become infinity.
fn finite_f32<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f32, D::Error> {
    let v = f64::deserialize(d)?;
    if !v.is_finite() || v.abs() > f32::MAX as f64 {
        return Err(serde::de::Error::custom(format!("`value` {v} is out of range")));
    }
    Ok(v as f32)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemLine {
    id: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    attrs: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserLine {
    id: String,
    #[serde(default)]
    attrs: BTreeMap<String, String>,
}

pub struct JsonlSource {
    cfg: JsonlConfig,
    host: Host,
}

/// Calls `f` on every non-empty line; errors name the file and line. Returns lines skipped.
fn for_each_line<T: serde::de::DeserializeOwned>(
    path: &Path,
    lenient: bool,
    host: &Host,
    mut f: impl FnMut(T),
) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut skipped = 0;
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read line", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(&line) {
            Ok(v) => f(v),
            Err(e) if lenient => {
                if skipped < 5 {
                    host.warn(format!("{}:{}: skipped: {e}", path.display(), n + 1));
                }
                skipped += 1;
            }
            Err(e) => bail!("{}:{}: {e}", path.display(), n + 1),
        }
    }
    Ok(skipped)
}

impl BehaviorSource for JsonlSource {
    type Config = JsonlConfig;
    const DESCRIPTION: &'static str = "heterogeneous behaviour from recfuse-schema JSONL (events, items, users)";

    fn new(cfg: JsonlConfig, host: Host) -> Result<Self> {
        // Checked here so that `recfuse validate` catches a wrong path, not only `run`.
        let files = [("events", Some(&cfg.events)), ("items", cfg.items.as_ref()), ("users", cfg.users.as_ref())];
        for (key, path) in files {
            if let Some(p) = path {
                ensure!(p.is_file(), "`{key}`: {} does not exist", p.display());
            }
        }
        Ok(Self { cfg, host })
    }

    fn load(&mut self) -> Result<Dataset> {
        let mut b = DatasetBuilder::new();
        let lenient = self.cfg.lenient;
        if let Some(items) = &self.cfg.items {
            let skipped = for_each_line(items, lenient, &self.host, |l: ItemLine| {
                b.describe_item(&l.id, &l.title, l.attrs);
            })?;
            b.skipped(skipped);
            b.input(items.display().to_string());
        }
        if let Some(users) = &self.cfg.users {
            let skipped = for_each_line(users, lenient, &self.host, |l: UserLine| {
                b.describe_user(&l.id, l.attrs);
            })?;
            b.skipped(skipped);
            b.input(users.display().to_string());
        }
        let skipped = for_each_line(&self.cfg.events, lenient, &self.host, |l: EventLine| {
            let event = Event {
                user: b.user(&l.user),
                item: l.item.as_deref().map(|i| b.item(i)).unwrap_or(NONE),
                kind: b.kind(&l.kind),
                scenario: b.scenario(l.scenario.as_deref().unwrap_or("")),
                subject: l.subject.as_deref().map(|s| b.subject(s)).unwrap_or(NONE),
                value: l.value,
                timestamp: l.timestamp,
            };
            b.event(event);
        })?;
        b.skipped(skipped);
        b.input(self.cfg.events.display().to_string());
        Ok(b.finish())
    }
}

export_plugin! {
    name: "jsonl-source",
    sources: { "jsonl" => JsonlSource },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(body.as_bytes()).unwrap();
        p
    }

    fn source(events: PathBuf, items: Option<PathBuf>, lenient: bool) -> JsonlSource {
        let cfg = JsonlConfig { events, items, users: None, lenient };
        JsonlSource::new(cfg, Host::standalone(std::env::temp_dir(), 1)).unwrap()
    }

    #[test]
    fn reads_heterogeneous_events_and_interns_ids() {
        let d = tempfile::tempdir().unwrap();
        let items = write(d.path(), "items.jsonl", "{\"id\":\"i1\",\"title\":\"Shoe\",\"attrs\":{\"shop\":\"s\"}}\n");
        let events = write(
            d.path(),
            "events.jsonl",
            concat!(
                "{\"user\":\"u1\",\"item\":\"i1\",\"kind\":\"click\",\"scenario\":\"app\",\"timestamp\":5}\n",
                "\n",
                "{\"user\":\"u1\",\"kind\":\"search\",\"subject\":\"red shoes\",\"timestamp\":4}\n",
                "{\"user\":\"u2\",\"item\":\"i2\",\"kind\":\"order\",\"value\":3,\"timestamp\":6}\n",
            ),
        );
        let ds = source(events, Some(items), false).load().unwrap();
        assert_eq!(ds.events.len(), 3);
        assert_eq!(ds.catalog.items.len(), 2);
        assert_eq!(ds.catalog.items[0].title, "Shoe");
        assert_eq!(ds.catalog.kinds, vec!["click", "search", "order"]);
        let search = ds.events[1];
        assert_eq!(search.item, NONE);
        assert_eq!(ds.catalog.subject_text(search.subject), Some("red shoes"));
        assert_eq!(ds.events[2].value, 3.0);
        assert_eq!(ds.events[0].value, 1.0);
    }

    #[test]
    fn malformed_line_names_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let events = write(
            d.path(),
            "events.jsonl",
            "{\"user\":\"u1\",\"item\":\"i1\",\"kind\":\"click\",\"timestamp\":5}\n{\"user\":\"u1\",\"kind\":\"click\"}\n",
        );
        let err = source(events.clone(), None, false).load().unwrap_err().to_string();
        assert!(err.contains(&format!("{}:2:", events.display())), "{err}");
        assert!(err.contains("timestamp"), "{err}");
        // A value beyond f32 (it would become infinity) is refused with file:line too.
        let events = write(d.path(), "big.jsonl", "{\"user\":\"u1\",\"item\":\"i1\",\"kind\":\"buy\",\"value\":1e300,\"timestamp\":5}\n");
        let err = source(events.clone(), None, false).load().unwrap_err().to_string();
        assert!(err.contains(&format!("{}:1:", events.display())) && err.contains("out of range"), "{err}");
    }

    #[test]
    fn lenient_mode_skips_and_counts() {
        let d = tempfile::tempdir().unwrap();
        let events = write(
            d.path(),
            "events.jsonl",
            "not json\n{\"user\":\"u1\",\"item\":\"i1\",\"kind\":\"click\",\"timestamp\":5}\n{\"oops\":1}\n",
        );
        let ds = source(events, None, true).load().unwrap();
        assert_eq!(ds.events.len(), 1);
        assert_eq!(ds.skipped, 2);
    }
}
