//! TLS to clients (`--tls-cert`, `--tls-key`, `--tls-client-ca`) and to
//! the servers (`--server-tls-ca`, `--server-tls-cert`, `--server-tls-key`,
//! `--server-tls-name`): real memcached behind memrelay (started with `-Z`
//! for the second), and blocking rustls clients in front.
//!
//! The certificates are made here (a CA, a server certificate for
//! `localhost` and 127.0.0.1, client certificates from that CA and from
//! another), into a temporary directory. What is checked towards clients:
//! the ordinary commands, values larger than a TLS record and pipelines
//! (where bytes can wait inside the TLS layer while the socket has none,
//! the way a TLS stream hangs if it gets readiness wrong), a pipeline
//! longer than `--max-pipeline`, concurrent clients, a plaintext client
//! turned away without harm to the others, client certificates when asked
//! for, and unusable files refused at start with exit 64 naming the flag.
//! Towards servers: requests, failover to a backup and the resync of a
//! restarted primary all over TLS; a server whose certificate is not
//! trusted, carries another name, or that speaks no TLS is an error, not a
//! hang and not plaintext; client certificates for memcached's
//! `ssl_verify_mode`.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{escape, run_memrelay, Memcached, Memrelay};

/// Longest wait for one exchange.
const DEADLINE: Duration = Duration::from_secs(10);

/// A directory of PEM files, removed on drop.
struct Pki {
    dir: PathBuf,
    /// The CA, to sign renewed certificates with.
    ca: Authority,
}

impl Pki {
    /// A CA, a server certificate and a client certificate signed by it,
    /// and a client certificate from a CA memrelay does not trust.
    fn make() -> Pki {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("memrelay-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_pem, ca) = authority("memrelay test CA");
        let pki = Pki { dir, ca };
        pki.write("ca.pem", &ca_pem);
        let (server_cert, server_key) = pki.server_leaf();
        pki.write("server.pem", &server_cert);
        pki.write("server.key", &server_key);
        let (client_cert, client_key) =
            leaf(&pki.ca, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        pki.write("client.pem", &client_cert);
        pki.write("client.key", &client_key);
        let (other_pem, other) = authority("someone else's CA");
        pki.write("other-ca.pem", &other_pem);
        let (stranger_cert, stranger_key) =
            leaf(&other, &["stranger"], ExtendedKeyUsagePurpose::ClientAuth);
        pki.write("stranger.pem", &stranger_cert);
        pki.write("stranger.key", &stranger_key);
        pki
    }

    /// A new server certificate for `localhost` and 127.0.0.1 from this
    /// CA, and its key (PEM).
    fn server_leaf(&self) -> (String, String) {
        leaf(
            &self.ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn write(&self, name: &str, pem: &str) {
        std::fs::write(self.dir.join(name), pem).unwrap();
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }

    /// memrelay in front of `mc`, with this PKI's TLS flags and `extra`.
    fn relay(&self, mc: &Memcached, extra: &[String]) -> Memrelay {
        let mut args = self.server_args();
        // Generous: a loaded test machine must not turn into SERVER_ERROR.
        args.extend(["--timeout", "5s", "--connect-timeout", "2s", "-s"].map(String::from));
        args.push(mc.addr());
        args.extend(extra.iter().cloned());
        Memrelay::start(&args)
    }

    /// memcached speaking only TLS with this PKI's server certificate, and
    /// `extra` options (`-o` suboptions, comma-separated).
    fn tls_memcached(&self, extra: &str) -> Memcached {
        let mut opts = format!(
            "ssl_chain_cert={},ssl_key={}",
            self.path("server.pem"),
            self.path("server.key")
        );
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        Memcached::start_with("127.0.0.1", &["-Z", "-o", &opts])
    }

    /// memrelay's TLS flags for this PKI.
    fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("server.pem"),
            "--tls-key".into(),
            self.path("server.key"),
        ]
    }

    /// A client that trusts this CA, showing `cert` (`client`, `stranger`)
    /// if given.
    fn client_config(&self, cert: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.dir.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match cert {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let chain = CertificateDer::pem_file_iter(self.dir.join(format!("{name}.pem")))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key =
                    PrivateKeyDer::from_pem_file(self.dir.join(format!("{name}.key"))).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        })
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A certificate authority: its PEM, and what signs with it.
type Authority = (Certificate, KeyPair);

fn authority(name: &str) -> (String, Authority) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), (cert, key))
}

fn leaf(ca: &Authority, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A blocking TLS client whose every read has a deadline.
struct TlsClient {
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    fn connect(addr: &str, config: Arc<rustls::ClientConfig>) -> TlsClient {
        TlsClient::try_connect(addr, config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As `connect`, or why the handshake did not happen.
    fn try_connect(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<TlsClient, String> {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        tcp.set_write_timeout(Some(DEADLINE)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        // The handshake first, through the short read timeout (a loaded
        // machine may take longer to answer), so that later writes only
        // write.
        let start = Instant::now();
        while s.conn.is_handshaking() {
            match s.conn.complete_io(&mut s.sock) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if start.elapsed() > DEADLINE {
                        return Err("no TLS handshake in time".into());
                    }
                }
                Err(e) => return Err(format!("TLS handshake: {e}")),
            }
        }
        Ok(TlsClient { s })
    }

    /// Writes `req`, then reads until the reply ends with `end`.
    fn ask(&mut self, req: &[u8], end: &[u8]) -> Vec<u8> {
        self.ask_until(req, |got| got.ends_with(end))
    }

    /// A `get` of one key: the whole reply.
    fn get(&mut self, key: &str) -> Vec<u8> {
        self.ask(format!("get {key}\r\n").as_bytes(), b"END\r\n")
    }

    /// Writes `req`, then reads `len` bytes (or more: the test then fails).
    fn ask_len(&mut self, req: &[u8], len: usize) -> Vec<u8> {
        self.ask_until(req, |got| got.len() >= len)
    }

    fn ask_until(&mut self, req: &[u8], done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        self.try_ask(req, done)
            .unwrap_or_else(|(got, e)| panic!("{e}; got {}", escape(&got)))
    }

    /// As `ask_until`, or what was read and why it stopped short.
    fn try_ask(
        &mut self,
        req: &[u8],
        done: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, (Vec<u8>, String)> {
        if let Err(e) = self.s.write_all(req).and_then(|()| self.s.flush()) {
            return Err((Vec::new(), format!("write: {e}")));
        }
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while !done(&got) {
            if start.elapsed() > DEADLINE {
                return Err((got, "no complete reply in time".into()));
            }
            match self.s.read(&mut buf) {
                Ok(0) => return Err((got, "closed".into())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err((got, format!("read: {e}"))),
            }
        }
        Ok(got)
    }
}

/// A value of `len` bytes that differs per key, so a mix-up shows.
fn value(key: &str, len: usize) -> Vec<u8> {
    key.bytes()
        .chain(b"0123456789".iter().copied())
        .cycle()
        .take(len)
        .collect()
}

fn set(key: &str, v: &[u8]) -> Vec<u8> {
    let mut r = format!("set {key} 0 0 {}\r\n", v.len()).into_bytes();
    r.extend_from_slice(v);
    r.extend_from_slice(b"\r\n");
    r
}

/// The reply to a `get` of `key` holding `v`.
fn found(key: &str, v: &[u8]) -> Vec<u8> {
    let mut r = hit(key, v);
    r.extend_from_slice(b"END\r\n");
    r
}

fn hit(key: &str, v: &[u8]) -> Vec<u8> {
    let mut r = format!("VALUE {key} 0 {}\r\n", v.len()).into_bytes();
    r.extend_from_slice(v);
    r.extend_from_slice(b"\r\n");
    r
}

#[test]
fn commands_large_values_pipelines_and_concurrent_clients() {
    let pki = Pki::make();
    let mc = Memcached::start();
    // A short pipeline limit: memrelay stops reading a client's requests
    // with some of them already decrypted and waiting in the TLS layer.
    let relay = pki.relay(&mc, &["--max-pipeline".into(), "4".into()]);
    let config = pki.client_config(None);
    let mut c = TlsClient::connect(&relay.addr(), config.clone());

    assert_eq!(c.ask(b"set a 0 0 1\r\nx\r\n", b"\r\n"), b"STORED\r\n");
    assert_eq!(c.get("a"), found("a", b"x"));
    assert!(c.ask(b"version\r\n", b"\r\n").starts_with(b"VERSION "));

    // A value of many TLS records, both ways.
    let big = value("big", 500 * 1024);
    assert_eq!(c.ask(&set("big", &big), b"\r\n"), b"STORED\r\n");
    let mut want = hit("big", &big);
    want.extend_from_slice(b"END\r\n");
    let got = c.ask(b"get big\r\n", b"END\r\n");
    assert!(got == want, "500 KiB value: got {} bytes", got.len());

    // 40 sets of 20 KiB (each over one record) in one write, then a
    // multi-get of them all, then 200 gets in one write.
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let mut sets = Vec::new();
    for k in &keys {
        sets.extend(set(k, &value(k, 20 * 1024)));
    }
    let stored = c.ask_len(&sets, 8 * 40);
    assert_eq!(stored, b"STORED\r\n".repeat(40), "{}", escape(&stored));
    let mut want = Vec::new();
    for k in &keys {
        want.extend(hit(k, &value(k, 20 * 1024)));
    }
    want.extend_from_slice(b"END\r\n");
    let got = c.ask(format!("get {}\r\n", keys.join(" ")).as_bytes(), b"END\r\n");
    assert!(
        got == want,
        "multi-get: got {} bytes of {}",
        got.len(),
        want.len()
    );
    let mut gets = Vec::new();
    let mut want = Vec::new();
    for i in 0..200 {
        let k = &keys[i % keys.len()];
        gets.extend(format!("get {k}\r\n").into_bytes());
        want.extend(hit(k, &value(k, 20 * 1024)));
        want.extend_from_slice(b"END\r\n");
    }
    let got = c.ask_len(&gets, want.len());
    assert!(
        got == want,
        "200 pipelined gets: got {} bytes of {}",
        got.len(),
        want.len()
    );

    // Several clients at once, each with its own keys.
    let addr = relay.addr();
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let addr = addr.clone();
            let config = config.clone();
            std::thread::spawn(move || {
                let mut c = TlsClient::connect(&addr, config);
                for i in 0..30 {
                    let k = format!("t{t}-{i}");
                    let v = value(&k, 1000 + 997 * i);
                    assert_eq!(c.ask(&set(&k, &v), b"\r\n"), b"STORED\r\n");
                    let mut want = hit(&k, &v);
                    want.extend_from_slice(b"END\r\n");
                    assert!(c.ask(format!("get {k}\r\n").as_bytes(), b"END\r\n") == want);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // A client that asks and then closes its side (close_notify) still
    // gets the whole reply: memrelay sends what TLS holds before closing.
    // (4 MB of reply, read only once memrelay made it: the sockets fill
    // up, and the last of it waits in memrelay's TLS layer when the
    // session ends, for at most 5 s, until this client reads.)
    let hits = |c: &mut TlsClient| {
        let stats = support::parse_stats(&c.ask(b"stats\r\n", b"END\r\n"));
        stats.get("get_hits").and_then(|v| v.parse::<u64>().ok())
    };
    let before = hits(&mut c).unwrap_or(0);
    let mut last = TlsClient::connect(&relay.addr(), config.clone());
    last.s
        .write_all(format!("get{}\r\n", " big".repeat(8)).as_bytes())
        .unwrap();
    last.s.conn.send_close_notify();
    last.s.flush().unwrap();
    // `get_hits` counts a read's hits as its reply is made.
    let made = support::wait_until(DEADLINE, || hits(&mut c) >= Some(before + 8));
    assert!(made, "memrelay never made the reply");
    let mut want = hit("big", &big).repeat(8);
    want.extend_from_slice(b"END\r\n");
    let got = last.ask_len(b"", want.len());
    assert!(got == want, "after close_notify: got {} bytes", got.len());

    // The client holding a connection all along still works.
    assert_eq!(c.get("a"), found("a", b"x"));
}

/// Reads a plain socket until it closes (or the deadline): what came back.
fn read_to_close(s: &mut TcpStream) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if start.elapsed() > DEADLINE {
            return Err(format!("not closed in time; got {}", escape(&got)));
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

#[test]
fn a_plaintext_client_is_closed_and_tls_clients_go_on() {
    let pki = Pki::make();
    let mc = Memcached::start();
    let mut relay = pki.relay(&mc, &[]);
    let config = pki.client_config(None);
    let mut before = TlsClient::connect(&relay.addr(), config.clone());
    assert_eq!(before.ask(b"set p 0 0 1\r\n1\r\n", b"\r\n"), b"STORED\r\n");

    for req in [
        &b"get p\r\n"[..],
        b"set p 0 0 1\r\n2\r\n",
        b"\x16\x03\x01\x00\x05hello",
    ] {
        let mut plain = TcpStream::connect(relay.addr()).unwrap();
        plain.write_all(req).unwrap();
        let got = read_to_close(&mut plain).unwrap();
        // At most a TLS alert record, never a memcached reply.
        assert!(
            got.is_empty() || got[0] == 0x15,
            "{:?}: {}",
            escape(req),
            escape(&got)
        );
    }
    assert!(relay.exited().is_none(), "{}", relay.output());
    assert_eq!(before.get("p"), found("p", b"1"));
    let mut after = TlsClient::connect(&relay.addr(), config);
    assert_eq!(after.get("p"), found("p", b"1"));
}

#[test]
fn client_certificates_when_asked_for() {
    let pki = Pki::make();
    let mc = Memcached::start();
    let relay = pki.relay(&mc, &["--tls-client-ca".into(), pki.path("ca.pem")]);

    // Refused: no certificate, or one from a CA memrelay does not trust.
    // (With TLS 1.3 the client learns it at its first read.)
    for cert in [None, Some("stranger")] {
        let mut c = TlsClient::connect(&relay.addr(), pki.client_config(cert));
        match c.try_ask(b"version\r\n", |got| got.ends_with(b"\r\n")) {
            Ok(got) => panic!("{cert:?} was served: {}", escape(&got)),
            Err((got, _)) => assert!(got.is_empty(), "{cert:?}: {}", escape(&got)),
        }
    }
    let mut c = TlsClient::connect(&relay.addr(), pki.client_config(Some("client")));
    assert_eq!(c.ask(b"set m 0 0 2\r\nok\r\n", b"\r\n"), b"STORED\r\n");
    assert_eq!(c.get("m"), found("m", b"ok"));
}

#[test]
fn unusable_files_stop_the_start_naming_the_flag() {
    let pki = Pki::make();
    let port = support::free_port("127.0.0.1");
    let missing = pki.path("missing.pem");
    let not_pem = pki.path("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--tls-cert".into(),
                missing.clone(),
                "--tls-key".into(),
                pki.path("server.key"),
            ],
            "--tls-cert",
        ),
        (
            vec![
                "--tls-cert".into(),
                not_pem.clone(),
                "--tls-key".into(),
                pki.path("server.key"),
            ],
            "--tls-cert",
        ),
        (
            vec![
                "--tls-cert".into(),
                pki.path("server.pem"),
                "--tls-key".into(),
                missing.clone(),
            ],
            "--tls-key",
        ),
        (
            vec![
                "--tls-cert".into(),
                pki.path("server.pem"),
                "--tls-key".into(),
                not_pem.clone(),
            ],
            "--tls-key",
        ),
        // A key that is not the certificate's.
        (
            vec![
                "--tls-cert".into(),
                pki.path("server.pem"),
                "--tls-key".into(),
                pki.path("client.key"),
            ],
            "--tls-key",
        ),
        (
            vec!["--tls-cert".into(), pki.path("server.pem")],
            "--tls-cert",
        ),
        (
            vec!["--tls-key".into(), pki.path("server.key")],
            "--tls-key",
        ),
        (
            [
                pki.server_args(),
                vec!["--tls-client-ca".into(), missing.clone()],
            ]
            .concat(),
            "--tls-client-ca",
        ),
        (
            vec!["--server-tls-ca".into(), missing.clone()],
            "--server-tls-ca",
        ),
        (
            vec!["--server-tls-ca".into(), not_pem.clone()],
            "--server-tls-ca",
        ),
        // Without a CA, no other server TLS flag means anything.
        (
            vec!["--server-tls-name".into(), "localhost".into()],
            "--server-tls-name",
        ),
        (
            vec![
                "--server-tls-ca".into(),
                pki.path("ca.pem"),
                "--server-tls-cert".into(),
                pki.path("client.pem"),
            ],
            "--server-tls-cert",
        ),
        (
            vec![
                "--server-tls-ca".into(),
                pki.path("ca.pem"),
                "--server-tls-cert".into(),
                pki.path("client.pem"),
                "--server-tls-key".into(),
                pki.path("server.key"),
            ],
            "--server-tls-key",
        ),
        (
            vec![
                "--server-tls-ca".into(),
                pki.path("ca.pem"),
                "--server-tls-name".into(),
                "not a name".into(),
            ],
            "--server-tls-name",
        ),
    ];
    for (tls, flag) in cases {
        let mut args: Vec<String> = vec![
            "-l".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-s".into(),
            "127.0.0.1:1".into(),
        ];
        args.extend(tls.iter().cloned());
        let out = run_memrelay(&args, DEADLINE, Some(port));
        assert_eq!(
            out.status.and_then(|s| s.code()),
            Some(64),
            "{tls:?}: {}",
            out.stderr
        );
        assert!(!out.port_was_bound, "{tls:?}");
        // One line naming the flag (then the usage line, as for any flag).
        let line = out.stderr.lines().next().unwrap_or_default();
        assert!(
            line.starts_with(&format!("memrelay: {flag}: ")),
            "{tls:?}: {line}"
        );
    }

    // The same from a file, naming the key.
    let file = Path::new(&pki.path("memrelay.toml")).to_path_buf();
    std::fs::write(
        &file,
        format!(
            "[pools]\nprimaries = [\"127.0.0.1:1\"]\n[tls]\ncert = \"{missing}\"\nkey = \"{}\"\n",
            pki.path("server.key")
        ),
    )
    .unwrap();
    let out = run_memrelay(
        &["--config", file.to_str().unwrap(), "--check-config"],
        DEADLINE,
        None,
    );
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(64),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains(": tls.cert: "), "{}", out.stderr);
}

#[test]
fn unix_sockets_stay_plaintext() {
    let pki = Pki::make();
    let mc = Memcached::start();
    let sock = pki.path("memrelay.sock");
    let conf = pki.path("memrelay.toml");
    let relay = Memrelay::start_with(|port| {
        std::fs::write(
            &conf,
            format!(
                "[[listen]]\naddress = \"127.0.0.1\"\nport = {port}\n\
                 [[listen]]\nunix = \"{sock}\"\n"
            ),
        )
        .unwrap();
        let mut args = vec!["--config".to_string(), conf.clone()];
        args.extend(pki.server_args());
        args.extend(["--timeout", "5s", "-s"].map(String::from));
        args.push(mc.addr());
        args
    });
    let mut c = TlsClient::connect(&relay.addr(), pki.client_config(None));
    assert_eq!(c.ask(b"set u 0 0 3\r\nyes\r\n", b"\r\n"), b"STORED\r\n");

    let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    u.set_read_timeout(Some(DEADLINE)).unwrap();
    u.write_all(b"get u\r\n").unwrap();
    let want = found("u", b"yes");
    let mut got = vec![0u8; want.len()];
    u.read_exact(&mut got).unwrap();
    assert_eq!(escape(&got), escape(&want));
}

// ---------------------------------------------------------------------------
// TLS to the servers
// ---------------------------------------------------------------------------

/// memrelay, plain towards its clients, with `args` (servers and TLS
/// flags); generous timeouts, as above.
fn relay_to(args: &[String]) -> Memrelay {
    let mut all: Vec<String> = ["--timeout", "5s", "--connect-timeout", "2s"]
        .map(String::from)
        .to_vec();
    all.extend(args.iter().cloned());
    Memrelay::start(&all)
}

/// One request through a plain client, the reply up to its last line.
fn ask(c: &mut support::Client, req: &[u8]) -> Vec<u8> {
    c.send_until(req, |b| {
        b.ends_with(b"END\r\n")
            || b.ends_with(b"STORED\r\n")
            || b.ends_with(b"DELETED\r\n")
            || b.ends_with(b"NOT_FOUND\r\n")
            || (b.starts_with(b"SERVER_ERROR") && b.ends_with(b"\r\n"))
    })
    .bytes
}

/// A server's copy of `key`, read straight from it over TLS.
fn direct_get(pki: &Pki, mc: &Memcached, key: &str) -> Vec<u8> {
    TlsClient::connect(&mc.addr(), pki.client_config(None)).get(key)
}

#[test]
fn requests_failover_and_resync_all_go_over_tls_to_the_servers() {
    let pki = Pki::make();
    let mut primary = pki.tls_memcached("");
    let backup = pki.tls_memcached("");
    // Short timeouts: a resync waits 3 x (connect timeout + timeout) for
    // writes in flight before it reads a source.
    let relay = relay_to(&[
        "--timeout".into(),
        "1s".into(),
        "--connect-timeout".into(),
        "1s".into(),
        "--server-tls-ca".into(),
        pki.path("ca.pem"),
        "-s".into(),
        primary.addr(),
        "-b".into(),
        backup.addr(),
    ]);
    let mut c = relay.client();
    let big = value("big", 300 * 1024);
    for i in 0..50 {
        let key = format!("k{i}");
        assert_eq!(ask(&mut c, &set(&key, &value(&key, 100))), b"STORED\r\n");
    }
    // A value larger than a TLS record, both ways.
    assert_eq!(ask(&mut c, &set("big", &big)), b"STORED\r\n");
    assert_eq!(ask(&mut c, b"get big\r\n"), found("big", &big));
    // Both servers hold the writes (read over TLS: they speak nothing else).
    assert_eq!(
        direct_get(&pki, &primary, "k7"),
        found("k7", &value("k7", 100))
    );
    assert_eq!(
        direct_get(&pki, &backup, "k7"),
        found("k7", &value("k7", 100))
    );

    // The primary dies: its backup serves.
    primary.kill();
    assert_eq!(ask(&mut c, b"get k3\r\n"), found("k3", &value("k3", 100)));

    // It comes back empty: the prober (over TLS) sees it restarted and the
    // resync (over TLS) copies every key back from the backup.
    primary.restart();
    let copied = support::wait_until(Duration::from_secs(30), || {
        direct_get(&pki, &primary, "k49") == found("k49", &value("k49", 100))
    });
    assert!(copied, "no resync over TLS:\n{}", relay.output());
    for i in 0..50 {
        let key = format!("k{i}");
        assert_eq!(
            direct_get(&pki, &primary, &key),
            found(&key, &value(&key, 100))
        );
    }
    assert_eq!(direct_get(&pki, &primary, "big"), found("big", &big));
    assert_eq!(ask(&mut c, b"get k0\r\n"), found("k0", &value("k0", 100)));
}

#[test]
fn an_untrusted_misnamed_or_plaintext_server_is_an_error_not_a_hang() {
    let pki = Pki::make();
    let tls_mc = pki.tls_memcached("");
    let plain_mc = Memcached::start();
    let cases: Vec<(&str, Vec<String>, &Memcached)> = vec![
        (
            "a CA that did not sign the server's certificate",
            vec!["--server-tls-ca".into(), pki.path("other-ca.pem")],
            &tls_mc,
        ),
        (
            "a name the certificate does not carry",
            vec![
                "--server-tls-ca".into(),
                pki.path("ca.pem"),
                "--server-tls-name".into(),
                "cache.example.com".into(),
            ],
            &tls_mc,
        ),
        (
            "a server without TLS",
            vec!["--server-tls-ca".into(), pki.path("ca.pem")],
            &plain_mc,
        ),
    ];
    for (what, flags, mc) in cases {
        let mut args = flags.clone();
        args.extend(["-s".into(), mc.addr()]);
        let relay = relay_to(&args);
        let mut c = relay.client();
        let started = Instant::now();
        // (A get would be answered as a miss: a set says what happened.)
        let got = ask(&mut c, &set("k", b"v"));
        assert!(got.starts_with(b"SERVER_ERROR"), "{what}: {}", escape(&got));
        // Within the connect timeout (2 s), with room for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(4), "{what}");
        relay.wait_for_output("TLS handshake failed", 1, DEADLINE);
    }
    // The right name, given explicitly, works (the servers are addressed
    // by IP; the certificate also says localhost).
    let relay = relay_to(&[
        "--server-tls-ca".into(),
        pki.path("ca.pem"),
        "--server-tls-name".into(),
        "localhost".into(),
        "-s".into(),
        tls_mc.addr(),
    ]);
    let mut c = relay.client();
    assert_eq!(ask(&mut c, &set("n", b"v")), b"STORED\r\n");
    assert_eq!(ask(&mut c, b"get n\r\n"), found("n", b"v"));
}

#[test]
fn a_server_that_asks_for_a_client_certificate_gets_memrelays() {
    let pki = Pki::make();
    // ssl_verify_mode 2: memcached requires a certificate from its CA.
    let mc = pki.tls_memcached(&format!(
        "ssl_verify_mode=2,ssl_ca_cert={}",
        pki.path("ca.pem")
    ));
    let without = relay_to(&[
        "--server-tls-ca".into(),
        pki.path("ca.pem"),
        "-s".into(),
        mc.addr(),
    ]);
    let got = ask(&mut without.client(), &set("k", b"v"));
    assert!(got.starts_with(b"SERVER_ERROR"), "{}", escape(&got));

    let with = relay_to(&[
        "--server-tls-ca".into(),
        pki.path("ca.pem"),
        "--server-tls-cert".into(),
        pki.path("client.pem"),
        "--server-tls-key".into(),
        pki.path("client.key"),
        "-s".into(),
        mc.addr(),
    ]);
    let mut c = with.client();
    // memcached 1.6.18 now and then answers a valid handshake with an
    // `InternalError` alert (seen in about one full run of this file in
    // five, just after it refused the relay without a certificate; never
    // alone): memrelay counts it as a failed connect and the next request
    // connects again. So: accepted within a few attempts, each of its own
    // key (a write that failed lists its key as missed on the server, kept
    // from it until the server has settled: docs/ha.md).
    let (mut got, mut n) = (Vec::new(), 0);
    let stored = support::wait_until(DEADLINE, || {
        n += 1;
        got = ask(&mut c, &set(&format!("m{n}"), b"mtls"));
        got == b"STORED\r\n"
    });
    assert!(stored, "{}\n{}", escape(&got), with.output());
    let key = format!("m{n}");
    assert_eq!(
        ask(&mut c, format!("get {key}\r\n").as_bytes()),
        found(&key, b"mtls")
    );
}

#[test]
fn deep_pipelines_and_large_values_do_not_stall_a_tls_memcached() {
    // memcached 1.6 over TLS leaves requests unread inside OpenSSL when a
    // record holds more than it reads at once, and waits for the socket:
    // 1,000 pipelined 100-byte sets, or anything after a 300 KiB value in
    // the same write, stall there until the client sends more (see
    // backend::records). Through memrelay, every request is answered.
    let pki = Pki::make();
    let mc = pki.tls_memcached("");
    let relay = relay_to(&[
        "--server-tls-ca".into(),
        pki.path("ca.pem"),
        "-s".into(),
        mc.addr(),
    ]);
    let mut c = relay.client();
    let mut pipeline = Vec::new();
    for i in 0..1000 {
        pipeline.extend_from_slice(&set(&format!("p{i}"), &value(&format!("p{i}"), 100)));
    }
    let got = c.send_until(&pipeline, |b| {
        b.windows(8).filter(|w| w == b"STORED\r\n").count() == 1000
            || b.windows(12).any(|w| w == b"SERVER_ERROR")
    });
    assert_eq!(
        got.bytes.windows(8).filter(|w| *w == b"STORED\r\n").count(),
        1000,
        "{}",
        escape(&got.bytes[got.bytes.len().saturating_sub(200)..])
    );

    let big = value("big", 300 * 1024);
    let mut pipeline = set("big", &big);
    for i in 0..20 {
        pipeline.extend_from_slice(&set(&format!("after{i}"), b"x"));
    }
    pipeline.extend_from_slice(b"get big after19\r\n");
    let mut want = b"STORED\r\n".repeat(21);
    want.extend_from_slice(&hit("big", &big));
    want.extend_from_slice(&found("after19", b"x"));
    let got = c.send_until(&pipeline, |b| {
        b.ends_with(b"END\r\n") || b.windows(12).any(|w| w == b"SERVER_ERROR")
    });
    assert!(
        got.bytes == want,
        "{}",
        escape(&got.bytes[got.bytes.len().saturating_sub(200)..])
    );
}

#[test]
fn a_reload_picks_up_renewed_certificates_on_both_sides() {
    let pki = Pki::make();
    let mc = pki.tls_memcached("");
    // Files the test renews in place: memrelay's own certificate, and the
    // CA it checks the servers against (wrong at first).
    std::fs::copy(pki.path("server.pem"), pki.path("relay.pem")).unwrap();
    std::fs::copy(pki.path("server.key"), pki.path("relay.key")).unwrap();
    std::fs::copy(pki.path("other-ca.pem"), pki.path("servers-ca.pem")).unwrap();
    let relay = relay_to(&[
        "--tls-cert".into(),
        pki.path("relay.pem"),
        "--tls-key".into(),
        pki.path("relay.key"),
        "--server-tls-ca".into(),
        pki.path("servers-ca.pem"),
        "-s".into(),
        mc.addr(),
    ]);
    let config = pki.client_config(None);
    let mut before = TlsClient::connect(&relay.addr(), config.clone());
    let got = before.ask(&set("r", b"1"), b"\r\n");
    assert!(got.starts_with(b"SERVER_ERROR"), "{}", escape(&got));

    let (cert, key) = pki.server_leaf();
    pki.write("relay.pem", &cert);
    pki.write("relay.key", &key);
    std::fs::copy(pki.path("ca.pem"), pki.path("servers-ca.pem")).unwrap();
    relay.hangup();
    relay.wait_for_output("configuration reloaded", 1, DEADLINE);

    // New clients get the renewed certificate; the one connected before
    // goes on.
    let after = TlsClient::connect(&relay.addr(), config);
    let shown = after.s.conn.peer_certificates().unwrap()[0].clone();
    let renewed = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    assert_eq!(shown, renewed);
    // The server is trusted now: once its prober (redialled too) marks it
    // up again, writes go through.
    let stored = support::wait_until(Duration::from_secs(15), || {
        before.ask(&set("r", b"2"), b"\r\n") == b"STORED\r\n"
    });
    assert!(stored, "{}", relay.output());
    assert_eq!(before.get("r"), found("r", b"2"));
}

#[test]
fn over_the_connection_limit_a_tls_client_is_closed_before_a_handshake() {
    let pki = Pki::make();
    let mc = Memcached::start();
    let relay = pki.relay(&mc, &["-n".into(), "1".into()]);
    let config = pki.client_config(None);
    // The harness's own check that the port is open may still hold the one
    // place for a moment.
    let mut first = None;
    let connected = support::wait_until(DEADLINE, || {
        first = TlsClient::try_connect(&relay.addr(), config.clone()).ok();
        first.is_some()
    });
    assert!(connected, "{}", relay.output());
    let mut first = first.unwrap();
    assert_eq!(first.ask(b"set n 0 0 1\r\n1\r\n", b"\r\n"), b"STORED\r\n");

    // The second is closed at once: no ServerHello, no error line.
    let mut second = TcpStream::connect(relay.addr()).unwrap();
    second.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    assert_eq!(read_to_close(&mut second).unwrap(), b"");
    let stats = first.ask(b"stats\r\n", b"END\r\n");
    let stats = support::parse_stats(&stats);
    // (At least one: the first client may have been turned away too.)
    assert_ne!(stats["rejected_connections"], "0");
    assert_eq!(stats["curr_connections"], "1");

    // Once the first leaves, a new client is served.
    drop(first);
    // Until the proxy has seen the first one go, a new client is still
    // over the limit and closed (reset) during its handshake: try again.
    let served = support::wait_until(DEADLINE, || {
        let Ok(mut c) = TlsClient::try_connect(&relay.addr(), config.clone()) else {
            return false;
        };
        c.try_ask(b"get n\r\n", |b| b.ends_with(b"END\r\n"))
            .is_ok_and(|got| got == found("n", b"1"))
    });
    assert!(served, "{}", relay.output());
}
