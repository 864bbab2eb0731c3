//! Writes a user's train-period behaviour out as text through one minijinja template per
//! behaviour kind, grouped by kind and scenario, most recent first (HKFR's per-behaviour
//! templates). The `template` fuser outputs this text as knowledge; LLM fusers give it to the
//! model. A plain library: plugins depend on it without clashing plugin exports.
//!
//! Each group template sees `kind`, `scenario`, `count` (events in the group), and the most
//! recent `max_per_kind` events as `items` (titles), `subjects` (free texts) and `values`.
//! The `profile` template sees `user` (id) and `attrs` (profile attributes).
//!
//! [`fusion`] holds what the LLM fusers share: the prompt and the persistent completion cache.

pub mod fusion;

use minijinja::{context, Environment};
use recfuse_sdk::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

const DEFAULT_GROUP: &str = "{{ kind }}{% if scenario %} ({{ scenario }}){% endif %}, {{ count }} in total, recently: \
{{ (items + subjects) | join('; ') }}.";
const DEFAULT_PROFILE: &str =
    "{% if attrs %}Profile: {% for k, v in attrs | dictsort %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.{% endif %}";

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct BehaviourConfig {
    /// Most recent events listed per (kind, scenario) group.
    #[serde(default = "d_max")]
    pub max_per_kind: usize,
    /// Inline templates by behaviour kind; `default` applies to kinds without their own.
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
    /// Template files by behaviour kind (override inline templates of the same kind).
    #[serde(default)]
    pub template_files: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub profile: Option<String>,
    /// Order of kinds in the text; kinds not listed follow in catalog order.
    #[serde(default)]
    pub kind_order: Vec<String>,
    /// Only events at most this many days older than the user's latest event (recency limit;
    /// timestamps in seconds). `count` still counts the whole group.
    #[serde(default)]
    pub max_age_days: Option<f64>,
}
fn d_max() -> usize {
    10
}

impl Default for BehaviourConfig {
    fn default() -> Self {
        Self {
            max_per_kind: d_max(),
            templates: BTreeMap::new(),
            template_files: BTreeMap::new(),
            profile: None,
            kind_order: Vec::new(),
            max_age_days: None,
        }
    }
}

/// Renders users' behaviour with the configured templates.
pub struct BehaviourWriter {
    cfg: BehaviourConfig,
    env: Environment<'static>,
}

impl BehaviourWriter {
    pub fn new(cfg: BehaviourConfig) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        let mut sources: BTreeMap<String, String> = cfg.templates.clone();
        sources.entry("default".into()).or_insert_with(|| DEFAULT_GROUP.into());
        for (kind, path) in &cfg.template_files {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("template_files.{kind}: cannot read {}", path.display()))?;
            sources.insert(kind.clone(), text);
        }
        sources.insert("profile".into(), cfg.profile.clone().unwrap_or_else(|| DEFAULT_PROFILE.into()));
        for (name, text) in sources {
            env.add_template_owned(name.clone(), text).with_context(|| format!("template for `{name}` does not parse"))?;
        }
        ensure!(cfg.max_per_kind > 0, "max_per_kind must be at least 1");
        ensure!(cfg.max_age_days.is_none_or(|d| d >= 0.0), "max_age_days must not be negative");
        Ok(Self { cfg, env })
    }

    fn template_for<'k>(&self, kind: &'k str) -> &'k str {
        if self.env.get_template(kind).is_ok() {
            kind
        } else {
            "default"
        }
    }

    /// The knowledge text of one user.
    pub fn render(&self, view: &TrainView, user: UserIdx) -> Result<String> {
        let cat = view.catalog;
        let mut lines = Vec::new();
        if let Some(u) = cat.users.get(user as usize) {
            let profile = self.env.get_template("profile")?.render(context! { user => u.id, attrs => u.attrs })?;
            if !profile.trim().is_empty() {
                lines.push(profile);
            }
        }
        // Group by (kind, scenario), newest first.
        let history = view.history(user);
        let newest = history.iter().map(|e| e.timestamp).max().unwrap_or(0);
        let oldest_kept = self.cfg.max_age_days.map_or(i64::MIN, |d| newest - (d * 86_400.0) as i64);
        let mut groups: HashMap<(u32, u32), Vec<&Event>> = HashMap::new();
        for e in history.iter().rev() {
            groups.entry((e.kind, e.scenario)).or_default().push(e);
        }
        let rank = |k: u32| {
            let name = cat.kind_name(k);
            self.cfg.kind_order.iter().position(|o| o == name).unwrap_or(self.cfg.kind_order.len() + k as usize)
        };
        let mut keys: Vec<(u32, u32)> = groups.keys().copied().collect();
        keys.sort_by_key(|&(k, s)| (rank(k), s));
        for key in keys {
            let events = &groups[&key];
            let recent: Vec<&Event> =
                events.iter().copied().filter(|e| e.timestamp >= oldest_kept).take(self.cfg.max_per_kind).collect();
            if recent.is_empty() {
                continue;
            }
            let items: Vec<&str> = recent
                .iter()
                .filter(|e| e.item != NONE)
                .map(|e| {
                    let it = &cat.items[e.item as usize];
                    if it.title.is_empty() { it.id.as_str() } else { it.title.as_str() }
                })
                .collect();
            let subjects: Vec<&str> = recent.iter().filter_map(|e| cat.subject_text(e.subject)).collect();
            let values: Vec<f32> = recent.iter().map(|e| e.value).collect();
            let kind = cat.kind_name(key.0);
            let text = self.env.get_template(self.template_for(kind))?.render(context! {
                kind, scenario => cat.scenario_name(key.1), count => events.len(), items, subjects, values,
            })?;
            lines.push(text);
        }
        Ok(lines.join("\n"))
    }
}

