//! Throw-away TLS material for tests, generated in-process with rcgen (no openssl CLI): a CA, a
//! server certificate for 127.0.0.1 and localhost signed by it, a client certificate for one
//! PostgreSQL role (its CN, for `cert` authentication), and a second, unrelated CA.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// PEM files in a temp dir (removed on drop), readable by everyone but the keys (0600: the
/// PostgreSQL server and libpq insist on that for keys).
pub struct TestPki {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed nothing here: verifying against it must fail.
    pub other_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// CN = the role given to [`TestPki::generate`].
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    dir: TempDir,
}

impl TestPki {
    /// New keys and certificates; the client certificate is for PostgreSQL role `client_role`.
    pub fn generate(client_role: &str) -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("logstore-test-pki-")
            .tempdir()
            .expect("temp dir for TLS material");
        // Readable by the `postgres` user when the tests run as root (it loads the server's
        // files from its own data dir, copied there by PgServer::enable_tls).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod pki dir");
        let ca = new_ca("logstore test CA");
        let other = new_ca("some other CA");

        let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server certificate parameters");
        server
            .distinguished_name
            .push(DnType::CommonName, "logstore test postgres");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("server key");
        let server_cert = server
            .signed_by(&server_key, &*ca)
            .expect("sign the server certificate");

        let mut client =
            CertificateParams::new(Vec::<String>::new()).expect("client certificate parameters");
        client
            .distinguished_name
            .push(DnType::CommonName, client_role);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().expect("client key");
        let client_cert = client
            .signed_by(&client_key, &*ca)
            .expect("sign the client certificate");

        let write = |name: &str, pem: String, mode: u32| {
            let path = dir.path().join(name);
            fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
            path
        };
        TestPki {
            ca: write("ca.crt", ca.pem(), 0o644),
            other_ca: write("other-ca.crt", other.pem(), 0o644),
            server_cert: write("server.crt", server_cert.pem(), 0o644),
            server_key: write("server.key", server_key.serialize_pem(), 0o600),
            client_cert: write("client.crt", client_cert.pem(), 0o644),
            client_key: write("client.key", client_key.serialize_pem(), 0o600),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    CertifiedIssuer::self_signed(params, key).expect("self-sign the CA")
}
