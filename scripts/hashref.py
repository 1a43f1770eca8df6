#!/usr/bin/env python3
"""Reference key-distribution tables for memrelay's tests.

Independent Python (stdlib only) models of two key-distribution schemes,
written from the algorithm descriptions, used to generate test tables that
memrelay's Rust implementation is checked against:

  ketama  twemproxy `distribution: ketama` with `hash: md5`
          -> crates/memrelay/tests/data/ketama.tsv
  magent  magent (memagent) default, non-ketama server selection
          -> crates/memrelay/tests/data/magent_hash.tsv

Usage:
  python3 scripts/hashref.py ketama             regenerate ketama.tsv
  python3 scripts/hashref.py magent             regenerate magent_hash.tsv
  python3 scripts/hashref.py verify-nutcracker  cross-check the ketama model
                                                against a live nutcracker

Output is deterministic: no randomness, no clock, no environment input.

verify-nutcracker needs `nutcracker` and `memcached` on PATH (or in /usr/sbin,
/usr/bin). It starts memcached instances and one nutcracker per pool on
127.0.0.1 only, stores keys through nutcracker, asks every memcached directly
which keys it holds, compares with the model, and stops every process it
started.
"""

import hashlib
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "crates", "memrelay", "tests", "data")

# ---------------------------------------------------------------------------
# ketama (twemproxy flavour)
# ---------------------------------------------------------------------------

KETAMA_POINTS_PER_SERVER = 160
KETAMA_POINTS_PER_HASH = 4
# twemproxy formats "name-i" into a fixed 86-byte buffer with snprintf, so the
# hashed string is silently truncated to 85 bytes.
KETAMA_MAX_HOSTLEN = 86
# twemproxy and libmemcached leave the port out of the hashed server name when
# it is the memcached default port (and the server has no explicit name).
KETAMA_DEFAULT_PORT = 11211


def f32(x):
    """Round a Python float to IEEE-754 single precision."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def md5(data):
    return hashlib.md5(data).digest()


def ketama_key_hash(key):
    """hash: md5 -> little-endian u32 of the first four digest bytes."""
    return struct.unpack_from("<I", md5(key), 0)[0]


def ketama_server_name(server):
    """Name hashed onto the continuum for an unnamed "host:port" server."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("server must be host:port, got %r" % server)
    if int(port) == KETAMA_DEFAULT_PORT:
        return host
    return server


def ketama_points_per_server(weight, total_weight, nlive):
    """Points for one server, computed the way twemproxy does it.

    twemproxy computes this in single-precision float:
      floorf((float)(pct * 160 / 4 * (float)nlive + 1e-10)) * 4
    with pct = (float)weight / (float)total_weight. Emulated here with explicit
    float32 rounding after each float operation.
    """
    pct = f32(f32(weight) / f32(total_weight))
    v = f32(pct * KETAMA_POINTS_PER_SERVER)
    v = f32(v / 4)
    v = f32(v * f32(nlive))
    v = f32(v + 0.0000000001)  # the add happens in double, then cast to float
    return int(math.floor(v)) * 4


def ketama_continuum(names, weights=None):
    """Sorted list of (value, server_index) for the given hashed names."""
    if weights is None:
        weights = [1] * len(names)
    total = sum(weights)
    points = []
    for index, (name, weight) in enumerate(zip(names, weights)):
        per_server = ketama_points_per_server(weight, total, len(names))
        for i in range(per_server // KETAMA_POINTS_PER_HASH):
            label = ("%s-%d" % (name, i)).encode()[: KETAMA_MAX_HOSTLEN - 1]
            digest = md5(label)
            for a in range(KETAMA_POINTS_PER_HASH):
                value = struct.unpack_from("<I", digest, 4 * a)[0]
                points.append((value, index))
    # twemproxy uses qsort on the value alone, which is not stable: if two
    # servers ever share a value, their order is unspecified. Refuse that case
    # rather than guess.
    points.sort(key=lambda p: p[0])
    for (v1, s1), (v2, s2) in zip(points, points[1:]):
        if v1 == v2 and s1 != s2:
            raise ValueError("continuum value %d shared by two servers" % v1)
    return points


def ketama_lookup(continuum, key_hash):
    """First point with value >= key_hash, wrapping to the first point."""
    lo, hi = 0, len(continuum)
    while lo < hi:
        mid = (lo + hi) // 2
        if continuum[mid][0] < key_hash:
            lo = mid + 1
        else:
            hi = mid
    if lo == len(continuum):
        lo = 0
    return continuum[lo][1]


class Ketama:
    def __init__(self, servers, names=None):
        self.servers = list(servers)
        self.names = list(names) if names else [ketama_server_name(s) for s in servers]
        self.continuum = ketama_continuum(self.names)

    def server_for(self, key):
        return ketama_lookup(self.continuum, ketama_key_hash(key))


# ---------------------------------------------------------------------------
# magent default hash
# ---------------------------------------------------------------------------


def magent_hash(key):
    """DJB hash as magent computes it: 32-bit unsigned, signed-char bytes.

    h = 5381; h = h * 33 + (signed char)b for each byte; h &= 0x7fffffff.
    magent walks a NUL-terminated C string, so a NUL byte would end the key;
    memcached text-protocol keys cannot contain NUL, so it is rejected here.
    """
    if b"\0" in key:
        raise ValueError("key contains NUL")
    h = 5381
    for b in key:
        sb = b - 256 if b >= 0x80 else b
        h = (h * 33 + sb) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


def magent_server_for(key, n):
    return magent_hash(key) % n


# ---------------------------------------------------------------------------
# deterministic key sets
# ---------------------------------------------------------------------------

BLOG_KEYS = [b"key1", b"key2", b"stone", b"shidl"]

PUNCT_KEYS = [
    b"user:1234:profile",
    b"session/abc/def",
    b"a.b.c",
    b"a-b_c",
    b"k=v&x=y",
    b"path/to/thing?x=1&y=2#frag",
    b"!#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    b'"quoted"',
    b"{json:1}",
    b"[0]",
    b"@home",
    b"~tilde~",
    b"100%",
    b"a|b|c",
    b"C:\\windows\\path",
    b"<tag>",
    b"semi;colon",
    b"comma,separated,list",
    b"under_score__double",
    b"dots...",
]


def _stream(seed):
    """Deterministic byte stream: md5(seed || counter) blocks."""
    counter = 0
    while True:
        yield from md5(seed + b"\0" + str(counter).encode())
        counter += 1


def _pick(seed, alphabet, length):
    s = _stream(seed)
    return bytes(alphabet[next(s) % len(alphabet)] for _ in range(length))


PRINTABLE = bytes(range(0x21, 0x7F))  # no space, no control bytes
ALNUM = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def ketama_keys(tag):
    """About 300 keys: blog keys, short, 32-byte, punctuation, 250-byte."""
    keys = list(BLOG_KEYS)
    keys += [b"a", b"b", b"z", b"0", b"9", b"_", b"-", b"foo", b"bar", b"baz"]
    keys += [b"key%d" % i for i in range(3, 101)]  # key3..key100
    keys += [b"k%d" % i for i in range(0, 54)]
    keys += [md5(b"%s-md5-%d" % (tag, i)).hex().encode() for i in range(40)]  # 32 bytes
    keys += [_pick(b"%s-32-%d" % (tag, i), PRINTABLE, 32) for i in range(20)]
    keys += PUNCT_KEYS
    keys += [_pick(b"%s-punct-%d" % (tag, i), PRINTABLE, 1 + i % 24) for i in range(30)]
    keys += [_pick(b"%s-250-%d" % (tag, i), ALNUM, 250) for i in range(15)]
    keys += [_pick(b"%s-250p-%d" % (tag, i), PRINTABLE, 250) for i in range(5)]
    keys += [(b"x" * 249) + b"y", b"y" * 250]
    return _dedupe(keys)


def wrap_keys(continuum, want=2):
    """Keys whose hash is above the last point (they wrap to the first)."""
    top = continuum[-1][0]
    found = []
    i = 0
    while len(found) < want:
        k = b"wrap-%d" % i
        if ketama_key_hash(k) > top:
            found.append(k)
        i += 1
    return found


def magent_keys():
    """About 200 keys, including bytes >= 0x80."""
    keys = list(BLOG_KEYS)
    keys += [b"a", b"b", b"0", b"foo", b"bar"]
    keys += [b"key%d" % i for i in range(3, 79)]
    keys += [md5(b"magent-md5-%d" % i).hex().encode() for i in range(20)]
    keys += PUNCT_KEYS[:10]
    keys += [_pick(b"magent-250-%d" % i, ALNUM, 250) for i in range(8)]
    keys += [_pick(b"magent-p-%d" % i, PRINTABLE, 5 + i) for i in range(20)]
    # bytes >= 0x80: single bytes, UTF-8 text, Latin-1 text, raw high bytes
    keys += [bytes([b]) for b in (0x80, 0x81, 0xA0, 0xC3, 0xFE, 0xFF)]
    keys += [b"key\x80", b"\xff\xff\xff\xff", b"\x80" * 250, b"\xff" * 250]
    keys += [s.encode("utf-8") for s in (
        "caf\u00e9", "na\u00efve", "\u00fcber", "\u043a\u043b\u044e\u0447",
        "\u30ad\u30fc", "\u952e", "\U0001f600", "stra\u00dfe", "\u00e9t\u00e9:2024",
        "user:\u00e5\u00e4\u00f6",
    )]
    keys += ["caf\u00e9".encode("latin-1"), "\u00fcber".encode("latin-1")]
    keys += [_pick(b"magent-hi-%d" % i, bytes(range(0x80, 0x100)), 3 + 7 * i) for i in range(16)]
    keys += [_pick(b"magent-mix-%d" % i, bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)), 10 + 11 * i)
             for i in range(16)]
    # control bytes (not valid memcached text keys, but the hash is defined)
    keys += [b"\x01", b"tab\there", b"line\nfeed"]
    return _dedupe(keys)


def _dedupe(keys):
    seen = set()
    out = []
    for k in keys:
        if k not in seen:
            seen.add(k)
            out.append(k)
    return out


def encode_key(key):
    """Raw if printable ASCII without spaces, else hex:<hexbytes>."""
    if key and all(0x21 <= b <= 0x7E for b in key) and not key.startswith(b"hex:"):
        return key.decode("ascii")
    return "hex:" + key.hex()


# ---------------------------------------------------------------------------
# table generation
# ---------------------------------------------------------------------------

# (label, servers). Verified lists are the ones verify-nutcracker runs.
KETAMA_LISTS = [
    ("two", ["127.0.0.1:11211", "127.0.0.1:11212"]),
    ("three", ["127.0.0.1:23101", "127.0.0.1:23102", "127.0.0.1:23103"]),
    ("five-hostnames", ["cache-a.example:11211", "cache-b.example:11211",
                        "cache-c.example:11212", "cache-d.example:22122",
                        "cache-e.example:11213"]),
    # 25 equal-weight servers: twemproxy's float32 arithmetic gives 156 points
    # per server here instead of 160 (see ketama_points_per_server).
    ("twenty-five", ["127.0.0.1:%d" % p for p in range(23130, 23155)]),
]


def ketama_table_keys(label, servers):
    k = Ketama(servers)
    return ketama_keys(label.encode()) + wrap_keys(k.continuum)


def write_ketama():
    lines = [
        "# ketama reference table: twemproxy `distribution: ketama`, `hash: md5`,",
        "# every server weight 1, unnamed servers. Points per server are 160, except",
        "# that twemproxy computes floorf(pct*160/4*n + 1e-10)*4 in float32, which",
        "# gives 156 for n = 25 (list twenty-five below).",
        "# Generated by `python3 scripts/hashref.py ketama`; do not edit by hand.",
        "# Columns: <servers>\\t<key>\\t<index>; servers comma-separated in configured",
        "# order, index 0-based into that list. Keys are raw (printable ASCII, no",
        "# spaces); none here needs the hex: form used by magent_hash.tsv.",
        "# Server name hashed onto the continuum: \"host:port\", EXCEPT when port is",
        "# 11211: then just \"host\" (twemproxy nc_conf.c conf_add_server, kept for",
        "# libmemcached compatibility). Points: md5(\"<name>-<i>\") for i in 0..40,",
        "# four little-endian u32 per digest. Key hash: little-endian u32 of",
        "# md5(key)[0..4]; first point >= hash, wrapping to the first point.",
        "# Server lists:",
    ]
    verified = {"two": "pool 2 of verify-nutcracker (unnamed servers)",
                "three": "pool 3 of verify-nutcracker (unnamed servers)",
                "five-hostnames": "pool 5-named of verify-nutcracker (127.0.0.1 backends"
                                  " given these hashed names via the server-name field)",
                "twenty-five": "pool 25 of verify-nutcracker (unnamed servers);"
                               " 156 points per server, not 160"}
    rows = []
    for label, servers in KETAMA_LISTS:
        keys = ketama_table_keys(label, servers)
        lines.append("#   %s (%d servers, %d keys): %s" % (label, len(servers), len(keys), ",".join(servers)))
        lines.append("#     verified against nutcracker 0.5.0: %s" % verified[label])
        k = Ketama(servers)
        for key in keys:
            rows.append("%s\t%s\t%d" % (",".join(servers), encode_key(key), k.server_for(key)))
    _write("ketama.tsv", lines + rows)


def write_magent():
    lines = [
        "# magent (memagent) default server selection reference table.",
        "# Generated by `python3 scripts/hashref.py magent`; do not edit by hand.",
        "# Source checked: memagent magent.c (v0.6 and later forks), static int",
        "#   hashme(char *str), used as idx = hashme(key) % matrixcnt in",
        "#   do_transcation() when -k (ketama) is off; servers in -s order.",
        "# hash: h = 5381 (unsigned 32-bit); for each byte b: h = h*33 + (signed char)b",
        "#   with 32-bit wraparound (bytes >= 0x80 count as b - 256); then",
        "#   h &= 0x7fffffff. index = h % N. Signed char is what magent gets on",
        "#   x86/x86-64; a build where plain char is unsigned (e.g. ARM) differs",
        "#   for keys with bytes >= 0x80.",
        "# Columns: <N>\\t<key>\\t<index>\\t<hash31>; hash31 is the masked 31-bit hash",
        "#   in decimal.",
        "# Keys: written raw when every byte is printable ASCII 0x21..0x7e (and the",
        "#   key does not start with \"hex:\"); otherwise written as hex:<lowercase",
        "#   hex of the key bytes>. A few keys contain control bytes that memcached",
        "#   would reject; they are here only to pin the hash down.",
    ]
    rows = []
    keys = magent_keys()
    lines.append("# %d keys per N; N in 2, 3, 7." % len(keys))
    for n in (2, 3, 7):
        for key in keys:
            h = magent_hash(key)
            rows.append("%d\t%s\t%d\t%d" % (n, encode_key(key), h % n, h))
    _write("magent_hash.tsv", lines + rows)


def _write(name, lines):
    os.makedirs(DATA_DIR, exist_ok=True)
    path = os.path.join(DATA_DIR, name)
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %s (%d data rows)" % (os.path.relpath(path, REPO),
                                       sum(1 for l in lines if not l.startswith("#"))))


# ---------------------------------------------------------------------------
# live cross-check against nutcracker (twemproxy)
# ---------------------------------------------------------------------------

NC_LISTEN = 23110
NC_STATS = 23111


def _find(prog, extra):
    p = shutil.which(prog)
    if p:
        return p
    for d in extra:
        c = os.path.join(d, prog)
        if os.access(c, os.X_OK):
            return c
    raise SystemExit("%s not found" % prog)


def _wait_port(port, proc, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process %d exited early (%s)" % (proc.pid, proc.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port %d did not open" % port)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def cmd(self, line):
        self.sock.sendall(line + b"\r\n")
        return self._line()

    def set(self, key, value):
        self.sock.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
        return self._line()

    def get_many(self, keys):
        """Values for keys present on this server (one get per key, pipelined)."""
        self.sock.sendall(b"".join(b"get %s\r\n" % k for k in keys))
        found = {}
        for _ in keys:
            while True:
                line = self._line()
                if line == b"END":
                    break
                parts = line.split()
                if parts[0] != b"VALUE":
                    raise RuntimeError("unexpected reply %r" % line)
                found[parts[1]] = self._exact(int(parts[3]) + 2)[:-2]
        return found


def verify_keys(servers, label):
    """Table keys for this list plus ~2000 extra deterministic keys."""
    keys = ketama_table_keys(label, servers) if label else []
    keys += [b"verify-%d" % i for i in range(1000)]
    keys += [md5(b"verify-md5-%d" % i).hex().encode() for i in range(500)]
    keys += [_pick(b"verify-p-%d" % i, PRINTABLE, 1 + (i * 7) % 250) for i in range(500)]
    return _dedupe(keys)


def verify_nutcracker():
    nutcracker = _find("nutcracker", ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"])
    memcached = _find("memcached", ["/usr/bin", "/usr/local/bin"])
    out = subprocess.run([nutcracker, "--version"], capture_output=True, text=True)
    print((out.stdout + out.stderr).strip().splitlines()[0])

    ports_plain = [23101, 23102, 23103, 23104, 23105]
    pools = [
        # (pool id, backend ports, server names or None, table list label)
        ("2", [11211, 11212], None, "two"),
        ("3", [23101, 23102, 23103], None, "three"),
        ("5", ports_plain, None, None),
        ("5-named", ports_plain,
         [ketama_server_name(s) for s in dict(KETAMA_LISTS)["five-hostnames"]],
         "five-hostnames"),
        ("25", list(range(23130, 23155)), None, "twenty-five"),
    ]
    all_ports = sorted({p for _, ports, _, _ in pools for p in ports})
    tmp = tempfile.mkdtemp(prefix="hashref-")
    procs = []
    ok = True
    try:
        for port in all_ports:
            argv = [memcached, "-U", "0", "-l", "127.0.0.1", "-p", str(port), "-m", "64"]
            if os.geteuid() == 0:
                argv += ["-u", "root"]
            p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            _wait_port(port, p)
        for pool_id, ports, names, label in pools:
            servers = ["127.0.0.1:%d" % p for p in ports]
            model = Ketama(servers, names)
            table_servers = dict(KETAMA_LISTS)[label] if label else servers
            keys = verify_keys(table_servers, label)
            conf = os.path.join(tmp, "pool-%s.yml" % pool_id)
            with open(conf, "w") as f:
                f.write("pool:\n  listen: 127.0.0.1:%d\n  distribution: ketama\n"
                        "  hash: md5\n  auto_eject_hosts: false\n  timeout: 2000\n"
                        "  servers:\n" % NC_LISTEN)
                for i, s in enumerate(servers):
                    f.write("   - %s:1%s\n" % (s, " " + names[i] if names else ""))
            for port in ports:
                c = Conn(port)
                assert c.cmd(b"flush_all") == b"OK"
                c.close()
            nc = subprocess.Popen([nutcracker, "-c", conf, "-s", str(NC_STATS), "-a", "127.0.0.1",
                                   "-o", os.path.join(tmp, "nc-%s.log" % pool_id)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_port(NC_LISTEN, nc)
                c = Conn(NC_LISTEN)
                for i, key in enumerate(keys):
                    r = c.set(key, b"%d" % i)
                    if r != b"STORED":
                        raise RuntimeError("set %r via nutcracker: %r" % (key, r))
                c.close()
            finally:
                nc.terminate()
                nc.wait(timeout=10)
            where = {}
            for idx, port in enumerate(ports):
                c = Conn(port)
                for key in c.get_many(keys):
                    if key in where:
                        raise RuntimeError("key %r on two servers" % key)
                    where[key] = idx
                c.close()
            mismatch = [k for k in keys if where.get(k) != model.server_for(k)]
            desc = ",".join(names) if names else ",".join(servers)
            print("pool %-8s %s: %d keys, %d mismatches%s" % (
                pool_id, desc, len(keys), len(mismatch),
                " (includes all %d table keys of list %r)" % (
                    len(ketama_table_keys(label, table_servers)), label) if label else ""))
            for k in mismatch[:10]:
                print("  mismatch %r: nutcracker %s, model %d" % (k, where.get(k), model.server_for(k)))
            ok = ok and not mismatch
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT: %s" % ("all pools agree 100%" if ok else "DISAGREEMENT"))
    return 0 if ok else 1


def main(argv):
    if len(argv) != 2 or argv[1] not in ("ketama", "magent", "verify-nutcracker"):
        sys.stderr.write("usage: %s ketama|magent|verify-nutcracker\n" % argv[0])
        return 2
    if argv[1] == "ketama":
        write_ketama()
    elif argv[1] == "magent":
        write_magent()
    else:
        return verify_nutcracker()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
