//! `kill -9` in the middle of LLM fusion loses nothing: the `recfuse` binary fuses through the
//! `chatgpt` fuser against a slow loopback server, is killed after some answers, and the rerun
//! asks only for what was not stored (at most the calls that were in flight at the kill).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../../plugins/chatgpt-fuser/tests/support/mod.rs"]
mod support;

const USERS: usize = 40;
const CONCURRENCY: usize = 4;

/// Answers every request after 150 ms; counts answers per user.
fn serve() -> (String, Arc<Mutex<HashMap<String, usize>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let answered = Arc::new(Mutex::new(HashMap::new()));
    let a = answered.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let a = a.clone();
            std::thread::spawn(move || {
                let Some(body) = support::read_body(&stream) else { return };
                let user = body.split("Behaviour of user ").nth(1).and_then(|s| s.split(':').next()).unwrap_or("?").to_string();
                std::thread::sleep(Duration::from_millis(150));
                support::reply(&mut stream, "200 OK", "", &support::completion(&format!("{user} likes films"), 50, 5));
                *a.lock().unwrap().entry(user).or_default() += 1;
            });
        }
    });
    (url, answered)
}

fn recfuse(config: &PathBuf) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_recfuse"));
    c.arg("run").arg(config).arg("--quiet").stdout(Stdio::null()).stderr(Stdio::null());
    c
}

#[test]
fn kill_dash_nine_mid_fusion_repeats_only_calls_in_flight() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    let (url, answered) = serve();
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("kill.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"kill\"\ndir = \"{runs}\"\nsample_users = {USERS}\n\n\
             [source]\nkind = \"recbole-atomic\"\ndir = \"{data}\"\nname = \"ml-100k\"\n\n\
             [[fusers]]\nkind = \"chatgpt\"\nbase_url = \"{url}\"\nmodel = \"m\"\nconcurrency = {CONCURRENCY}\n",
            runs = d.path().join("runs").display(),
            data = data.display()
        ),
    )
    .unwrap();
    let total = || answered.lock().unwrap().values().sum::<usize>();

    let mut child = recfuse(&config).spawn().unwrap();
    let t = Instant::now();
    while total() < USERS / 2 {
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = total();
    assert!(before < USERS, "the kill came too late to test anything");
    let cache = d.path().join("runs/kill/components/fusers0/cache.jsonl");
    let stored = std::fs::read_to_string(&cache).unwrap().lines().count();
    assert!(stored + CONCURRENCY >= before, "{before} answers sent, only {stored} stored");

    let status = recfuse(&config).status().unwrap();
    assert!(status.success());
    let knowledge = std::fs::read_to_string(d.path().join("runs/kill/knowledge.jsonl")).unwrap();
    assert_eq!(knowledge.lines().count(), USERS);
    assert!(knowledge.lines().all(|l| l.contains("likes films")));
    // Every user was answered; repeats are bounded by the calls in flight at the kill.
    let answered = answered.lock().unwrap();
    assert_eq!(answered.len(), USERS);
    assert!(answered.values().sum::<usize>() <= USERS + CONCURRENCY, "{answered:?}");
}
