//! Optional bearer-key protection shared by `recfuse serve` and `recfuse serve-llm`: the key is
//! read once from an environment variable named on the command line (never from the command
//! line itself, where `ps` would show it), and every protected request must carry
//! `Authorization: Bearer <key>`. A missing or wrong key gets 401 in the OpenAI error shape.

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The key requests must present, if any.
#[derive(Clone, Default)]
pub struct ApiKey(Option<Arc<str>>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.write_str(if self.0.is_some() { "ApiKey(<set>)" } else { "ApiKey(none)" })
    }
}

impl ApiKey {
    /// The key held by environment variable `var` (`None`: no key required).
    pub fn from_env(var: Option<&str>) -> Result<Self> {
        let Some(var) = var.filter(|v| !v.is_empty()) else { return Ok(Self(None)) };
        let key = std::env::var(var).with_context(|| format!("--api-key-env: environment variable `{var}` is not set"))?;
        anyhow::ensure!(!key.trim().is_empty(), "--api-key-env: environment variable `{var}` is empty");
        Ok(Self(Some(Arc::from(key.trim()))))
    }

    /// A key given directly (tests, embedding).
    pub fn new(key: &str) -> Self {
        Self(Some(Arc::from(key)))
    }

    pub fn required(&self) -> bool {
        self.0.is_some()
    }

    fn accepts(&self, header: Option<&str>) -> bool {
        match &self.0 {
            None => true,
            // Compared in constant time: the position of the first wrong byte is not timed.
            Some(key) => header.and_then(|h| h.strip_prefix("Bearer ")).is_some_and(|given| {
                given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            }),
        }
    }
}

/// Middleware: 401 unless the request carries the key.
pub async fn require_key(State(key): State<ApiKey>, request: Request, next: Next) -> Response {
    let header = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if key.accepts(header) {
        return next.run(request).await;
    }
    let body = serde_json::json!({"error": {
        "message": "missing or wrong API key: send `Authorization: Bearer <key>`",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    (StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], axum::Json(body)).into_response()
}
