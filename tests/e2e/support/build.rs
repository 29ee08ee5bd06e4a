//! Building plugin libraries and the host binary with cargo, once per test process.
//!
//! `cargo test` does not build a dependency's `cdylib`, and `CARGO_BIN_EXE_*` exists only inside the
//! binary's own package, so the tests ask cargo for the artifacts (`--message-format=json`) and take the
//! paths it reports. Cargo's own lock serialises concurrent builds from parallel test processes.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

/// A `cargo` command run from `dir`, without the variables `cargo test` sets for this test process:
/// ring's build script tracks some of them, and inherited they would make this build and the next
/// `cargo test` rebuild ring and everything above it (the host included), in turn.
pub fn cargo(dir: &Path) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let per_crate = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ];
        if per_crate.iter().any(|prefix| key.starts_with(prefix))
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
        {
            command.env_remove(key.as_ref());
        }
    }
    command.current_dir(dir);
    command
}

/// Run `cargo build` with `args` and return the file of the artifact of `package` whose kind is `kind`.
fn build(args: &[&str], package: &str, kind: &str, target_dir: Option<&Path>) -> PathBuf {
    let mut command = cargo(&workspace());
    command.args([
        "build",
        "--message-format=json-render-diagnostics",
        "-p",
        package,
    ]);
    command.args(args);
    if let Some(dir) = target_dir {
        command.arg("--target-dir").arg(dir);
    }
    let output = command.output().expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo build -p {package} {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["target"]["name"].as_str().map(|n| n.replace('_', "-"))
                == Some(package.replace('_', "-"))
        })
        .find_map(|m| {
            if kind == "bin" {
                return m["executable"].as_str().map(PathBuf::from);
            }
            let kinds = m["target"]["kind"].as_array()?;
            kinds.iter().any(|k| k == kind).then(|| {
                m["filenames"]
                    .as_array()?
                    .iter()
                    .filter_map(|f| f.as_str())
                    .find(|f| f.ends_with(".so"))
                    .map(PathBuf::from)
            })?
        })
        .unwrap_or_else(|| panic!("cargo reported no {kind} artifact for {package}"))
}

/// The sample domain library (`libsample_domain.so`).
pub fn sample_domain() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| build(&[], "sample-domain", "cdylib", None))
}

/// The fixture domain library (`libfixture_domain.so`): instances that fail, panic and cascade.
pub fn fixture_domain() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| build(&[], "fixture-domain", "cdylib", None))
}

/// The `protean-host` binary.
pub fn host_binary() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    // PROTEAN_HOST_BIN runs the tests against another build (an older one, to see a test fail
    // before its fix).
    PATH.get_or_init(|| match std::env::var_os("PROTEAN_HOST_BIN") {
        Some(path) => PathBuf::from(path),
        None => build(&["--bin", "protean-host"], "protean-host", "bin", None),
    })
}

/// Ways to build the fixture domain against a plugin-api this host cannot load.
#[derive(Debug, Clone, Copy)]
pub enum Incompatibility {
    /// The ABI tag says another ABI generation.
    NextTag,
    /// Same tag, but a root-module field has another type.
    Layout,
}

/// The fixture domain built with a test feature of plugin-api, in a target directory of its own (so the
/// normal build is untouched).
pub fn incompatible_fixture(which: Incompatibility) -> PathBuf {
    let (feature, dir) = match which {
        Incompatibility::NextTag => ("abi-test-next-tag", "abi-next-tag"),
        Incompatibility::Layout => ("abi-test-layout", "abi-layout"),
    };
    let target_dir = workspace().join("target").join("abi-fixtures").join(dir);
    build(
        &["--features", feature],
        "fixture-domain",
        "cdylib",
        Some(&target_dir),
    )
}

/// Test builds of the fixture domain for the hot-reload tests, by cargo feature: each exports instance
/// `domain`, to replace the sample domain's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadBuild {
    /// `reload-test-variant`: reservations in the "north" warehouse, one more handler.
    Variant,
    /// `reload-test-panic`: its constructor panics.
    Panicking,
}

/// The fixture domain built with a hot-reload test feature, in a target directory of its own. Both
/// builds share that directory (only fixture-domain differs), so each artifact is copied aside.
pub fn reload_fixture(which: ReloadBuild) -> &'static Path {
    static VARIANT: OnceLock<PathBuf> = OnceLock::new();
    static PANICKING: OnceLock<PathBuf> = OnceLock::new();
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let (cell, feature) = match which {
        ReloadBuild::Variant => (&VARIANT, "reload-test-variant"),
        ReloadBuild::Panicking => (&PANICKING, "reload-test-panic"),
    };
    cell.get_or_init(|| {
        let _one_at_a_time = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        let target_dir = workspace().join("target").join("reload-fixtures");
        let built = build(
            &["--features", feature],
            "fixture-domain",
            "cdylib",
            Some(&target_dir),
        );
        let aside = target_dir.join(format!("{feature}.so"));
        std::fs::copy(&built, &aside).expect("copy the test build aside");
        aside
    })
}

/// Builds of tests/bad-domain that crash or hang whatever loads them, by cargo feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadBuild {
    /// An ELF initialiser aborts when the library is mapped.
    AbortOnLoad,
    /// The constructor of instance `domain` aborts.
    AbortInConstructor,
    /// The constructor of instance `domain` never returns.
    HangInConstructor,
}

impl BadBuild {
    pub const ALL: [BadBuild; 3] = [
        BadBuild::AbortOnLoad,
        BadBuild::AbortInConstructor,
        BadBuild::HangInConstructor,
    ];

    /// What the host's one-line refusal of this build says happened.
    pub fn refusal(self) -> &'static str {
        match self {
            BadBuild::AbortOnLoad => "the probe process died of SIGABRT while loading the library",
            BadBuild::AbortInConstructor => {
                "the probe process died of SIGABRT while constructing domain instance \"domain\""
            }
            BadBuild::HangInConstructor => {
                "the probe process was still constructing domain instance \"domain\" after 3 s"
            }
        }
    }

    fn feature(self) -> &'static str {
        match self {
            BadBuild::AbortOnLoad => "abort-on-load",
            BadBuild::AbortInConstructor => "abort-in-constructor",
            BadBuild::HangInConstructor => "hang-in-constructor",
        }
    }
}

/// The bad-domain library built with `which`'s feature. Every feature builds the same file in the
/// shared target directory (only this small crate differs), so each build is copied aside at once.
pub fn bad_build(which: BadBuild) -> &'static Path {
    static BUILT: [OnceLock<PathBuf>; 3] = [const { OnceLock::new() }; 3];
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    BUILT[which as usize].get_or_init(|| {
        let _one_at_a_time = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        let built = build(
            &["--features", which.feature()],
            "bad-domain",
            "cdylib",
            None,
        );
        let aside = built.with_file_name(format!("libbad_domain-{}.so", which.feature()));
        std::fs::copy(&built, &aside).expect("copy the bad build aside");
        aside
    })
}

/// The oldest plugin-api this host accepts (docs/compatibility.md): the commit where the ABI took the
/// form this host speaks (ABI 1; `plugin-api/src/abi.rs` has not changed since).
pub const OLDEST_PLUGIN_API: &str = "56f1484";

/// Builds of `tests/compat-domain` for the compatibility tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompatBuild {
    /// With today's plugin-api and the default toolchain, as a workspace member: the reference.
    Today,
    /// Against the plugin-api of [`OLDEST_PLUGIN_API`], taken from git history.
    OldestApi,
    /// With today's plugin-api and the installed nightly toolchain.
    Nightly,
}

/// `tests/compat-domain` built `which` way. The two foreign builds are made in a crate of their own
/// under `target/compat/` (the domain's source copied in, its plugin-api dependency pointed at the
/// one wanted), kept between runs so that only the first run pays for building their dependencies.
pub fn compat_build(which: CompatBuild) -> &'static Path {
    static BUILT: [OnceLock<PathBuf>; 3] = [const { OnceLock::new() }; 3];
    BUILT[which as usize].get_or_init(|| match which {
        CompatBuild::Today => build(&[], "compat-domain", "cdylib", None),
        CompatBuild::OldestApi => {
            let api = oldest_plugin_api();
            build_apart("oldest-api", &api, None)
        }
        CompatBuild::Nightly => {
            let api = workspace().join("plugin-api");
            build_apart("nightly", &api, Some("nightly"))
        }
    })
}

/// The plugin-api of [`OLDEST_PLUGIN_API`] with the workspace manifest it inherits from (its member
/// list cut to it), extracted from git into `target/compat/api-{commit}`.
fn oldest_plugin_api() -> PathBuf {
    let done = workspace().join(format!("target/compat/api-{OLDEST_PLUGIN_API}"));
    if !done.is_dir() {
        // Made aside and renamed into place, so a run that fails halfway leaves nothing to trust.
        let dir = done.with_extension("part");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let archive = Command::new("git")
            .current_dir(workspace())
            .args(["archive", "--format=tar", OLDEST_PLUGIN_API])
            .args(["Cargo.toml", "Cargo.lock", "plugin-api"])
            .output()
            .expect("git runs");
        assert!(
            archive.status.success(),
            "the compatibility tests need plugin-api as of {OLDEST_PLUGIN_API} from git history \
             (a shallow clone lacks it; git fetch --unshallow): {}",
            String::from_utf8_lossy(&archive.stderr)
        );
        let mut tar = Command::new("tar")
            .current_dir(&dir)
            .arg("-x")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("tar runs");
        use std::io::Write as _;
        tar.stdin
            .take()
            .unwrap()
            .write_all(&archive.stdout)
            .unwrap();
        assert!(tar.wait().unwrap().success(), "tar extracts the archive");
        let manifest = dir.join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        let members_cut: Vec<&str> = text
            .lines()
            .filter_map(|line| match line.split_once(" = ") {
                Some(("members", _)) => Some("members = [\"plugin-api\"]"),
                Some(("default-members", _)) => None,
                _ => Some(line),
            })
            .collect();
        std::fs::write(&manifest, members_cut.join("\n")).unwrap();
        std::fs::rename(&dir, &done).unwrap();
    }
    done.join("plugin-api")
}

/// `tests/compat-domain`'s source as a crate of its own in `target/compat/{name}`, depending on the
/// plugin-api at `api` (with the versions locked beside it), built with `toolchain` (else the default).
fn build_apart(name: &str, api: &Path, toolchain: Option<&str>) -> PathBuf {
    let dir = workspace().join("target/compat").join(name);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let source = workspace().join("tests/compat-domain/src/lib.rs");
    std::fs::copy(source, dir.join("src/lib.rs")).unwrap();
    let manifest = format!(
        "[package]\nname = \"compat-domain\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\n\
         protean-plugin-api = {{ path = {api:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n\
         [workspace]\n"
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    let lock = api
        .parent()
        .expect("plugin-api sits in its workspace")
        .join("Cargo.lock");
    std::fs::copy(lock, dir.join("Cargo.lock")).unwrap();
    let mut command = match toolchain {
        Some(toolchain) => {
            let mut rustup = Command::new("rustup");
            rustup.current_dir(&dir).args(["run", toolchain, "cargo"]);
            rustup
        }
        None => cargo(&dir),
    };
    let output = command
        .args(["build", "--target-dir", "target"])
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "building the compatibility domain {name} failed (toolchain {toolchain:?}; rustup toolchain \
         list shows what is installed):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir.join("target/debug/libcompat_domain.so")
}
