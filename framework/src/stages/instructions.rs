//! The instructions stage: for every evaluable user and each of its train, validation and test
//! targets (plus sampled negatives), one request per task, built by that task's builder. The
//! target's event value travels with it (train and validation only: the test value is never
//! handed out), and so does each candidate's item knowledge.

use super::Runner;
use crate::config::Sampling;
use crate::eval::NegativeSampler;
use crate::handles::InstructionsHandle;
use crate::knowledge::KnowledgeBase;
use crate::runstore::Journal;
use crate::split::SplitData;
use anyhow::{ensure, Result};
use recfuse_sdk::records::*;
use recfuse_sdk::SeededRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

pub const OUTPUT: &str = "instructions.jsonl";

/// One line of `instructions.jsonl`: every example of one user, all tasks.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct InstructionRecord {
    pub user: UserIdx,
    pub instructions: Vec<Instruction>,
}

pub fn run(
    r: &mut Runner,
    builders: &[(String, Arc<Mutex<InstructionsHandle>>)],
    split: &SplitData,
    dataset: &Dataset,
    knowledge: &KnowledgeBase,
    seed: u64,
) -> Result<()> {
    let p = &r.cfg.pipeline;
    let (mut journal, done) = Journal::open::<InstructionRecord>(&r.run.path(OUTPUT))?;
    let done: HashSet<UserIdx> = done.iter().map(|k| k.user).collect();
    let users: Vec<UserIdx> = split.evaluable_users().into_iter().filter(|u| !done.contains(u)).collect();
    let kv = knowledge.view();
    let item_text = |item: ItemIdx| kv.item(item).map(|k| k.text.clone()).unwrap_or_default();

    let sampler = NegativeSampler::new(split, dataset, Sampling::Uniform, r.cfg.pipeline.eval.negative_pool);
    let bar = r.progress.bar("instructions", (users.len() + done.len()) as u64);
    bar.inc(done.len() as u64);
    for chunk in users.chunks(p.run.batch_size) {
        r.check_cancel()?;
        // The same candidates for every task of a user: tasks differ in what they ask.
        let mut requests = Vec::new();
        for &u in chunk {
            let t = split.targets[u as usize];
            let text = kv.user(u).map(|k| k.text.clone()).unwrap_or_default();
            for (which, item, value) in
                [(Split::Train, t.train, t.train_value), (Split::Valid, t.valid, t.valid_value), (Split::Test, t.test, f32::NAN)]
            {
                if item == NONE {
                    continue; // e.g. no validation event in the temporal split's window
                }
                let mut rng = SeededRng::new(seed ^ ((u as u64) << 8) ^ which as u64);
                let value = (!value.is_nan()).then_some(value);
                let mut targets = vec![Target { item, label: 1.0, value, knowledge: item_text(item) }];
                let negatives = sampler.sample(u, p.split.negatives, &mut rng);
                targets.extend(negatives.into_iter().map(|item| Target { item, label: 0.0, value: None, knowledge: item_text(item) }));
                requests.push(InstructionRequest { user: u, split: which, task: String::new(), knowledge: text.clone(), targets });
            }
        }
        let mut per_user: BTreeMap<UserIdx, Vec<Instruction>> = chunk.iter().map(|&u| (u, vec![])).collect();
        for (task, builder) in builders {
            requests.iter_mut().for_each(|q| q.task = task.clone());
            let out = builder.lock().map_err(|_| anyhow::anyhow!("builder of `{task}` panicked earlier"))?.build(&split.history, &requests)?;
            for mut i in out {
                ensure!(per_user.contains_key(&i.user), "builder of task `{task}` returned an example for user {} it was not asked about", i.user);
                i.task = task.clone(); // the host's tag: one builder kind may serve two tasks
                per_user.entry(i.user).or_default().push(i);
            }
        }
        let records: Vec<InstructionRecord> = per_user.into_iter().map(|(user, instructions)| InstructionRecord { user, instructions }).collect();
        journal.append(&records)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}
