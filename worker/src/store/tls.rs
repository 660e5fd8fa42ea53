//! TLS to PostgreSQL with libpq's connection parameters: `sslmode` (disable, prefer, require,
//! verify-ca, verify-full), `sslrootcert`, `sslcert` and `sslkey`, over rustls.
//!
//! tokio-postgres itself knows `sslmode` disable/prefer/require only and refuses the other
//! parameters as unknown options, so [`split`] takes them out of a shard URL first; the rest of
//! the URL goes to tokio-postgres as before, with its `sslmode` set from ours.
//!
//! What each mode does (libpq's semantics):
//! - `disable`: plaintext.
//! - `prefer` (the default, as in libpq): TLS when the server offers it, plaintext only when the
//!   server answers that it does not support TLS. A TLS handshake that fails is an error, never
//!   a silent fallback.
//! - `require`: TLS or nothing, the server's certificate is not checked, unless `sslrootcert`
//!   is given: then it is checked like `verify-ca` (as libpq does; the same holds for `prefer`).
//! - `verify-ca`: TLS, the server's certificate chain must lead to a CA in `sslrootcert`.
//! - `verify-full`: `verify-ca`, and the certificate must name the host the URL connects to.
//!
//! `sslcert` + `sslkey` (PEM files) present a client certificate (for `cert` authentication or
//! `clientcert=verify-*` in pg_hba.conf). Unlike libpq, no file is looked for in
//! `~/.postgresql/`: every file is named in the URL.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use crate::config::conninfo::{split, SslMode, TlsSettings};

/// The rustls client configuration for `settings`: reads the certificate and key files now,
/// so a missing or unreadable file stops the start with one line naming it.
pub fn client_config(settings: &TlsSettings) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let roots = settings.root_cert.as_deref().map(load_roots).transpose()?;
    let builder =
        match (settings.mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => {
                let verifier =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("TLS setup: {e}"))?;
                builder.with_webpki_verifier(verifier)
            }
            (SslMode::Disable, _) | (_, None) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NameUnchecked {
                    roots: None,
                    provider,
                })),
            (_, Some(roots)) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NameUnchecked {
                    roots: Some(roots),
                    provider,
                })),
        };
    match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => {
            let chain = load_certs(cert, "sslcert")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                format!(
                    "sslkey {}: cannot read a PEM private key: {e}",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn load_certs(path: &Path, param: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{param} {}: cannot read PEM certificates: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{param} {}: holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, "sslrootcert")? {
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A server certificate check that never looks at the host name. With `roots` (`verify-ca`,
/// or `prefer`/`require` with `sslrootcert`): the chain must lead to one of them. Without
/// (`prefer`/`require`): any certificate, as libpq does. Either way the server must prove it
/// holds the key of the certificate it sent.
#[derive(Debug)]
struct NameUnchecked {
    roots: Option<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn missing_files_are_named() {
        let settings = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsSettings::default()
        };
        let error = client_config(&settings).unwrap_err();
        assert!(error.contains("sslrootcert /nonexistent/ca.pem"), "{error}");
        // Without files, every mode builds.
        for mode in [SslMode::Disable, SslMode::Prefer, SslMode::Require] {
            client_config(&TlsSettings {
                mode,
                ..TlsSettings::default()
            })
            .unwrap();
        }
    }
}
