//! The `chatgpt` fuser against a fault-injecting OpenAI-compatible server on loopback: 429 with
//! Retry-After, 500, a response slower than the timeout, malformed JSON, a dropped connection,
//! and a user whose requests always fail. Every user ends with knowledge or a recorded
//! failure, and after a restart no completed call is repeated.

use recfuse_plugin_chatgpt_fuser::ChatGptFuser;
use recfuse_sdk::prelude::*;
use std::collections::HashMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};

mod support;
use support::{completion, read_body, reply};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Requests seen per user id, and 200 answers sent per user id.
#[derive(Default)]
struct Log {
    requests: HashMap<String, usize>,
    answered: HashMap<String, usize>,
}

fn handle(mut stream: TcpStream, log: Arc<Mutex<Log>>) {
    let Some(body) = read_body(&stream) else { return };
    let user = body.split("Behaviour of user ").nth(1).and_then(|s| s.split(':').next()).unwrap_or("?").to_string();
    let n = {
        let mut l = log.lock().unwrap();
        let c = l.requests.entry(user.clone()).or_default();
        *c += 1;
        *c
    };
    let ok = completion(&format!("{user} likes films"), 100, 10);
    match (user.as_str(), n) {
        ("u-429", 1) => reply(&mut stream, "429 Too Many Requests", "Retry-After: 1\r\n", "{}"),
        ("u-500", 1) => reply(&mut stream, "500 Internal Server Error", "", "{}"),
        ("u-slow", 1) => {
            std::thread::sleep(Duration::from_millis(1500));
            reply(&mut stream, "200 OK", "", &ok);
            return; // answered too late: the client has given up, not counted
        }
        ("u-json", 1) => reply(&mut stream, "200 OK", "", "{\"choices\": [ not json"),
        ("u-drop", 1) => {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        ("u-dead", _) => reply(&mut stream, "503 Service Unavailable", "", "{}"),
        _ => {
            reply(&mut stream, "200 OK", "", &ok);
            *log.lock().unwrap().answered.entry(user).or_default() += 1;
        }
    }
}

fn serve() -> (String, Arc<Mutex<Log>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Log::default()));
    let l = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let l = l.clone();
            std::thread::spawn(move || handle(stream, l));
        }
    });
    (url, log)
}

const USERS: [&str; 8] = ["u-ok1", "u-429", "u-500", "u-slow", "u-json", "u-drop", "u-dead", "u-ok2"];

fn fixture() -> (Catalog, Vec<Event>, Vec<u32>) {
    let catalog = Catalog {
        items: vec![Item { id: "1".into(), title: "Heat".into(), ..Default::default() }],
        users: USERS.iter().map(|u| User { id: u.to_string(), ..Default::default() }).collect(),
        kinds: vec!["like".into()],
        scenarios: vec!["".into()],
        ..Default::default()
    };
    let events: Vec<Event> = (0..USERS.len() as u32)
        .map(|u| Event { user: u, item: 0, kind: 0, scenario: 0, subject: NONE, value: 5.0, timestamp: 1 })
        .collect();
    let offsets = (0..=USERS.len() as u32).collect();
    (catalog, events, offsets)
}

fn fuser(url: &str, dir: &std::path::Path) -> ChatGptFuser {
    let cfg = serde_json::json!({
        "base_url": url, "model": "test-model", "concurrency": 3, "max_retries": 3,
        "timeout_secs": 0.5, "backoff_ms": 20, "price_per_1k_input": 0.5, "price_per_1k_output": 1.5,
    });
    ChatGptFuser::new(serde_json::from_value(cfg).unwrap(), Host::standalone(dir, 7)).unwrap()
}

#[test]
fn every_user_ends_with_knowledge_or_a_failure_and_no_call_is_repeated() {
    let (url, log) = serve();
    let dir = tempfile::tempdir().unwrap();
    let (catalog, events, offsets) = fixture();
    let view = TrainView { catalog: &catalog, events: &events, offsets: &offsets };
    let all: Vec<u32> = (0..USERS.len() as u32).collect();

    let knowledge = fuser(&url, dir.path()).fuse(&view, &all).unwrap();
    let got: Vec<&str> = knowledge.iter().map(|k| USERS[k.user as usize]).collect();
    assert_eq!(got, vec!["u-ok1", "u-429", "u-500", "u-slow", "u-json", "u-drop", "u-ok2"], "only u-dead fails");
    for k in &knowledge {
        assert_eq!(k.text, format!("{} likes films", USERS[k.user as usize]));
    }
    {
        let l = log.lock().unwrap();
        for u in ["u-429", "u-500", "u-json", "u-drop"] {
            assert_eq!(l.requests[u], 2, "{u}: one fault, one retry");
        }
        assert!(l.requests["u-slow"] >= 2);
        assert_eq!(l.requests["u-dead"], 4, "1 try + max_retries");
    }
    let usage: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("usage.json")).unwrap()).unwrap();
    assert_eq!(usage["failures"], 1);
    let served: usize = log.lock().unwrap().requests.values().sum();
    assert_eq!(usage["requests"], served as u64, "usage counts every HTTP request the server saw");
    assert_eq!(usage["prompt_tokens"], 700);
    assert!((usage["estimated_cost"].as_f64().unwrap() - (0.7 * 0.5 + 0.07 * 1.5)).abs() < 1e-9);

    // A restart (a new process would build a new fuser on the same run directory): completed
    // calls come from the cache; only the failed user is asked again.
    let before: HashMap<String, usize> = log.lock().unwrap().requests.clone();
    let again = fuser(&url, dir.path()).fuse(&view, &all).unwrap();
    assert_eq!(again.len(), 7);
    let after = log.lock().unwrap().requests.clone();
    for u in USERS.iter().filter(|u| **u != "u-dead") {
        assert_eq!(after[*u], before[*u], "{u} was asked again");
    }
    assert_eq!(after["u-dead"], before["u-dead"] + 4);
    let l = log.lock().unwrap();
    assert!(l.answered.values().all(|&n| n == 1), "each successful call made once: {:?}", l.answered);
}

#[test]
fn the_api_key_is_sent_but_never_written() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(String::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        if let Ok(mut stream) = listener.accept().map(|(s, _)| s) {
            let mut buf = [0u8; 8192];
            let n = stream.read(&mut buf).unwrap();
            *s.lock().unwrap() = String::from_utf8_lossy(&buf[..n]).into_owned();
            reply(&mut stream, "200 OK", "", &completion("ok", 1, 1));
        }
    });
    std::env::set_var("RECFUSE_TEST_KEY", "sk-secret-123");
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({"base_url": url, "model": "m", "api_key_env": "RECFUSE_TEST_KEY", "timeout_secs": 5.0});
    let mut f = ChatGptFuser::new(serde_json::from_value(cfg).unwrap(), Host::standalone(dir.path(), 1)).unwrap();
    let (catalog, events, offsets) = fixture();
    let view = TrainView { catalog: &catalog, events: &events, offsets: &offsets };
    let k = f.fuse(&view, &[0]).unwrap();
    assert_eq!(k[0].text, "ok");
    assert!(seen.lock().unwrap().contains("Authorization: Bearer sk-secret-123") || seen.lock().unwrap().contains("authorization: Bearer sk-secret-123"));
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains("sk-secret-123"));
    }
    // A missing variable is a clear config error.
    let cfg = serde_json::json!({"base_url": url, "model": "m", "api_key_env": "RECFUSE_NO_SUCH_KEY"});
    let err = ChatGptFuser::new(serde_json::from_value(cfg).unwrap(), Host::standalone(dir.path(), 1)).err().unwrap();
    assert!(err.to_string().contains("RECFUSE_NO_SUCH_KEY"), "{err}");
}
