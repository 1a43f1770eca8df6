//! memrelay: a high-availability memcached proxy, a drop-in successor to
//! magent. The binary's `main` only parses arguments and calls
//! [`server::run`]; everything else lives here, one folder per concern:
//!
//! - `config/`: command line -> one validated `Config`;
//! - `router/`: key -> servers (ketama, modula, magent's hash); no I/O;
//! - `backend/`: pipelined connections to memcached, liveness, probes;
//! - `proxy/`: accepting clients, sessions: parse, dispatch, reply in order;
//! - `ha/`: replica state, replica choice, write mirroring, read fallback
//!   and repair, resync;
//! - `net/`: streams (plain, TLS), binding listeners, write queues;
//! - `stats/`: counters and the `stats` reply;
//! - `logging`: where log lines go (stderr or `--log-file`), colour only on a terminal;
//! - `topology`: the configuration the workers run, and its reload.
//! - `sys`: the libc calls behind small safe functions, where `unsafe` lives.
//!
//! Each module uses only those below it, in the order of
//! `crates/memrelay/layers.txt` (checked by `scripts/layers`).
#![deny(unsafe_op_in_unsafe_fn)]
// `unsafe` lives in `sys` (safe wrappers of the libc calls), plus the
// allocator's impl, net::handoff's SCM_RIGHTS and one registration in
// proxy::park, each allowed where it is.
#![deny(unsafe_code)]
// `pub(crate)` by default: only what the binary, tests, benches and examples
// use is exported, and this lint flags a `pub` nothing outside can reach.
#![warn(unreachable_pub)]

pub mod alloc;
pub(crate) mod backend;
pub mod config;
pub(crate) mod fleet;
pub mod ha;
pub mod logging;
pub(crate) mod net;
pub(crate) mod privileges;
pub(crate) mod proxy;
pub mod router;
pub mod server;
pub(crate) mod stats;
mod sys;
pub(crate) mod topology;

/// The one version memrelay shows, everywhere: the `version` reply,
/// `STAT version`, `--version`, `/metrics` and the start-up log line.
/// memcached's protocol version comes first because clients parse it to
/// decide which commands they may send (meta commands: 1.6); memrelay's
/// own release follows.
pub const VERSION: &str = concat!("1.6.0-memrelay-", env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_reply_is_the_one_version() {
        assert_eq!(
            crate::proxy::dispatch::VERSION_REPLY,
            format!("VERSION {}\r\n", crate::VERSION).as_bytes()
        );
    }
}
