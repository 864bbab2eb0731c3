//! `kill -9` in the middle of LLM fusion loses nothing: the `recfuse` binary fuses through the
//! `chatgpt` fuser against a slow loopback server, is killed after some answers, and the rerun
//! asks only for what was not stored (at most the calls that were in flight at the kill).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../plugins/chatgpt-fuser/tests/support/mod.rs"]
mod support;

const USERS: usize = 40;
const CONCURRENCY: usize = 4;


fn recfuse(config: &PathBuf) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_recfuse"));
    c.arg("run").arg(config).arg("--quiet").stdout(Stdio::null()).stderr(Stdio::null());
    c
}

#[test]
fn kill_dash_nine_mid_fusion_repeats_only_calls_in_flight() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    let (url, answered) = support::counting_server(Duration::from_millis(150));
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
    // Usage counts both processes: every answer stored by either (only answers in flight at
    // the kill, sent but never stored, can be missing).
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("runs/kill/manifest.json")).unwrap()).unwrap();
    let requests = manifest["usage"]["fusers0"]["requests"].as_u64().unwrap() as usize;
    let sent = answered.values().sum::<usize>();
    assert!(requests <= sent && requests + CONCURRENCY >= sent, "usage counts {requests} requests, the server answered {sent}");
    assert_eq!(manifest["usage"]["fusers0"]["completion_tokens"].as_u64().unwrap() as usize, requests * 5);
}

/// `epochs_done` of a checkpoint, read from the safetensors header (0 while none is complete).
fn epochs_done(path: &std::path::Path) -> usize {
    let Ok(bytes) = std::fs::read(path) else { return 0 };
    if bytes.len() < 8 {
        return 0;
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let Some(header) = bytes.get(8..8 + n) else { return 0 };
    let v: serde_json::Value = serde_json::from_slice(header).unwrap_or_default();
    v["__metadata__"]["epochs_done"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// `kill -9` in the middle of a ranker's fit: the rerun resumes from the last epoch checkpoint
/// and ends with exactly the report of a run that was never interrupted.
#[test]
fn kill_dash_nine_mid_fit_resumes_from_the_epoch_checkpoint() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    const EPOCHS: usize = 12;
    let d = tempfile::tempdir().unwrap();
    let config = |name: &str| {
        let path = d.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[run]\nname = \"{name}\"\ndir = \"{runs}\"\n\n\
                 [source]\nkind = \"recbole-atomic\"\ndir = \"{data}\"\nname = \"ml-100k\"\n\n\
                 [eval]\nmax_users = 200\n\n\
                 [[rankers]]\nkind = \"bpr\"\ndim = 32\nepochs = {EPOCHS}\npatience = 0\noptimizer = \"sgd\"\nlearning_rate = 0.05\n",
                runs = d.path().join("runs").display(),
                data = data.display()
            ),
        )
        .unwrap();
        path
    };
    let (killed, straight) = (config("killed"), config("straight"));
    let checkpoint = d.path().join("runs/killed/rankers/bpr/checkpoint.safetensors");

    let mut child = recfuse(&killed).spawn().unwrap();
    let t = Instant::now();
    while epochs_done(&checkpoint) < 2 {
        assert!(t.elapsed() < Duration::from_secs(300), "no epoch finished");
        assert!(child.try_wait().unwrap().is_none(), "the fit ended before it could be killed");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = epochs_done(&checkpoint);
    assert!((2..EPOCHS).contains(&done), "killed after {done} of {EPOCHS} epochs");
    assert!(!d.path().join("runs/killed/reports/bpr.json").exists());

    assert!(recfuse(&killed).status().unwrap().success());
    assert!(recfuse(&straight).status().unwrap().success());
    let report = |name: &str| {
        let text = std::fs::read_to_string(d.path().join(format!("runs/{name}/reports/bpr.json"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["segments"].clone()
    };
    assert_eq!(report("killed"), report("straight"), "the resumed fit must end where an uninterrupted one does");
    assert_eq!(epochs_done(&checkpoint), EPOCHS);
}
