//! `--auto-eject` (no backups): while a server is down its keys go to the
//! next server on the ring, other keys stay put, and the server never serves
//! a value older than one written while it was away.
#![allow(clippy::panic, clippy::unwrap_used)]

mod support;

use support::{wait_until, Client, Memcached, Memrelay, START_DEADLINE};

use memrelay::config::cli::{parse_args, Action};
use memrelay::router::Router;

fn line(c: &mut Client, req: &str) -> String {
    let r = c.send_until(req.as_bytes(), |b| b.ends_with(b"\r\n"));
    String::from_utf8_lossy(&r.bytes).into_owned()
}

fn get(c: &mut Client, key: &str) -> Option<String> {
    let r = c.send_until(format!("get {key}\r\n").as_bytes(), |b| {
        b.ends_with(b"END\r\n")
    });
    let text = String::from_utf8_lossy(&r.bytes).into_owned();
    text.lines()
        .nth(1)
        .filter(|_| text.starts_with("VALUE "))
        .map(str::to_string)
}

fn state(c: &mut Client, i: usize) -> String {
    let r = c.send_until(b"stats\r\n", |b| b.ends_with(b"END\r\n"));
    let text = String::from_utf8_lossy(&r.bytes).into_owned();
    let prefix = format!("STAT server:{i}:state ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or("?")
        .to_string()
}

struct Setup {
    servers: Vec<Memcached>,
    relay: Memrelay,
    router: Router,
}

fn setup(extra: &[&str]) -> Setup {
    let servers: Vec<Memcached> = (0..3).map(|_| Memcached::start()).collect();
    let mut args: Vec<String> = vec![
        "-t".into(),
        "1".into(),
        "--failure-limit".into(),
        "1".into(),
        "--timeout".into(),
        "300ms".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    for s in &servers {
        args.push("-s".into());
        args.push(s.addr());
    }
    let relay = Memrelay::start(&args);
    let Ok(Action::Run(cfg)) =
        parse_args(servers.iter().flat_map(|s| ["-s".to_string(), s.addr()]))
    else {
        panic!("config")
    };
    Setup {
        router: Router::new(&cfg),
        servers,
        relay,
    }
}

/// Keys whose primary is server 0, and keys whose primary is not.
fn keys(router: &Router) -> (Vec<String>, Vec<String>) {
    let all: Vec<String> = (0..60).map(|i| format!("ej-{i}")).collect();
    all.into_iter()
        .partition(|k| router.primary(k.as_bytes()) == 0)
}

#[test]
fn a_dead_servers_keys_move_and_the_others_stay() {
    let mut s = setup(&["--auto-eject"]);
    let (on0, others) = keys(&s.router);
    assert!(!on0.is_empty() && !others.is_empty());
    let mut c = Client::connect(&s.relay.addr());
    for k in on0.iter().chain(&others) {
        assert_eq!(
            line(&mut c, &format!("set {k} 0 0 2\r\nv1\r\n")),
            "STORED\r\n"
        );
    }
    s.servers[0].kill();
    // The first request to it fails over and marks it down (limit 1).
    assert!(wait_until(START_DEADLINE, || {
        let _ = get(&mut c, &on0[0]);
        state(&mut c, 0) == "down"
    }));
    for k in &others {
        assert_eq!(
            get(&mut c, k).as_deref(),
            Some("v1"),
            "{k} moved although its server is up"
        );
    }
    for k in &on0 {
        assert_eq!(
            line(&mut c, &format!("set {k} 0 0 2\r\nv2\r\n")),
            "STORED\r\n",
            "{k}"
        );
        assert_eq!(get(&mut c, k).as_deref(), Some("v2"), "{k}");
    }
}

#[test]
fn without_auto_eject_a_dead_servers_keys_fail() {
    let mut s = setup(&[]);
    let (on0, _) = keys(&s.router);
    let mut c = Client::connect(&s.relay.addr());
    s.servers[0].kill();
    let r = line(&mut c, &format!("set {} 0 0 2\r\nv2\r\n", on0[0]));
    assert!(r.starts_with("SERVER_ERROR"), "{r}");
    assert_eq!(get(&mut c, &on0[0]), None);
}

#[test]
fn a_server_back_from_a_pause_never_serves_what_it_missed() {
    let mut s = setup(&["--auto-eject"]);
    let (on0, _) = keys(&s.router);
    let mut c = Client::connect(&s.relay.addr());
    for k in &on0 {
        assert_eq!(
            line(&mut c, &format!("set {k} 0 0 2\r\nv1\r\n")),
            "STORED\r\n"
        );
    }
    s.servers[0].stop();
    assert!(wait_until(START_DEADLINE, || {
        let _ = get(&mut c, &on0[0]);
        state(&mut c, 0) == "down"
    }));
    for k in &on0 {
        assert_eq!(
            line(&mut c, &format!("set {k} 0 0 2\r\nv2\r\n")),
            "STORED\r\n"
        );
    }
    s.servers[0].cont();
    assert!(
        wait_until(START_DEADLINE, || state(&mut c, 0) == "up"),
        "never marked up"
    );
    // Its keys route back to it; it must not serve v1 (v2 was acknowledged).
    for _ in 0..3 {
        for k in &on0 {
            let got = get(&mut c, k);
            assert_ne!(
                got.as_deref(),
                Some("v1"),
                "{k}: stale value served after the server came back"
            );
        }
    }
}
