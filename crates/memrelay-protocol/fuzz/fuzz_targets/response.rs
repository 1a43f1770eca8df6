//! Server response framing: for arbitrary bytes and every reply shape, the
//! parser never claims bytes it was not given, gives the same answer however
//! the bytes arrive, and frames retrieval replies so that `ValueBlocks` can
//! walk them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memrelay_protocol::response::ValueBlocks;
use memrelay_protocol::{
    meta_flags, parse_response, Expect, MetaStatus, ResponseError, ResponseKind, ResponseParser,
};

type Outcome = Result<Option<(ResponseKind, usize)>, ResponseError>;

const EXPECTS: [Expect; 9] = [
    Expect::Retrieval,
    Expect::Storage,
    Expect::Delete,
    Expect::Arith,
    Expect::Touch,
    Expect::Ok,
    Expect::Version,
    Expect::Meta,
    Expect::MetaQuiet,
];

/// The proxy's largest value limit (`-I 1g` plus slack), a default one,
/// and a tiny one so short inputs reach the too-large branches.
const MAX_VALUES: [usize; 3] = [(1 << 30) + 1024, 1 << 20, 8];

fuzz_target!(|data: &[u8]| {
    // Never panics, whatever it is given.
    let _ = meta_flags(data);
    for expect in EXPECTS {
        for max_value in MAX_VALUES {
            check(data, expect, max_value);
        }
    }
});

fn check(data: &[u8], expect: Expect, max_value: usize) {
    let whole = parse_response(data, expect, max_value);
    check_outcome(data, expect, &whole);
    check_incremental(data, expect, max_value, &whole);
    // A reply and the one after it, read through one parser as a backend
    // connection does: the second answer is what a fresh parser gives.
    if let Ok(Some((_, n))) = whole {
        let mut p = ResponseParser::new();
        assert_eq!(p.parse(data, expect, max_value), whole);
        let rest = &data[n..];
        assert_eq!(
            p.parse(rest, expect, max_value),
            parse_response(rest, expect, max_value)
        );
    }
}

fn check_outcome(data: &[u8], expect: Expect, outcome: &Outcome) {
    let Ok(Some((kind, n))) = *outcome else {
        return;
    };
    assert!(n > 0 && n <= data.len(), "consumed {n} of {}", data.len());
    let mut reply = &data[..n];
    assert!(
        reply.ends_with(b"\r\n"),
        "reply {reply:?} not ended by CRLF"
    );
    if expect == Expect::MetaQuiet {
        if kind == ResponseKind::Meta(MetaStatus::Mn) {
            // Nothing but the MN line: the server suppressed the reply.
            assert!(reply.starts_with(b"MN"));
        } else {
            // The reply memcached did not suppress, then exactly the
            // `MN\r\n` the caller strips.
            assert!(reply.ends_with(b"\r\nMN\r\n"), "quiet reply {reply:?}");
            reply = &reply[..n - 4];
        }
    }
    match kind {
        ResponseKind::Values { hits } => {
            assert_eq!(expect, Expect::Retrieval);
            assert!(reply.ends_with(b"END\r\n"));
            let end = n - b"END\r\n".len();
            let blocks: Vec<_> = ValueBlocks::new(reply).collect();
            assert_eq!(blocks.len(), hits as usize, "reply {reply:?}");
            let mut pos = 0;
            for b in &blocks {
                assert_eq!(b.start, pos, "blocks must tile the reply");
                assert!(b.end > b.start);
                assert!(!b.header.key.is_empty());
                assert_eq!(&reply[b.end - 2..b.end], b"\r\n");
                pos = b.end;
            }
            assert_eq!(pos, end, "blocks must end where END starts");
        }
        ResponseKind::Meta(MetaStatus::Value) => {
            let f = meta_flags(reply);
            let Some((off, len)) = f.data else {
                panic!("VA reply {reply:?} without a data block");
            };
            assert_eq!(off + len + 2, reply.len(), "VA data must end the reply");
        }
        _ => {}
    }
}

/// A persistent parser fed growing prefixes ends with the same answer as
/// parsing the whole input at once.
fn check_incremental(data: &[u8], expect: Expect, max_value: usize, whole: &Outcome) {
    let mut p = ResponseParser::new();
    let step = if data.len() <= 512 {
        1
    } else {
        data.len() / 256
    };
    let mut cut = 0;
    loop {
        let cut_now = cut.min(data.len());
        let r = p.parse(&data[..cut_now], expect, max_value);
        check_outcome(&data[..cut_now], expect, &r);
        match r {
            Ok(None) if cut_now < data.len() => cut += step,
            // The documented exception: a line with no end yet, longer than
            // any reply line, is refused though more bytes might end it.
            Err(ResponseError::LineTooLong) if cut_now < data.len() => return,
            r => {
                assert_eq!(&r, whole, "prefix of {cut_now} bytes");
                return;
            }
        }
    }
}
