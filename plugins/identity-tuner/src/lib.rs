//! `kind = "identity"`: the no-tuning baseline. It trains nothing, but it does the bookkeeping
//! a real tuner does: it checks the instruction set, writes its statistics to the artifact
//! directory and returns an `identity` artifact a ranker can recognise (and ignore).

use recfuse_sdk::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Fail when there are fewer train examples than this (catches an empty instruction stage).
    #[serde(default)]
    pub min_examples: usize,
}

pub struct IdentityTuner {
    cfg: IdentityConfig,
    host: Host,
}

#[derive(Serialize)]
struct Stats {
    train: usize,
    valid: usize,
    positives: usize,
    tasks: BTreeMap<String, usize>,
    mean_input_chars: f64,
    users_with_knowledge: usize,
    items_with_knowledge: usize,
}

impl Tuner for IdentityTuner {
    type Config = IdentityConfig;
    const DESCRIPTION: &'static str = "trains nothing; records the instruction set (no-tuning baseline)";

    fn new(cfg: IdentityConfig, host: Host) -> Result<Self> {
        Ok(Self { cfg, host })
    }

    fn tune(&mut self, _view: &TrainView, inputs: &TuneInputs, out_dir: &Path) -> Result<Artifact> {
        let (train, valid) = (inputs.train, inputs.valid);
        ensure!(
            train.len() >= self.cfg.min_examples,
            "only {} train examples, min_examples is {}",
            train.len(),
            self.cfg.min_examples
        );
        let mut tasks = BTreeMap::new();
        for i in train {
            *tasks.entry(i.task.clone()).or_insert(0) += 1;
        }
        let stats = Stats {
            train: train.len(),
            valid: valid.len(),
            positives: train.iter().filter(|i| i.label > 0.5).count(),
            tasks,
            mean_input_chars: train.iter().map(|i| i.input.chars().count()).sum::<usize>() as f64 / train.len().max(1) as f64,
            users_with_knowledge: inputs.knowledge.iter().filter(|k| !k.text.is_empty() || !k.vectors.is_empty()).count(),
            items_with_knowledge: inputs.item_knowledge.len(),
        };
        std::fs::create_dir_all(out_dir)?;
        let path = out_dir.join("identity.json");
        let meta = serde_json::to_string_pretty(&stats)?;
        std::fs::write(&path, &meta).with_context(|| format!("writing {}", path.display()))?;
        self.host.info(format!("identity tuner: {} train / {} valid examples, nothing trained", stats.train, stats.valid));
        Ok(Artifact { kind: "identity".into(), path: path.display().to_string(), meta })
    }
}

export_plugin! {
    name: "identity-tuner",
    tuners: { "identity" => IdentityTuner },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(label: f32) -> Instruction {
        Instruction {
            user: 0,
            item: 1,
            split: Split::Train,
            task: "ctr".into(),
            instruction: "q".into(),
            input: "abcd".into(),
            output: "Yes".into(),
            label,
        }
    }

    #[test]
    fn writes_statistics_artifact() {
        let d = tempfile::tempdir().unwrap();
        let cat = Catalog::default();
        let view = TrainView { catalog: &cat, events: &[], offsets: &[] };
        let mut t = IdentityTuner::new(IdentityConfig { min_examples: 1 }, Host::standalone(d.path(), 0)).unwrap();
        let train = [ex(1.0), ex(0.0), ex(0.0)];
        let items = [ItemKnowledge { item: 1, text: "a film".into(), vectors: vec![] }];
        let inputs = TuneInputs { train: &train, valid: &[ex(1.0)], knowledge: &[], item_knowledge: &items };
        let a = t.tune(&view, &inputs, d.path()).unwrap();
        assert_eq!(a.kind, "identity");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&a.path).unwrap()).unwrap();
        assert_eq!(v["train"], 3);
        assert_eq!(v["positives"], 1);
        assert_eq!(v["tasks"]["ctr"], 3);
        assert_eq!(v["items_with_knowledge"], 1);
        assert!(t.tune(&view, &TuneInputs::default(), d.path()).is_err());
    }
}
