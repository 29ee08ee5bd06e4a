//! The private copy every library generation is loaded from.
//!
//! The copy goes into a directory this process creates itself (random name, mode 0700, checked to be
//! ours after creation) under `$XDG_RUNTIME_DIR` when that is private to this user, else under the temp
//! directory. The file is created through `O_CREAT | O_EXCL | O_NOFOLLOW`, so nothing planted there
//! (a symlink, a file of another user) is written through or reused. The bytes are read back from the
//! descriptor that wrote them and compared: the file the loader maps holds exactly the bytes whose build
//! id was computed, and only this user (or root) could change it before the load. The directory is removed
//! once the library is mapped; one left by a process that died mid-load is removed by the next start of
//! the same user.

use std::{
    fs::{self, OpenOptions, Permissions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use super::{trust, LoadError};

/// Every copy directory's name starts with this, then the pid of the process that made it.
const PREFIX: &str = "protean-host-";

/// A library copy in its private directory; dropping it removes both (a mapped image stays valid).
#[derive(Debug)]
pub(super) struct Copy {
    pub(super) path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Copy `bytes`, the content of `source`, to a fresh private file `name`.
pub(super) fn write(source: &Path, bytes: &[u8], name: &str) -> Result<Copy, LoadError> {
    let me = trust::euid();
    let base = base(me)?;
    remove_stale(&base, me);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{}-", std::process::id()))
        .permissions(Permissions::from_mode(0o700))
        .tempdir_in(&base)
        .map_err(|e| private_dir_error(&base, &e.to_string()))?;
    check_private(dir.path(), me)
        .map_err(|reason| private_dir_error(dir.path(), &reason.to_string()))?;
    let path = dir.path().join(name);
    write_checked(&path, bytes).map_err(|error| LoadError::Copy {
        from: source.to_owned(),
        to: path.clone(),
        source: error,
    })?;
    Ok(Copy { path, _dir: dir })
}

fn private_dir_error(dir: &Path, reason: &str) -> LoadError {
    LoadError::PrivateDir {
        dir: dir.into(),
        reason: reason.into(),
    }
}

/// Where copy directories go: `$XDG_RUNTIME_DIR` when it is a directory of this user that nobody else
/// can enter, else the temp directory, provided another user cannot rename what we create there.
fn base(me: u32) -> Result<PathBuf, LoadError> {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if check_private(&runtime, me).is_ok() {
            return Ok(runtime);
        }
    }
    let temp = std::env::temp_dir();
    let meta = fs::metadata(&temp).map_err(|e| private_dir_error(&temp, &e.to_string()))?;
    let mode = meta.mode() & 0o7777;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(private_dir_error(
            &temp,
            &format!(
                "it belongs to uid {}; set TMPDIR to a directory of this user",
                meta.uid()
            ),
        ));
    }
    // In a directory others can write without the sticky bit, they could rename our directory away
    // and put theirs in its place.
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(private_dir_error(
            &temp,
            &format!("it is writable by other users without the sticky bit (mode {mode:04o}); set TMPDIR to a directory only this user can write"),
        ));
    }
    Ok(temp)
}

/// Why a directory is not private to this user.
#[derive(Debug, thiserror::Error)]
enum NotPrivate {
    #[error("{0}")]
    Unreadable(std::io::Error),
    #[error("it is not a directory")]
    NotADirectory,
    #[error("it belongs to uid {owner}, not to this user (uid {me})")]
    Owner { owner: u32, me: u32 },
    #[error("other users may enter it (mode {0:04o})")]
    Open(u32),
}

/// `Ok` when `dir` is a real directory (not a symlink) of user `me` that nobody else may enter.
fn check_private(dir: &Path, me: u32) -> Result<(), NotPrivate> {
    let meta = fs::symlink_metadata(dir).map_err(NotPrivate::Unreadable)?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() {
        return Err(NotPrivate::NotADirectory);
    }
    if meta.uid() != me {
        return Err(NotPrivate::Owner {
            owner: meta.uid(),
            me,
        });
    }
    if mode & 0o077 != 0 {
        return Err(NotPrivate::Open(mode));
    }
    Ok(())
}

/// Create `path` (never following or reusing anything there), write `bytes`, and read them back from
/// the same descriptor: what will be mapped must be `bytes`.
fn write_checked(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o500)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.write_all(bytes)?;
    file.seek(SeekFrom::Start(0))?;
    if !holds(&mut file, bytes)? {
        return Err(std::io::Error::other(
            "the copy does not hold the bytes that were checked",
        ));
    }
    Ok(())
}

/// Whether what is left to read of `file` is exactly `bytes`. Read a chunk at a time: a library of tens
/// of megabytes is not held twice (a second whole copy and its hash took a fifth of a start).
fn holds(file: &mut impl Read, bytes: &[u8]) -> std::io::Result<bool> {
    let mut chunk = vec![0; 1 << 20];
    let mut rest = bytes;
    loop {
        let n = match file.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(rest.is_empty());
        }
        match rest.split_at_checked(n) {
            Some((head, tail)) if head == &chunk[..n] => rest = tail,
            _ => return Ok(false),
        }
    }
}

/// Remove copy directories of this user left by processes that are gone (they died while loading).
/// Only directories named by a dead pid and owned by this user are touched; `remove_dir_all` does not
/// follow symlinks.
fn remove_stale(base: &Path, me: u32) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let ours = fs::symlink_metadata(entry.path()).is_ok_and(|m| m.is_dir() && m.uid() == me);
        if ours && pid as u32 != std::process::id() && !trust::pid_alive(pid) {
            match fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::debug!(dir = %entry.path().display(), "removed the library copy of a process that is gone")
                }
                Err(error) => {
                    tracing::debug!(dir = %entry.path().display(), %error, "cannot remove a stale library copy")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_holds_the_bytes_only_when_they_read_back_exactly() {
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        assert!(holds(&mut bytes.as_slice(), &bytes).unwrap());
        assert!(
            !holds(&mut &bytes[..bytes.len() - 1], &bytes).unwrap(),
            "shorter"
        );
        let longer = [bytes.as_slice(), b"x"].concat();
        assert!(!holds(&mut longer.as_slice(), &bytes).unwrap(), "longer");
        let mut changed = bytes.clone();
        changed[2_500_000] ^= 1;
        assert!(!holds(&mut changed.as_slice(), &bytes).unwrap(), "one bit");
        assert!(holds(&mut &b""[..], b"").unwrap());
    }

    #[test]
    fn a_directory_is_private_only_when_it_is_ours_and_closed() {
        let me = trust::euid();
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), Permissions::from_mode(0o700)).unwrap();
        assert!(check_private(dir.path(), me).is_ok());
        assert!(matches!(
            check_private(dir.path(), me + 1),
            Err(NotPrivate::Owner { owner, .. }) if owner == me
        ));
        fs::set_permissions(dir.path(), Permissions::from_mode(0o750)).unwrap();
        assert_eq!(
            check_private(dir.path(), me).unwrap_err().to_string(),
            "other users may enter it (mode 0750)"
        );
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            check_private(&file, me),
            Err(NotPrivate::NotADirectory)
        ));
        assert!(matches!(
            check_private(&dir.path().join("absent"), me),
            Err(NotPrivate::Unreadable(_))
        ));
    }
}
