//! Serving the monitoring endpoint over HTTP: the accept loop, reading a
//! request, and writing the reply that `super::metrics` renders.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::metrics::render;
use super::StatsRegistry;

/// Longest request head accepted from a scraper.
const MAX_HEAD: usize = 8 * 1024;

pub async fn serve(listener: TcpListener, registry: Arc<StatsRegistry>) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                Ok::<(), std::io::Error>(())
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let line = head.split(|&b| b == b'\r').next().unwrap_or(b"");
            let path = line.split(|&b| b == b' ').nth(1).unwrap_or(b"");
            let (status, body) = match path {
                b"/metrics" => ("200 OK", render(&registry)),
                b"/healthz" => ("200 OK", "ok\n".to_string()),
                b"/readyz" => match registry.unready() {
                    None => ("200 OK", "ready\n".to_string()),
                    Some(why) => ("503 Service Unavailable", format!("{why}\n")),
                },
                _ => (
                    "404 Not Found",
                    "try /metrics, /healthz or /readyz\n".to_string(),
                ),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ =
                tokio::time::timeout(Duration::from_secs(5), s.write_all(reply.as_bytes())).await;
        });
    }
}

/// Binds the endpoint (before privileges are dropped).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}
