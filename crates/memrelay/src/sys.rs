//! The operating system calls memrelay makes through `libc`, each behind a
//! small safe function: the one place of the crate (with the `SCM_RIGHTS`
//! code of `net::handoff` and one registration in `proxy::park`) allowed
//! `unsafe`, so that an unsafe block is found by its module, not by a
//! search. What a call means for memrelay (when to detach, what a limit is
//! for) stays with its caller; this module only makes the call sound.
//! Lowest layer: it uses no other module of the crate.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;

/// daemon(3): forks, the parent exits, the child leaves the terminal and
/// the session and points stdin, stdout and stderr at /dev/null.
///
/// Call it only while the process has a single thread: the child of a
/// fork has only the calling thread, so a lock another thread held stays
/// held forever. Its one caller, `server::start::Sockets::detach`, is typed
/// so that no thread can have started yet.
pub(crate) fn daemon() -> io::Result<()> {
    // SAFETY: daemon(3) takes two integers and touches no memory of ours;
    // the single-thread precondition above is the caller's.
    if unsafe { libc::daemon(0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends SIGTERM to this process: it then drains exactly as when an
/// operator sends it.
pub(crate) fn terminate_self() {
    // SAFETY: kill(2) and getpid(2) take and return integers only.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

/// Returns the allocator's free pages to the kernel (glibc's
/// `malloc_trim`); nothing elsewhere.
pub(crate) fn malloc_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The machine's physical memory in bytes, if sysconf(3) knows it.
pub(crate) fn physical_memory() -> Option<usize> {
    // SAFETY: sysconf only reads system values.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        Some((pages as usize).saturating_mul(page as usize))
    } else {
        None
    }
}

/// The effective user id.
pub(crate) fn euid() -> libc::uid_t {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The effective group id.
pub(crate) fn egid() -> libc::gid_t {
    // SAFETY: getegid cannot fail and touches no memory.
    unsafe { libc::getegid() }
}

/// Makes `gid` the only group: supplementary groups first (while still
/// allowed to set them), then the real, effective and saved group.
pub(crate) fn set_group(gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: setgroups reads one gid from a valid pointer; setgid takes
    // an integer.
    if unsafe { libc::setgroups(1, &gid) } != 0 || unsafe { libc::setgid(gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switches the real, effective and saved user to `uid`.
pub(crate) fn set_user(uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: setuid takes an integer.
    if unsafe { libc::setuid(uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// (uid, primary gid) of the user with this id, if the user database has
/// one.
pub(crate) fn user_by_id(uid: libc::uid_t) -> Option<(libc::uid_t, libc::gid_t)> {
    // SAFETY: getpwuid returns null or a pointer into static storage,
    // read at once, before any other call could overwrite it.
    unsafe {
        let pw = libc::getpwuid(uid);
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// (uid, primary gid) of the user with this name, if any.
pub(crate) fn user_by_name(name: &CStr) -> Option<(libc::uid_t, libc::gid_t)> {
    // SAFETY: `name` is NUL-terminated; getpwnam returns null or a pointer
    // into static storage, read at once.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// The gid of the group with this name, if any.
pub(crate) fn group_by_name(name: &CStr) -> Option<libc::gid_t> {
    // SAFETY: as in user_by_name, with getgrnam.
    unsafe {
        let gr = libc::getgrnam(name.as_ptr());
        (!gr.is_null()).then(|| (*gr).gr_gid)
    }
}

/// The open-file limit: (soft, hard).
pub(crate) fn nofile_limit() -> io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Sets the open-file limit to (soft, hard).
pub(crate) fn set_nofile_limit(soft: libc::rlim_t, hard: libc::rlim_t) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one rlimit through a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives what the socket has into `buf`'s spare capacity, without
/// zeroing it first, and makes the bytes received part of `buf`. Returns
/// how many (0: the peer closed). Reads at most the spare capacity:
/// reserve first.
pub(crate) fn recv_into_spare(
    sock: &socket2::SockRef<'_>,
    buf: &mut bytes::BytesMut,
) -> io::Result<usize> {
    let n = sock.recv(buf.spare_capacity_mut())?;
    // SAFETY: recv initialised the first n bytes of the spare capacity
    // (and n is at most its length).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}
