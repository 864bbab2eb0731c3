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
