//! `protean-host new NAME`: a domain crate to start from, outside any workspace.
//!
//! The crate has one aggregate, command, event and handler, and a unit test of the handler on the
//! SDK's in-process test host; `cargo build` makes the library the host runs. The files are the
//! templates beside this module, with `{{placeholders}}` filled in.
//!
//! Invariant: nothing is written unless the whole crate can be: an existing directory is refused, and
//! the name is checked before anything touches the disk.

use std::path::{Path, PathBuf};

use protean_plugin_api::Naming;

/// Why a crate could not be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{name:?} is not a crate name; use letters, digits, '-' and '_', starting with a letter"
    )]
    BadName { name: String },
    #[error("{} already exists; choose another name or remove it", path.display())]
    Exists { path: PathBuf },
    #[error("cannot find plugin-api at {}; pass --plugin-api PATH (the plugin-api directory of a protean-host checkout)", path.display())]
    NoPluginApi { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What was created, for the instructions printed after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The crate's directory.
    pub dir: PathBuf,
    /// The crate's name (`shop`), also what `--domain` finds it by.
    pub crate_name: String,
    /// The domain's name in type names (`Shop`).
    pub domain: String,
}

impl Created {
    /// The commands that take the new crate to a passing test and a running domain.
    pub fn next_steps(&self) -> String {
        format!(
            "created {dir}: the {domain} domain (src/lib.rs) with its test\n\
             \n  cd {dir}\n  cargo test\n  cargo build && protean-host --domain={name}\n\
             \nthen, from another shell in {dir}:\n  \
             protean-host --domain={name} send {domain}.PlaceOrder.v1 '{{\"order_id\": \"o1\", \"item\": \"book\"}}'",
            dir = self.dir.display(),
            domain = self.domain,
            name = self.crate_name,
        )
    }
}

/// The plugin-api of the source tree this binary was built from, when it is still there.
pub fn default_plugin_api() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api")
}

/// Create crate `name` in `dir` (which must not exist), depending on the plugin-api at `plugin_api`.
pub fn create(dir: &Path, name: &str, plugin_api: &Path) -> Result<Created, Error> {
    if !is_crate_name(name) {
        return Err(Error::BadName { name: name.into() });
    }
    if dir.exists() {
        return Err(Error::Exists { path: dir.into() });
    }
    let plugin_api = plugin_api
        .join("Cargo.toml")
        .canonicalize()
        .ok()
        .and_then(|manifest| manifest.parent().map(Path::to_owned))
        .ok_or_else(|| Error::NoPluginApi {
            path: plugin_api.into(),
        })?;
    let naming = Naming::new(name);
    let fill = |template: &str| {
        template
            .replace("{{crate}}", name)
            .replace("{{lib}}", &name.replace('-', "_"))
            .replace("{{Domain}}", naming.camel())
            .replace("{{category}}", naming.normalized())
            .replace(
                "{{plugin_api}}",
                &toml_escape(&plugin_api.display().to_string()),
            )
    };
    let files = [
        ("Cargo.toml", fill(include_str!("Cargo.toml.in"))),
        ("src/lib.rs", fill(include_str!("lib.rs.in"))),
        (".gitignore", fill(include_str!("gitignore.in"))),
    ];
    for (file, text) in files {
        write(&dir.join(file), &text)?;
    }
    Ok(Created {
        dir: dir.into(),
        crate_name: name.into(),
        domain: naming.camel().into(),
    })
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    let failed = |source| Error::Write {
        path: path.into(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    std::fs::write(path, text).map_err(failed)
}

/// Cargo's rule for package names, narrowed to ASCII (the library file is named after it).
fn is_crate_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The inside of a TOML basic string.
fn toml_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crate_gets_its_manifest_code_and_test_with_the_names_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("my-shop");
        let created = create(&target, "my-shop", &default_plugin_api()).unwrap();
        assert_eq!(
            (created.domain.as_str(), created.crate_name.as_str()),
            ("MyShop", "my-shop")
        );
        let manifest = std::fs::read_to_string(target.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"my-shop\""), "{manifest}");
        assert!(manifest.contains("crate-type = [\"cdylib\"]"), "{manifest}");
        assert!(manifest.contains("\n[workspace]\n"), "{manifest}");
        let api = default_plugin_api().canonicalize().unwrap();
        assert!(
            manifest.contains(&format!("path = \"{}\"", api.display())),
            "{manifest}"
        );
        let code = std::fs::read_to_string(target.join("src/lib.rs")).unwrap();
        assert!(code.contains("Domain::new(\"MyShop\")"), "{code}");
        assert!(code.contains("`my_shop::order-{id}`"), "{code}");
        assert!(!code.contains("{{"), "every placeholder is filled: {code}");
        assert!(created
            .next_steps()
            .contains("protean-host --domain=my-shop send MyShop.PlaceOrder.v1"));
    }

    #[test]
    fn an_existing_directory_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep"), "mine").unwrap();
        let error = create(dir.path(), "shop", &default_plugin_api()).unwrap_err();
        assert!(matches!(error, Error::Exists { .. }), "{error}");
        assert!(!dir.path().join("Cargo.toml").exists());
    }

    #[test]
    fn a_name_that_is_no_crate_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", "1shop", "my shop", "shop/x", "café"] {
            let error = create(&dir.path().join("x"), name, &default_plugin_api()).unwrap_err();
            assert!(matches!(error, Error::BadName { .. }), "{name:?}: {error}");
        }
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn a_missing_plugin_api_says_how_to_point_at_one() {
        let dir = tempfile::tempdir().unwrap();
        let error = create(&dir.path().join("shop"), "shop", dir.path()).unwrap_err();
        assert!(
            error.to_string().ends_with(
                "pass --plugin-api PATH (the plugin-api directory of a protean-host checkout)"
            ),
            "{error}"
        );
        assert!(!dir.path().join("shop").exists());
    }
}
