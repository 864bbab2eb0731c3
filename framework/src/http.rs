//! What `recfuse serve` and `recfuse serve-llm` share: errors in the OpenAI shape (every
//! status, 404/405/413 included), and the optional bearer key. The key is read once from an
//! environment variable named on the command line (never from the command line itself, where
//! `ps` would show it); every protected request must carry `Authorization: Bearer <key>`, or
//! gets 401.

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;

/// A server running on its own thread and tokio runtime, with what its owner wants to know of
/// it (`info`, reachable through `Deref`). Dropping it does not stop it; [`Running::shutdown`]
/// or Ctrl-C do (after the requests in flight).
pub struct Running<T> {
    pub addr: SocketAddr,
    info: T,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl<T> std::ops::Deref for Running<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.info
    }
}

impl<T> Running<T> {
    /// Binds `addr` (port 0 picks a free port) and serves `app` on a thread named `name`.
    pub fn spawn(addr: SocketAddr, app: Router, name: &str, worker_threads: usize, info: T) -> Result<Self> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(worker_threads.max(1)).enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        tokio::select! {
                            _ = stopped => {}
                            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: finishing the requests in flight"),
                        }
                    })
                    .await?;
                Ok(())
            })
        })?;
        Ok(Self { addr, info, stop: Some(stop), thread: Some(thread) })
    }

    pub fn shutdown(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.wait()
    }

    /// Blocks until the server stops.
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("server thread panicked"),
            None => Ok(()),
        }
    }
}

/// An error in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.
pub fn error(status: StatusCode, message: impl Into<String>, param: Option<&str>, code: Option<&str>) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    let body = serde_json::json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}});
    (status, axum::Json(body)).into_response()
}

/// How much of an oversized body is read and dropped before answering 413. A client that sends
/// its whole body before reading (most do) gets the 413 instead of a broken pipe: closing a socket
/// with unread data resets the connection. Beyond this, the connection is closed regardless.
const DRAIN_BYTES: usize = 64 << 20;

/// The request body, or the error to answer with: 413 in the JSON shape when it is over
/// `max_bytes`. An oversized body is drained up to [`DRAIN_BYTES`] first.
pub async fn read_body(body: axum::body::Body, max_bytes: usize) -> Result<axum::body::Bytes, Response> {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading the request body: {e}"), None, None))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if seen > max_bytes.saturating_add(DRAIN_BYTES) {
            break;
        }
        if seen <= max_bytes {
            kept.extend_from_slice(&data);
        }
    }
    if seen > max_bytes {
        let message = format!("the request body is too large ({seen} bytes or more; the limit is {max_bytes})");
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, message, None, None));
    }
    Ok(kept.into())
}

/// Unknown paths (404) and wrong methods (405) answered as JSON errors, not axum's plain text.
/// Bodies are limited by the handlers themselves ([`read_body`]).
pub fn json_errors<S: Clone + Send + Sync + 'static>(router: Router<S>, endpoints: &'static str) -> Router<S> {
    router
        .fallback(move || async move { error(StatusCode::NOT_FOUND, format!("no such endpoint ({endpoints})"), None, None) })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint", None, None) })
}

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
    let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong API key: send `Authorization: Bearer <key>`", None, Some("invalid_api_key"));
    response.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    response
}
