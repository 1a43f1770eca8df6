"""What the benchmark and plot scripts share: reading CPU time and memory
from /proc, picking and probing ports on 127.0.0.1, the memcached command
line they start their servers with, a record of the processes they start
(all stopped at the end), and a TCP forwarder that can hold its bytes (a
silent network partition).

The scripts (scripts/bench, latency-bench, resync-bench, failover-plot,
partition-plot) import it with scripts/lib on sys.path; it writes nothing
and starts nothing by itself.
"""

import os
import signal
import socket
import subprocess
import threading
import time

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# /proc sampling

def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name."""
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    # comm may contain spaces and parentheses: split after the last ')'
    return s[s.rindex(")") + 2:].split()


def proc_cpu_s(pid):
    """utime+stime of a process (all its threads), seconds."""
    f = stat_fields(pid)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def descendants(pid):
    """`pid` and every process below it."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(stat_fields(int(d))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_s(pid):
    """CPU seconds of `pid` and its descendants (those still running)."""
    total = 0.0
    for p in descendants(pid):
        try:
            total += proc_cpu_s(p)
        except (OSError, ValueError, IndexError):
            pass
    return total


def system_busy_s():
    """Busy time of all CPUs from /proc/stat (seconds, summed over CPUs)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK


def vm_rss_kb(pid):
    """Resident memory of a process in KiB, or None once it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------
# Ports (127.0.0.1 only)

def free_port():
    """A port nothing listens on now (the kernel's pick)."""
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def port_busy(port):
    """Whether something accepts connections on `port`."""
    s = socket.socket()
    try:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0
    finally:
        s.close()
    # (a bind test would also catch non-listening sockets, but could race
    # with TIME_WAIT; connecting is what matters for us)


def wait_listening(port, deadline, pause, proc=None):
    """Polls `port` until it accepts a connection. Returns None when it
    does, "exited" when `proc` (a subprocess.Popen) ended first, or
    "timeout" after `deadline` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return "exited"
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return None
        except OSError:
            time.sleep(pause)
    return "timeout"


# ---------------------------------------------------------------------------
# memcached

def memcached_argv(port, memory_mb, binary="memcached", threads=None, conns=None):
    """A memcached on HOST:port without UDP, with `memory_mb` of cache
    (and `threads`, `conns` when given); as root, told to stay root."""
    argv = [binary, "-l", HOST, "-p", str(port), "-U", "0", "-m", str(memory_mb)]
    if threads is not None:
        argv += ["-t", str(threads)]
    if conns is not None:
        argv += ["-c", str(conns)]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    return argv


# ---------------------------------------------------------------------------
# Processes

class Procs:
    """Every process started, stopped at exit (SIGCONT first: a stopped
    process would not see SIGTERM). Each one's output goes to
    LOGDIR/NAME.log."""

    def __init__(self, logdir):
        self.procs = []
        self.logdir = logdir

    def start(self, name, argv):
        log = open(os.path.join(self.logdir, name + ".log"), "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()  # the child has its own copy
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------------------
# A network link that can fail silently

TCP_CLOSE = 7  # tcpi_state of a connection the peer reset


class Forwarder:
    """Listens on HOST, a free port (`.port`), and forwards each connection
    to HOST:`target_port`, byte for byte, in both directions.

    `blackhole()` makes it a silent partition: nothing is forwarded and
    nothing is closed; the bytes wait (in the kernel's buffers, and at most
    one chunk per direction here) until `heal()`, as a network holds
    segments that TCP then retransmits. A connection its client reset
    meanwhile is closed at the heal without delivering what it held, since
    a reset sender's kernel drops what the receiver had not acknowledged.
    New connections are accepted during a blackhole, then held the same
    way (a real partition would leave the SYN unanswered)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.passing = threading.Event()
        self.passing.set()
        self.closed = False
        self.lock = threading.Lock()
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self):
        self.passing.clear()

    def heal(self):
        self.passing.set()

    def close(self):
        """Stops accepting and closes every forwarded connection."""
        self.closed = True
        self.passing.set()
        self.listener.close()
        with self.lock:
            for s in self.socks:
                _shut(s)

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((HOST, self.target_port), timeout=2)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.closed:
                    _shut(client)
                    _shut(server)
                    return
                self.socks += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, client),
                                 daemon=True).start()

    def _wait_passing(self):
        self.passing.wait()
        return not self.closed

    def _pump(self, src, dst, client):
        try:
            while self._wait_passing():
                data = src.recv(65536)
                if not data:
                    break
                # A blackhole that began meanwhile holds this chunk too.
                if not self._wait_passing() or _was_reset(client):
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src)
            _shut(dst)


def _was_reset(sock):
    """Whether the peer of `sock` reset the connection (read from TCP_INFO,
    which, unlike SO_ERROR, does not clear what it reports)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE
    except OSError:
        return True


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
