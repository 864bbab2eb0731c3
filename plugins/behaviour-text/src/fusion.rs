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

    /// The completions stored after the first `n`, in the order they were appended.
    pub fn stored_after(&self, n: usize) -> Result<Vec<Completion>> {
        let Ok(f) = std::fs::File::open(&self.path) else { return Ok(vec![]) };
        let mut out = Vec::new();
        for line in BufReader::new(f).lines().skip(n) {
            if let Ok(e) = serde_json::from_str::<Completion>(&line?) {
                out.push(e);
            }
        }
        Ok(out)
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
/// into the run manifest). Cumulative over every process that worked in the run directory:
/// a run killed and resumed reports what both processes spent.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct Usage {
    pub requests: u64,
    pub retries: u64,
    pub cache_hits: u64,
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub estimated_cost: f64,
    /// Cache entries these figures account for: entries beyond them were answered by a
    /// process that died before saving its usage, and are added on resume.
    #[serde(default)]
    pub cache_entries: u64,
}

impl Usage {
    /// What earlier processes of this run spent: their saved usage, plus the completions a
    /// killed process stored in the cache after its last save (its retries and failures after
    /// that save are not known).
    pub fn resume(host: &Host, cache: &CompletionCache) -> Result<Self> {
        let path = host.run_dir().join("usage.json");
        let mut usage: Self = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("{} is not a usage record", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        for c in cache.stored_after(usage.cache_entries as usize)? {
            usage.requests += 1;
            usage.prompt_tokens += c.prompt_tokens;
            usage.completion_tokens += c.completion_tokens;
        }
        usage.cache_entries = cache.len() as u64;
        Ok(usage)
    }

    /// Writes `usage.json` whole or not at all (temporary file, sync, rename), accounting for
    /// every entry now in `cache`.
    pub fn save(&mut self, host: &Host, cache: &CompletionCache) -> Result<()> {
        self.cache_entries = cache.len() as u64;
        use std::io::Write;
        let path = host.run_dir().join("usage.json");
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes()).and_then(|_| f.sync_all())?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }
}
