//! Pure parse/compose of the memcached text protocol, as memcached 1.6 speaks it.
//!
//! This crate owns the wire format and nothing else: no sockets, no clocks, no
//! runtime. Every parser takes a byte slice and answers "incomplete" (`Ok(None)`),
//! a message plus the number of bytes it consumed, or a typed error that knows
//! the exact reply memcached would send. That is what makes it fuzzable and
//! benchmarkable on its own, and what lets the proxy be byte-compatible with a
//! real memcached (the differential tests compare the two).
//!
//! Offsets instead of borrows: a parsed [`Request`] refers to its key and value
//! by [`Span`]s into the frame it was parsed from, so the caller can split the
//! frame off its read buffer (`BytesMut::split_to`) and keep both without
//! copying or fighting lifetimes.
#![forbid(unsafe_code)]

pub mod auth;
pub mod base64;
pub mod compose;
pub mod limits;
pub mod number;
pub mod request;
pub mod response;

pub use limits::Limits;
pub use request::{
    parse_request, Command, ErrorKind, MetaOpts, Parsed, Request, RequestError, Span,
};
pub use response::{
    meta_flags, parse_response, Expect, MetaFlags, MetaStatus, ResponseError, ResponseKind,
    ResponseParser,
};

/// memcached's hard limit on key length (`KEY_MAX_LENGTH`).
pub const KEY_MAX_LENGTH: usize = 250;
