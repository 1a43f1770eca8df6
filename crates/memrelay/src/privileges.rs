//! Dropping root after binding, and raising the open-file limit.
//!
//! Group before user (once the user is dropped, the group can no longer be
//! changed). Names and numeric ids are both accepted.

use std::ffi::CString;

/// Switches to `group` then `user`, if given.
pub fn drop_to(group: Option<&str>, user: Option<&str>) -> Result<(), String> {
    let target_gid = match group {
        Some(g) => Some(lookup_group(g)?),
        None => None,
    };
    let target = match user {
        Some(u) => Some(lookup_user(u)?),
        None => None,
    };
    // SAFETY: plain libc calls with valid arguments; no memory is shared.
    unsafe {
        let euid = libc::geteuid();
        let gid = target_gid.or(target.map(|(_, g)| g));
        if let Some(gid) = gid {
            if libc::getegid() != gid {
                if euid != 0 {
                    return Err(format!("cannot switch to group {gid}: not running as root"));
                }
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 {
                    return Err(format!(
                        "cannot switch to group {gid}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
        }
        if let Some((uid, _)) = target {
            if euid != uid {
                if euid != 0 {
                    return Err(format!("cannot switch to user {uid}: not running as root"));
                }
                if libc::setuid(uid) != 0 {
                    return Err(format!(
                        "cannot switch to user {uid}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// (uid, primary gid) of a user name or numeric id.
fn lookup_user(u: &str) -> Result<(libc::uid_t, libc::gid_t), String> {
    let name = CString::new(u).map_err(|_| format!("-u: bad user name '{u}'"))?;
    // SAFETY: getpwnam/getpwuid return a pointer into static storage that
    // we read immediately, before any other call could overwrite it.
    unsafe {
        let pw = if let Ok(id) = u.parse::<libc::uid_t>() {
            let pw = libc::getpwuid(id);
            if pw.is_null() {
                return Ok((id, libc::getegid()));
            }
            pw
        } else {
            libc::getpwnam(name.as_ptr())
        };
        if pw.is_null() {
            return Err(format!("-u: no such user '{u}'"));
        }
        Ok(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn lookup_group(g: &str) -> Result<libc::gid_t, String> {
    if let Ok(id) = g.parse::<libc::gid_t>() {
        return Ok(id);
    }
    let name = CString::new(g).map_err(|_| format!("-g: bad group name '{g}'"))?;
    // SAFETY: as in lookup_user.
    unsafe {
        let gr = libc::getgrnam(name.as_ptr());
        if gr.is_null() {
            return Err(format!("-g: no such group '{g}'"));
        }
        Ok((*gr).gr_gid)
    }
}

/// Raises the soft open-file limit towards `wanted` (up to the hard limit),
/// and says so when it cannot reach it.
pub fn raise_nofile(wanted: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let wanted = wanted as libc::rlim_t;
        if lim.rlim_cur >= wanted {
            return;
        }
        let new = wanted.min(lim.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: new,
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 || new < wanted {
            tracing::warn!(
                wanted = wanted,
                limit = new.max(lim.rlim_cur),
                "open-file limit is below what -n needs; raise it (ulimit -n, LimitNOFILE=) or lower -n"
            );
        }
    }
}
