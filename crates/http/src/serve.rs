//! Serving the `[http]` listener: connection caps, timeouts, and a failure limit for the
//! bearer-token APIs.
//!
//! `axum::serve` sets no header timeout and no connection cap: 2,000 idle or half-sent
//! connections stayed open for 75 s, and ~20,000 used up the file descriptors, so SCIM
//! calls timed out and a SIGHUP reload failed with "Too many open files". Here:
//! - a cap on open connections ([`Limits::max_connections`], also kept below the
//!   descriptor limit minus a reserve for reloads, the spool and the database), and one
//!   per client address; over either, a new connection is closed at once;
//! - hyper's header-read timeout: a request's head (and the next one on a kept-alive
//!   connection) must arrive within [`Limits::header_timeout`];
//! - an idle timeout on the stream itself: no byte read or written for
//!   [`Limits::idle_timeout`] closes it (a body that stalls).
//!
//! [`limit_bearer_failures`] counts 401 answers per address: past
//! `portcullis_apiauth::FAILURES_PER_MINUTE` they become 429 and are no longer logged
//! one by one, while a valid token from the same address still passes.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The client's address, for `ConnectInfo` on both the plain and the TLS listener (a
/// local type: axum's impl covers only its own listeners).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// Descriptors kept free for everything but HTTP connections.
const FD_RESERVE: u64 = 256;

/// The listener's limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Limits {
    /// `max_connections`, lowered to fit the process's descriptor limit (raised to its
    /// hard limit first) minus a reserve.
    pub fn fitted(mut self) -> Limits {
        let limit = raise_fd_limit();
        let room = limit.saturating_sub(FD_RESERVE).max(16);
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        if self.max_connections > room {
            tracing::warn!(
                configured = self.max_connections,
                fd_limit = limit,
                using = room,
                "http.max_connections lowered to fit the descriptor limit"
            );
            self.max_connections = room;
        }
        self
    }
}

/// Raises the soft descriptor limit to the hard one; the soft limit in force after.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Admission of connections: a global cap and one per address.
#[derive(Clone, Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_address: usize,
}

/// An admitted connection's place; released when dropped.
#[derive(Debug)]
pub struct Ticket {
    _slot: OwnedSemaphorePermit,
    address: IpAddr,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut m) = self.per_address.lock() {
            if let Some(n) = m.get_mut(&self.address) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.address);
                }
            }
        }
    }
}

impl Gate {
    pub fn new(limits: &Limits) -> Gate {
        Gate {
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            per_address: Arc::new(Mutex::new(HashMap::new())),
            max_per_address: limits.max_connections_per_address.max(1),
        }
    }

    /// A place for a connection from `address`, or `None` when it must be closed.
    pub fn admit(&self, address: IpAddr) -> Option<Ticket> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        let mut m = self.per_address.lock().ok()?;
        let n = m.entry(address).or_insert(0);
        if *n >= self.max_per_address {
            return None;
        }
        *n += 1;
        drop(m);
        Some(Ticket {
            _slot: slot,
            address,
            per_address: self.per_address.clone(),
        })
    }
}

/// The next connection `gate` admits; the others are closed as they come. Accept errors
/// (out of descriptors and the like) back off and keep serving.
pub async fn accept_admitted(
    listener: &tokio::net::TcpListener,
    gate: &Gate,
) -> (tokio::net::TcpStream, SocketAddr, Ticket) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match gate.admit(peer.ip()) {
            Some(ticket) => return (stream, peer, ticket),
            None => tracing::debug!(%peer, "connection refused: over the connection limits"),
        }
    }
}

/// Accepts plain TCP connections through the gate and serves them.
pub async fn serve_plain(listener: tokio::net::TcpListener, app: Router, limits: Limits) {
    let gate = Gate::new(&limits);
    loop {
        let (stream, peer, ticket) = accept_admitted(&listener, &gate).await;
        tokio::spawn(serve_connection(stream, peer, app.clone(), limits, ticket));
    }
}

/// Serves one connection (HTTP/1.1) with the header and idle timeouts.
pub async fn serve_connection<S>(
    io: S,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    ticket: Ticket,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(Peer(peer)));
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let io = TokioIo::new(Idle::new(io, limits.idle_timeout));
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!(%peer, "http connection ended: {e}");
    }
    drop(ticket);
}

/// A stream that fails once no byte moved for `timeout`.
struct Idle<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Idle<S> {
    fn new(inner: S, timeout: Duration) -> Idle<S> {
        Idle {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn progressed(&mut self) {
        let next = tokio::time::Instant::now() + self.timeout;
        self.deadline.as_mut().reset(next);
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection idle",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.progressed();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.check(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.progressed();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.check(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Failed bearer authentications per address (see the module docs).
#[derive(Clone, Debug)]
pub struct BearerFailures(Arc<Mutex<portcullis_apiauth::RateLimit>>);

impl Default for BearerFailures {
    fn default() -> Self {
        BearerFailures(Arc::new(Mutex::new(portcullis_apiauth::RateLimit::new(
            portcullis_apiauth::FAILURES_PER_MINUTE,
            10_000,
        ))))
    }
}

/// A layer over SCIM and `/admin/v1`: counts their 401 answers per address; past the
/// limit a 401 becomes a 429 (not logged); other answers pass unchanged, so a valid
/// token is never locked out.
pub async fn limit_bearer_failures(
    State(failures): State<BearerFailures>,
    req: Request,
    next: Next,
) -> Response {
    let remote = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0 .0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let path = req.uri().path().to_string();
    let bearer = path.starts_with("/scim/") || path.starts_with("/admin/");
    let response = next.run(req).await;
    if !bearer || response.status() != StatusCode::UNAUTHORIZED {
        return response;
    }
    let now = chrono::Utc::now();
    let limited = match failures.0.lock() {
        Ok(mut f) => {
            let limited = f.exhausted(remote, now);
            if !limited {
                f.record(remote, now);
            }
            limited
        }
        Err(_) => false,
    };
    if !limited {
        tracing::warn!(%path, %remote, "request without a valid bearer token refused");
        return response;
    }
    let message = "too many failed authentications from this address; retry in a minute";
    let body = if path.starts_with("/scim/") {
        serde_json::json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
            "status": "429",
            "detail": message,
        })
    } else {
        serde_json::json!({ "error": message })
    };
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(axum::http::header::RETRY_AFTER, "60")],
        axum::Json(body),
    )
        .into_response()
}

/// Longest request target (path and query) accepted; longer ones get a JSON 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Every error answer is JSON, whoever produced it: axum's extractor rejections (an
/// undecodable path segment, a bad query) are plain text, hyper's too. SCIM paths get
/// SCIM's error schema. Request targets over [`MAX_URI_BYTES`] get 414 here, with a body.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let scim = path.starts_with("/scim/");
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_URI_BYTES {
        return error_body(
            StatusCode::URI_TOO_LONG,
            scim,
            &format!("request target is {target_len} bytes, over the {MAX_URI_BYTES}-byte limit"),
        );
    }
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    let is_html = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("html"));
    if !(status.is_client_error() || status.is_server_error()) || is_json || is_html {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let text = if text.is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_lowercase()
    } else {
        text
    };
    let mut out = error_body(parts.status, scim, &text);
    for (k, v) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

fn error_body(status: StatusCode, scim: bool, message: &str) -> Response {
    let body = if scim {
        serde_json::json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
            "status": status.as_u16().to_string(),
            "detail": message,
        })
    } else {
        serde_json::json!({ "error": message })
    };
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_connections_globally_and_per_address() {
        let gate = Gate::new(&Limits {
            max_connections: 3,
            max_connections_per_address: 2,
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
        });
        let a = IpAddr::from([127, 0, 0, 1]);
        let b = IpAddr::from([127, 0, 0, 2]);
        let t1 = gate.admit(a);
        let t2 = gate.admit(a);
        assert!(t1.is_some() && t2.is_some());
        assert!(gate.admit(a).is_none(), "per-address cap");
        let t3 = gate.admit(b);
        assert!(t3.is_some());
        assert!(gate.admit(b).is_none(), "global cap");
        drop(t1);
        assert!(
            gate.admit(a).is_some(),
            "a closed connection frees its place"
        );
    }
}
