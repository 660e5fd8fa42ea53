//! TLS to PostgreSQL (issue 13): libpq's `sslmode` (disable, prefer, require, verify-ca,
//! verify-full), `sslrootcert`, `sslcert` and `sslkey` in shard URLs, against a real PostgreSQL
//! with `ssl = on` whose pg_hba.conf takes TLS connections only (`hostnossl … reject`), with
//! certificates made by the test (support::tls). The password comes from
//! POSTGRES_PASSWORD_FILE.

mod support;

use std::path::{Path, PathBuf};

use support::tls::TestPki;
use support::*;

/// Logs in with a password (scram-sha-256), over TLS only.
const ROLE: &str = "logstore_tls";
const PASSWORD: &str = "tls-secret-5e7a";
/// Logs in with a client certificate (`cert` authentication), over TLS only.
const CERT_ROLE: &str = "logstore_cert";
/// May log in with or without TLS: shows that `prefer` picks TLS when both are possible.
const EITHER_ROLE: &str = "logstore_either";

/// One PostgreSQL with TLS on, its databases and the files the worker reads.
struct TlsServer {
    pg: PgServer,
    pki: TestPki,
    /// Owned by ROLE (and used by EITHER_ROLE, a member of ROLE).
    db: String,
    /// Owned by CERT_ROLE.
    cert_db: String,
    /// Owned by ROLE, for the POSTGRES_IPS form (whose shard is named after its host).
    ips_db: String,
    /// PASSWORD and a newline, as `echo` or an editor writes it.
    password_file: PathBuf,
}

impl TlsServer {
    async fn start() -> TlsServer {
        let pg = PgServer::start(); // its own: TLS and pg_hba.conf change for good
        let db = pg.require_password(ROLE, PASSWORD).await;
        let admin = pg.socket_connect("postgres").await;
        let cert_db = unique_name("certdb");
        let ips_db = unique_name("ipsdb");
        for sql in [
            format!("CREATE DATABASE {ips_db} OWNER {ROLE} TEMPLATE template0"),
            format!("CREATE ROLE {CERT_ROLE} LOGIN"),
            format!("CREATE DATABASE {cert_db} OWNER {CERT_ROLE} TEMPLATE template0"),
            format!("CREATE ROLE {EITHER_ROLE} LOGIN PASSWORD '{PASSWORD}' IN ROLE {ROLE}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let pki = TestPki::generate(CERT_ROLE);
        // First match wins: EITHER_ROLE may use plain TCP, nobody else; CERT_ROLE logs in
        // with its certificate, everyone else with a password, over TLS.
        let hba = format!(
            "local all all trust\n\
             host all {EITHER_ROLE} 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 127.0.0.1/32 reject\n\
             hostssl all {CERT_ROLE} 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n"
        );
        pg.enable_tls(&pki.server_cert, &pki.server_key, &pki.ca, &hba)
            .await;
        let password_file = pki.dir().join("postgres-password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("write the password file");
        TlsServer {
            pg,
            pki,
            db,
            cert_db,
            ips_db,
            password_file,
        }
    }

    /// `postgres://ROLE@HOST:PORT/DB?QUERY` (no password: POSTGRES_PASSWORD_FILE gives it).
    fn url(&self, role: &str, host: &str, db: &str, query: &str) -> String {
        format!("postgres://{role}@{host}:{}/{db}?{query}", self.pg.port())
    }

    /// An env with one shard `a` at `url` (core intake, shared NATS).
    fn env(&self, url: String) -> Env {
        Env {
            nats_url: shared().nats.url(),
            prefix: unique_name("t"),
            shards: vec![("a".to_string(), url)],
            intake: "core",
        }
    }

    fn password_setting(&self) -> (&'static str, String) {
        (
            "POSTGRES_PASSWORD_FILE",
            self.password_file.display().to_string(),
        )
    }

    /// (backends, of which on TLS) of `role`'s sessions with the worker's application name.
    async fn worker_sessions(&self, role: &str) -> (i64, i64) {
        let admin = self.pg.socket_connect("postgres").await;
        let row = admin
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.usename = $1 AND a.application_name = 'logstore-worker'",
                &[&role],
            )
            .await
            .expect("read pg_stat_ssl");
        (row.get(0), row.get(1))
    }
}

fn query(pairs: &[(&str, &Path)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.display()))
        .collect::<Vec<_>>()
        .join("&")
}

/// verify-full (CA and the host the URL names, 127.0.0.1) serves the core scenarios with the
/// password from POSTGRES_PASSWORD_FILE, every session on TLS; so does the POSTGRES_IPS form
/// with POSTGRES_SSLMODE/POSTGRES_SSLROOTCERT; verify-ca accepts a certificate
/// that does not name the host; `prefer` uses TLS where plaintext would be allowed too; a
/// client certificate logs in where pg_hba.conf says `cert`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_serve_and_are_encrypted() {
    let server = TlsServer::start().await;
    let pki = &server.pki;
    let password = server.password_setting();
    let extra = [(password.0, password.1.as_str())];

    // verify-full: the core scenarios.
    let url = server.url(
        ROLE,
        "127.0.0.1",
        &server.db,
        &format!("sslmode=verify-full&{}", query(&[("sslrootcert", &pki.ca)])),
    );
    let env = server.env(url);
    let worker = env.start_worker(&extra).await;
    core_scenarios(&env, 1).await;
    let (sessions, on_tls) = server.worker_sessions(ROLE).await;
    assert!(sessions > 0, "no worker session of {ROLE}");
    assert_eq!(on_tls, sessions, "every worker session is on TLS");
    worker.stop().await.expect("the worker stops");

    // The original's form (POSTGRES_IPS) with POSTGRES_SSLMODE and POSTGRES_SSLROOTCERT, which
    // also stand for every POSTGRES_SHARDS URL that names no TLS parameter of its own.
    let mut env = server.env(String::new());
    env.shards.clear(); // POSTGRES_SHARDS="" gives way to POSTGRES_IPS
    let (port, ca) = (server.pg.port().to_string(), pki.ca.display().to_string());
    let worker = env
        .start_worker(&[
            extra[0],
            ("POSTGRES_IPS", "127.0.0.1"),
            ("POSTGRES_PORT", &port),
            ("POSTGRES_USER", ROLE),
            ("POSTGRES_DB", &server.ips_db),
            ("POSTGRES_SSLMODE", "verify-full"),
            ("POSTGRES_SSLROOTCERT", &ca),
        ])
        .await;
    let client = env.client().await;
    let reply = env
        .append(&client, 6, "by POSTGRES_IPS", Some("ips-1"))
        .await;
    assert_eq!(reply.seq, 1);
    worker.stop().await.expect("the worker stops");

    // verify-ca: the chain is checked, the name is not (the URL names a host the certificate
    // does not; hostaddr says where to connect).
    let url = server.url(
        ROLE,
        "db.wrong-name.invalid",
        &server.db,
        &format!(
            "sslmode=verify-ca&hostaddr=127.0.0.1&{}",
            query(&[("sslrootcert", &pki.ca)])
        ),
    );
    let env = server.env(url);
    let worker = env.start_worker(&extra).await;
    let client = env.client().await;
    let reply = env.append(&client, 7, "over verify-ca", Some("ca-1")).await;
    assert_eq!(reply.seq, 1);
    worker.stop().await.expect("the worker stops");

    // prefer, for a role that may also log in without TLS: TLS it is.
    let url = server.url(EITHER_ROLE, "127.0.0.1", &server.db, "sslmode=prefer");
    let env = server.env(url);
    let worker = env.start_worker(&extra).await;
    let client = env.client().await;
    env.append(&client, 8, "over prefer", None).await;
    let (sessions, on_tls) = server.worker_sessions(EITHER_ROLE).await;
    assert!(sessions > 0, "no worker session of {EITHER_ROLE}");
    assert_eq!(on_tls, sessions, "prefer picked TLS for every session");
    worker.stop().await.expect("the worker stops");
    // (That role can indeed log in without TLS: prefer chose TLS, pg_hba.conf did not.)
    let mut plain: tokio_postgres::Config = server
        .url(EITHER_ROLE, "127.0.0.1", &server.db, "sslmode=disable")
        .parse()
        .expect("URL");
    plain.password(PASSWORD);
    let (_plain_client, connection) =
        within(10, "plain login", plain.connect(tokio_postgres::NoTls))
            .await
            .expect("a plain login of the role that may use plaintext");
    drop(connection);

    // A client certificate (pg_hba.conf: cert), no password.
    let url = server.url(
        CERT_ROLE,
        "127.0.0.1",
        &server.cert_db,
        &format!(
            "sslmode=verify-full&{}",
            query(&[
                ("sslrootcert", &pki.ca),
                ("sslcert", &pki.client_cert),
                ("sslkey", &pki.client_key),
            ])
        ),
    );
    let env = server.env(url);
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let reply = env.append(&client, 9, "by certificate", Some("c-1")).await;
    assert_eq!(reply.seq, 1);
    let logs = entries(&env.query_all(&client, 9).await);
    assert_eq!(logs[0].log, "by certificate");
    let (sessions, on_tls) = server.worker_sessions(CERT_ROLE).await;
    assert!(
        sessions > 0 && on_tls == sessions,
        "{on_tls} of {sessions} on TLS"
    );
    worker.stop().await.expect("the worker stops");
}

/// Each way a TLS connection can be wrong leaves the worker not ready, with one line at the
/// default log level naming the shard and the cause, and no password: plaintext to a server
/// that takes TLS only, a server certificate from another CA (verify-full and verify-ca), one
/// that does not name the host (verify-full), no client certificate where one is required, and `require` against a
/// server without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_are_one_clear_line() {
    let server = TlsServer::start().await;
    let pki = &server.pki;
    let password = server.password_setting();
    let plain_pg = &shared().pg[0]; // trust, no TLS
    let plain_db = fresh_db(plain_pg, "notls").await; // a URL
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "plaintext to a TLS-only server",
            server.url(ROLE, "127.0.0.1", &server.db, "sslmode=disable"),
            &["shard a", "no encryption"],
        ),
        (
            "a server certificate from another CA",
            server.url(
                ROLE,
                "127.0.0.1",
                &server.db,
                &format!(
                    "sslmode=verify-full&{}",
                    query(&[("sslrootcert", &pki.other_ca)])
                ),
            ),
            &["shard a", "TLS handshake", "UnknownIssuer"],
        ),
        (
            "verify-ca with a server certificate from another CA",
            server.url(
                ROLE,
                "127.0.0.1",
                &server.db,
                &format!(
                    "sslmode=verify-ca&{}",
                    query(&[("sslrootcert", &pki.other_ca)])
                ),
            ),
            &["shard a", "TLS handshake", "UnknownIssuer"],
        ),
        (
            "a server certificate that does not name the host",
            server.url(
                ROLE,
                "db.wrong-name.invalid",
                &server.db,
                &format!(
                    "sslmode=verify-full&hostaddr=127.0.0.1&{}",
                    query(&[("sslrootcert", &pki.ca)])
                ),
            ),
            &["shard a", "TLS handshake", "not valid for name"],
        ),
        (
            "no client certificate where pg_hba.conf says cert",
            server.url(
                CERT_ROLE,
                "127.0.0.1",
                &server.cert_db,
                &format!("sslmode=verify-full&{}", query(&[("sslrootcert", &pki.ca)])),
            ),
            &["shard a", "certificate"],
        ),
        (
            "require against a server without TLS",
            format!("{plain_db}?sslmode=require"),
            &["shard a", "server does not support TLS"],
        ),
    ];
    for (what, url, says) in cases {
        let env = server.env(url);
        let worker = WorkerCommand::new(&env)
            .extra(std::slice::from_ref(&password))
            .default_log()
            .capture()
            .spawn();
        worker.wait_for("shard unreachable at start").await;
        let (status, body) = within(10, "GET /readyz", http_get(worker.metrics, "/readyz"))
            .await
            .unwrap_or_else(|| panic!("{what}: /readyz does not answer"));
        assert_eq!(status, 503, "{what}: ready: {body}");
        let output = worker.stop().await;
        let lines: Vec<&str> = output
            .lines()
            .filter(|l| l.contains("shard unreachable at start"))
            .collect();
        assert_eq!(lines.len(), 1, "{what}: one line:\n{output}");
        eprintln!("{what}: {}", lines[0]);
        for needle in says {
            assert!(
                lines[0].contains(needle),
                "{what}: the line does not say {needle:?}: {}",
                lines[0]
            );
        }
        assert!(
            !output.contains(PASSWORD),
            "{what}: the password was printed:\n{output}"
        );
    }
}

/// A shard that is down at start and comes back refusing the connection for another reason
/// (here: `require` against a server without TLS) gets a warning with the new cause, once,
/// at the default log level; the retries after it log at debug only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cause_after_start_is_one_more_line() {
    let mut pg = PgServer::start(); // its own: stopped and restarted
    let db = fresh_db(&pg, "later").await; // a URL
    pg.stop();
    let env = Env {
        nats_url: shared().nats.url(),
        prefix: unique_name("t"),
        shards: vec![("a".to_string(), format!("{db}?sslmode=require"))],
        intake: "core",
    };
    let worker = WorkerCommand::new(&env).default_log().capture().spawn();
    worker.wait_for("shard unreachable at start").await;
    pg.restart();
    worker.wait_for("server does not support TLS").await;
    let output = worker.stop().await;
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("server does not support TLS"))
        .collect();
    assert_eq!(lines.len(), 1, "one line for the new cause:\n{output}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("shard=a"),
        "{}",
        lines[0]
    );
}
