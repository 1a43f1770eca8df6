//! Bounds on what a peer may make us buffer or parse.

/// Limits applied while parsing client requests. Every field bounds something
/// a client controls; an input already past a bound is an error, never a
/// reason to keep buffering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest value accepted in a storage command. Larger values get
    /// `SERVER_ERROR object too large for cache` and are swallowed, as
    /// memcached does with its `-I` item size (default 1 MiB).
    pub max_value_len: usize,
    /// A line with no newline after this many bytes, that is not a `get` or
    /// `gets`, is garbage: memcached closes the connection (its limit is 2048).
    pub max_line_len: usize,
    /// Upper bound for retrieval lines (`get k1 k2 ...`), which memcached lets
    /// grow without limit. Past it we close the connection.
    pub max_get_line_len: usize,
    /// Most keys accepted in one retrieval command.
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_len: 1024 * 1024,
            max_line_len: 2048,
            max_get_line_len: 1024 * 1024,
            max_keys: 100_000,
        }
    }
}
