//! Certificates for the TLS tests, made with the openssl command: a CA, a server certificate for
//! `localhost` only (so that connecting to 127.0.0.1 fails a name check), and a client certificate.

use std::{path::Path, process::Command};

/// Write `ca.pem`, `server.pem`/`server.key` and `client.pem`/`client.key` into `dir`.
#[track_caller]
pub fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run openssl ({e}); scripts/test installs it (apt-get install openssl)"
                )
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &[
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=protean test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ][..],
            &key,
        ]
        .concat(),
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subject) in [("server", "/CN=localhost"), ("client", "/CN=protean-host")] {
        let (keyout, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        openssl(
            &[
                &["req", "-subj", subject, "-keyout", &keyout, "-out", &csr][..],
                &key,
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }
    // redis-server reads the keys as this user, PostgreSQL its copy as its own user.
    for key in ["server.key", "client.key"] {
        let path = dir.join(key);
        let mut permissions = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o600);
        std::fs::set_permissions(&path, permissions).unwrap();
    }
}
