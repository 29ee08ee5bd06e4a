//! TLS to PostgreSQL, with libpq's `sslmode` semantics (rustls underneath).
//!
//! The `postgres` crate knows `sslmode` `disable`, `prefer` and `require` only, and no certificate
//! options, so the connection string's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` are taken out
//! here and turned into a rustls configuration:
//!
//! | sslmode | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable`, `prefer` (default) | no (`prefer` does not try TLS) | - |
//! | `require` | yes | no; with `sslrootcert`, as `verify-ca` (as libpq does) |
//! | `verify-ca` | yes | signed by `sslrootcert` |
//! | `verify-full` | yes | signed by `sslrootcert`, and names the host connected to |
//!
//! `sslcert` and `sslkey` (PEM) give a client certificate.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::UriError;

/// The options taken out of a connection string.
const OPTIONS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS options of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settings {
    pub(super) mode: Mode,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// `text` without its TLS options, and those options.
pub(super) fn split(text: &str) -> Result<(String, Settings), UriError> {
    let (rest, pairs) = if text.contains("://") {
        split_uri(text)
    } else {
        split_key_values(text)
    };
    let value = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let mode = match value("sslmode").as_deref() {
        None | Some("prefer") => Mode::Prefer,
        Some("disable") => Mode::Disable,
        Some("require") => Mode::Require,
        Some("verify-ca") => Mode::VerifyCa,
        Some("verify-full") => Mode::VerifyFull,
        Some(other) => return Err(UriError::SslMode(other.to_owned())),
    };
    let settings = Settings {
        mode,
        root_cert: value("sslrootcert").map(PathBuf::from),
        cert: value("sslcert").map(PathBuf::from),
        key: value("sslkey").map(PathBuf::from),
    };
    if matches!(mode, Mode::VerifyCa | Mode::VerifyFull) && settings.root_cert.is_none() {
        return Err(UriError::NeedsRootCert(
            value("sslmode").unwrap_or_default(),
        ));
    }
    if settings.cert.is_some() != settings.key.is_some() {
        return Err(UriError::CertWithoutKey);
    }
    Ok((rest, settings))
}

/// A URI's query without the TLS options (values percent-decoded).
fn split_uri(text: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = text.split_once('?') else {
        return (text.to_owned(), Vec::new());
    };
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((key, value)) if OPTIONS.contains(&key) => {
                taken.push((key.to_owned(), percent_decode(value)))
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, taken)
}

/// A libpq `key = value` string without the TLS options (quoted values unquoted).
fn split_key_values(text: &str) -> (String, Vec<(String, String)>) {
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    let mut rest = text.trim_start();
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().to_owned();
        let after = rest[eq + 1..].trim_start();
        let (raw, value, tail) = value_at(after);
        if OPTIONS.contains(&key.as_str()) {
            taken.push((key, value));
        } else {
            kept.push(format!("{key}={raw}"));
        }
        rest = tail.trim_start();
    }
    (kept.join(" "), taken)
}

/// The value at the start of `text`: as written, unquoted, and the text after it.
fn value_at(text: &str) -> (&str, String, &str) {
    if !text.starts_with('\'') {
        let end = text.find(char::is_whitespace).unwrap_or(text.len());
        return (&text[..end], text[..end].to_owned(), &text[end..]);
    }
    let mut value = String::new();
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => {
                value.push(c);
                escaped = false;
            }
            '\\' => escaped = true,
            '\'' => return (&text[..=i], value, &text[i + 1..]),
            _ => value.push(c),
        }
    }
    (text, value, "")
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The connector for these settings: `None` for a plain connection.
pub(super) fn connector(settings: &Settings) -> Result<Option<MakeRustlsConnect>, UriError> {
    if matches!(settings.mode, Mode::Disable | Mode::Prefer) {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| UriError::Tls(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (&settings.root_cert, settings.mode) {
        (None, _) => Arc::new(Unchecked(provider)),
        (Some(path), mode) => {
            let roots = Arc::new(root_store(path)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| UriError::Tls(e.to_string()))?;
            if mode == Mode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert, "sslcert")?, private_key(key)?)
            .map_err(|e| UriError::ClientCertificate(e.to_string()))?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(MakeRustlsConnect::new(config)))
}

fn certificates(
    path: &Path,
    option: &'static str,
) -> Result<Vec<CertificateDer<'static>>, UriError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(option, path, e))?;
    if certs.is_empty() {
        return Err(file_error(option, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn file_error(option: &'static str, path: &Path, reason: impl ToString) -> UriError {
    UriError::File {
        option,
        path: path.into(),
        reason: reason.to_string(),
    }
}

fn root_store(path: &Path) -> Result<RootCertStore, UriError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path, "sslrootcert")? {
        roots
            .add(cert)
            .map_err(|e| file_error("sslrootcert", path, e))?;
    }
    Ok(roots)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, UriError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("sslkey", path, e))
}

/// `require` without a root certificate: encrypted, the server's certificate not checked (libpq's
/// meaning of `require`); signatures are still checked, so the handshake is sound.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root certificate; the name in it is not compared.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError::*, Error::InvalidCertificate};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::{split, Mode};

    #[test]
    fn tls_options_are_taken_out_of_both_forms() {
        let (rest, tls) = split(
            "postgresql://db/shop?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgresql://db/shop?application_name=x");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert.unwrap().to_str(), Some("/ca.pem"));
        let (rest, tls) =
            split("host=db sslmode = 'verify-ca' sslrootcert='/a b.pem' user=app").unwrap();
        assert_eq!(rest, "host=db user=app");
        assert_eq!(tls.mode, Mode::VerifyCa);
        assert_eq!(tls.root_cert.unwrap().to_str(), Some("/a b.pem"));
        assert_eq!(split("postgresql://db/shop").unwrap().1.mode, Mode::Prefer);
    }

    #[test]
    fn bad_tls_options_say_what_to_write() {
        for (text, expected) in [
            (
                "postgresql://db/x?sslmode=verify-full",
                "needs sslrootcert=",
            ),
            ("postgresql://db/x?sslmode=always", "is not one of disable"),
            (
                "postgresql://db/x?sslmode=require&sslcert=/c.pem",
                "sslcert and sslkey go together",
            ),
        ] {
            let error = split(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
