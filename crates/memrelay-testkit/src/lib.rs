//! memrelay's test kit: what the integration tests (crates/memrelay/tests)
//! and memrelay-chaos share.
//!
//! - `process`: the registry of child processes, signals, free loopback
//!   ports, waiting on a condition with a deadline, temporary files;
//! - `memcached`, `memrelay`: the real binaries as processes on loopback
//!   ports the kit picks, stopped when dropped;
//! - `forwarder`: a fault-injecting TCP forwarder (blackhole, reset,
//!   delay) between one memrelay and one server: a partial partition;
//! - `cluster`: primaries, backups and a memrelay in front, built in one
//!   line;
//! - `client`: a raw client whose every read has a deadline (replies as
//!   bytes); `conn`: a client that reads parsed replies, for the model;
//! - `wire`: items, `VALUE` blocks, `mg` replies and `stats` as a test
//!   reads them;
//! - `model`: the one model checker (each key's possible states, every
//!   reply judged against them);
//! - `rng`: the one seeded random generator.
//!
//! The kit drives processes; it does not link memrelay, so it tests the
//! binary an operator runs. Real memcached only: a missing memcached fails
//! loudly, it never skips. Everything listens on 127.0.0.1 or ::1.
//!
//! Helpers fail the test by panicking, with a message that says what went
//! wrong; the `try_`/`launch` forms return the reason instead, for a tool.
#![allow(clippy::panic)]

pub mod client;
pub mod cluster;
pub mod conn;
pub mod forwarder;
pub mod memcached;
pub mod memrelay;
pub mod model;
pub mod process;
pub mod rng;
pub mod wire;

pub use client::{
    get_text, hit_text, http_get, set_text, stat_u64, stats, Client, End, Reply, IO_DEADLINE,
};
pub use cluster::{set_spread, Cluster, ClusterBuilder, CONVERGE, HA_FLAGS};
pub use forwarder::{Fault, Forwarder};
pub use memcached::{memcached_bin, Memcached};
pub use memrelay::{memrelay_bin, run_memrelay, Memrelay, MemrelayCmd, RunOutput, Stopped};
pub use process::{
    free_port, join_host_port, kill_all_children, proc_state, signal, try_free_port, wait_until,
    TempDir, TempFile, START_DEADLINE,
};
pub use rng::Rng;
pub use wire::{
    complete_retrieval, escape, escape_max, meta_done, parse_mg, parse_stats, parse_values,
    same_item, Item, Val,
};
