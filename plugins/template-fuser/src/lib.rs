//! `kind = "template"`: a user's train-period behaviour written out as text through one
//! minijinja template per behaviour kind (see `recfuse-behaviour-text`), output as the user's
//! knowledge. HKFR's knowledge without the LLM: the no-LLM ablation.

use recfuse_behaviour_text::{BehaviourConfig, BehaviourWriter};
use recfuse_sdk::prelude::*;

pub struct TemplateFuser {
    writer: BehaviourWriter,
}

impl TemplateFuser {
    /// The knowledge text of one user.
    pub fn render(&self, view: &TrainView, user: UserIdx) -> Result<String> {
        self.writer.render(view, user)
    }
}

impl KnowledgeFuser for TemplateFuser {
    type Config = BehaviourConfig;
    const DESCRIPTION: &'static str = "behaviour written out through per-kind minijinja templates (no LLM)";

    fn new(cfg: BehaviourConfig, _host: Host) -> Result<Self> {
        Ok(Self { writer: BehaviourWriter::new(cfg)? })
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
    use std::collections::BTreeMap;

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
    fn recency_limit_keeps_only_recent_events() {
        let (cat, mut events) = fixture();
        // Days apart: Toy Story 30 days before the newest event, Heat 10, the search 1.
        let day = 86_400;
        for (e, ts) in events.iter_mut().zip([0, 20 * day, 29 * day, 30 * day]) {
            e.timestamp = ts;
        }
        let view = TrainView { catalog: &cat, events: &events, offsets: &[0, 4] };
        let f = fuser(serde_json::json!({"max_age_days": 10.5, "profile": ""}));
        assert_eq!(f.render(&view, 0).unwrap(), "like, 3 in total, recently: Alien; Heat.\nsearch (app), 1 in total, recently: space horror.");
        let f = fuser(serde_json::json!({"max_age_days": 0.5, "profile": ""}));
        assert_eq!(f.render(&view, 0).unwrap(), "like, 3 in total, recently: Alien.");
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
