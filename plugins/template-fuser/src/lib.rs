//! `kind = "template"`: writes a user's train-period behaviour out as text through one
//! minijinja template per behaviour kind, grouped by kind and scenario, most recent first.
//! This is HKFR's knowledge without the LLM (the no-LLM ablation), and the text an LLM fuser
//! would be given.
//!
//! Each group template sees `kind`, `scenario`, `count` (events in the group), and the most
//! recent `max_per_kind` events as `items` (titles), `subjects` (free texts) and `values`.
//! The `profile` template sees `user` (id) and `attrs` (profile attributes).

use minijinja::{context, Environment};
use recfuse_sdk::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

const DEFAULT_GROUP: &str = "{{ kind }}{% if scenario %} ({{ scenario }}){% endif %}, {{ count }} in total, recently: \
{{ (items + subjects) | join('; ') }}.";
const DEFAULT_PROFILE: &str =
    "{% if attrs %}Profile: {% for k, v in attrs | dictsort %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.{% endif %}";

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
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
}
fn d_max() -> usize {
    10
}

pub struct TemplateFuser {
    cfg: TemplateConfig,
    env: Environment<'static>,
}

impl TemplateFuser {
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
        let mut groups: HashMap<(u32, u32), Vec<&Event>> = HashMap::new();
        for e in view.history(user).iter().rev() {
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
            let recent = &events[..events.len().min(self.cfg.max_per_kind)];
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

impl KnowledgeFuser for TemplateFuser {
    type Config = TemplateConfig;
    const DESCRIPTION: &'static str = "behaviour written out through per-kind minijinja templates (no LLM)";

    fn new(cfg: TemplateConfig, _host: Host) -> Result<Self> {
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
        Ok(Self { cfg, env })
    }

    fn fuse(&mut self, view: &TrainView, users: &[UserIdx]) -> Result<Vec<Knowledge>> {
        users
            .iter()
            .map(|&u| Ok(Knowledge { user: u, text: self.render(view, u)?, vectors: vec![] }))
            .collect()
    }
}

export_plugin! {
    name: "template-fuser",
    fusers: { "template" => TemplateFuser },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (Catalog, Vec<Event>) {
        let mut attrs = BTreeMap::new();
        attrs.insert("age".to_string(), "24".to_string());
        let cat = Catalog {
            items: ["Toy Story", "Heat", "Alien"]
                .iter()
                .enumerate()
                .map(|(i, t)| Item { id: i.to_string(), title: t.to_string(), ..Default::default() })
                .collect(),
            users: vec![User { id: "u0".into(), attrs }],
            kinds: vec!["like".into(), "search".into()],
            scenarios: vec!["".into(), "app".into()],
            subjects: vec!["space horror".into()],
        };
        let ev = |item, kind, scenario, subject, ts| Event { user: 0, item, kind, scenario, subject, value: 5.0, timestamp: ts };
        let events = vec![ev(0, 0, 0, NONE, 1), ev(1, 0, 0, NONE, 2), ev(NONE, 1, 1, 0, 3), ev(2, 0, 0, NONE, 4)];
        (cat, events)
    }

    fn fuser(cfg: serde_json::Value) -> TemplateFuser {
        TemplateFuser::new(serde_json::from_value(cfg).unwrap(), Host::standalone(std::env::temp_dir(), 0)).unwrap()
    }

    #[test]
    fn groups_by_kind_newest_first_with_limit() {
        let (cat, events) = fixture();
        let view = TrainView { catalog: &cat, events: &events, offsets: &[0, 4] };
        let f = fuser(serde_json::json!({"max_per_kind": 2}));
        let text = f.render(&view, 0).unwrap();
        assert_eq!(
            text,
            "Profile: age 24.\nlike, 3 in total, recently: Alien; Heat.\nsearch (app), 1 in total, recently: space horror."
        );
    }

    #[test]
    fn per_kind_templates_and_order() {
        let (cat, events) = fixture();
        let view = TrainView { catalog: &cat, events: &events, offsets: &[0, 4] };
        let f = fuser(serde_json::json!({
            "templates": {"search": "Searched for {{ subjects | join(', ') }}"},
            "profile": "",
            "kind_order": ["search", "like"],
        }));
        let text = f.render(&view, 0).unwrap();
        assert!(text.starts_with("Searched for space horror\nlike, 3 in total"), "{text}");
    }

    #[test]
    fn broken_template_is_a_config_error() {
        let r = TemplateFuser::new(
            serde_json::from_value(serde_json::json!({"templates": {"like": "{{ oops"}})).unwrap(),
            Host::standalone(std::env::temp_dir(), 0),
        );
        let err = format!("{:#}", r.err().unwrap());
        assert!(err.contains("template for `like` does not parse"), "{err}");
    }
}
