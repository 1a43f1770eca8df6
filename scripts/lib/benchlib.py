"""What the benchmark and plot scripts share: reading CPU time and memory
from /proc, picking and probing ports on 127.0.0.1, and the memcached
command line they start their servers with.

The scripts (scripts/bench, latency-bench, resync-bench, failover-plot)
import it with scripts/lib on sys.path; it writes nothing and starts
nothing by itself.
"""

import os
import socket
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
