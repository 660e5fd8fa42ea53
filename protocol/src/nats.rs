//! How the worker, loadgen and the CLI log in to NATS: one set of settings (the same
//! environment variables and flags in all three), read and checked once at start into a
//! [`NatsAccess`], which builds the client's [`async_nats::ConnectOptions`] and turns a failed
//! connection into one line a person can act on.
//!
//! - Login: credentials in `NATS_URL` (as before), or `NATS_USER` + `NATS_PASSWORD_FILE`,
//!   `NATS_TOKEN_FILE`, `NATS_NKEY_SEED_FILE` or `NATS_CREDS_FILE` (a JWT `.creds` file). One
//!   login at a time. Secret files are read once, here; a trailing newline is not part of the
//!   secret.
//! - TLS: a `tls://` server URL, or any of `NATS_TLS_CA_FILE` (the CA that signed the server's
//!   certificate), `NATS_TLS_CERT_FILE` + `NATS_TLS_KEY_FILE` (a client certificate), makes
//!   TLS required. With a CA file the system's trust store is not consulted (so neither is
//!   `SSL_CERT_FILE`). The client library reads the certificate files again for each
//!   connection, so renewed certificates are picked up on reconnect; they are checked here
//!   so that a wrong path stops the start.
//!
//! Secrets never leave this module except into the connect options: `Debug` shows file paths
//! and user names only, errors name the variable and the file, never its content.
//!
//! Behind the `nats` feature, which brings async-nats, nkeys and clap.

use std::fmt;
use std::path::PathBuf;

use async_nats::{ConnectError, ConnectErrorKind, ConnectOptions};

use crate::redact::{NatsAuth, NatsServers, MASK};

/// The login and TLS settings, as given (paths, not contents). Flatten it into a binary's
/// clap arguments; [`NatsSecurityArgs::resolve`] reads and checks them. `global`: the CLI
/// takes them after its subcommand too.
#[derive(Clone, Default, clap::Args)]
pub struct NatsSecurityArgs {
    /// NATS user name; its password is read from NATS_PASSWORD_FILE.
    #[arg(long, env = "NATS_USER", global = true)]
    pub nats_user: Option<String>,
    /// File holding NATS_USER's password (a trailing newline is ignored).
    #[arg(long, env = "NATS_PASSWORD_FILE", value_name = "PATH", global = true)]
    pub nats_password_file: Option<String>,
    /// File holding a NATS token (a trailing newline is ignored).
    #[arg(long, env = "NATS_TOKEN_FILE", value_name = "PATH", global = true)]
    pub nats_token_file: Option<String>,
    /// File holding an NKey seed (`SU…`) to log in with.
    #[arg(long, env = "NATS_NKEY_SEED_FILE", value_name = "PATH", global = true)]
    pub nats_nkey_seed_file: Option<String>,
    /// NATS credentials file (`.creds`: a user JWT and its NKey seed).
    #[arg(long, env = "NATS_CREDS_FILE", value_name = "PATH", global = true)]
    pub nats_creds_file: Option<String>,
    /// PEM file with the CA certificate(s) that signed the NATS server's certificate; makes
    /// TLS required.
    #[arg(long, env = "NATS_TLS_CA_FILE", value_name = "PATH", global = true)]
    pub nats_tls_ca_file: Option<String>,
    /// PEM client certificate for servers that verify clients (with NATS_TLS_KEY_FILE); makes
    /// TLS required.
    #[arg(long, env = "NATS_TLS_CERT_FILE", value_name = "PATH", global = true)]
    pub nats_tls_cert_file: Option<String>,
    /// PEM private key of NATS_TLS_CERT_FILE.
    #[arg(long, env = "NATS_TLS_KEY_FILE", value_name = "PATH", global = true)]
    pub nats_tls_key_file: Option<String>,
    /// Prefix of this program's reply subjects (the answers it waits for). Default:
    /// `_INBOX_<NATS_USER>` when logging in with NATS_USER (each user reads only its own
    /// answers), else `_INBOX`.
    #[arg(long, env = "NATS_INBOX_PREFIX", value_name = "PREFIX", global = true)]
    pub nats_inbox_prefix: Option<String>,
}

/// Paths and the user name are not secrets; the listing is complete on purpose (a new field
/// cannot be added without deciding how it is shown).
impl fmt::Debug for NatsSecurityArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let NatsSecurityArgs {
            nats_user,
            nats_password_file,
            nats_token_file,
            nats_nkey_seed_file,
            nats_creds_file,
            nats_tls_ca_file,
            nats_tls_cert_file,
            nats_tls_key_file,
            nats_inbox_prefix,
        } = self;
        f.debug_struct("NatsSecurityArgs")
            .field("nats_user", nats_user)
            .field("nats_password_file", nats_password_file)
            .field("nats_token_file", nats_token_file)
            .field("nats_nkey_seed_file", nats_nkey_seed_file)
            .field("nats_creds_file", nats_creds_file)
            .field("nats_tls_ca_file", nats_tls_ca_file)
            .field("nats_tls_cert_file", nats_tls_cert_file)
            .field("nats_tls_key_file", nats_tls_key_file)
            .field("nats_inbox_prefix", nats_inbox_prefix)
            .finish()
    }
}

/// A NATS setting that cannot work, naming its variable (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct SettingError {
    pub var: &'static str,
    pub problem: String,
}

impl SettingError {
    /// The command-line flag of [`SettingError::var`] (`NATS_USER` → `nats-user`).
    pub fn flag(&self) -> &'static str {
        flag_of(self.var)
    }
}

/// The flag (without `--`) of one of the variables this module reads.
pub fn flag_of(var: &'static str) -> &'static str {
    match var {
        "NATS_URL" => "nats-url",
        "NATS_USER" => "nats-user",
        "NATS_PASSWORD_FILE" => "nats-password-file",
        "NATS_TOKEN_FILE" => "nats-token-file",
        "NATS_NKEY_SEED_FILE" => "nats-nkey-seed-file",
        "NATS_CREDS_FILE" => "nats-creds-file",
        "NATS_TLS_CA_FILE" => "nats-tls-ca-file",
        "NATS_TLS_CERT_FILE" => "nats-tls-cert-file",
        "NATS_TLS_KEY_FILE" => "nats-tls-key-file",
        "NATS_INBOX_PREFIX" => "nats-inbox-prefix",
        _ => "nats",
    }
}

fn bad(var: &'static str, problem: impl Into<String>) -> SettingError {
    SettingError {
        var,
        problem: problem.into(),
    }
}

/// How the client logs in. `Debug` hides every secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Login {
    None,
    UserPassword {
        user: String,
        password: String,
        /// Where the password came from: `NATS_URL` or `NATS_PASSWORD_FILE <path>`.
        from: String,
    },
    Token {
        token: String,
        from: String,
    },
    Nkey {
        seed: String,
        /// The seed's public key (`U…`): what the server's configuration names.
        public: String,
        path: String,
    },
    Creds {
        contents: String,
        path: String,
    },
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Login::None => f.write_str("None"),
            Login::UserPassword { user, from, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &MASK)
                .field("from", from)
                .finish(),
            Login::Token { from, .. } => f
                .debug_struct("Token")
                .field("token", &MASK)
                .field("from", from)
                .finish(),
            Login::Nkey { public, path, .. } => f
                .debug_struct("Nkey")
                .field("seed", &MASK)
                .field("public", public)
                .field("path", path)
                .finish(),
            Login::Creds { path, .. } => f
                .debug_struct("Creds")
                .field("contents", &MASK)
                .field("path", path)
                .finish(),
        }
    }
}

impl Login {
    /// How the login is described in an error: `for user worker`, `without credentials`…
    pub fn describe(&self) -> String {
        match self {
            Login::None => "without credentials".to_string(),
            Login::UserPassword { user, .. } => format!("for user {user}"),
            Login::Token { from, .. } => format!("with the token of {from}"),
            Login::Nkey { public, path, .. } => {
                format!("of nkey {public} (NATS_NKEY_SEED_FILE {path})")
            }
            Login::Creds { path, .. } => format!("with the credentials of NATS_CREDS_FILE {path}"),
        }
    }
}

/// TLS settings: the files are checked at start and handed to the client by path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsTls {
    pub ca_file: Option<PathBuf>,
    /// Client certificate and its key.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Everything needed to connect: servers without credentials, the login, TLS. `Debug` hides
/// the secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsAccess {
    /// `nats://host:port` (or `tls://…`), one per server, no userinfo.
    pub servers: Vec<String>,
    /// The server list as given, redacted: what messages show.
    pub shown: String,
    pub login: Login,
    /// `Some` when TLS is required (a `tls://` URL, a CA file or a client certificate).
    pub tls: Option<NatsTls>,
    /// Prefix of this client's reply subjects (NATS_INBOX_PREFIX, or see [`default_inbox_prefix`]).
    pub inbox_prefix: String,
}

/// The server's permissions-violation error in `event`, if it is one (`Permissions Violation
/// for Publish to "delete"`), trimmed of its quotes. The server drops what a user may not
/// publish or subscribe to and says so only this way, out of band: a program that waits for an
/// answer should stop on it rather than time out.
pub fn permissions_violation(event: &async_nats::Event) -> Option<String> {
    let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = event else {
        return None;
    };
    let text = text.trim().trim_matches('\'');
    text.to_ascii_lowercase()
        .contains("permissions violation")
        .then(|| text.to_string())
}

/// The inbox prefix a login reads its answers on unless NATS_INBOX_PREFIX says otherwise:
/// `_INBOX_<user>` for a user name that is one subject token of letters, digits, `-` and `_`
/// (so a server can give each user its own, `_INBOX_<user>.>`, and no user reads another's
/// answers), else NATS's default `_INBOX`.
pub fn default_inbox_prefix(login: &Login) -> String {
    match login {
        Login::UserPassword { user, .. }
            if !user.is_empty()
                && user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
        {
            format!("_INBOX_{user}")
        }
        _ => "_INBOX".to_string(),
    }
}

/// A reply-subject prefix: one or more subject tokens, no wildcards, no spaces.
fn inbox_prefix(value: &str) -> Result<String, SettingError> {
    let valid = !value.is_empty()
        && value.split('.').all(|token| {
            !token.is_empty()
                && !token.contains(['*', '>'])
                && !token.chars().any(char::is_whitespace)
        });
    if valid {
        Ok(value.to_string())
    } else {
        Err(bad(
            "NATS_INBOX_PREFIX",
            format!("{value:?} is not a subject prefix (tokens separated by dots, no wildcards)"),
        ))
    }
}

impl NatsSecurityArgs {
    /// Parse `nats_url` (NATS_URL) and read and check every file setting. Errors name the
    /// variable at fault, never a secret.
    pub fn resolve(&self, nats_url: &str) -> Result<NatsAccess, SettingError> {
        let parsed = NatsServers::parse(nats_url).map_err(|problem| bad("NATS_URL", problem))?;
        for (i, server) in parsed.servers.iter().enumerate() {
            check_scheme(i + 1, server, &parsed.shown)?;
            // The client's parse errors name the problem (port, scheme), never the URL.
            if let Err(e) = server.parse::<async_nats::ServerAddr>() {
                return Err(bad(
                    "NATS_URL",
                    format!(
                        "server {} of {:?} is not a NATS server URL ({e})",
                        i + 1,
                        parsed.shown
                    ),
                ));
            }
        }
        let login = self.login(&parsed)?;
        let tls = self.tls(&parsed)?;
        let inbox_prefix = match given(&self.nats_inbox_prefix) {
            Some(prefix) => inbox_prefix(prefix)?,
            None => default_inbox_prefix(&login),
        };
        Ok(NatsAccess {
            servers: parsed.servers,
            shown: parsed.shown,
            login,
            tls,
            inbox_prefix,
        })
    }

    fn login(&self, parsed: &NatsServers) -> Result<Login, SettingError> {
        let user = given(&self.nats_user);
        let password_file = given(&self.nats_password_file);
        match (user, password_file) {
            (Some(_), None) => {
                return Err(bad(
                    "NATS_PASSWORD_FILE",
                    "not set, but NATS_USER is (the password comes from a file)",
                ))
            }
            (None, Some(_)) => return Err(bad("NATS_USER", "not set, but NATS_PASSWORD_FILE is")),
            _ => {}
        }
        let mut chosen: Vec<&'static str> = Vec::new();
        if parsed.auth != NatsAuth::None {
            chosen.push("NATS_URL");
        }
        for (var, value) in [
            ("NATS_PASSWORD_FILE", password_file),
            ("NATS_TOKEN_FILE", given(&self.nats_token_file)),
            ("NATS_NKEY_SEED_FILE", given(&self.nats_nkey_seed_file)),
            ("NATS_CREDS_FILE", given(&self.nats_creds_file)),
        ] {
            if value.is_some() {
                chosen.push(var);
            }
        }
        if let [first, second, ..] = chosen[..] {
            let first = if first == "NATS_URL" {
                "credentials in NATS_URL"
            } else {
                first
            };
            return Err(bad(
                second,
                format!("{first} is set too: give one way to log in"),
            ));
        }
        if let (Some(user), Some(path)) = (user, password_file) {
            let password = read_secret("NATS_PASSWORD_FILE", path)?;
            return Ok(Login::UserPassword {
                user: user.to_string(),
                password,
                from: format!("NATS_PASSWORD_FILE {path}"),
            });
        }
        if let Some(path) = given(&self.nats_token_file) {
            return Ok(Login::Token {
                token: read_secret("NATS_TOKEN_FILE", path)?,
                from: format!("NATS_TOKEN_FILE {path}"),
            });
        }
        if let Some(path) = given(&self.nats_nkey_seed_file) {
            const VAR: &str = "NATS_NKEY_SEED_FILE";
            let seed = read_secret(VAR, path)?.trim().to_string();
            // The library's error says what is wrong with the seed, not what the seed is.
            let pair = nkeys::KeyPair::from_seed(&seed)
                .map_err(|e| bad(VAR, format!("{path} does not hold an NKey seed ({e})")))?;
            return Ok(Login::Nkey {
                public: pair.public_key(),
                seed,
                path: path.to_string(),
            });
        }
        if let Some(path) = given(&self.nats_creds_file) {
            const VAR: &str = "NATS_CREDS_FILE";
            // Whole: the format's closing line ends with its newline.
            let contents = std::fs::read_to_string(path)
                .map_err(|e| bad(VAR, format!("cannot read {path}: {e}")))?;
            // Parsed now so that a broken file stops the start; its errors hold no content.
            ConnectOptions::new().credentials(&contents).map_err(|e| {
                bad(
                    VAR,
                    format!("{path} is not a NATS credentials file (.creds): {e}"),
                )
            })?;
            return Ok(Login::Creds {
                contents,
                path: path.to_string(),
            });
        }
        Ok(match &parsed.auth {
            NatsAuth::None => Login::None,
            NatsAuth::UserPassword { user, password } => Login::UserPassword {
                user: user.clone(),
                password: password.clone(),
                from: "NATS_URL".to_string(),
            },
            NatsAuth::Token(token) => Login::Token {
                token: token.clone(),
                from: "NATS_URL".to_string(),
            },
        })
    }

    fn tls(&self, parsed: &NatsServers) -> Result<Option<NatsTls>, SettingError> {
        let ca_file = given(&self.nats_tls_ca_file)
            .map(|path| pem_file("NATS_TLS_CA_FILE", path, "CERTIFICATE"))
            .transpose()?;
        let client = match (
            given(&self.nats_tls_cert_file),
            given(&self.nats_tls_key_file),
        ) {
            (Some(cert), Some(key)) => Some((
                pem_file("NATS_TLS_CERT_FILE", cert, "CERTIFICATE")?,
                pem_file("NATS_TLS_KEY_FILE", key, "PRIVATE KEY")?,
            )),
            (Some(_), None) => {
                return Err(bad(
                    "NATS_TLS_KEY_FILE",
                    "not set, but NATS_TLS_CERT_FILE is (a client certificate needs its key)",
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "NATS_TLS_CERT_FILE",
                    "not set, but NATS_TLS_KEY_FILE is",
                ))
            }
            (None, None) => None,
        };
        let tls_url = parsed
            .servers
            .iter()
            .any(|s| s.to_ascii_lowercase().starts_with("tls://"));
        Ok((tls_url || ca_file.is_some() || client.is_some())
            .then_some(NatsTls { ca_file, client }))
    }
}

/// The schemes a server in `NATS_URL` may have.
pub const NATS_SCHEMES: [&str; 4] = ["nats", "tls", "ws", "wss"];

/// Server `n` of `NATS_URL` (`server`: without credentials; `shown`: the whole list,
/// redacted) must name its scheme. The client library would silently read `127.0.0.1:4222` as
/// `nats://127.0.0.1:4222` and connect to whatever listens there, so a server without a scheme
/// is refused, with the fix spelt out. Schemes other than [`NATS_SCHEMES`] are refused too (the
/// client's own check, said here in the same words).
fn check_scheme(n: usize, server: &str, shown: &str) -> Result<(), SettingError> {
    let Some((scheme, _)) = server.split_once("://") else {
        return Err(bad(
            "NATS_URL",
            format!(
                "server {n} of {shown:?} has no scheme: write nats://{server} (or tls://, \
                 ws://, wss://)"
            ),
        ));
    };
    if NATS_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()) {
        return Ok(());
    }
    Err(bad(
        "NATS_URL",
        format!(
            "server {n} of {shown:?} has the scheme {scheme}://, not one of nats://, tls://, \
             ws://, wss:// (e.g. NATS_URL=nats://127.0.0.1:4222)"
        ),
    ))
}

/// A setting that is set and not blank.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// A secret file's content without its trailing newline (`echo secret > file` writes one).
fn read_secret(var: &'static str, path: &str) -> Result<String, SettingError> {
    let content =
        std::fs::read_to_string(path).map_err(|e| bad(var, format!("cannot read {path}: {e}")))?;
    let secret = content.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(bad(var, format!("{path} is empty")));
    }
    Ok(secret.to_string())
}

/// A readable PEM file holding a `-----BEGIN … {label}-----` block.
fn pem_file(var: &'static str, path: &str, label: &str) -> Result<PathBuf, SettingError> {
    let content = std::fs::read(path).map_err(|e| bad(var, format!("cannot read {path}: {e}")))?;
    let text = String::from_utf8_lossy(&content);
    let has_block = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.contains(label));
    if !has_block {
        return Err(bad(
            var,
            format!("{path} holds no PEM {label} (-----BEGIN … {label}-----)"),
        ));
    }
    Ok(PathBuf::from(path))
}

impl NatsAccess {
    /// Connect options with the login and TLS settings; add the binary's own (name, timeouts,
    /// callbacks) and connect them to [`NatsAccess::servers`]. Credentials travel here, never
    /// inside the URLs the client logs.
    pub fn options(&self) -> Result<ConnectOptions, SettingError> {
        let mut options = ConnectOptions::new().custom_inbox_prefix(&self.inbox_prefix);
        options = match &self.login {
            Login::None => options,
            Login::UserPassword { user, password, .. } => {
                options.user_and_password(user.clone(), password.clone())
            }
            Login::Token { token, .. } => options.token(token.clone()),
            Login::Nkey { seed, .. } => options.nkey(seed.clone()),
            // Checked by `resolve`; an error here would mean the file was not what it read.
            Login::Creds { contents, path } => options.credentials(contents).map_err(|e| {
                bad(
                    "NATS_CREDS_FILE",
                    format!("{path} is not a NATS credentials file (.creds): {e}"),
                )
            })?,
        };
        if let Some(tls) = &self.tls {
            options = options.require_tls(true);
            if let Some(ca) = &tls.ca_file {
                options = options.add_root_certificates(ca.clone());
            }
            if let Some((cert, key)) = &tls.client {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        Ok(options)
    }

    /// Connect to [`NatsAccess::servers`] with [`NatsAccess::options`] plus what `customize`
    /// adds (name, timeouts, callbacks); a failure is described by [`NatsAccess::failure`].
    pub async fn connect(
        &self,
        customize: impl FnOnce(ConnectOptions) -> ConnectOptions,
    ) -> Result<async_nats::Client, ConnectFailure> {
        let options = self.options().map_err(|e| ConnectFailure {
            summary: "cannot use the NATS login settings".to_string(),
            rejected: true,
            source: ConnectError::with_source(ConnectErrorKind::Authentication, e),
        })?;
        customize(options)
            .connect(self.servers.as_slice())
            .await
            .map_err(|e| self.failure(e))
    }

    /// `error` of a connection attempt as one line: what failed, with a hint where the cause
    /// is on this side. [`ConnectFailure::rejected`] tells a refusal (login, TLS), which no
    /// retry will cure, from an unreachable server.
    pub fn failure(&self, error: ConnectError) -> ConnectFailure {
        let shown = &self.shown;
        let (rejected, summary) = match error.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                let hint = match self.login {
                    Login::None => {
                        " (it requires credentials: set NATS_USER and NATS_PASSWORD_FILE, \
                         NATS_TOKEN_FILE, NATS_NKEY_SEED_FILE or NATS_CREDS_FILE)"
                    }
                    _ => "",
                };
                (
                    true,
                    format!(
                        "NATS at {shown} refused the login {}{hint}",
                        self.login.describe()
                    ),
                )
            }
            ConnectErrorKind::Tls => (
                true,
                format!("cannot set up TLS for NATS at {shown} (NATS_TLS_* files)"),
            ),
            _ => match tls_error(&error) {
                Some(tls) => (
                    true,
                    format!("TLS with NATS at {shown} failed{}", self.tls_hint(tls)),
                ),
                None => (false, format!("cannot connect to NATS at {shown}")),
            },
        };
        ConnectFailure {
            summary,
            rejected,
            source: error,
        }
    }

    fn tls_hint(&self, error: &async_nats::rustls::Error) -> &'static str {
        use async_nats::rustls::Error;
        let has_ca = self.tls.as_ref().is_some_and(|t| t.ca_file.is_some());
        match error {
            Error::InvalidCertificate(_) if has_ca => {
                " (its certificate is not one NATS_TLS_CA_FILE vouches for)"
            }
            Error::InvalidCertificate(_) => {
                " (its certificate is not signed by a CA this system trusts: set NATS_TLS_CA_FILE)"
            }
            Error::AlertReceived(_) => {
                if self.tls.as_ref().is_some_and(|t| t.client.is_some()) {
                    " (the server refused the handshake: does it accept the client certificate \
                     of NATS_TLS_CERT_FILE?)"
                } else {
                    " (the server refused the handshake: does it require a client certificate? \
                     set NATS_TLS_CERT_FILE and NATS_TLS_KEY_FILE)"
                }
            }
            _ => "",
        }
    }
}

/// The TLS error somewhere in `error`'s causes (the client wraps it in an I/O error).
fn tls_error(error: &ConnectError) -> Option<&async_nats::rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<async_nats::rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<async_nats::rustls::Error>())
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

/// A connection that could not be made. Shown as one line with its cause through
/// [`crate::chain::Chain`]: `NATS at nats://h:4222 refused the login for user worker:
/// authorization violation: …`.
#[derive(Debug, thiserror::Error)]
#[error("{summary}")]
pub struct ConnectFailure {
    pub summary: String,
    /// The server refused the login, or TLS failed: retrying will not help.
    pub rejected: bool,
    #[source]
    pub source: ConnectError,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MARKER: &str = "S3CRET-MARKER-nats";

    fn file(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(content.as_bytes()).expect("write temp file");
        f
    }

    fn path(f: &tempfile::NamedTempFile) -> Option<String> {
        Some(f.path().display().to_string())
    }

    #[test]
    fn password_file_is_read_once_without_its_newline() {
        let password = file(&format!("{MARKER}\n"));
        let args = NatsSecurityArgs {
            nats_user: Some("worker".into()),
            nats_password_file: path(&password),
            ..Default::default()
        };
        let access = args.resolve("nats://h:4222").unwrap();
        assert_eq!(
            access.login,
            Login::UserPassword {
                user: "worker".into(),
                password: MARKER.into(),
                from: format!("NATS_PASSWORD_FILE {}", password.path().display()),
            }
        );
        assert_eq!(access.tls, None);
        // Read once: removing the file changes nothing for the options.
        drop(password);
        assert!(access.options().is_ok());
        let debug = format!("{access:?} {args:?}");
        assert!(!debug.contains(MARKER), "{debug}");
    }

    #[test]
    fn url_credentials_still_work_and_stay_hidden() {
        let access = NatsSecurityArgs::default()
            .resolve(&format!("nats://{MARKER}@h1:4222,nats://h2"))
            .unwrap();
        assert_eq!(access.servers, ["nats://h1:4222", "nats://h2"]);
        assert!(
            matches!(&access.login, Login::Token { token, from } if token == MARKER && from == "NATS_URL")
        );
        assert!(!format!("{access:?}").contains(MARKER));
    }

    #[test]
    fn one_login_at_a_time() {
        let secret = file(MARKER);
        let cases = [
            (
                NatsSecurityArgs {
                    nats_token_file: path(&secret),
                    ..Default::default()
                },
                format!("nats://u:{MARKER}@h"),
                "NATS_TOKEN_FILE",
            ),
            (
                NatsSecurityArgs {
                    nats_token_file: path(&secret),
                    nats_nkey_seed_file: path(&secret),
                    ..Default::default()
                },
                "nats://h".to_string(),
                "NATS_NKEY_SEED_FILE",
            ),
            (
                NatsSecurityArgs {
                    nats_user: Some("u".into()),
                    ..Default::default()
                },
                "nats://h".to_string(),
                "NATS_PASSWORD_FILE",
            ),
            (
                NatsSecurityArgs {
                    nats_password_file: path(&secret),
                    ..Default::default()
                },
                "nats://h".to_string(),
                "NATS_USER",
            ),
            (
                NatsSecurityArgs {
                    nats_tls_cert_file: path(&secret),
                    ..Default::default()
                },
                "nats://h".to_string(),
                "NATS_TLS_KEY_FILE",
            ),
        ];
        for (args, url, var) in cases {
            let err = args.resolve(&url).unwrap_err();
            assert_eq!(err.var, var, "{err}");
            assert!(!err.to_string().contains(MARKER), "{err}");
        }
    }

    #[test]
    fn bad_files_are_named_without_their_content() {
        let not_a_seed = file(&format!("{MARKER}\n"));
        let empty = file("\n");
        let not_pem = file(MARKER);
        let cases = [
            (
                NatsSecurityArgs {
                    nats_nkey_seed_file: path(&not_a_seed),
                    ..Default::default()
                },
                "NATS_NKEY_SEED_FILE",
                "does not hold an NKey seed",
            ),
            (
                NatsSecurityArgs {
                    nats_creds_file: path(&not_a_seed),
                    ..Default::default()
                },
                "NATS_CREDS_FILE",
                "not a NATS credentials file",
            ),
            (
                NatsSecurityArgs {
                    nats_token_file: path(&empty),
                    ..Default::default()
                },
                "NATS_TOKEN_FILE",
                "is empty",
            ),
            (
                NatsSecurityArgs {
                    nats_token_file: Some("/nonexistent/token".into()),
                    ..Default::default()
                },
                "NATS_TOKEN_FILE",
                "cannot read /nonexistent/token",
            ),
            (
                NatsSecurityArgs {
                    nats_tls_ca_file: path(&not_pem),
                    ..Default::default()
                },
                "NATS_TLS_CA_FILE",
                "holds no PEM CERTIFICATE",
            ),
        ];
        for (args, var, says) in cases {
            let err = args.resolve("nats://h").unwrap_err();
            let text = err.to_string();
            assert_eq!(err.var, var, "{text}");
            assert!(text.contains(says), "{text}");
            assert!(!text.contains(MARKER), "{text}");
            assert_eq!(err.flag(), flag_of(var));
        }
    }

    #[test]
    fn nkey_seed_gives_its_public_key() {
        let pair = nkeys::KeyPair::new_user();
        let seed = file(&format!("{}\n", pair.seed().unwrap()));
        let access = NatsSecurityArgs {
            nats_nkey_seed_file: path(&seed),
            ..Default::default()
        }
        .resolve("nats://h")
        .unwrap();
        match &access.login {
            Login::Nkey { public, .. } => assert_eq!(public, &pair.public_key()),
            other => panic!("{other:?}"),
        }
        assert!(!format!("{access:?}").contains(&pair.seed().unwrap()));
    }

    #[test]
    fn a_server_without_a_scheme_is_refused_with_the_fix() {
        for (url, n, fix) in [
            ("127.0.0.1:4222", 1, "write nats://127.0.0.1:4222"),
            ("nats://h1:4222,h2:4222", 2, "write nats://h2:4222"),
            (
                &format!("u:{MARKER}@h:4222") as &str,
                1,
                "write nats://h:4222",
            ),
            ("localhost", 1, "write nats://localhost"),
        ] {
            let err = NatsSecurityArgs::default().resolve(url).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.var, "NATS_URL", "{text}");
            assert!(
                text.starts_with(&format!("NATS_URL: server {n} of "))
                    && text.contains("has no scheme")
                    && text.contains(fix),
                "{url}: {text}"
            );
            assert!(!text.contains(MARKER), "{text}");
        }
        let err = NatsSecurityArgs::default()
            .resolve(&format!("http://u:{MARKER}@h:8222"))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("has the scheme http://"), "{text}");
        assert!(!text.contains(MARKER), "{text}");
    }

    #[test]
    fn every_nats_scheme_is_accepted() {
        for url in [
            "nats://h:4222",
            "tls://h:4222",
            "ws://h:8080",
            "wss://h:443",
            "NATS://h:4222",
            "nats://h1,tls://h2:4223",
        ] {
            let access = NatsSecurityArgs::default().resolve(url);
            assert!(access.is_ok(), "{url}: {:?}", access.err());
        }
    }

    #[test]
    fn tls_is_required_by_a_tls_url_or_a_ca() {
        let ca = file("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
        let plain = NatsSecurityArgs::default().resolve("nats://h").unwrap();
        assert_eq!(plain.tls, None);
        let by_url = NatsSecurityArgs::default().resolve("tls://h:4222").unwrap();
        assert_eq!(by_url.tls, Some(NatsTls::default()));
        let by_ca = NatsSecurityArgs {
            nats_tls_ca_file: path(&ca),
            ..Default::default()
        }
        .resolve("nats://h")
        .unwrap();
        assert_eq!(
            by_ca.tls.and_then(|t| t.ca_file),
            Some(ca.path().to_path_buf())
        );
    }

    #[test]
    fn failures_say_what_was_refused() {
        let access = NatsSecurityArgs::default()
            .resolve(&format!("nats://worker:{MARKER}@h:4222"))
            .unwrap();
        let refused = access.failure(ConnectError::new(ConnectErrorKind::AuthorizationViolation));
        assert!(refused.rejected);
        assert_eq!(
            refused.summary,
            "NATS at nats://worker:***@h:4222 refused the login for user worker"
        );
        let unreachable = access.failure(ConnectError::with_source(
            ConnectErrorKind::Io,
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        ));
        assert!(!unreachable.rejected);
        let tls = access.failure(ConnectError::with_source(
            ConnectErrorKind::Io,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                async_nats::rustls::Error::InvalidCertificate(
                    async_nats::rustls::CertificateError::UnknownIssuer,
                ),
            ),
        ));
        assert!(tls.rejected);
        assert!(
            tls.summary.starts_with("TLS with NATS at"),
            "{}",
            tls.summary
        );
    }
}
