//! Dropping root after binding, and raising the open-file limit.
//!
//! Group before user (once the user is dropped, the group can no longer be
//! changed). Names and numeric ids are both accepted.

use std::ffi::CString;

use crate::sys;

/// Switches to `group` then `user`, if given.
pub(crate) fn drop_to(group: Option<&str>, user: Option<&str>) -> Result<(), String> {
    let target_gid = match group {
        Some(g) => Some(lookup_group(g)?),
        None => None,
    };
    let target = match user {
        Some(u) => Some(lookup_user(u)?),
        None => None,
    };
    let euid = sys::euid();
    let gid = target_gid.or(target.map(|(_, g)| g));
    if let Some(gid) = gid {
        if sys::egid() != gid {
            if euid != 0 {
                return Err(format!("cannot switch to group {gid}: not running as root"));
            }
            sys::set_group(gid).map_err(|e| format!("cannot switch to group {gid}: {e}"))?;
        }
    }
    if let Some((uid, _)) = target {
        if euid != uid {
            if euid != 0 {
                return Err(format!("cannot switch to user {uid}: not running as root"));
            }
            sys::set_user(uid).map_err(|e| format!("cannot switch to user {uid}: {e}"))?;
        }
    }
    Ok(())
}

/// (uid, primary gid) of a user name or numeric id.
fn lookup_user(u: &str) -> Result<(libc::uid_t, libc::gid_t), String> {
    let name = CString::new(u).map_err(|_| format!("-u: bad user name '{u}'"))?;
    if let Ok(id) = u.parse::<libc::uid_t>() {
        // A numeric id needs no entry: its group is then ours.
        return Ok(sys::user_by_id(id).unwrap_or((id, sys::egid())));
    }
    sys::user_by_name(&name).ok_or_else(|| format!("-u: no such user '{u}'"))
}

fn lookup_group(g: &str) -> Result<libc::gid_t, String> {
    if let Ok(id) = g.parse::<libc::gid_t>() {
        return Ok(id);
    }
    let name = CString::new(g).map_err(|_| format!("-g: bad group name '{g}'"))?;
    sys::group_by_name(&name).ok_or_else(|| format!("-g: no such group '{g}'"))
}

/// Raises the soft open-file limit towards `wanted` (up to the hard limit),
/// and says so when it cannot reach it.
pub(crate) fn raise_nofile(wanted: usize) {
    let Ok((cur, max)) = sys::nofile_limit() else {
        return;
    };
    let wanted = wanted as libc::rlim_t;
    if cur >= wanted {
        return;
    }
    let new = wanted.min(max);
    if sys::set_nofile_limit(new, max).is_err() || new < wanted {
        tracing::warn!(
            wanted = wanted,
            limit = new.max(cur),
            "open-file limit is below what -n needs; raise it (ulimit -n, LimitNOFILE=) or lower -n"
        );
    }
}
