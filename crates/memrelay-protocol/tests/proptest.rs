//! Property tests for request parsing: generated valid requests (every
//! command, keys within memcached's rules, any value bytes, noreply, meta
//! flags, varied spacing) parse back to what generated them, consume exactly
//! their bytes, alone or pipelined; arbitrary bytes never panic the parser.

use memrelay_protocol::{parse_request, Command, ErrorKind, Limits, Request, KEY_MAX_LENGTH};
use proptest::collection::vec;
use proptest::prelude::*;

/// A request as generated: the fields the parser must give back.
#[derive(Clone, Debug)]
struct Model {
    command: Command,
    keys: Vec<Vec<u8>>,
    flags: u32,
    exptime: i32,
    cas: u64,
    delta: u64,
    value: Vec<u8>,
    noreply: bool,
    has_delay: bool,
    args: Vec<u8>,
    meta_flags: Vec<Vec<u8>>,
    /// `delete <key> 0`: the legacy form memcached still takes.
    zero: bool,
    /// Spaces between tokens (1..=3) and whether lines end in "\r\n".
    gap: usize,
    crlf: bool,
}

impl Model {
    fn new(command: Command) -> Model {
        Model {
            command,
            keys: Vec::new(),
            flags: 0,
            exptime: 0,
            cas: 0,
            delta: 0,
            value: Vec::new(),
            noreply: false,
            has_delay: false,
            args: Vec::new(),
            meta_flags: Vec::new(),
            zero: false,
            gap: 1,
            crlf: true,
        }
    }

    /// The request on the wire.
    fn encode(&self) -> Vec<u8> {
        let mut toks: Vec<Vec<u8>> = vec![self.command.name().to_vec()];
        let num = |n: &dyn ToString| n.to_string().into_bytes();
        let key = || self.keys[0].clone();
        match self.command {
            Command::Get | Command::Gets => toks.extend(self.keys.iter().cloned()),
            Command::Gat | Command::Gats => {
                toks.push(num(&self.exptime));
                toks.extend(self.keys.iter().cloned());
            }
            Command::Set
            | Command::Add
            | Command::Replace
            | Command::Append
            | Command::Prepend
            | Command::Cas => {
                toks.extend([
                    key(),
                    num(&self.flags),
                    num(&self.exptime),
                    num(&self.value.len()),
                ]);
                if self.command == Command::Cas {
                    toks.push(num(&self.cas));
                }
            }
            Command::Delete => {
                toks.push(key());
                if self.zero {
                    toks.push(b"0".to_vec());
                }
            }
            Command::Incr | Command::Decr => toks.extend([key(), num(&self.delta)]),
            Command::Touch => toks.extend([key(), num(&self.exptime)]),
            Command::FlushAll => {
                if self.has_delay {
                    toks.push(num(&self.exptime));
                }
            }
            Command::Verbosity => toks.push(num(&self.delta)),
            Command::Stats | Command::Admin => {
                if !self.args.is_empty() {
                    toks.push(self.args.clone());
                }
            }
            Command::Version | Command::Quit | Command::MetaNoop => {}
            Command::MetaSet => {
                toks.extend([key(), num(&self.value.len())]);
                toks.extend(self.meta_flags.iter().cloned());
            }
            Command::MetaGet | Command::MetaDelete | Command::MetaArith | Command::MetaDebug => {
                toks.push(key());
                toks.extend(self.meta_flags.iter().cloned());
            }
        }
        if self.noreply {
            toks.push(b"noreply".to_vec());
        }
        let mut out = toks.join(&b" ".repeat(self.gap)[..]);
        out.extend_from_slice(if self.crlf { b"\r\n" } else { b"\n" });
        if self.command.is_storage() || self.command == Command::MetaSet {
            out.extend_from_slice(&self.value);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// Checks a parsed request against the model.
    fn check(&self, frame: &[u8], req: &Request) -> Result<(), TestCaseError> {
        prop_assert_eq!(req.command, self.command);
        let keys: Vec<&[u8]> = req.keys(frame).collect();
        let want: Vec<&[u8]> = self.keys.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(keys, want);
        if self.command.is_retrieval() {
            prop_assert_eq!(req.nkeys as usize, self.keys.len());
        }
        prop_assert_eq!(req.value.of(frame), &self.value[..]);
        prop_assert_eq!(req.noreply, self.noreply);
        match self.command {
            Command::Set
            | Command::Add
            | Command::Replace
            | Command::Append
            | Command::Prepend
            | Command::Cas => {
                prop_assert_eq!(req.flags, self.flags);
                prop_assert_eq!(req.exptime, self.exptime);
                prop_assert_eq!(req.cas, self.cas);
            }
            Command::Gat | Command::Gats | Command::Touch => {
                prop_assert_eq!(req.exptime, self.exptime)
            }
            Command::Incr | Command::Decr | Command::Verbosity => {
                prop_assert_eq!(req.delta, self.delta)
            }
            Command::FlushAll => {
                prop_assert_eq!(req.has_delay, self.has_delay);
                if self.has_delay {
                    prop_assert_eq!(req.exptime, self.exptime);
                }
            }
            Command::Stats | Command::Admin => {
                prop_assert_eq!(req.args.of(frame), &self.args[..])
            }
            _ => {}
        }
        if self.command == Command::MetaDebug {
            // `me` reads only a `b` right after the key.
            let b = self.meta_flags.first().is_some_and(|f| f == b"b");
            let want: &[u8] = if b { b"b" } else { b"" };
            prop_assert_eq!(req.meta.flags.of(frame), want);
            prop_assert_eq!(req.meta.base64, b);
            prop_assert!(!req.meta.quiet && !req.meta.value && !req.meta.cas);
            prop_assert!(!req.meta.vivify);
            prop_assert_eq!(req.meta.mode, 0);
        } else if self.command.is_meta() {
            let flags: Vec<&[u8]> = req
                .meta
                .flags
                .of(frame)
                .split(|&b| b == b' ')
                .filter(|t| !t.is_empty())
                .collect();
            let want: Vec<&[u8]> = self.meta_flags.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(flags, want);
            let has = |c: u8| self.meta_flags.iter().any(|f| f[0] == c);
            prop_assert_eq!(req.meta.quiet, has(b'q'));
            prop_assert_eq!(req.meta.base64, has(b'b'));
            prop_assert_eq!(req.meta.cas, has(b'C'));
            prop_assert_eq!(req.meta.value, has(b'v'));
            prop_assert_eq!(req.meta.vivify, has(b'N'));
            let mode = self
                .meta_flags
                .iter()
                .rev()
                .find(|f| f[0] == b'M' && f.len() == 2)
                .map_or(0, |f| f[1]);
            prop_assert_eq!(req.meta.mode, mode);
        }
        Ok(())
    }
}

/// A key memcached accepts: 1 to 250 bytes, none of them a space, a control
/// character that ends or splits a line, or NUL.
fn key() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => 0x80u8..=0xff,
    ];
    prop_oneof![
        4 => vec(byte.clone(), 1..=16),
        1 => vec(byte, 1..=KEY_MAX_LENGTH),
        1 => Just(b"noreply".to_vec()),
    ]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..64),
        // Values that look like protocol: the length, not the content, frames them.
        Just(b"END\r\nget a\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
    ]
}

/// Meta flags: at most one `q` (two are refused), few enough tokens for
/// memcached's limit on meta lines.
fn meta_flags() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let flag = prop_oneof![
        Just(b"v".to_vec()),
        Just(b"k".to_vec()),
        Just(b"f".to_vec()),
        Just(b"t".to_vec()),
        Just(b"c".to_vec()),
        Just(b"s".to_vec()),
        Just(b"b".to_vec()),
        Just(b"I".to_vec()),
        Just(b"N30".to_vec()),
        (b'A'..=b'Z').prop_map(|m| vec![b'M', m]),
        any::<u32>().prop_map(|n| format!("T{n}").into_bytes()),
        any::<u32>().prop_map(|n| format!("F{n}").into_bytes()),
        any::<u64>().prop_map(|n| format!("C{n}").into_bytes()),
        any::<u64>().prop_map(|n| format!("D{n}").into_bytes()),
        vec(0x21u8..=0x7e, 1..=32).prop_map(|o| [&b"O"[..], &o].concat()),
    ];
    (
        vec(flag, 0..=15),
        any::<bool>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut flags, quiet, at)| {
            if quiet {
                let i = at.index(flags.len() + 1);
                flags.insert(i, b"q".to_vec());
            }
            flags
        })
}

fn stats_args() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        &b""[..],
        b"slabs",
        b"items",
        b"settings",
        b"sizes",
        b"conns",
        b"detail on",
        b"cachedump 1 2",
    ])
    .prop_map(<[u8]>::to_vec)
}

/// `memrelay <subcommand> [args]`, the proxy's own commands.
fn admin_args() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        &b""[..],
        b"resync 10.0.0.11:11211",
        b"resync [::1]:11212",
        b"help",
    ])
    .prop_map(<[u8]>::to_vec)
}

/// Any valid request.
fn request() -> impl Strategy<Value = Model> {
    use Command::*;
    let command = prop::sample::select(vec![
        Get, Gets, Gat, Gats, Set, Add, Replace, Append, Prepend, Cas, Delete, Incr, Decr, Touch,
        FlushAll, Version, Verbosity, Quit, Stats, Admin, MetaNoop, MetaGet, MetaSet, MetaDelete,
        MetaArith, MetaDebug,
    ]);
    (
        command,
        vec(key(), 1..=8),
        any::<u32>(),
        any::<i32>(),
        any::<u64>(),
        value(),
        any::<bool>(),
        any::<bool>(),
        (stats_args(), admin_args()),
        meta_flags(),
        1usize..=3,
        any::<bool>(),
    )
        .prop_map(
            |(
                command,
                keys,
                flags,
                exptime,
                num,
                value,
                noreply,
                opt,
                (args, admin_args),
                mflags,
                gap,
                crlf,
            )| {
                let mut m = Model::new(command);
                m.gap = gap;
                m.crlf = crlf;
                let one_key = || vec![keys[0].clone()];
                match command {
                    Get | Gets => m.keys = keys,
                    Gat | Gats => {
                        m.keys = keys;
                        m.exptime = exptime;
                    }
                    Set | Add | Replace | Append | Prepend | Cas => {
                        m.keys = one_key();
                        m.flags = flags;
                        m.exptime = exptime;
                        m.value = value;
                        m.noreply = noreply;
                        if command == Cas {
                            m.cas = num;
                        }
                    }
                    Delete => {
                        m.keys = one_key();
                        m.noreply = noreply;
                        m.zero = opt;
                    }
                    Incr | Decr => {
                        m.keys = one_key();
                        m.delta = num;
                        m.noreply = noreply;
                    }
                    Touch => {
                        m.keys = one_key();
                        m.exptime = exptime;
                        m.noreply = noreply;
                    }
                    FlushAll => {
                        m.has_delay = opt;
                        m.exptime = if opt { exptime } else { 0 };
                        m.noreply = noreply;
                    }
                    Verbosity => {
                        m.delta = u64::from(flags);
                        m.noreply = noreply;
                    }
                    Stats => m.args = args,
                    Admin => m.args = admin_args,
                    Version | Quit | MetaNoop => {}
                    MetaGet | MetaSet | MetaDelete | MetaArith | MetaDebug => {
                        m.keys = one_key();
                        m.meta_flags = mflags;
                        if command == MetaSet {
                            m.value = value;
                        }
                    }
                }
                m
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// One request parses back to its model and consumes exactly its bytes,
    /// whatever follows it; every shorter prefix is merely incomplete.
    #[test]
    fn valid_request_round_trips(model in request(), trailer in vec(any::<u8>(), 0..16)) {
        let wire = model.encode();
        let limits = Limits::default();
        let mut input = wire.clone();
        input.extend_from_slice(&trailer);
        let parsed = parse_request(&input, &limits);
        let Ok(Some((req, n))) = parsed else {
            return Err(TestCaseError::fail(format!(
                "{:?} gave {parsed:?}", String::from_utf8_lossy(&wire))));
        };
        prop_assert_eq!(n, wire.len());
        model.check(&input[..n], &req)?;
        for cut in 0..wire.len() {
            let part = parse_request(&wire[..cut], &limits);
            // Only get and gets lines may grow past max_line_len before
            // their newline: memcached hangs up on any other.
            let too_long = cut > limits.max_line_len
                && !wire[..cut].contains(&b'\n')
                && !matches!(model.command, Command::Get | Command::Gets);
            if too_long {
                prop_assert_eq!(part.map_err(|e| e.kind), Err(ErrorKind::Close), "cut {}", cut);
            } else {
                prop_assert_eq!(part, Ok(None), "cut {}", cut);
            }
        }
    }

    /// Several requests in one buffer parse one by one, each consuming
    /// exactly its own bytes.
    #[test]
    fn pipelines_parse_request_by_request(models in vec(request(), 1..8)) {
        let wires: Vec<Vec<u8>> = models.iter().map(Model::encode).collect();
        let buf = wires.concat();
        let limits = Limits::default();
        let mut pos = 0;
        for (model, wire) in models.iter().zip(&wires) {
            let parsed = parse_request(&buf[pos..], &limits);
            let Ok(Some((req, n))) = parsed else {
                return Err(TestCaseError::fail(format!(
                    "{:?} gave {parsed:?}", String::from_utf8_lossy(wire))));
            };
            prop_assert_eq!(n, wire.len());
            model.check(&buf[pos..pos + n], &req)?;
            pos += n;
        }
        prop_assert_eq!(pos, buf.len());
        prop_assert_eq!(parse_request(&buf[pos..], &limits), Ok(None));
    }

    /// Arbitrary bytes, and protocol-looking junk, never panic the parser,
    /// and it never claims more than it was given.
    #[test]
    fn garbage_never_panics(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..512),
            vec(
                prop::sample::select(vec![
                    &b"get"[..], b"set", b"cas", b"mg", b"ms", b"delete", b"incr",
                    b"touch", b"flush_all", b"verbosity", b"stats", b" ", b"  ",
                    b"\r\n", b"\n", b"\r", b"\0", b"noreply", b"0", b"1", b"-1",
                    b"5", b"4294967296", b"18446744073709551616", b"k", b"q", b"v",
                ]),
                0..64,
            )
            .prop_map(|toks| toks.concat()),
        ],
        small in any::<bool>(),
    ) {
        let limits = if small {
            Limits { max_value_len: 8, max_line_len: 32, max_get_line_len: 64, max_keys: 2 }
        } else {
            Limits::default()
        };
        let mut pos = 0;
        while pos < bytes.len() {
            match parse_request(&bytes[pos..], &limits) {
                Ok(None) => break,
                Ok(Some((_, n))) => {
                    prop_assert!(n > 0 && n <= bytes.len() - pos);
                    pos += n;
                }
                Err(e) => {
                    prop_assert!(e.consumed > 0 && e.consumed <= bytes.len() - pos);
                    pos += e.consumed;
                }
            }
        }
    }
}
