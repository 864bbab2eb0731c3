//! Instruction builders for four tasks, each a component whose prompts are templates in config
//! (minijinja; variables listed per task). Every example's input starts with the user's fused
//! knowledge; the candidate part follows a line starting with `Candidate`.
//!
//! * `ctr`: will the user interact with this candidate? Output "Yes" (the user's target item)
//!   or "No" (a sampled negative). One example per candidate.
//! * `next-item`: which of these candidates (the target and negatives, shuffled; 20 by
//!   default) comes next? Output: the target's name. One example per request.
//! * `rating`: what rating will the user give? Output: the target event's value, rounded.
//!   Positives only; a test target's value is never handed out, so test examples have an
//!   empty output (they exist to be scored, not trained on).
//! * `explanation`: why would the user like it? Output: an explanation written from the data
//!   (attributes the candidate shares with items in the user's history, and those items),
//!   since the datasets carry no review text; see docs/data.md. Positives only.

use minijinja::Environment;
use recfuse_sdk::prelude::*;
use recfuse_sdk::SeededRng;
use std::collections::{BTreeSet, HashSet};

const CTR_INPUT: &str = "{{ knowledge }}\nCandidate item: {{ candidate }}{% if candidate_knowledge %}\nAbout the candidate: {{ candidate_knowledge }}{% endif %}";
const NEXT_INPUT: &str = "{{ knowledge }}\nCandidate items:{% for c in candidates %}\n{{ loop.index }}. {{ c }}{% endfor %}";
const EXPLANATION_OUTPUT: &str = "{% if matches %}The user enjoyed {{ matches | join(', ') }}; {{ candidate }} shares their {{ shared | join(', ') }}.{% else %}{{ candidate }} fits the user's recent choices.{% endif %}";

/// Compiled `input` (and `output`) templates; errors name the config key.
struct Templates {
    env: Environment<'static>,
    has_output: bool,
}

impl Templates {
    fn new(input: &str, output: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template_owned("input", input.to_string())
            .map_err(|e| anyhow!("`input` template: {e:#}"))?;
        if let Some(o) = output {
            env.add_template_owned("output", o.to_string())
                .map_err(|e| anyhow!("`output` template: {e:#}"))?;
        }
        Ok(Self {
            env,
            has_output: output.is_some(),
        })
    }

    fn render(&self, which: &str, ctx: minijinja::Value) -> Result<String> {
        debug_assert!(which != "output" || self.has_output);
        self.env
            .get_template(which)?
            .render(ctx)
            .map_err(|e| anyhow!("`{which}` template: {e:#}"))
    }
}

/// An item as text: its title (or id) and the configured attributes.
fn describe(cat: &Catalog, item: ItemIdx, attrs: &[String]) -> String {
    let Some(it) = cat.items.get(item as usize) else {
        return format!("item #{item}");
    };
    let mut s = if it.title.is_empty() {
        it.id.clone()
    } else {
        it.title.clone()
    };
    let listed: Vec<String> = attrs
        .iter()
        .filter_map(|k| it.attrs.get(k).map(|v| format!("{k}: {v}")))
        .collect();
    if !listed.is_empty() {
        s.push_str(&format!(" ({})", listed.join("; ")));
    }
    s
}

/// The candidate part of every task's context.
fn context(knowledge: &str, candidate: String, t: &Target) -> minijinja::Value {
    minijinja::context! { knowledge => knowledge, candidate => candidate, candidate_knowledge => t.knowledge }
}

fn d_attrs() -> Vec<String> {
    vec![]
}

// ---------------------------------------------------------------------------------------- ctr

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CtrConfig {
    #[serde(default = "d_ctr_instruction")]
    pub instruction: String,
    /// Template; variables: knowledge, candidate, candidate_knowledge.
    #[serde(default = "d_ctr_input")]
    pub input: String,
    #[serde(default = "d_yes")]
    pub yes: String,
    #[serde(default = "d_no")]
    pub no: String,
    /// Item attributes appended to the candidate's title (e.g. ["class", "release_year"]).
    #[serde(default = "d_attrs")]
    pub item_attrs: Vec<String>,
}
fn d_ctr_instruction() -> String {
    "Given the user's behaviour and preferences, will the user interact with the candidate item next? Answer Yes or No.".into()
}
fn d_ctr_input() -> String {
    CTR_INPUT.into()
}
fn d_yes() -> String {
    "Yes".into()
}
fn d_no() -> String {
    "No".into()
}

pub struct CtrInstructions {
    cfg: CtrConfig,
    templates: Templates,
}

impl InstructionBuilder for CtrInstructions {
    type Config = CtrConfig;
    const DESCRIPTION: &'static str = "CTR task: will the user interact with this item? Yes/No";

    fn new(cfg: CtrConfig, _host: Host) -> Result<Self> {
        ensure!(cfg.yes != cfg.no, "`yes` and `no` answers must differ");
        Ok(Self {
            templates: Templates::new(&cfg.input, None)?,
            cfg,
        })
    }

    fn build(
        &mut self,
        view: &TrainView,
        requests: &[InstructionRequest],
    ) -> Result<Vec<Instruction>> {
        let mut out = Vec::new();
        for r in requests {
            for t in &r.targets {
                let ctx = context(
                    &r.knowledge,
                    describe(view.catalog, t.item, &self.cfg.item_attrs),
                    t,
                );
                out.push(Instruction {
                    user: r.user,
                    item: t.item,
                    split: r.split,
                    task: r.task.clone(),
                    instruction: self.cfg.instruction.clone(),
                    input: self.templates.render("input", ctx)?,
                    output: if t.label > 0.5 {
                        self.cfg.yes.clone()
                    } else {
                        self.cfg.no.clone()
                    },
                    label: t.label,
                });
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------- next-item

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct NextItemConfig {
    #[serde(default = "d_next_instruction")]
    pub instruction: String,
    /// Template; variables: knowledge, candidates (names, shuffled), candidate (the target's name).
    #[serde(default = "d_next_input")]
    pub input: String,
    /// List length: the target plus the request's negatives, topped up with items the user
    /// has not interacted with.
    #[serde(default = "d_candidates")]
    pub candidates: usize,
    #[serde(default = "d_attrs")]
    pub item_attrs: Vec<String>,
}
fn d_next_instruction() -> String {
    "Given the user's behaviour and preferences, which of the candidate items will the user interact with next? Answer with its name.".into()
}
fn d_next_input() -> String {
    NEXT_INPUT.into()
}
fn d_candidates() -> usize {
    20
}

pub struct NextItemInstructions {
    cfg: NextItemConfig,
    templates: Templates,
    seed: u64,
}

impl NextItemInstructions {
    /// The target, the request's negatives, and random unseen items up to `candidates`,
    /// shuffled (reproducibly per user and split).
    fn candidates(
        &self,
        view: &TrainView,
        r: &InstructionRequest,
        target: ItemIdx,
    ) -> Vec<ItemIdx> {
        let mut rng = SeededRng::new(self.seed ^ ((r.user as u64) << 20) ^ r.split as u64);
        let seen: HashSet<ItemIdx> = view.history(r.user).iter().map(|e| e.item).collect();
        let mut list = vec![target];
        for t in r.targets.iter().filter(|t| t.label <= 0.5) {
            if list.len() < self.cfg.candidates && !list.contains(&t.item) {
                list.push(t.item);
            }
        }
        let n = view.n_items();
        let mut tries = 0;
        while list.len() < self.cfg.candidates.min(n) && tries < 100 * self.cfg.candidates {
            let i = rng.below(n) as ItemIdx;
            if !seen.contains(&i) && !list.contains(&i) {
                list.push(i);
            }
            tries += 1;
        }
        rng.shuffle(&mut list);
        list
    }
}

impl NextItemInstructions {
    /// The example of `r` whose candidate list is `names` and whose answer is `names[answer]`
    /// (item `item`).
    fn example(&self, r: &InstructionRequest, names: &[String], answer: usize, item: ItemIdx, label: f32) -> Result<Instruction> {
        let ctx = minijinja::context! { knowledge => r.knowledge, candidates => names, candidate => names[answer] };
        Ok(Instruction {
            user: r.user,
            item,
            split: r.split,
            task: r.task.clone(),
            instruction: self.cfg.instruction.clone(),
            input: self.templates.render("input", ctx)?,
            output: names[answer].clone(),
            label,
        })
    }
}

impl InstructionBuilder for NextItemInstructions {
    type Config = NextItemConfig;
    const DESCRIPTION: &'static str =
        "next-item task: which of these candidates comes next? (answer: its name)";

    fn new(cfg: NextItemConfig, host: Host) -> Result<Self> {
        ensure!(cfg.candidates >= 2, "`candidates` must be at least 2");
        Ok(Self {
            templates: Templates::new(&cfg.input, None)?,
            seed: host.seed(),
            cfg,
        })
    }

    fn build(
        &mut self,
        view: &TrainView,
        requests: &[InstructionRequest],
    ) -> Result<Vec<Instruction>> {
        let mut out = Vec::new();
        for r in requests {
            let Some(target) = r.targets.iter().find(|t| t.label > 0.5) else {
                // A request to score (no positive, e.g. from the `llm` ranker): the listed
                // candidates are the request's, in its order, and each gets an example whose
                // answer is that candidate, so its likelihood can be read off.
                let names: Vec<String> = r.targets.iter().map(|t| describe(view.catalog, t.item, &self.cfg.item_attrs)).collect();
                for (j, t) in r.targets.iter().enumerate() {
                    out.push(self.example(r, &names, j, t.item, t.label)?);
                }
                continue;
            };
            let list = self.candidates(view, r, target.item);
            let names: Vec<String> = list.iter().map(|&i| describe(view.catalog, i, &self.cfg.item_attrs)).collect();
            let answer = list.iter().position(|&i| i == target.item).expect("the target is listed");
            out.push(self.example(r, &names, answer, target.item, 1.0)?);
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------------------------- rating

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RatingConfig {
    #[serde(default = "d_rating_instruction")]
    pub instruction: String,
    /// Template; variables: knowledge, candidate, candidate_knowledge.
    #[serde(default = "d_ctr_input")]
    pub input: String,
    /// Ratings are clamped to this range and rounded to whole numbers.
    #[serde(default = "d_min")]
    pub min: f32,
    #[serde(default = "d_max")]
    pub max: f32,
    #[serde(default = "d_attrs")]
    pub item_attrs: Vec<String>,
}
fn d_rating_instruction() -> String {
    "Given the user's behaviour and preferences, how will the user rate the candidate item on a scale of 1 to 5? Answer with a number.".into()
}
fn d_min() -> f32 {
    1.0
}
fn d_max() -> f32 {
    5.0
}

pub struct RatingInstructions {
    cfg: RatingConfig,
    templates: Templates,
}

impl InstructionBuilder for RatingInstructions {
    type Config = RatingConfig;
    const DESCRIPTION: &'static str =
        "rating task: what rating will the user give this item? (answer: a number)";

    fn new(cfg: RatingConfig, _host: Host) -> Result<Self> {
        ensure!(
            cfg.min.is_finite() && cfg.max.is_finite() && cfg.min < cfg.max,
            "`min` must be below `max`"
        );
        Ok(Self {
            templates: Templates::new(&cfg.input, None)?,
            cfg,
        })
    }

    fn build(
        &mut self,
        view: &TrainView,
        requests: &[InstructionRequest],
    ) -> Result<Vec<Instruction>> {
        let mut out = Vec::new();
        for r in requests {
            for t in r.targets.iter().filter(|t| t.label > 0.5) {
                let ctx = context(
                    &r.knowledge,
                    describe(view.catalog, t.item, &self.cfg.item_attrs),
                    t,
                );
                let output = match t.value {
                    Some(v) if v.is_finite() => {
                        format!("{}", v.clamp(self.cfg.min, self.cfg.max).round() as i64)
                    }
                    _ => String::new(), // test targets (and events without a value): nothing to learn
                };
                out.push(Instruction {
                    user: r.user,
                    item: t.item,
                    split: r.split,
                    task: r.task.clone(),
                    instruction: self.cfg.instruction.clone(),
                    input: self.templates.render("input", ctx)?,
                    output,
                    label: 1.0,
                });
            }
        }
        Ok(out)
    }
}

// -------------------------------------------------------------------------------- explanation

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ExplanationConfig {
    #[serde(default = "d_explanation_instruction")]
    pub instruction: String,
    /// Template; variables: knowledge, candidate, candidate_knowledge.
    #[serde(default = "d_ctr_input")]
    pub input: String,
    /// Template of the supervising explanation; variables: candidate, shared (attribute values
    /// the candidate shares with the matched history items), matches (those items' names, most
    /// recent first), knowledge.
    #[serde(default = "d_explanation_output")]
    pub output: String,
    /// Item attributes whose values (split on spaces, `|` and `,`) are compared.
    #[serde(default = "d_explain_attrs")]
    pub explain_attrs: Vec<String>,
    /// History events count as liked when their value is at least this (events without a
    /// value, value 0, always count).
    #[serde(default = "d_liked")]
    pub liked_min: f32,
    /// At most this many matched history items.
    #[serde(default = "d_matches")]
    pub max_matches: usize,
    #[serde(default = "d_attrs")]
    pub item_attrs: Vec<String>,
}
fn d_explanation_instruction() -> String {
    "Given the user's behaviour and preferences, explain why the user would enjoy the candidate item.".into()
}
fn d_explanation_output() -> String {
    EXPLANATION_OUTPUT.into()
}
fn d_explain_attrs() -> Vec<String> {
    vec!["class".into()]
}
fn d_liked() -> f32 {
    4.0
}
fn d_matches() -> usize {
    3
}

pub struct ExplanationInstructions {
    cfg: ExplanationConfig,
    templates: Templates,
}

impl ExplanationInstructions {
    fn values(&self, cat: &Catalog, item: ItemIdx) -> BTreeSet<String> {
        let Some(it) = cat.items.get(item as usize) else {
            return BTreeSet::new();
        };
        self.cfg
            .explain_attrs
            .iter()
            .filter_map(|k| it.attrs.get(k))
            .flat_map(|v| {
                v.split([' ', '|', ','])
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// (shared values, matched history item names): the most recent liked history items that
    /// share a value with the candidate.
    fn evidence(
        &self,
        view: &TrainView,
        user: UserIdx,
        item: ItemIdx,
    ) -> (Vec<String>, Vec<String>) {
        let wanted = self.values(view.catalog, item);
        let (mut shared, mut matches) = (BTreeSet::new(), Vec::new());
        for e in view.history(user).iter().rev() {
            if matches.len() >= self.cfg.max_matches {
                break;
            }
            let liked = e.value == 0.0 || e.value >= self.cfg.liked_min;
            let common: Vec<String> = self
                .values(view.catalog, e.item)
                .intersection(&wanted)
                .cloned()
                .collect();
            let name = describe(view.catalog, e.item, &[]);
            if liked && e.item != item && !common.is_empty() && !matches.contains(&name) {
                shared.extend(common);
                matches.push(name);
            }
        }
        (shared.into_iter().collect(), matches)
    }
}

impl InstructionBuilder for ExplanationInstructions {
    type Config = ExplanationConfig;
    const DESCRIPTION: &'static str =
        "explanation task: why would the user like this item? (answer: a sentence from the data)";

    fn new(cfg: ExplanationConfig, _host: Host) -> Result<Self> {
        Ok(Self {
            templates: Templates::new(&cfg.input, Some(&cfg.output))?,
            cfg,
        })
    }

    fn build(
        &mut self,
        view: &TrainView,
        requests: &[InstructionRequest],
    ) -> Result<Vec<Instruction>> {
        let mut out = Vec::new();
        for r in requests {
            for t in r.targets.iter().filter(|t| t.label > 0.5) {
                let candidate = describe(view.catalog, t.item, &self.cfg.item_attrs);
                let (shared, matches) = self.evidence(view, r.user, t.item);
                let name = describe(view.catalog, t.item, &[]);
                let explanation = self.templates.render(
                    "output",
                    minijinja::context! { candidate => name, shared => shared, matches => matches, knowledge => r.knowledge },
                )?;
                out.push(Instruction {
                    user: r.user,
                    item: t.item,
                    split: r.split,
                    task: r.task.clone(),
                    instruction: self.cfg.instruction.clone(),
                    input: self
                        .templates
                        .render("input", context(&r.knowledge, candidate, t))?,
                    output: explanation,
                    label: 1.0,
                });
            }
        }
        Ok(out)
    }
}

export_plugin! {
    name: "instructions",
    instructions: {
        "ctr" => CtrInstructions,
        "next-item" => NextItemInstructions,
        "rating" => RatingInstructions,
        "explanation" => ExplanationInstructions,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let item = |id: &str, title: &str, class: &str| {
            let mut it = Item {
                id: id.into(),
                title: title.into(),
                ..Default::default()
            };
            it.attrs.insert("class".into(), class.into());
            it
        };
        let mut items = vec![
            item("1", "", "Drama"),
            item("9", "Heat", "Action Thriller"),
            item("3", "Alien", "Horror Sci-Fi"),
            item("4", "Speed", "Action"),
            item("5", "Fargo", "Crime Thriller"),
        ];
        items.extend((6..40).map(|i| item(&i.to_string(), &format!("Film {i}"), "Comedy")));
        Catalog {
            items,
            ..Default::default()
        }
    }

    fn ev(item: u32, value: f32) -> Event {
        Event {
            user: 3,
            item,
            kind: 0,
            scenario: 0,
            subject: NONE,
            value,
            timestamp: item as i64,
        }
    }

    fn request(split: Split, task: &str) -> InstructionRequest {
        InstructionRequest {
            user: 3,
            split,
            task: task.into(),
            knowledge: "likes thrillers".into(),
            targets: vec![
                Target {
                    item: 1,
                    label: 1.0,
                    value: if split == Split::Test {
                        None
                    } else {
                        Some(4.4)
                    },
                    knowledge: String::new(),
                },
                Target {
                    item: 0,
                    label: 0.0,
                    value: None,
                    knowledge: "a quiet drama".into(),
                },
            ],
        }
    }

    fn host() -> Host {
        Host::standalone(std::env::temp_dir(), 5)
    }

    fn cfg<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    /// User 3's history: Speed (5, liked), Alien (2, disliked), Fargo (4, liked).
    fn with_view<R>(f: impl FnOnce(&TrainView) -> R) -> R {
        let cat = catalog();
        let events = vec![ev(3, 5.0), ev(2, 2.0), ev(4, 4.0)];
        let offsets = [0, 0, 0, 0, 3];
        f(&TrainView {
            catalog: &cat,
            events: &events,
            offsets: &offsets,
        })
    }

    #[test]
    fn ctr_one_example_per_target_with_yes_no() {
        let mut b = CtrInstructions::new(cfg(serde_json::json!({"item_attrs": ["class"]})), host())
            .unwrap();
        let out = with_view(|v| b.build(v, &[request(Split::Train, "ctr")]).unwrap());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].output, "Yes");
        assert_eq!(
            out[0].input,
            "likes thrillers\nCandidate item: Heat (class: Action Thriller)"
        );
        assert_eq!(out[1].output, "No");
        assert_eq!(
            out[1].input,
            "likes thrillers\nCandidate item: 1 (class: Drama)\nAbout the candidate: a quiet drama"
        );
        assert!(out
            .iter()
            .all(|i| i.user == 3 && i.task == "ctr" && i.split == Split::Train));
    }

    #[test]
    fn next_item_lists_the_target_among_unseen_candidates() {
        let mut b = NextItemInstructions::new(cfg(serde_json::json!({})), host()).unwrap();
        let out = with_view(|v| b.build(v, &[request(Split::Train, "next")]).unwrap());
        assert_eq!(out.len(), 1);
        let i = &out[0];
        assert_eq!((i.output.as_str(), i.item, i.label), ("Heat", 1, 1.0));
        let lines: Vec<&str> = i.input.lines().skip(2).collect();
        assert_eq!(lines.len(), 20);
        let names: Vec<&str> = lines
            .iter()
            .map(|l| l.split_once(". ").unwrap().1)
            .collect();
        assert!(
            names.contains(&"Heat") && names.contains(&"1"),
            "target and given negative listed"
        );
        assert!(
            !names.contains(&"Speed") && !names.contains(&"Alien") && !names.contains(&"Fargo"),
            "history items are not candidates"
        );
        assert_eq!(
            names.iter().collect::<HashSet<_>>().len(),
            20,
            "no duplicates"
        );
        // Reproducible, and a different seed shuffles differently.
        let again = with_view(|v| b.build(v, &[request(Split::Train, "next")]).unwrap());
        assert_eq!(again[0].input, i.input);
        let mut other = NextItemInstructions::new(
            cfg(serde_json::json!({})),
            Host::standalone(std::env::temp_dir(), 6),
        )
        .unwrap();
        assert_ne!(
            with_view(|v| other.build(v, &[request(Split::Train, "next")]).unwrap())[0].input,
            i.input
        );
    }

    /// A scoring request (no positive) lists exactly its candidates, in order, and gives
    /// each one an example answering with it, all under the same prompt.
    #[test]
    fn next_item_scoring_request_lists_its_candidates_with_one_example_each() {
        let mut b = NextItemInstructions::new(cfg(serde_json::json!({})), host()).unwrap();
        let mut r = request(Split::Test, "next");
        r.targets.iter_mut().for_each(|t| t.label = 0.0);
        let out = with_view(|v| b.build(v, &[r]).unwrap());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].input, "likes thrillers\nCandidate items:\n1. Heat\n2. 1");
        assert_eq!(out[0].input, out[1].input);
        assert_eq!((out[0].item, out[0].output.as_str()), (1, "Heat"));
        assert_eq!((out[1].item, out[1].output.as_str()), (0, "1"));
    }

    #[test]
    fn rating_outputs_the_rounded_value_and_never_a_test_value() {
        let mut b = RatingInstructions::new(cfg(serde_json::json!({})), host()).unwrap();
        let out = with_view(|v| {
            b.build(
                v,
                &[
                    request(Split::Train, "rating"),
                    request(Split::Test, "rating"),
                ],
            )
            .unwrap()
        });
        assert_eq!(out.len(), 2, "positives only");
        assert_eq!(out[0].output, "4");
        assert_eq!(
            out[1].output, "",
            "the test target's value is not handed out"
        );
        assert!(
            RatingInstructions::new(cfg(serde_json::json!({"min": 5, "max": 1})), host()).is_err()
        );
    }

    #[test]
    fn explanation_cites_liked_history_sharing_attributes() {
        let mut b = ExplanationInstructions::new(cfg(serde_json::json!({})), host()).unwrap();
        let out = with_view(|v| b.build(v, &[request(Split::Valid, "explanation")]).unwrap());
        assert_eq!(out.len(), 1);
        // Heat (Action Thriller): Fargo (Thriller, liked) and Speed (Action, liked), most recent
        // first; Alien shares nothing.
        assert_eq!(
            out[0].output,
            "The user enjoyed Fargo, Speed; Heat shares their Action, Thriller."
        );
        let err =
            ExplanationInstructions::new(cfg(serde_json::json!({"output": "{% if %}"})), host())
                .err()
                .unwrap();
        assert!(err.to_string().contains("`output` template"), "{err}");
    }
}
