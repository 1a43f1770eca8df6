//! memrelay: a high-availability memcached proxy, a drop-in successor to
//! magent. The binary's `main` only parses arguments and calls
//! [`server::run`]; everything else lives here, one folder per concern:
//!
//! - `config/`: command line -> one validated `Config`;
//! - `router/`: key -> servers (ketama, modula, magent's hash); no I/O;
//! - `backend/`: pipelined connections to memcached, health, probes;
//! - `proxy/`: client sessions: parse, dispatch, reply in order;
//! - `ha/`: replica choice, write mirroring, read fallback and repair;
//! - `net/`: listeners, the connection limit, write queues;
//! - `stats/`: counters and the `stats` reply;
//! - `topology`: the configuration the workers run, and its reload.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod backend;
pub mod config;
pub mod ha;
pub mod net;
pub mod privileges;
pub mod proxy;
pub mod router;
pub mod server;
pub mod stats;
pub mod topology;

/// memrelay's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
