//! `recfuse serve` as a platform team uses it: a finished run on ML-100K, the binary serving it
//! on loopback with a bearer key, requests over real HTTP. Good answers, every documented
//! refusal with its field, the popularity fallback, Prometheus metrics, still serving after bad
//! requests, and Ctrl-C (SIGINT) ending it cleanly. Then the two-stage ranker through the
//! library API.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const KEY: &str = "test-key-5f2c";

fn data() -> PathBuf {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    data
}

/// POSTs `body` (with `key`, if any); the status and the JSON answer, errors included.
fn post(base: &str, path: &str, key: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut req = ureq::post(&format!("{base}{path}")).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    answer(req.send_string(body))
}

fn get(base: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let mut req = ureq::get(&format!("{base}{path}"));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, serde_json::Value) {
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap();
            (code, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{code} answer is not JSON: {text}")))
        }
        Err(e) => panic!("{e}"),
    }
}

/// The items of user `user` in ML-100K, and the last one by time (the test item, which the run
/// never saw and which may be recommended).
fn items_of(data: &Path, user: &str) -> (HashSet<String>, String) {
    let text = std::fs::read_to_string(data.join("ml-100k.inter")).unwrap();
    let mut events: Vec<(f64, String)> = text
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .filter(|f| f[0] == user)
        .map(|f| (f[3].parse().unwrap(), f[1].to_string()))
        .collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let test = events.last().unwrap().1.clone();
    (events.into_iter().map(|(_, i)| i).collect(), test)
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn serve_answers_refuses_bad_requests_and_stops_on_ctrl_c() {
    let data = data();
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"served\"\ndir = \"{}\"\n\n[source]\nkind = \"recbole-atomic\"\ndir = \"{}\"\nname = \"ml-100k\"\n\n\
             [eval]\nmax_users = 50\n\n[[rankers]]\nkind = \"popularity\"\n\n[[rankers]]\nkind = \"bpr\"\ndim = 16\nepochs = 3\n\n\
             [[rankers]]\nkind = \"bpr\"\nlabel = \"rerank\"\ndim = 16\nepochs = 3\nrerank = {{ from = \"popularity\", top = 50 }}\n",
            d.path().join("runs").display(),
            data.display()
        ),
    )
    .unwrap();
    let ran = Command::new(env!("CARGO_BIN_EXE_recfuse")).args(["run", config.to_str().unwrap(), "--quiet"]).output().unwrap();
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let run_dir = d.path().join("runs/served");

    let mut server = Command::new(env!("CARGO_BIN_EXE_recfuse"))
        .args(["serve", run_dir.to_str().unwrap(), "--addr", "127.0.0.1:0", "--ranker", "bpr", "--api-key-env", "SERVE_TEST_KEY", "--max-body-bytes", "8192"])
        .env("SERVE_TEST_KEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let addr = first.split("http://").nth(1).and_then(|s| s.split(' ').next()).unwrap_or_else(|| panic!("no address in {first:?}"));
    let base = format!("http://{addr}");
    assert!(first.contains("`bpr`") && first.contains("bearer key required"), "{first}");

    // Open health; everything else needs the key.
    let (status, health) = get(&base, "/health", None);
    assert_eq!(status, 200);
    assert!(health.contains("\"status\":\"ok\"") && health.contains("\"items\":1682"), "{health}");
    let ask = r#"{"user": "1", "k": 10}"#;
    for key in [None, Some("wrong")] {
        let (status, e) = post(&base, "/v1/recommend", key, ask);
        assert_eq!(status, 401, "{e}");
        assert_eq!(e["error"]["code"], "invalid_api_key");
    }
    assert_eq!(get(&base, "/metrics", None).0, 401);

    // A known user: 10 items, none it interacted with in the run (train and validation).
    let (status, r) = post(&base, "/v1/recommend", Some(KEY), ask);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["model"], "bpr");
    assert!(r["fallback"].is_null());
    let got = ids(&r);
    assert_eq!(got.len(), 10);
    assert!(r["items"][0]["title"].as_str().unwrap().len() > 3, "{r}");
    let (seen, test_item) = items_of(&data, "1");
    assert!(got.iter().all(|i| !seen.contains(i) || *i == test_item), "recommended a seen item: {got:?}");
    let scores: Vec<f64> = r["items"].as_array().unwrap().iter().map(|i| i["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let (_, all) = post(&base, "/v1/recommend", Some(KEY), r#"{"user": "1", "k": 10, "exclude_seen": false}"#);
    assert!(ids(&all).iter().any(|i| seen.contains(i) && *i != test_item), "without exclude_seen the user's own items rank high for BPR");

    // 1000 candidates: the answer comes from them, best first.
    let candidates: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
    let body = serde_json::json!({"user": "1", "k": 5, "candidates": candidates}).to_string();
    let (status, r) = post(&base, "/v1/recommend", Some(KEY), &body);
    assert_eq!(status, 200, "{r}");
    assert!(ids(&r).iter().all(|i| i.parse::<usize>().unwrap() <= 1000));

    // A user the run does not know: the most popular items, said so.
    let (status, r) = post(&base, "/v1/recommend", Some(KEY), r#"{"user": "no-such-user", "k": 3}"#);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["fallback"], "popularity");
    assert_eq!(ids(&r)[0], "50", "Star Wars (item 50) is ML-100K's most rated film");

    // Refusals, each naming the field, in the OpenAI error shape.
    for (body, status, param) in [
        (r#"{"user": "1", "k": 0}"#, 400, Some("k")),
        (r#"{"user": "1", "k": 100000}"#, 400, Some("k")),
        (r#"{"user": "1", "kk": 3}"#, 400, Some("kk")),
        (r#"{"user": "1", "k": "ten"}"#, 400, Some("k")),
        (r#"{"k": 3}"#, 400, Some("user")),
        (r#"{"user": "1", "candidates": []}"#, 400, Some("candidates")),
        (r#"{"user": "1", "candidates": ["50", "nope-1", "nope-2"]}"#, 400, Some("candidates")),
        ("not json", 400, None),
    ] {
        let (got, e) = post(&base, "/v1/recommend", Some(KEY), body);
        assert_eq!(got, status, "{body}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{body}: {e}");
        if let Some(p) = param {
            assert_eq!(e["error"]["param"], p, "{body}: {e}");
        }
    }
    let (_, e) = post(&base, "/v1/recommend", Some(KEY), r#"{"user": "1", "candidates": ["50", "nope-1", "nope-2"]}"#);
    assert_eq!(e["error"]["unknown_items"], serde_json::json!(["nope-1", "nope-2"]));
    assert!(e["error"]["message"].as_str().unwrap().contains("nope-1"));
    let big = serde_json::json!({"user": "1", "candidates": vec!["1"; 3000]}).to_string();
    let (status, e) = post(&base, "/v1/recommend", Some(KEY), &big);
    assert_eq!(status, 413, "{e}");
    assert_eq!(get(&base, "/v1/recommend", Some(KEY)).0, 405);
    let (status, text) = get(&base, "/nowhere", Some(KEY));
    assert_eq!(status, 404);
    assert!(text.contains("\"error\""), "{text}");

    // Still serving, and counting.
    assert_eq!(post(&base, "/v1/recommend", Some(KEY), ask).0, 200);
    let (status, metrics) = get(&base, "/metrics", Some(KEY));
    assert_eq!(status, 200);
    assert!(metrics.contains("recfuse_http_requests_total{route=\"/v1/recommend\",status=\"400\"} 9"), "{metrics}");
    assert!(metrics.contains("recfuse_http_requests_total{route=\"/v1/recommend\",status=\"200\"} 5"), "{metrics}");
    assert!(metrics.contains("recfuse_recommend_fallback_total 1"), "{metrics}");
    assert!(metrics.contains("recfuse_recommend_seconds_count 5"), "{metrics}");

    // Ctrl-C: a clean exit.
    assert!(Command::new("kill").args(["-INT", &server.id().to_string()]).status().unwrap().success());
    let status = server.wait().unwrap();
    assert!(status.success(), "serve did not stop cleanly on SIGINT: {status}");

    // The two-stage ranker serves as it was evaluated: its answer is a reordering of the first
    // stage's top 50.
    let pop = recfuse::serve::Recommender::load(&run_dir, Some("popularity")).unwrap();
    let rerank = recfuse::serve::Recommender::load(&run_dir, Some("rerank")).unwrap();
    let top50: HashSet<u32> = pop.recommend(Some(0), None, 50, true).unwrap().into_iter().map(|(i, _)| i).collect();
    let reranked = rerank.recommend(Some(0), None, 50, true).unwrap();
    assert_eq!(reranked.iter().map(|(i, _)| *i).collect::<HashSet<u32>>(), top50);
    let err = recfuse::serve::Recommender::load(&run_dir, Some("nope")).err().unwrap().to_string();
    assert!(err.contains("no ranker `nope`") && err.contains("popularity, bpr, rerank"), "{err}");
}
