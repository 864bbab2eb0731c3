//! `kind = "ctr"`: HKFR's click-through task as instruction examples. For every labelled
//! candidate: instruction = the question, input = the user's fused knowledge plus the candidate,
//! output = "Yes" (the user's next item) or "No" (a sampled negative).

use recfuse_sdk::prelude::*;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CtrConfig {
    #[serde(default = "d_instruction")]
    pub instruction: String,
    #[serde(default = "d_yes")]
    pub yes: String,
    #[serde(default = "d_no")]
    pub no: String,
    /// Item attributes appended to the candidate's title (e.g. ["class", "release_year"]).
    #[serde(default)]
    pub item_attrs: Vec<String>,
}
fn d_instruction() -> String {
    "Given the user's behaviour and preferences, will the user interact with the candidate item next? Answer Yes or No.".into()
}
fn d_yes() -> String {
    "Yes".into()
}
fn d_no() -> String {
    "No".into()
}

pub struct CtrInstructions {
    cfg: CtrConfig,
}

impl CtrInstructions {
    fn describe(&self, cat: &Catalog, item: ItemIdx) -> String {
        let Some(it) = cat.items.get(item as usize) else { return format!("item #{item}") };
        let mut s = if it.title.is_empty() { it.id.clone() } else { it.title.clone() };
        let attrs: Vec<String> = self
            .cfg
            .item_attrs
            .iter()
            .filter_map(|k| it.attrs.get(k).map(|v| format!("{k}: {v}")))
            .collect();
        if !attrs.is_empty() {
            s.push_str(&format!(" ({})", attrs.join("; ")));
        }
        s
    }
}

impl CtrInstructions {
    /// The user's knowledge, then the candidate (with its item knowledge when a fuser gave one).
    fn input(&self, cat: &Catalog, knowledge: &str, t: &Target) -> String {
        let mut s = format!("{knowledge}\nCandidate item: {}", self.describe(cat, t.item));
        if !t.knowledge.is_empty() {
            s.push_str(&format!("\nAbout the candidate: {}", t.knowledge));
        }
        s
    }
}

impl InstructionBuilder for CtrInstructions {
    type Config = CtrConfig;
    const DESCRIPTION: &'static str = "CTR task: will the user interact with this item? Yes/No";

    fn new(cfg: CtrConfig, _host: Host) -> Result<Self> {
        ensure!(cfg.yes != cfg.no, "`yes` and `no` answers must differ");
        Ok(Self { cfg })
    }

    fn build(&mut self, view: &TrainView, requests: &[InstructionRequest]) -> Result<Vec<Instruction>> {
        let mut out = Vec::new();
        for r in requests {
            for t in &r.targets {
                out.push(Instruction {
                    user: r.user,
                    item: t.item,
                    split: r.split,
                    task: r.task.clone(),
                    instruction: self.cfg.instruction.clone(),
                    input: self.input(view.catalog, &r.knowledge, t),
                    output: if t.label > 0.5 { self.cfg.yes.clone() } else { self.cfg.no.clone() },
                    label: t.label,
                });
            }
        }
        Ok(out)
    }
}

export_plugin! {
    name: "ctr-instructions",
    instructions: { "ctr" => CtrInstructions },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_example_per_target_with_yes_no() {
        let mut it = Item { id: "9".into(), title: "Heat".into(), ..Default::default() };
        it.attrs.insert("class".into(), "Action".into());
        let cat = Catalog { items: vec![Item { id: "1".into(), ..Default::default() }, it], ..Default::default() };
        let view = TrainView { catalog: &cat, events: &[], offsets: &[] };
        let cfg: CtrConfig = serde_json::from_value(serde_json::json!({"item_attrs": ["class"]})).unwrap();
        let mut b = CtrInstructions::new(cfg, Host::standalone(std::env::temp_dir(), 0)).unwrap();
        let req = InstructionRequest {
            user: 3,
            split: Split::Train,
            task: "ctr".into(),
            knowledge: "likes thrillers".into(),
            targets: vec![
                Target { item: 1, label: 1.0, value: Some(4.0), knowledge: String::new() },
                Target { item: 0, label: 0.0, value: None, knowledge: "a quiet drama".into() },
            ],
        };
        let out = b.build(&view, &[req]).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].output, "Yes");
        assert_eq!(out[0].input, "likes thrillers\nCandidate item: Heat (class: Action)");
        assert_eq!(out[1].output, "No");
        assert_eq!(out[1].input, "likes thrillers\nCandidate item: 1\nAbout the candidate: a quiet drama");
        assert!(out.iter().all(|i| i.user == 3 && i.task == "ctr" && i.split == Split::Train));
    }
}
