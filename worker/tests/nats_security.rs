//! Locked doors (issue 13, NATS): the worker, loadgen and the CLI log in to real nats-servers
//! that require a login (user and password over TLS with verified client certificates, a
//! token, an NKey, a JWT `.creds` file), and each of them stops at start with one clear line,
//! without the secret, when the server refuses the login or the TLS handshake. (The shipped
//! deploy/nats/nats-server.conf is tried in side_doors.rs.)
//!
//! The TLS material (a CA, a second CA that signed nothing the server uses, server and client
//! certificates) and the JWTs (operator, account, users) are made here, once per test binary.

mod support;

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use support::*;

/// Part of every secret (passwords, tokens): no output may contain it.
const MARKER: &str = "S3CRET-natsec-7f2a";

fn assert_no_secret(what: &str, output: &str, secrets: &[&str]) {
    for secret in secrets.iter().chain([&MARKER]) {
        assert!(
            !output.contains(secret),
            "{what}: a secret was printed:\n{output}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Files: TLS material, secrets, JWTs
// ---------------------------------------------------------------------------------------------

/// Everything written once per test binary, in one temp dir.
struct Material {
    dir: tempfile::TempDir,
}

impl Material {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Write `content` to a new file `name` and return its path.
    fn write(&self, name: &str, content: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.display().to_string()
    }
}

/// `ca.pem` signs `server.pem` (for 127.0.0.1 and localhost) and `client.pem`; `other-ca.pem`
/// is a CA the server's certificate does not come from.
fn material() -> &'static Material {
    static MATERIAL: OnceLock<Material> = OnceLock::new();
    MATERIAL.get_or_init(|| {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let material = Material {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let new_ca = |name: &str| {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).expect("self-signed CA");
            (cert, Issuer::new(params, key))
        };
        let (ca_cert, ca) = new_ca("logstore test CA");
        let (other_cert, _) = new_ca("some other CA");
        material.write("ca.pem", &ca_cert.pem());
        material.write("other-ca.pem", &other_cert.pem());
        for (name, sans, usage) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            ("client", vec![], ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &ca).expect("sign");
            material.write(&format!("{name}.pem"), &cert.pem());
            material.write(&format!("{name}-key.pem"), &key.serialize_pem());
        }
        material
    })
}

/// A JWT as nats-server reads them: `{"typ":"JWT","alg":"ed25519-nkey"}`, claims, signed by
/// `issuer`'s key.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": unique_name("jti").to_uppercase(),
        "iat": now,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{payload}");
    let signature = issuer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A user JWT signed by `account` plus the user's seed, in the `.creds` format.
fn creds(account: &nkeys::KeyPair, name: &str) -> String {
    let user = nkeys::KeyPair::new_user();
    let token = jwt(
        account,
        &user.public_key(),
        name,
        serde_json::json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2
        }),
    );
    format!(
        "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().expect("user seed")
    )
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

type Vars = Vec<(&'static str, String)>;

/// Runs `bin` and expects it to succeed; returns its stdout.
async fn run_ok(
    bin: &str,
    args: &[&str],
    env: &[(&'static str, String)],
    secrets: &[&str],
) -> String {
    let (code, stdout, stderr) = run_once(bin, args, env, 40).await;
    assert_eq!(code, Some(0), "{bin} {args:?}:\n{stdout}\n{stderr}");
    assert_no_secret(
        &format!("{bin} {args:?}"),
        &format!("{stdout}{stderr}"),
        secrets,
    );
    stdout
}

/// Runs `bin`, expects it to fail at start, and checks its last line: `bin: …` holding
/// `says`, nothing after it, no secret anywhere. Returns that line.
async fn refused(
    bin: &str,
    args: &[&str],
    env: &[(&'static str, String)],
    says: &str,
    secrets: &[&str],
) -> String {
    let (code, stdout, stderr) = run_once(bin, args, env, 40).await;
    let what = format!("{bin} {args:?} ({says})");
    assert!(
        code.is_some_and(|c| c != 0),
        "{what}: exit {code:?}\n{stdout}\n{stderr}"
    );
    assert_no_secret(&what, &format!("{stdout}{stderr}"), secrets);
    let prefix = format!("{bin}: ");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(lines.len(), 1, "{what}: one error line:\n{stderr}");
    let line = lines[0];
    println!("{what}: {line}");
    assert_eq!(
        stderr.lines().last(),
        Some(line),
        "{what}: the error comes last:\n{stderr}"
    );
    assert!(line.contains(says), "{what}:\n{stderr}");
    if bin != "worker" {
        // The CLI and loadgen print nothing else at all.
        assert_eq!(stderr.lines().count(), 1, "{what}:\n{stderr}");
    }
    // Exit codes: a configuration error is 2 (worker); a refusal is loadgen's and the worker's
    // 1 and the CLI's 4 ("NATS could not be reached or refused the login").
    let expected = match bin {
        _ if line.contains("invalid configuration") => 2,
        "logstore" => 4,
        _ => 1,
    };
    assert_eq!(code, Some(expected), "{what}:\n{stderr}");
    line.to_string()
}

/// The settings of `env` (per-test subjects, stream and shards), with `nats_url`, as the
/// worker's environment; INTAKE core unless `env.intake` says otherwise.
fn worker_env(env: &Env, nats_url: &str, login: &[(&'static str, String)]) -> Vars {
    // METRICS_ADDR 127.0.0.1:0 (any free port) for the runs that must fail at start: the
    // default :2112 may be taken by another worker on this machine. `all_three_work`'s worker
    // gets its own.
    let mut vars: Vars = env
        .settings(0)
        .into_iter()
        .map(|(var, value)| {
            if var == "NATS_URL" {
                (var, nats_url.to_string())
            } else {
                (var, value)
            }
        })
        .collect();
    vars.extend(login.iter().cloned());
    // NATS TLS must not depend on it: a CA file replaces the system's trust store.
    vars.push((
        "SSL_CERT_FILE",
        "/nonexistent/ssl-cert-file.pem".to_string(),
    ));
    vars
}

/// The CLI's and loadgen's environment for `env`: its NATS_* subjects, `nats_url`, `login`.
fn client_env(env: &Env, nats_url: &str, login: &[(&'static str, String)]) -> Vars {
    worker_env(env, nats_url, login)
        .into_iter()
        .filter(|(var, _)| var.starts_with("NATS_") || *var == "SSL_CERT_FILE")
        .chain([("LOGSTORE_TIMEOUT_MS", "5000".to_string())])
        .collect()
}

fn with(base: &[(&'static str, String)], extra: &[(&'static str, String)]) -> Vars {
    let mut vars: Vars = base
        .iter()
        .filter(|(var, _)| !extra.iter().any(|(v, _)| v == var))
        .cloned()
        .collect();
    vars.extend(extra.iter().cloned());
    vars
}

fn without(base: &[(&'static str, String)], drop: &[&str]) -> Vars {
    base.iter()
        .filter(|(var, _)| !drop.contains(var))
        .cloned()
        .collect()
}

/// The worker, the CLI and loadgen all work with `login` on `nats_url`: the worker becomes
/// ready, the CLI appends and reads the entry back, loadgen appends and verifies.
async fn all_three_work(
    env: &Env,
    nats_url: &str,
    worker_login: &[(&'static str, String)],
    client_login: &[(&'static str, String)],
    secrets: &[&str],
) -> WorkerProcess {
    // The worker's environment is exactly `worker_env` (capture inherits nothing), with its
    // own metrics port.
    let worker = WorkerCommand::new(env)
        .extra(&without(
            &worker_env(env, nats_url, worker_login),
            &["METRICS_ADDR"],
        ))
        .log("debug,async_nats=trace")
        .capture()
        .start()
        .await;
    let cli = client_env(env, nats_url, client_login);
    let id = "4242";
    let text = format!("hello over {nats_url}");
    run_ok("logstore", &["append", id, &text], &cli, secrets).await;
    let read = run_ok("logstore", &["get", id], &cli, secrets).await;
    assert!(read.contains(&text), "logstore get {id}:\n{read}");
    let summary = run_ok(
        "loadgen",
        &[
            "--count",
            "5",
            "--rate",
            "100",
            "--verify",
            "--progress-secs",
            "0",
        ],
        &cli,
        secrets,
    )
    .await;
    assert!(summary.contains("verify"), "loadgen:\n{summary}");
    let metrics = within(10, "GET /metrics", http_get(worker.metrics, "/metrics"))
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert_no_secret("/metrics", &metrics, secrets);
    worker
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Done-when 1: TLS with verified client certificates and users with passwords. All three
/// binaries work with the CA, the client certificate and a password file; without
/// credentials, with a wrong password, with a CA that did not sign the server's certificate
/// and without a client certificate, each stops at start with one line that says so. The
/// worker keeps its login over a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_and_passwords() {
    let m = material();
    let worker_password = format!("w-{MARKER}");
    let client_password = format!("c-{MARKER}");
    let mut nats = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n\
         authorization {{\n  users = [\n    {{ user: worker, password: \"{worker_password}\" }}\n    {{ user: client, password: \"{client_password}\" }}\n  ]\n}}\n",
        m.path("server.pem"),
        m.path("server-key.pem"),
        m.path("ca.pem"),
    ));
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let env = Env::shared(&["a"]).await;
    let secrets = [worker_password.as_str(), client_password.as_str()];
    let tls: Vars = vec![
        ("NATS_TLS_CA_FILE", m.path("ca.pem")),
        ("NATS_TLS_CERT_FILE", m.path("client.pem")),
        ("NATS_TLS_KEY_FILE", m.path("client-key.pem")),
    ];
    let worker_login = with(
        &tls,
        &[
            ("NATS_USER", "worker".to_string()),
            // With its newline, as `echo password > file` writes it.
            (
                "NATS_PASSWORD_FILE",
                m.write("worker.password", &format!("{worker_password}\n")),
            ),
        ],
    );
    let client_login = with(
        &tls,
        &[
            ("NATS_USER", "client".to_string()),
            (
                "NATS_PASSWORD_FILE",
                m.write("client.password", &format!("{client_password}\n")),
            ),
        ],
    );

    let worker = all_three_work(&env, &url, &worker_login, &client_login, &secrets).await;

    // A reconnect (the server restarts with the same configuration) keeps login and TLS.
    nats.restart_as_started();
    let addr = worker.metrics;
    eventually(30, "the worker reconnects", || async move {
        let (_, body) = http_get(addr, "/metrics").await?;
        let reconnected = metric_sum(&body, "logstore_nats_reconnects_total", &[]) >= 1.0;
        let ready = matches!(http_get(addr, "/readyz").await, Some((200, _)));
        (reconnected && ready).then_some(())
    })
    .await;
    let cli = client_env(&env, &url, &client_login);
    run_ok(
        "logstore",
        &["append", "4243", "after the reconnect"],
        &cli,
        &secrets,
    )
    .await;
    let read = run_ok("logstore", &["get", "4243"], &cli, &secrets).await;
    assert!(read.contains("after the reconnect"), "{read}");
    let output = worker.kill_and_read().await;
    assert!(output.contains("connected to NATS"), "{output}");
    // async-nats at trace level included: no password.
    assert_no_secret("the worker's log at async_nats=trace", &output, &secrets);

    // Refusals: each binary, each way.
    let wrong_password = m.write("wrong.password", &format!("wrong-{MARKER}\n"));
    let cases: Vec<(&str, Vars, Vars, &str)> = vec![
        (
            "no credentials",
            tls.clone(),
            tls.clone(),
            "refused the login without credentials (it requires credentials: set NATS_USER",
        ),
        (
            "a wrong password",
            with(
                &worker_login,
                &[("NATS_PASSWORD_FILE", wrong_password.clone())],
            ),
            with(
                &client_login,
                &[("NATS_PASSWORD_FILE", wrong_password.clone())],
            ),
            "refused the login for user",
        ),
        (
            "a CA that did not sign the server's certificate",
            with(
                &worker_login,
                &[("NATS_TLS_CA_FILE", m.path("other-ca.pem"))],
            ),
            with(
                &client_login,
                &[("NATS_TLS_CA_FILE", m.path("other-ca.pem"))],
            ),
            "failed (its certificate is not one NATS_TLS_CA_FILE vouches for)",
        ),
        (
            "no client certificate",
            without(&worker_login, &["NATS_TLS_CERT_FILE", "NATS_TLS_KEY_FILE"]),
            without(&client_login, &["NATS_TLS_CERT_FILE", "NATS_TLS_KEY_FILE"]),
            "failed (the server refused the handshake: does it require a client certificate?",
        ),
    ];
    for (what, worker_login, client_login, says) in cases {
        println!("case: {what}");
        let line = refused(
            "worker",
            &[],
            &worker_env(&env, &url, &worker_login),
            says,
            &secrets,
        )
        .await;
        assert!(line.contains(&url), "names the server: {line}");
        let cli = client_env(&env, &url, &client_login);
        refused("logstore", &["stats", "1"], &cli, says, &secrets).await;
        refused("loadgen", &["--count", "1"], &cli, says, &secrets).await;
    }
    // A missing file is a configuration error: it names the variable (exit 2).
    let missing = with(
        &worker_login,
        &[("NATS_PASSWORD_FILE", m.path("no-such-file"))],
    );
    refused(
        "worker",
        &[],
        &worker_env(&env, &url, &missing),
        "NATS_PASSWORD_FILE: cannot read",
        &secrets,
    )
    .await;
}

/// `--help` names the new settings; their values (paths) are shown by nobody, and the secrets
/// in the files cannot be.
#[tokio::test]
async fn help_names_the_login_settings() {
    for bin in ["worker", "loadgen", "logstore"] {
        let out = run_ok(bin, &["--help"], &[], &[]).await;
        for var in [
            "NATS_USER",
            "NATS_PASSWORD_FILE",
            "NATS_TOKEN_FILE",
            "NATS_NKEY_SEED_FILE",
            "NATS_CREDS_FILE",
            "NATS_TLS_CA_FILE",
            "NATS_TLS_CERT_FILE",
            "NATS_TLS_KEY_FILE",
        ] {
            assert!(
                out.contains(&format!("[env: {var}")),
                "{bin} --help lacks {var}:\n{out}"
            );
        }
    }
}

/// Done-when 2: a token, an NKey and a JWT `.creds` file, each on a server that requires it
/// (the JWT one in operator mode). All three binaries work with the right one and stop at
/// start with one line naming the refused login with a wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_nkey_and_creds_logins() {
    let m = material();
    let env = Env::shared(&["a"]).await;

    // Token.
    let token = format!("t-{MARKER}");
    let nats = NatsServer::start_with_config(&format!("authorization {{ token: \"{token}\" }}\n"));
    let url = nats.url();
    let login: Vars = vec![("NATS_TOKEN_FILE", m.write("token", &format!("{token}\n")))];
    let wrong: Vars = vec![(
        "NATS_TOKEN_FILE",
        m.write("wrong-token", &format!("x-{MARKER}")),
    )];
    check_login(
        &env,
        &url,
        &login,
        &wrong,
        "refused the login with the token of NATS_TOKEN_FILE",
        &[&token],
    )
    .await;
    drop(nats);

    // NKey.
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    ));
    let url = nats.url();
    let login: Vars = vec![(
        "NATS_NKEY_SEED_FILE",
        m.write("user.nk", &format!("{seed}\n")),
    )];
    let stranger = nkeys::KeyPair::new_user();
    let stranger_seed = stranger.seed().expect("seed");
    let wrong: Vars = vec![(
        "NATS_NKEY_SEED_FILE",
        m.write("stranger.nk", &stranger_seed),
    )];
    check_login(
        &env,
        &url,
        &login,
        &wrong,
        &format!("refused the login of nkey {}", stranger.public_key()),
        &[&seed, &stranger_seed],
    )
    .await;
    drop(nats);

    // JWT: an operator, an account it signed, users the account signed.
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({ "type": "operator", "version": 2 }),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "logstore",
        serde_json::json!({
            // JetStream on (unlimited): the workers keep their ring record in a KV bucket.
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
            },
            "default_permissions": { "pub": {}, "sub": {} },
            "type": "account", "version": 2
        }),
    );
    // JetStream (the test servers run with -js) wants a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({ "type": "account", "version": 2 }),
    );
    let nats = NatsServer::start_with_config(&format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {system}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {system}: \"{system_jwt}\"\n  {account}: \"{account_jwt}\"\n}}\n",
        system = system.public_key(),
        account = account.public_key(),
    ));
    let url = nats.url();
    let user_creds = creds(&account, "logstore-user");
    // Signed by an account the server does not know.
    let stranger_creds = creds(&nkeys::KeyPair::new_account(), "stranger");
    let login: Vars = vec![("NATS_CREDS_FILE", m.write("user.creds", &user_creds))];
    let wrong_path = m.write("stranger.creds", &stranger_creds);
    let wrong: Vars = vec![("NATS_CREDS_FILE", wrong_path.clone())];
    let seeds: Vec<String> = [&user_creds, &stranger_creds]
        .iter()
        .filter_map(|c| c.lines().find(|l| l.starts_with("SU")).map(str::to_string))
        .collect();
    let secrets: Vec<&str> = seeds.iter().map(String::as_str).collect();
    check_login(
        &env,
        &url,
        &login,
        &wrong,
        &format!("refused the login with the credentials of NATS_CREDS_FILE {wrong_path}"),
        &secrets,
    )
    .await;
}

/// `login` works for all three binaries on `url` (core intake); `wrong` is refused by each
/// with a line holding `says`.
async fn check_login(
    env: &Env,
    url: &str,
    login: &[(&'static str, String)],
    wrong: &[(&'static str, String)],
    says: &str,
    secrets: &[&str],
) {
    let worker = all_three_work(env, url, login, login, secrets).await;
    let output = worker.kill_and_read().await;
    assert_no_secret("the worker's log at async_nats=trace", &output, secrets);
    refused("worker", &[], &worker_env(env, url, wrong), says, secrets).await;
    let cli = client_env(env, url, wrong);
    refused("logstore", &["stats", "1"], &cli, says, secrets).await;
    refused("loadgen", &["--count", "1"], &cli, says, secrets).await;
    // No login at all.
    let none = client_env(env, url, &[]);
    refused(
        "logstore",
        &["stats", "1"],
        &none,
        "refused the login without credentials",
        secrets,
    )
    .await;
}
