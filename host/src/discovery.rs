//! Finding the domain library: `PROTEAN_DOMAIN` or `--domain`, in one of four forms.
//!
//! | form | example | resolves to |
//! |---|---|---|
//! | path | `target/debug/libshop.so` | that file |
//! | path with instance | `/opt/a:b/libshop.so:reporting` | split at the last `.so:`, so a `:` in a directory is safe |
//! | crate name | `shop` or `shop:reporting` | `libshop.so` in `.`, then `target/release`, then `target/debug` |
//! | nothing | | `./libdomain.so`, then `./libsubdomain.so` |
//!
//! `PROTEAN_DOMAIN`, when set and non-empty, wins over `--domain` (as in Protean).

use std::path::{Path, PathBuf};

/// Where the domain is: a library path and, optionally, the instance to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DomainSpec {
    /// The library file.
    pub(crate) path: PathBuf,
    /// The instance named after `:`, if any.
    pub(crate) instance: Option<String>,
}

/// Why no library could be found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Error {
    #[error("no domain library given and none found: looked for {}; pass --domain=PATH[:INSTANCE] or set PROTEAN_DOMAIN", list(.0))]
    NoDefault(Vec<PathBuf>),
    #[error("no library for crate {name:?}: looked for {}; build it with cargo build, or pass the path", list(.looked))]
    CrateNotFound { name: String, looked: Vec<PathBuf> },
    #[error("empty instance name in {0:?}; write PATH:INSTANCE, e.g. libshop.so:reporting")]
    EmptyInstance(String),
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

const SUFFIX: &str = ".so";

/// Resolve the domain from the environment value (`PROTEAN_DOMAIN`), the flag, and the working directory.
pub(crate) fn resolve(
    env: Option<&str>,
    flag: Option<&str>,
    cwd: &Path,
) -> Result<DomainSpec, Error> {
    let given = env
        .filter(|v| !v.is_empty())
        .or(flag.filter(|v| !v.is_empty()));
    let Some(given) = given else {
        return defaults(cwd);
    };
    let (target, instance) = split_instance(given)?;
    let is_path = target.contains('/') || target.ends_with(SUFFIX);
    let path = if is_path {
        cwd.join(target)
    } else {
        find_crate(target, cwd)?
    };
    Ok(DomainSpec { path, instance })
}

/// Split `target[:instance]`. A path is split only at its last `.so:`, so colons in directories are safe;
/// a bare crate name is split at its last `:`.
fn split_instance(given: &str) -> Result<(&str, Option<String>), Error> {
    let split = match given.rfind(".so:") {
        Some(at) => Some((&given[..at + SUFFIX.len()], &given[at + SUFFIX.len() + 1..])),
        None if !given.contains('/') => given.rsplit_once(':'),
        None => None,
    };
    match split {
        Some((_, "")) => Err(Error::EmptyInstance(given.into())),
        Some((target, instance)) => Ok((target, Some(instance.into()))),
        None => Ok((given, None)),
    }
}

fn find_crate(name: &str, cwd: &Path) -> Result<PathBuf, Error> {
    let file = format!("lib{}{SUFFIX}", name.replace('-', "_"));
    let looked: Vec<PathBuf> = ["", "target/release", "target/debug"]
        .iter()
        .map(|dir| cwd.join(dir).join(&file))
        .collect();
    looked
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::CrateNotFound {
            name: name.into(),
            looked,
        })
}

fn defaults(cwd: &Path) -> Result<DomainSpec, Error> {
    let looked: Vec<PathBuf> = ["libdomain.so", "libsubdomain.so"]
        .iter()
        .map(|f| cwd.join(f))
        .collect();
    match looked.iter().find(|p| p.is_file()) {
        Some(path) => Ok(DomainSpec {
            path: path.clone(),
            instance: None,
        }),
        None => Err(Error::NoDefault(looked)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &Path, instance: Option<&str>) -> DomainSpec {
        DomainSpec {
            path: path.into(),
            instance: instance.map(Into::into),
        }
    }

    #[test]
    fn env_wins_over_flag_unless_empty() {
        let cwd = Path::new("/w");
        assert_eq!(
            resolve(Some("a/liba.so"), Some("b/libb.so"), cwd),
            Ok(spec(Path::new("/w/a/liba.so"), None))
        );
        assert_eq!(
            resolve(Some(""), Some("b/libb.so"), cwd),
            Ok(spec(Path::new("/w/b/libb.so"), None))
        );
    }

    #[test]
    fn instance_is_split_at_the_last_so_colon() {
        let cwd = Path::new("/w");
        assert_eq!(
            resolve(None, Some("/opt/a:b/libx.so:reporting"), cwd),
            Ok(spec(Path::new("/opt/a:b/libx.so"), Some("reporting")))
        );
        assert_eq!(
            resolve(None, Some("/opt/a:b/libx.so"), cwd),
            Ok(spec(Path::new("/opt/a:b/libx.so"), None))
        );
        assert_eq!(
            resolve(None, Some("libx.so:"), cwd),
            Err(Error::EmptyInstance("libx.so:".into()))
        );
    }

    #[test]
    fn crate_names_are_searched_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let debug = dir.path().join("target/debug");
        std::fs::create_dir_all(&debug).unwrap();
        std::fs::write(debug.join("libmy_domain.so"), b"").unwrap();
        assert_eq!(
            resolve(None, Some("my-domain:reporting"), dir.path()),
            Ok(spec(&debug.join("libmy_domain.so"), Some("reporting")))
        );
        std::fs::write(dir.path().join("libmy_domain.so"), b"").unwrap();
        assert_eq!(
            resolve(None, Some("my_domain"), dir.path()),
            Ok(spec(&dir.path().join("libmy_domain.so"), None))
        );
        let missing = resolve(None, Some("nope"), dir.path()).unwrap_err();
        assert!(
            missing.to_string().contains("target/release/libnope.so"),
            "{missing}"
        );
    }

    #[test]
    fn defaults_are_libdomain_then_libsubdomain() {
        let dir = tempfile::tempdir().unwrap();
        let none = resolve(None, None, dir.path()).unwrap_err();
        assert!(none.to_string().contains("libsubdomain.so"), "{none}");
        std::fs::write(dir.path().join("libsubdomain.so"), b"").unwrap();
        assert_eq!(
            resolve(None, None, dir.path()),
            Ok(spec(&dir.path().join("libsubdomain.so"), None))
        );
        std::fs::write(dir.path().join("libdomain.so"), b"").unwrap();
        assert_eq!(
            resolve(None, None, dir.path()),
            Ok(spec(&dir.path().join("libdomain.so"), None))
        );
    }
}
