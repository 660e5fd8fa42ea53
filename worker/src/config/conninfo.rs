//! libpq's connection parameters in a shard URL or key/value string: [`split`] takes the TLS
//! parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) out for `store::tls`, since
//! tokio-postgres refuses the ones it does not know; [`with_defaults`] fills what a connection
//! string does not say; [`param`] reads one parameter; [`for_writing`] applies the worker's
//! rule for a list of hosts (an HA pair: `target_session_attrs=read-write` unless it says
//! otherwise); quoting and percent-encoding for building one. Parsing only: the rustls
//! configuration these settings make is `store::tls`'s.

use std::path::PathBuf;

use logstore_protocol::redact::{percent_decode, BadEscape};

/// libpq's `sslmode` values, except `allow` (plaintext first), which tokio-postgres cannot do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }

    /// What tokio-postgres is told: whether to ask for TLS, and whether plaintext may follow
    /// a server's "no TLS here".
    pub fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A shard URL's TLS parameters. None of them is a secret (a key is named by its path).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The parameters [`split`] takes out of a URL.
const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Split a connection string into what tokio-postgres parses and our TLS settings. URLs
/// (`postgres://…?sslmode=…&sslrootcert=…`) lose the four TLS parameters (later ones win, as in
/// tokio-postgres); other query parameters stay as they were. The key=value form (built from
/// POSTGRES_IPS: `host=h port=5432 sslmode='verify-full' …`) likewise, its other pairs
/// re-quoted. Errors never repeat the connection string.
pub fn split(conn: &str) -> Result<(String, TlsSettings), String> {
    let mut settings = TlsSettings::default();
    let rest = if is_url(conn) {
        let Some((base, query)) = conn.split_once('?') else {
            return Ok((conn.to_string(), settings));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_PARAMS.contains(&key) {
                let value =
                    percent_decode(value, BadEscape::Refuse).map_err(|e| format!("{key}: {e}"))?;
                settings.set(key, &value)?;
            } else {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (key, value) in conninfo_pairs(conn)? {
            if TLS_PARAMS.contains(&key.as_str()) {
                settings.set(&key, &value)?;
            } else {
                kept.push(format!("{key}={}", quote_conninfo(&value)));
            }
        }
        kept.join(" ")
    };
    match (&settings.cert, &settings.key) {
        (Some(_), None) => return Err("sslcert is given without sslkey".to_string()),
        (None, Some(_)) => return Err("sslkey is given without sslcert".to_string()),
        _ => {}
    }
    if matches!(settings.mode, SslMode::VerifyCa | SslMode::VerifyFull)
        && settings.root_cert.is_none()
    {
        return Err(format!(
            "sslmode={} needs sslrootcert=FILE (the CA certificate(s) that signed the server's \
             certificate, PEM)",
            settings.mode.as_str()
        ));
    }
    Ok((rest, settings))
}

impl TlsSettings {
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "sslmode" => self.mode = SslMode::parse(value)?,
            _ if value.is_empty() => return Err(format!("{key} is empty (give a file path)")),
            "sslrootcert" => self.root_cert = Some(PathBuf::from(value)),
            "sslcert" => self.cert = Some(PathBuf::from(value)),
            _ => self.key = Some(PathBuf::from(value)),
        }
        Ok(())
    }
}

/// libpq's key=value form: `key = value` pairs separated by whitespace, a value in single
/// quotes when it holds spaces, `\'` and `\\` escaped.
fn conninfo_pairs(conn: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = conn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err("a key=value pair lacks its =".to_string());
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err("a quoted value lacks its closing quote".to_string()),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// `conn` with each of `defaults` (parameter, value) that it does not name itself: appended to
/// a URL's query (escaped) or to a key=value string (quoted). For settings that apply to every
/// shard (POSTGRES_SSLMODE and its kin).
pub fn with_defaults(conn: &str, defaults: &[(&str, &str)]) -> Result<String, String> {
    let url_form = is_url(conn);
    let present: Vec<String> = params(conn)?.into_iter().map(|(k, _)| k).collect();
    let mut out = conn.to_string();
    for (key, value) in defaults {
        if present.iter().any(|k| k == key) {
            continue;
        }
        if url_form {
            let separator = if out.contains('?') { '&' } else { '?' };
            out.push_str(&format!("{separator}{key}={}", percent_encode(value)));
        } else {
            out.push_str(&format!(" {key}={}", quote_conninfo(value)));
        }
    }
    Ok(out)
}

/// The value `conn` gives parameter `key` (the last one where it is repeated, as tokio-postgres
/// reads it; percent-decoded in a URL), or None where it names none.
pub fn param(conn: &str, key: &str) -> Result<Option<String>, String> {
    let Some((_, value)) = params(conn)?.into_iter().rev().find(|(k, _)| k == key) else {
        return Ok(None);
    };
    if is_url(conn) {
        percent_decode(&value, BadEscape::Refuse)
            .map(Some)
            .map_err(|e| format!("{key}: {e}"))
    } else {
        Ok(Some(value))
    }
}

/// A shard's connection `config` (parsed from `conn`) made fit for the worker, which writes:
/// where `conn` lists several hosts (an HA pair: `postgres://a:5432,b:5432/db`) without saying
/// `target_session_attrs`, it becomes `read-write`, so a standby that answers first is passed
/// over for the primary (libpq's default, `any`, would take it and every append would fail);
/// `target_session_attrs=read-only` is refused. Each host gets an equal share of the
/// connect timeout already set, so a host that does not answer leaves time for the next.
pub fn for_writing(conn: &str, config: &mut tokio_postgres::Config) -> Result<(), String> {
    use tokio_postgres::config::TargetSessionAttrs;
    let hosts = config.get_hosts().len();
    match config.get_target_session_attrs() {
        TargetSessionAttrs::ReadOnly => return Err(
            "target_session_attrs=read-only: the worker writes to its shards (give read-write, \
                 or leave it out)"
                .to_string(),
        ),
        TargetSessionAttrs::Any if hosts > 1 && param(conn, "target_session_attrs")?.is_none() => {
            config.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        _ => {}
    }
    if let (Some(timeout), Ok(hosts @ 2..)) = (config.get_connect_timeout(), u32::try_from(hosts)) {
        let share = *timeout / hosts;
        config.connect_timeout(share);
    }
    Ok(())
}

/// The (key, value) parameters `conn` names, in order: a URL's query pairs (values still
/// percent-encoded), or the key=value form's pairs.
fn params(conn: &str) -> Result<Vec<(String, String)>, String> {
    if !is_url(conn) {
        return conninfo_pairs(conn);
    }
    Ok(conn
        .split_once('?')
        .map(|(_, query)| {
            query
                .split('&')
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k.to_string(), v.to_string())
                })
                .collect()
        })
        .unwrap_or_default())
}

fn is_url(conn: &str) -> bool {
    conn.starts_with("postgres://") || conn.starts_with("postgresql://")
}

/// A key=value value in single quotes, `\` and `'` escaped. The one quoting of the workspace:
/// the configuration's key=value URLs (POSTGRES_IPS) use it too.
pub fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Percent-encode `value` for a URL query (every byte but RFC 3986's unreserved ones).
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn tls_parameters_leave_the_url() {
        let (rest, tls) = split(
            "postgres://u@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=/etc/ca%20dir/ca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u@h:5432/db?application_name=x&connect_timeout=3"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(
            tls.root_cert.as_deref(),
            Some(Path::new("/etc/ca dir/ca.pem"))
        );
        assert!(rest.parse::<tokio_postgres::Config>().is_ok());

        let (rest, tls) = split("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgresql://h/db", SslMode::Require)
        );
        let (rest, tls) = split("postgres://h/db").unwrap();
        assert_eq!(
            (rest.as_str(), tls),
            ("postgres://h/db", TlsSettings::default())
        );
        assert_eq!(
            TlsSettings::default().mode,
            SslMode::Prefer,
            "libpq's default"
        );
        // The key=value form without TLS parameters: the same pairs.
        let kv = "host=h port=5432 user='u' dbname='d'";
        assert_eq!(
            split(kv).unwrap(),
            (
                "host='h' port='5432' user='u' dbname='d'".to_string(),
                TlsSettings::default()
            )
        );
        let (_, tls) =
            split("postgres://h/db?sslcert=/c.pem&sslkey=/k.pem&sslmode=disable").unwrap();
        assert_eq!(
            (tls.mode, tls.cert.as_deref(), tls.key.as_deref()),
            (
                SslMode::Disable,
                Some(Path::new("/c.pem")),
                Some(Path::new("/k.pem"))
            )
        );
    }

    #[test]
    fn the_key_value_form_is_split_too() {
        let (rest, tls) = split(
            r"host=h port=5432 user='u' password='a b\'c\\d' sslmode='verify-ca' sslrootcert=/ca.pem",
        )
        .unwrap();
        assert_eq!(rest, r"host='h' port='5432' user='u' password='a b\'c\\d'");
        assert_eq!(
            (tls.mode, tls.root_cert.as_deref()),
            (SslMode::VerifyCa, Some(Path::new("/ca.pem")))
        );
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"a b'c\\d"[..]));
        assert!(split("host='h").unwrap_err().contains("closing quote"));
        assert!(split("host h").unwrap_err().contains("lacks its ="));
    }

    #[test]
    fn defaults_fill_what_a_connection_string_does_not_say() {
        let defaults = [("sslmode", "verify-full"), ("sslrootcert", "/a b.pem")];
        assert_eq!(
            with_defaults("postgres://h/db", &defaults).unwrap(),
            "postgres://h/db?sslmode=verify-full&sslrootcert=%2Fa%20b.pem"
        );
        assert_eq!(
            with_defaults("postgres://h/db?sslmode=disable", &defaults).unwrap(),
            "postgres://h/db?sslmode=disable&sslrootcert=%2Fa%20b.pem"
        );
        assert_eq!(
            with_defaults("host=h sslrootcert=/own.pem", &defaults).unwrap(),
            "host=h sslrootcert=/own.pem sslmode='verify-full'"
        );
        let (_, tls) = split(&with_defaults("host=h", &defaults).unwrap()).unwrap();
        assert_eq!(
            (tls.mode, tls.root_cert.as_deref()),
            (SslMode::VerifyFull, Some(Path::new("/a b.pem")))
        );
    }

    #[test]
    fn bad_tls_parameters_say_what_is_wrong() {
        for (url, says) in [
            ("postgres://h/db?sslmode=allow", "is not disable, prefer"),
            ("postgres://h/db?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://h/db?sslmode=verify-ca", "needs sslrootcert"),
            ("postgres://h/db?sslcert=/c.pem", "without sslkey"),
            ("postgres://h/db?sslkey=/k.pem", "without sslcert"),
            ("postgres://h/db?sslrootcert=", "is empty"),
            ("postgres://h/db?sslrootcert=%zz", "hex digits"),
        ] {
            let error = split(url).unwrap_err();
            assert!(error.contains(says), "{url}: {error}");
        }
    }

    #[test]
    fn passwords_are_escaped_for_a_query() {
        assert_eq!(percent_encode("a b&c=d%é/~"), "a%20b%26c%3Dd%25%C3%A9%2F~");
        assert_eq!(
            percent_decode(&percent_encode("p@ss:w/rd&x"), BadEscape::Refuse).unwrap(),
            "p@ss:w/rd&x"
        );
    }
}
