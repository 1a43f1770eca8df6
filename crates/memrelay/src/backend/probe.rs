//! Background probing of servers that are marked down.
//!
//! While a server is down nobody sends it requests, so something else must
//! notice when it is back: this loop connects and asks `version`, with
//! jittered exponential backoff, and marks the server up after
//! `SUCCESSES_TO_MARK_UP` probes in a row succeed (one lucky connect to a
//! flapping server is not enough).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::health::Health;

const SUCCESSES_TO_MARK_UP: u32 = 2;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often an up server's flag is looked at (cheap: one atomic load).
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

pub async fn probe_loop(
    health: Arc<Health>,
    addr: SocketAddr,
    connect_timeout: Duration,
    timeout: Duration,
) {
    let mut rng = seed(&health.name);
    let mut backoff = MIN_BACKOFF;
    let mut successes = 0;
    loop {
        if !health.is_down() {
            backoff = MIN_BACKOFF;
            successes = 0;
            tokio::time::sleep(WATCH_INTERVAL).await;
            continue;
        }
        // Jitter: between half and all of the backoff, so many proxies
        // probing the same server do not stampede it in step.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let wait = backoff / 2 + Duration::from_millis(rng % (backoff.as_millis() as u64 / 2 + 1));
        tokio::time::sleep(wait).await;
        if probe(addr, connect_timeout, timeout).await {
            successes += 1;
            if successes >= SUCCESSES_TO_MARK_UP {
                health.mark_up();
            }
            backoff = MIN_BACKOFF;
        } else {
            successes = 0;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// One probe: connect, `version`, expect `VERSION ...`.
async fn probe(addr: SocketAddr, connect_timeout: Duration, timeout: Duration) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await
    else {
        return false;
    };
    let exchange = async {
        s.write_all(b"version\r\n").await?;
        let mut buf = [0u8; 128];
        let mut n = 0;
        while n < buf.len() {
            let r = s.read(&mut buf[n..]).await?;
            if r == 0 {
                break;
            }
            n += r;
            if buf[..n].ends_with(b"\r\n") {
                break;
            }
        }
        Ok::<bool, std::io::Error>(buf[..n].starts_with(b"VERSION "))
    };
    matches!(tokio::time::timeout(timeout, exchange).await, Ok(Ok(true)))
}

fn seed(name: &str) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    name.bytes()
        .fold(t | 1, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}
