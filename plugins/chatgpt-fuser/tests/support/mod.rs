//! A minimal HTTP/1.1 server side for the fuser's tests and benchmarks: read one request,
//! write one response, close.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

/// The body of the request on `stream`, or None if the client went away.
pub fn read_body(stream: &TcpStream) -> Option<String> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

/// Writes a JSON response with extra header lines (each ending in `\r\n`) and closes.
pub fn reply(stream: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A Chat Completions answer with the given content and usage.
pub fn completion(content: &str, prompt_tokens: u64, completion_tokens: u64) -> String {
    serde_json::json!({
        "choices": [{"message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    })
    .to_string()
}

/// A loopback Chat Completions server for fusion tests and benches: each request is read on a
/// thread of its own and handed to `handle` with the user named in the fusion prompt
/// ("Behaviour of user <id>:") and the body; `handle` writes the reply (and may sleep, count,
/// fail). Returns the base URL.
#[allow(dead_code)] // not every user of this module serves
pub fn serve_users(handle: impl Fn(&str, &str, &mut TcpStream) + Send + Sync + 'static) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let handle = std::sync::Arc::new(handle);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let handle = handle.clone();
            std::thread::spawn(move || {
                let Some(body) = read_body(&stream) else { return };
                let user = body.split("Behaviour of user ").nth(1).and_then(|s| s.split(':').next()).unwrap_or("?").to_string();
                handle(&user, &body, &mut stream);
            });
        }
    });
    url
}

/// The answer the fusion tests give: "<user> likes films", 50 prompt and 5 completion tokens.
#[allow(dead_code)]
pub fn likes_films(user: &str) -> String {
    completion(&format!("{user} likes films"), 50, 5)
}

/// Answers every request after `delay` with [`likes_films`]; counts answers per user.
#[allow(dead_code)]
pub fn counting_server(delay: std::time::Duration) -> (String, std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>) {
    let answered = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let a = answered.clone();
    let url = serve_users(move |user, _, stream| {
        std::thread::sleep(delay);
        reply(stream, "200 OK", "", &likes_films(user));
        *a.lock().unwrap().entry(user.to_string()).or_default() += 1;
    });
    (url, answered)
}
