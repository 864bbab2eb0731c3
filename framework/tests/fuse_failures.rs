//! A fuser that fails for some users does not finish the stage: the `recfuse` binary fuses
//! through the `chatgpt` fuser against a loopback server that answers HTTP 500 for some users,
//! exits non-zero without marking the stage done, and the rerun (server healthy again) asks
//! only for those users, never repeating a completed call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[path = "../../plugins/chatgpt-fuser/tests/support/mod.rs"]
mod support;

const USERS: usize = 12;

/// While `down`, users whose id ends in 3 or 7 get HTTP 500; counts successful answers per user.
fn serve(down: Arc<AtomicBool>) -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let answered = Arc::new(Mutex::new(HashMap::new()));
    let a = answered.clone();
    let url = support::serve_users(move |user, _, stream| {
        if down.load(Ordering::SeqCst) && (user.ends_with('3') || user.ends_with('7')) {
            support::reply(stream, "500 Internal Server Error", "", r#"{"error":{"message":"down"}}"#);
            return;
        }
        support::reply(stream, "200 OK", "", &support::likes_films(user));
        *a.lock().unwrap().entry(user.to_string()).or_default() += 1;
    });
    (url, answered)
}

#[test]
fn users_a_fuser_failed_on_are_not_done_and_are_asked_again() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    let down = Arc::new(AtomicBool::new(true));
    let (url, answered) = serve(down.clone());
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("fail.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"fail\"\ndir = \"{runs}\"\nsample_users = {USERS}\n\n\
             [source]\nkind = \"recbole-atomic\"\ndir = \"{data}\"\nname = \"ml-100k\"\n\n\
             [[fusers]]\nkind = \"chatgpt\"\nbase_url = \"{url}\"\nmodel = \"m\"\nconcurrency = 4\nmax_retries = 0\n\n\
             [ranker]\nkind = \"popularity\"\n",
            runs = d.path().join("runs").display(),
            data = data.display()
        ),
    )
    .unwrap();
    let recfuse = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_recfuse"));
        c.arg("run").arg(&config).arg("--quiet").stdout(Stdio::null()).stderr(Stdio::piped());
        c
    };

    let out = recfuse().output().unwrap();
    assert!(!out.status.success(), "a run with failed users must not exit 0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("got no knowledge") && err.contains("rerun"), "{err}");
    let run = d.path().join("runs/fail");
    assert!(!run.join("report.json").exists(), "no report from incomplete knowledge");
    let first: HashMap<String, usize> = answered.lock().unwrap().clone();
    assert!(first.len() < USERS && !first.is_empty(), "some users failed, some did not: {first:?}");

    down.store(false, Ordering::SeqCst);
    let out = recfuse().output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(run.join("report.json").exists());
    // Every user ends with knowledge (the last record of each counts) ...
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("knowledge.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut last: HashMap<u64, &serde_json::Value> = HashMap::new();
    for r in &records {
        last.insert(r["index"].as_u64().unwrap(), r);
    }
    assert_eq!(last.len(), USERS);
    assert!(last.values().all(|r| r["text"].as_str().unwrap().contains("likes films") && r.get("errors").and_then(|e| e.as_array()).is_none_or(|e| e.is_empty())));
    // ... and each was answered exactly once: no completed call repeated.
    let answered = answered.lock().unwrap();
    assert_eq!(answered.len(), USERS);
    assert!(answered.values().all(|&n| n == 1), "{answered:?}");
}
