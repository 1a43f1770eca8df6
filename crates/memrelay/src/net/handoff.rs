//! Handing the listening sockets to a new memrelay process (zero-downtime
//! restart).
//!
//! With `--handoff PATH`, a starting memrelay first connects to PATH: if an
//! older memrelay answers there, it sends over its listening sockets
//! (`SCM_RIGHTS`), and the new one serves them instead of binding. There
//! is only ever one listening socket per address, so no connection waiting
//! to be accepted is lost or reset (closing one socket of an `SO_REUSEPORT`
//! group resets the connections queued on it). If nobody answers, the new
//! memrelay binds as usual, and then serves PATH itself for the next one.
//!
//! The old memrelay goes on accepting until the new one says it serves
//! (`serving` on the same connection, once its workers run): the new one
//! first takes the missed-key lists, joins its fleet and learns who each
//! server is, which can take seconds, and meanwhile nobody would accept
//! the connections queued on the socket. Then the old one drains. If the
//! new one exits without saying it, or says nothing for `SERVING_WAIT`,
//! the old one drains all the same: it handed its state over already.
// Passing descriptors (`SCM_RIGHTS`) means building a `msghdr` and its
// control messages by hand: no safe wrapper in std or socket2 does it, and
// the code is clearer kept whole here than split into `sys`. Each unsafe
// block says why it is sound.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// Most listening sockets handed over at once.
const MAX_FDS: usize = 16;
const HELLO: &[u8] = b"memrelay-handoff-1\n";
const SERVING: &[u8] = b"serving\n";

/// How long the old memrelay goes on accepting for a new one that has not
/// said it serves: its start waits for the old one's lists (3 s at most),
/// its peers (2 s) and its servers (0.5 s), then starts its workers.
pub(crate) const SERVING_WAIT: Duration = Duration::from_secs(30);

/// Listening sockets taken from a running memrelay, and the connection
/// on which to tell it once this one serves them ([`tell_serving`]).
#[derive(Debug)]
pub(crate) struct TakenOver {
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) old: UnixStream,
}

/// What the old memrelay heard from the new one after the hand-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewProcess {
    /// It serves: the old one may stop accepting.
    Serving,
    /// It closed the connection first (it exited, or is an older release
    /// that never says it).
    Gone,
    /// It said nothing within `SERVING_WAIT`.
    Silent,
}

/// Binds the hand-off socket at `path`, readable and writable by its owner
/// only from the start: the mode is set through the umask before `bind`
/// creates the file, so no other user can connect in between (a chmod
/// after `bind` left a window).
pub(crate) fn bind(path: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    // SAFETY: umask(2) only swaps the process's mask; it is put back at
    // once. Start-up runs this before any other thread creates files.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

/// Refuses a peer that is not the same user as this process (or root):
/// only such a process may take, or give, the listening sockets.
pub(crate) fn check_peer(s: &UnixStream) -> io::Result<()> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid == me || cred.uid == 0 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer uid {} is not this process's ({me})", cred.uid),
        ))
    }
}

/// Asks the memrelay serving `path` for its listening sockets. `Ok(None)`
/// when nobody serves it (a first start).
pub(crate) fn take_over(path: &Path, expected: usize) -> io::Result<Option<TakenOver>> {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    check_peer(&s)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(HELLO)?;
    let fds = recv_fds(&s)?;
    if fds.len() != expected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the running memrelay has {} listeners, this one is configured for {expected}",
                fds.len()
            ),
        ));
    }
    // Tell the old process we have them: it hands its state over now, and
    // goes on accepting until `tell_serving`.
    s.write_all(b"ok\n")?;
    Ok(Some(TakenOver { fds, old: s }))
}

/// New side: this process serves the sockets it took; the old one may
/// stop accepting. An old one that is gone needs no word.
pub(crate) fn tell_serving(mut old: UnixStream) {
    if let Err(e) = old.write_all(SERVING) {
        tracing::debug!(error = %e, "hand-off: the old memrelay did not hear that this one serves");
    }
}

/// Old side: waits (blocking) until the new process serves, leaves, or
/// says nothing for `within`.
pub(crate) fn wait_serving(mut s: UnixStream, within: Duration) -> NewProcess {
    if s.set_read_timeout(Some(within)).is_err() {
        return NewProcess::Gone;
    }
    let mut word = [0u8; SERVING.len()];
    match s.read_exact(&mut word) {
        Ok(()) if word == SERVING => NewProcess::Serving,
        Ok(()) => NewProcess::Gone,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            NewProcess::Silent
        }
        Err(_) => NewProcess::Gone,
    }
}

/// Serves one hand-off on `listener` (blocking; run it on its own thread):
/// sends `fds` to the new process and returns, once it confirmed, the
/// connection on which it will say that it serves ([`wait_serving`]).
pub(crate) fn serve_once(listener: &UnixListener, fds: &[RawFd]) -> io::Result<UnixStream> {
    loop {
        let (mut s, _) = listener.accept()?;
        if let Err(e) = check_peer(&s) {
            tracing::warn!(error = %e, "hand-off: refused a connection");
            continue;
        }
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut hello = [0u8; HELLO.len()];
        if s.read_exact(&mut hello).is_err() || hello != HELLO {
            continue; // not a memrelay: ignore it
        }
        send_fds(&s, fds)?;
        let mut ok = [0u8; 3];
        if s.read_exact(&mut ok).is_ok() && &ok == b"ok\n" {
            return Ok(s);
        }
    }
}

fn send_fds(s: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let n = fds.len().min(MAX_FDS);
    let payload = [n as u8];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is CMSG_SPACE bytes for n descriptors, so
    // the first header and its data fit; the pointers stay valid for the call.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN((n * std::mem::size_of::<RawFd>()) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg) as *mut RawFd, n);
        if libc::sendmsg(s.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn recv_fds(s: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: the buffers outlive the call; recvmsg writes within their sizes.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "no listening sockets received",
        ));
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg filled in, within
    // msg_controllen; each SCM_RIGHTS payload is an array of descriptors
    // that are now ours to own.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = data_len / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(fds)
}
