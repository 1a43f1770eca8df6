//! Serving the monitoring endpoint over HTTP: the accept loop, the limits
//! on scrapers, credentials, and the replies that `super::metrics` renders.
//!
//! HTTP/1 by hyper (not a parser of our own): it bounds the request head,
//! answers requests with bare-LF line endings, and closes a connection
//! whose head does not arrive within [`HEAD_TIMEOUT`].
//!
//! Bounds (docs/security.md): at most [`MAX_CONNS`] scrapers at once; the
//! next ones wait in the kernel's backlog, not accepted, so they hold no
//! descriptor of ours. Those descriptors are counted in the file budget
//! (`Config::fds_needed`): no number of scrapers can take the descriptors
//! the clients and the server connections need. One request per connection
//! (`Connection: close`), and a connection lasts at most [`CONN_DEADLINE`].

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::metrics::render;
use super::StatsRegistry;
use crate::config::auth::Credentials;

/// Most scrapers served at once (declared with the configuration, which
/// counts the file descriptors they take).
const MAX_CONNS: usize = crate::config::METRICS_MAX_CONNS;
/// Time for a request's head to arrive: a scraper sends it at once.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest life of one connection, reply included (a scraper that does not
/// read its reply lets go of its slot by then).
const CONN_DEADLINE: Duration = Duration::from_secs(10);
/// hyper's read buffer, which bounds a request head (its smallest allowed).
const MAX_HEAD: usize = 8 * 1024;

/// The credentials `/metrics` asks for: `--auth-file`'s, as of the last
/// reload (None: open). Written by the main thread after a reload.
pub(crate) type MetricsAuth = Arc<RwLock<Option<Arc<Credentials>>>>;

/// Accepts scrapers until the process exits, [`MAX_CONNS`] at a time.
pub(crate) async fn serve(listener: TcpListener, registry: Arc<StatsRegistry>, auth: MetricsAuth) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false);
    loop {
        // The slot first: over the cap, connections wait in the backlog.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return; // never closed
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors or similar: wait instead of spinning.
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let auth = auth.clone();
        let service = hyper::service::service_fn(move |req| {
            let reply = answer(&req, &registry, &auth);
            async move { Ok::<_, std::convert::Infallible>(reply) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONN_DEADLINE, conn).await;
            drop(slot);
        });
    }
}

/// The reply to one request.
fn answer(
    req: &Request<hyper::body::Incoming>,
    registry: &StatsRegistry,
    auth: &RwLock<Option<Arc<Credentials>>>,
) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/metrics" => {
            let creds = auth.read().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(creds) = creds {
                if !authorized(req, &creds) {
                    let mut r = reply(StatusCode::UNAUTHORIZED, "credentials required\n".into());
                    r.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"memrelay\""),
                    );
                    return r;
                }
            }
            (StatusCode::OK, render(registry))
        }
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" => match registry.unready() {
            None => (StatusCode::OK, "ready\n".to_string()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    reply(status, body)
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// HTTP basic authentication (RFC 7617) against `--auth-file`'s entries,
/// compared as the memcached clients' are (`Credentials::check`).
fn authorized<B>(req: &Request<B>, creds: &Credentials) -> bool {
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Basic "))
    else {
        return false;
    };
    let Some(decoded) = memrelay_protocol::base64::decode(given.trim_ascii()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    creds.check(&decoded[..colon], &decoded[colon + 1..])
}

/// Binds the endpoint (before privileges are dropped).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials() {
        let creds = Credentials::parse(b"scraper:s3cret:x\n").unwrap();
        let with = |value: &str| {
            Request::builder()
                .header(AUTHORIZATION, value)
                .body(())
                .unwrap()
        };
        // base64("scraper:s3cret:x")
        assert!(authorized(&with("Basic c2NyYXBlcjpzM2NyZXQ6eA=="), &creds));
        // base64("scraper:wrong")
        assert!(!authorized(&with("Basic c2NyYXBlcjp3cm9uZw=="), &creds));
        assert!(!authorized(
            &with("Bearer c2NyYXBlcjpzM2NyZXQ6eA=="),
            &creds
        ));
        assert!(!authorized(&with("Basic !!!"), &creds));
        assert!(!authorized(&Request::new(()), &creds));
    }
}
