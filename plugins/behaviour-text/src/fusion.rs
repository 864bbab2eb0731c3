//! What the LLM fusers (`chatgpt`, `local-llm`) share: the fusion prompt built from a user's
//! behaviour text, and a persistent cache of completions that makes reruns and restarts after a
//! kill repeat no finished generation.

use crate::{BehaviourConfig, BehaviourWriter};
use minijinja::{context, Environment};
use recfuse_sdk::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const SYSTEM: &str = "You are a recommendation assistant. You fuse a user's heterogeneous behaviour \
(ratings, clicks, orders, searches, tags, across items, shops and scenarios) into one concise \
description of the user's interests and preferences.";
pub const USER: &str = "Behaviour of user {{ user }}:\n{{ behaviour }}\n\nDescribe this user's preferences in \
at most five sentences: what they like, what they avoid, and how their behaviour differs across scenarios.";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// System and user prompt templates (minijinja; the user prompt sees `user` and `behaviour`)
/// over the behaviour text.
pub struct FusionPrompt {
    behaviour: BehaviourWriter,
    env: Environment<'static>,
}

impl FusionPrompt {
    pub fn new(system: Option<String>, user: Option<String>, behaviour: Option<BehaviourConfig>) -> Result<Self> {
        let behaviour = match behaviour {
            Some(b) => b,
            None => BehaviourConfig::default(),
        };
        let mut env = Environment::new();
        env.add_template_owned("system", system.unwrap_or_else(|| SYSTEM.into())).context("system_prompt does not parse")?;
        env.add_template_owned("user", user.unwrap_or_else(|| USER.into())).context("user_prompt does not parse")?;
        Ok(Self { behaviour: BehaviourWriter::new(behaviour)?, env })
    }

    pub fn messages(&self, view: &TrainView, user: UserIdx) -> Result<Vec<ChatMessage>> {
        let behaviour = self.behaviour.render(view, user)?;
        let id = &view.catalog.users[user as usize].id;
        let system = self.env.get_template("system")?.render(context! { user => id })?;
        let prompt = self.env.get_template("user")?.render(context! { user => id, behaviour })?;
        Ok(vec![
            ChatMessage { role: "system".into(), content: system },
            ChatMessage { role: "user".into(), content: prompt },
        ])
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Completion {
    pub key: String,
    pub text: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// `cache.jsonl`: one completion per line, appended and synced as each arrives, keyed by the
/// sha256 of everything that determines the answer (model, messages, parameters). Shared by
/// concurrent workers, each of which stores its answer the moment it has it, so a kill loses
/// at most the answers in flight.
pub struct CompletionCache {
    path: PathBuf,
    entries: Mutex<HashMap<String, Completion>>,
}

impl CompletionCache {
    /// Reads the cache; a torn last line (a kill mid-write) is ignored.
    pub fn open(path: &Path) -> Result<Self> {
        let mut entries = HashMap::new();
        if let Ok(f) = std::fs::File::open(path) {
            for line in BufReader::new(f).lines() {
                if let Ok(e) = serde_json::from_str::<Completion>(&line?) {
                    entries.insert(e.key.clone(), e);
                }
            }
        }
        Ok(Self { path: path.to_path_buf(), entries: Mutex::new(entries) })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Completion>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn key(request: &impl Serialize) -> Result<String> {
        Ok(hex::encode(Sha256::digest(serde_json::to_vec(request)?)))
    }

    pub fn get(&self, key: &str) -> Option<Completion> {
        self.entries().get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    pub fn put(&self, entry: Completion) -> Result<()> {
        let mut entries = self.entries(); // also serializes the appends
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()?;
        entries.insert(entry.key.clone(), entry);
        Ok(())
    }
}

/// Token usage of a fuser, written to `usage.json` in its run directory (the host copies it
/// into the run manifest).
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct Usage {
    pub requests: u64,
    pub retries: u64,
    pub cache_hits: u64,
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub estimated_cost: f64,
}

impl Usage {
    pub fn save(&self, host: &Host) -> Result<()> {
        let path = host.run_dir().join("usage.json");
        std::fs::write(&path, serde_json::to_string_pretty(self)?).with_context(|| format!("writing {}", path.display()))
    }
}
