//! Who may have written a file the host is about to load code from.
//!
//! A library, or the directory it sits in, that another user can write is a way to run that user's code
//! inside the host (as the host's user, often root in a container). The rule: the file and its directory
//! belong to this user, to root, or to the one owner the operator pinned, and neither is writable by
//! group or other users.

use std::{
    io,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Why a path is not trusted to hold code.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot check {}: {source}", path.display())]
    Stat { path: PathBuf, source: io::Error },
    #[error("{} is writable by other users (mode {mode:04o}), so any of them could put code into this process; run chmod go-w {}", path.display(), path.display())]
    Writable { path: PathBuf, mode: u32 },
    #[error("{} belongs to uid {owner}, not to the allowed owner (uid {allowed}: this user unless --reload-owner says otherwise) or root; chown it, or pin its owner with --reload-owner {owner}", path.display())]
    Owner {
        path: PathBuf,
        owner: u32,
        allowed: u32,
    },
    #[error("--reload-owner {0:?} is neither a uid nor a user of this system; pass a number or a name from /etc/passwd")]
    UnknownUser(String),
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a process with this pid exists (a zero signal checks without sending anything).
pub(crate) fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The uid a `--reload-owner` value names: a number, or a user name looked up in the system's users.
pub fn resolve_owner(text: &str) -> Result<u32, TrustError> {
    if let Ok(uid) = text.parse() {
        return Ok(uid);
    }
    let unknown = || TrustError::UnknownUser(text.to_owned());
    let name = std::ffi::CString::new(text).map_err(|_| unknown())?;
    // SAFETY: getpwnam reads the user database; the returned record is only read here, before any
    // other getpw* call of this process could overwrite it (the host makes none on other threads).
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(unknown());
    }
    // SAFETY: a non-null result points at a valid passwd record.
    Ok(unsafe { (*entry).pw_uid })
}

/// Fail unless `path` (followed through symlinks) belongs to `owner` or root and is not writable by
/// group or other users.
pub fn check(path: &Path, owner: u32) -> Result<(), TrustError> {
    let meta = std::fs::metadata(path).map_err(|source| TrustError::Stat {
        path: path.into(),
        source,
    })?;
    check_metadata(path, &meta, owner)
}

/// [`check`] for metadata already taken (of an open file, so the check is about the file that is read).
pub fn check_metadata(path: &Path, meta: &std::fs::Metadata, owner: u32) -> Result<(), TrustError> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TrustError::Writable {
            path: path.into(),
            mode,
        });
    }
    if meta.uid() != owner && meta.uid() != 0 {
        return Err(TrustError::Owner {
            path: path.into(),
            owner: meta.uid(),
            allowed: owner,
        });
    }
    Ok(())
}
