//! Where the shards are and how the worker logs in to them: POSTGRES_SHARDS (or the
//! POSTGRES_IPS form with POSTGRES_PORT/USER/DB), the password (POSTGRES_PASSWORD or
//! POSTGRES_PASSWORD_FILE) and the POSTGRES_SSL* defaults, filled into every shard's connection
//! string; [`MemberAccess`], the same login kept for ring members learnt from NATS; and the URL
//! surgery the ring record needs ([`without_login`], [`without_password`]).

use logstore_protocol::redact::split_list;

use super::conninfo;
use super::parse::{non_empty, number};
use super::secret::Masked;
use super::{bad, quote_conninfo, ConfigError, RawConfig, ShardConfig};

/// This worker's own PostgreSQL login (the user and password it logs in to its POSTGRES_SHARDS
/// with) and the POSTGRES_SSL* defaults, kept to fill the URLs of ring members learnt from NATS
/// (stored there without user or password) as POSTGRES_SHARDS URLs are filled.
#[derive(Clone, Debug, Default)]
pub struct MemberAccess {
    /// The user of this worker's first configured shard (its POSTGRES_SHARDS URL's, or
    /// POSTGRES_USER with POSTGRES_IPS or a URL naming none).
    pub(super) user: Option<String>,
    /// POSTGRES_PASSWORD / POSTGRES_PASSWORD_FILE, else the password of the first configured
    /// shard's URL.
    pub(super) password: Option<Masked>,
    /// The POSTGRES_SSL* settings as (connection parameter, value): paths and a mode, no secret.
    pub(super) tls: Vec<(&'static str, String)>,
}

impl MemberAccess {
    /// The login this worker uses for its own shards: the user (and, without
    /// POSTGRES_PASSWORD, the password) of `first`, its first configured shard, or
    /// `default_user` (POSTGRES_USER) where that names none.
    pub(super) fn with_login_of(
        mut self,
        first: Option<&ShardConfig>,
        default_user: &str,
    ) -> MemberAccess {
        let parsed = first
            .and_then(|shard| conninfo::split(&shard.url).ok())
            .and_then(|(url, _)| url.parse::<tokio_postgres::Config>().ok());
        let user = parsed
            .as_ref()
            .and_then(|c| c.get_user())
            .map(str::to_string);
        if self.password.is_none() {
            self.password = parsed
                .as_ref()
                .and_then(|c| c.get_password())
                .and_then(|p| String::from_utf8(p.to_vec()).ok())
                .map(Masked::from);
        }
        let default_user = default_user.trim();
        self.user = user.or_else(|| (!default_user.is_empty()).then(|| default_user.to_string()));
        self
    }

    /// The shard `name` at `url` (as stored in the ring record: no user, no password), with
    /// this worker's own user, password and TLS defaults filled in where the URL names none.
    /// (`worker shards add` uses it with the URL an operator gave: a user named there is
    /// kept for that command's own connection.)
    pub fn shard(&self, name: &str, url: &str) -> Result<ShardConfig, String> {
        let mut shard = ShardConfig {
            name: name.to_string(),
            url: url.to_string(),
        };
        let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if let Some(user) = &self.user {
            fill_user(&mut shard, user, is_url);
        }
        match &self.password {
            Some(password) if is_url => fill_password(&mut shard, password.expose()),
            // The key=value form (a ring seeded from POSTGRES_IPS), which never holds one here.
            Some(password) => {
                shard.url = format!(
                    "{} password={}",
                    shard.url,
                    quote_conninfo(password.expose())
                );
            }
            None => {}
        }
        if !self.tls.is_empty() {
            let defaults: Vec<(&str, &str)> =
                self.tls.iter().map(|(k, v)| (*k, v.as_str())).collect();
            shard.url = conninfo::with_defaults(&shard.url, &defaults)
                .map_err(|problem| format!("shard {name} with POSTGRES_SSL*: {problem}"))?;
        }
        conninfo::split(&shard.url).map_err(|problem| format!("shard {name}: {problem}"))?;
        Ok(shard)
    }
}

/// `url` without user or password (the userinfo of a `postgres://` URL, `user` and `password`
/// parameters of either form): what the ring record stores. Every worker logs in to a member
/// with its own login ([`MemberAccess::shard`]), whoever wrote the record.
pub fn without_login(url: &str) -> String {
    strip_login(url, "user", &|_| None)
}

/// `url` without any password (in the userinfo of a `postgres://` URL, or as a `password`
/// parameter of either form): what may be shown to an operator.
pub fn without_password(url: &str) -> String {
    strip_login(url, "password", &|userinfo| {
        Some(userinfo.split_once(':').map_or(userinfo, |(user, _)| user))
    })
}

/// `url` without its `key` parameter (URL query or key=value pair; a quoted value may hold
/// spaces), and with a URL's userinfo replaced by what `keep` makes of it (`None`: none).
/// `user` stripping strips the password too: a password alone is no login.
fn strip_login(url: &str, key: &str, keep: &dyn Fn(&str) -> Option<&str>) -> String {
    let trimmed = if key == "password" {
        url.trim().to_string()
    } else {
        strip_login(url, "password", &|_| None)
    };
    let prefix = format!("{key}=");
    if let Some((scheme, rest)) = trimmed.split_once("://") {
        let (authority_end, _) = rest
            .char_indices()
            .find(|(_, c)| matches!(c, '/' | '?'))
            .unwrap_or((rest.len(), ' '));
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match keep(userinfo) {
                Some(kept) => format!("{kept}@{host}"),
                None => host.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.to_ascii_lowercase().starts_with(&prefix))
                    .collect();
                if kept.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}?{}", kept.join("&"))
                }
            }
            None => tail.to_string(),
        };
        return format!("{scheme}://{authority}{tail}");
    }
    let quoted = format!("{key}='");
    let mut out = Vec::new();
    let mut words = trimmed.split(' ').peekable();
    while let Some(word) = words.next() {
        if word.to_ascii_lowercase().starts_with(&prefix) {
            if word.starts_with(&quoted) && !(word.len() > quoted.len() && word.ends_with('\'')) {
                for next in words.by_ref() {
                    if next.ends_with('\'') {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(word);
    }
    out.join(" ")
}

impl RawConfig {
    pub(super) fn shards(&self, access: &MemberAccess) -> Result<Vec<ShardConfig>, ConfigError> {
        let password = &access.password;
        let shards =
            match (&self.postgres_shards, &self.postgres_ips) {
                (Some(spec), _) if !spec.expose().trim().is_empty() => {
                    let mut shards = parse_shards(spec.expose())?;
                    if let Some(password) = &password {
                        for shard in &mut shards {
                            fill_password(shard, password.expose());
                        }
                    }
                    shards
                }
                (_, Some(ips)) if !ips.expose().trim().is_empty() => {
                    self.shards_from_ips(ips.expose(), password.as_ref().map(Masked::expose))?
                }
                _ => return Err(bad(
                    "POSTGRES_SHARDS",
                    "not set (set POSTGRES_SHARDS=name=postgres://…,… or POSTGRES_IPS=host1,host2)",
                )),
            };
        with_tls_defaults(shards, &access.tls)
    }

    /// The POSTGRES_SSL* settings given, as (connection parameter, value).
    pub(super) fn tls_defaults(&self) -> Result<Vec<(&'static str, String)>, ConfigError> {
        let mut defaults: Vec<(&'static str, String)> = Vec::new();
        for (var, param, value) in [
            ("POSTGRES_SSLMODE", "sslmode", &self.postgres_sslmode),
            (
                "POSTGRES_SSLROOTCERT",
                "sslrootcert",
                &self.postgres_sslrootcert,
            ),
            ("POSTGRES_SSLCERT", "sslcert", &self.postgres_sslcert),
            ("POSTGRES_SSLKEY", "sslkey", &self.postgres_sslkey),
        ] {
            match value.as_deref().map(str::trim) {
                None | Some("") => {}
                Some(value) => {
                    if param == "sslmode" {
                        conninfo::SslMode::parse(value).map_err(|e| bad(var, e))?;
                    }
                    defaults.push((param, value.to_string()));
                }
            }
        }
        Ok(defaults)
    }

    /// POSTGRES_PASSWORD, or the content of POSTGRES_PASSWORD_FILE (read here, once; one
    /// trailing newline dropped). Errors name the file, never show its content.
    pub(super) fn password(&self) -> Result<Option<Masked>, ConfigError> {
        const VAR: &str = "POSTGRES_PASSWORD_FILE";
        let path = match self.postgres_password_file.as_deref().map(str::trim) {
            None | Some("") => {
                return Ok((!self.postgres_password.expose().is_empty())
                    .then(|| self.postgres_password.clone()))
            }
            Some(path) => path,
        };
        if !self.postgres_password.expose().is_empty() {
            return Err(bad(
                VAR,
                "POSTGRES_PASSWORD is set too; set only one of them",
            ));
        }
        let content =
            std::fs::read(path).map_err(|e| bad(VAR, format!("cannot read {path:?}: {e}")))?;
        let content = String::from_utf8(content)
            .map_err(|_| bad(VAR, format!("{path:?} is not UTF-8 text")))?;
        let password = content
            .strip_suffix('\n')
            .map(|p| p.strip_suffix('\r').unwrap_or(p))
            .unwrap_or(&content);
        if password.is_empty() {
            return Err(bad(VAR, format!("{path:?} is empty")));
        }
        if password.contains(['\n', '\r', '\0']) {
            return Err(bad(
                VAR,
                format!("{path:?} holds more than one line (or a NUL); a password is one line"),
            ));
        }
        Ok(Some(Masked::from(password.to_string())))
    }

    fn shards_from_ips(
        &self,
        ips: &str,
        password: Option<&str>,
    ) -> Result<Vec<ShardConfig>, ConfigError> {
        let port: u16 = number("POSTGRES_PORT", &self.postgres_port, 1, 65_535)?;
        non_empty("POSTGRES_USER", &self.postgres_user)?;
        non_empty("POSTGRES_DB", &self.postgres_db)?;
        let mut shards = Vec::new();
        for (host, shown) in split_list(ips) {
            if host.is_empty() || host.contains(|c: char| "/@='\\".contains(c) || c.is_whitespace())
            {
                return Err(bad(
                    "POSTGRES_IPS",
                    format!(
                        "{shown:?} is not a host name or IP (credentials go in \
                         POSTGRES_USER/POSTGRES_PASSWORD)"
                    ),
                ));
            }
            // key=value form: no URL-escaping of the password needed.
            let mut url = format!(
                "host={host} port={port} user={} dbname={}",
                quote_conninfo(&self.postgres_user),
                quote_conninfo(&self.postgres_db)
            );
            if let Some(password) = password {
                url.push_str(&format!(" password={}", quote_conninfo(password)));
            }
            shards.push(ShardConfig {
                name: host.to_string(),
                url,
            });
        }
        check_unique("POSTGRES_IPS", &shards)?;
        Ok(shards)
    }
}

/// Parse `name=postgres://…,name2=postgresql://…`. Only URLs are taken (the key=value form is
/// built internally from POSTGRES_IPS): a key=value string or two URLs in one entry, which
/// is what a space instead of a comma produces, would otherwise be read as one shard. An entry
/// ends at the next comma that starts a new `name=` ([`shard_entries`]), so a URL may list
/// several hosts (`postgres://a:5432,b:5432/db`, an HA pair); commas elsewhere in a URL and
/// whitespace must be percent-encoded. Errors show the entry redacted.
pub fn parse_shards(spec: &str) -> Result<Vec<ShardConfig>, ConfigError> {
    const VAR: &str = "POSTGRES_SHARDS";
    let mut shards = Vec::new();
    for (part, entry) in shard_entries(spec) {
        if part.is_empty() {
            continue;
        }
        let name = entry_name(&part, &entry).map_err(|problem| bad(VAR, problem))?;
        let url = &part[name.len() + 1..];
        check_url(url)
            .map_err(|problem| bad(VAR, format!("shard {name}: {entry:?}: {problem}")))?;
        shards.push(ShardConfig {
            name: name.to_string(),
            url: url.to_string(),
        });
    }
    if shards.is_empty() {
        return Err(bad(VAR, "no shard given"));
    }
    check_unique(VAR, &shards)?;
    Ok(shards)
}

/// POSTGRES_SHARDS's entries, trimmed, each with its redacted form: the list split at the
/// commas that start a new entry (`name=`, see [`starts_entry`]), not at those inside a URL's
/// host list. Each entry is redacted in the context of the whole list ([`split_list`]), so a
/// password that a comma cuts stays hidden in both halves.
fn shard_entries(spec: &str) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    // Whether the last entry may go on: an empty piece (`a,,b`) ends it.
    let mut open = false;
    for (piece, (trimmed, shown)) in spec.split(',').zip(split_list(spec)) {
        if open && !trimmed.is_empty() && !starts_entry(trimmed) {
            if let Some((entry, entry_shown)) = entries.last_mut() {
                entry.push(',');
                entry.push_str(piece);
                entry_shown.push(',');
                entry_shown.push_str(&shown);
                continue;
            }
        }
        open = !trimmed.is_empty();
        entries.push((piece.to_string(), shown));
    }
    entries
        .into_iter()
        .map(|(entry, shown)| (entry.trim().to_string(), shown))
        .collect()
}

/// Whether a comma-separated piece of POSTGRES_SHARDS starts a new entry: `name=…` with a
/// shard name (a host of a host list, `b:5432/db?…`, never has its `=` right after a name).
fn starts_entry(piece: &str) -> bool {
    piece
        .split_once('=')
        .is_some_and(|(name, _)| is_shard_name(name))
}

fn is_shard_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The shard name of the entry `part` (shown as `entry`), or what is wrong with it.
fn entry_name<'a>(part: &'a str, entry: &str) -> Result<&'a str, String> {
    if part.contains(char::is_whitespace) {
        return Err(format!(
            "entry {entry:?} contains whitespace (separate shards with commas)"
        ));
    }
    let Some((name, _)) = part.split_once('=') else {
        return Err(format!("entry {entry:?} is not name=postgres://…"));
    };
    if !is_shard_name(name) {
        return Err(format!(
            "entry {entry:?} does not start with a shard name (name=postgres://…, names are \
             [A-Za-z0-9._-])"
        ));
    }
    Ok(name)
}

/// What is wrong with a shard's `url`, if anything (never repeating the URL).
fn check_url(url: &str) -> Result<(), String> {
    if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
        return Err("not a postgres:// or postgresql:// URL".to_string());
    }
    if url.matches("://").count() > 1 {
        return Err("holds more than one URL (separate shards with commas)".to_string());
    }
    // libpq's TLS parameters are handled by the worker (crate::store::tls), not tokio-postgres.
    let (url_for_driver, _) = conninfo::split(url)?;
    let mut config = url_for_driver
        .parse::<tokio_postgres::Config>()
        .map_err(|e| {
            // Its Display is only the kind; the cause names the option (never its value).
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
            format!("not a PostgreSQL URL ({e}{cause})")
        })?;
    conninfo::for_writing(url, &mut config)
}

/// POSTGRES_SSLMODE, POSTGRES_SSLROOTCERT, POSTGRES_SSLCERT and POSTGRES_SSLKEY (`defaults`)
/// fill each shard's connection string where it names no such parameter itself; the result must
/// make sense (a verify-* mode with a CA, a certificate with its key).
fn with_tls_defaults(
    mut shards: Vec<ShardConfig>,
    defaults: &[(&'static str, String)],
) -> Result<Vec<ShardConfig>, ConfigError> {
    if defaults.is_empty() {
        return Ok(shards);
    }
    let defaults: Vec<(&str, &str)> = defaults.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for shard in &mut shards {
        let name = &shard.name;
        shard.url = conninfo::with_defaults(&shard.url, &defaults)
            .and_then(|url| conninfo::split(&url).map(|_| url))
            .map_err(|problem| {
                bad(
                    "POSTGRES_SSLMODE",
                    format!("shard {name} with POSTGRES_SSL*: {problem}"),
                )
            })?;
    }
    Ok(shards)
}

/// Give a connection string naming no user `user`: in a URL's userinfo, or as a `user` pair.
fn fill_user(shard: &mut ShardConfig, user: &str, is_url: bool) {
    let has_user = conninfo::split(&shard.url)
        .ok()
        .and_then(|(url, _)| url.parse::<tokio_postgres::Config>().ok())
        .is_some_and(|config| config.get_user().is_some());
    if has_user {
        return;
    }
    if !is_url {
        shard.url = format!("{} user={}", shard.url, quote_conninfo(user));
        return;
    }
    if let Some((scheme, rest)) = shard.url.split_once("://") {
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        // A userinfo without a user (`:pw@host`, `@host`) gets the user in front; none, a new one.
        let at = if authority.contains('@') { "" } else { "@" };
        shard.url = format!("{scheme}://{}{at}{rest}", conninfo::percent_encode(user));
    }
}

/// Give a shard URL without a password of its own the configured one, as a `password` query
/// parameter (tokio-postgres reads it there; redaction hides it like one in the user info).
fn fill_password(shard: &mut ShardConfig, password: &str) {
    let has_password = conninfo::split(&shard.url)
        .ok()
        .and_then(|(url, _)| url.parse::<tokio_postgres::Config>().ok())
        .is_some_and(|config| config.get_password().is_some());
    if !has_password {
        let separator = if shard.url.contains('?') { '&' } else { '?' };
        shard.url = format!(
            "{}{separator}password={}",
            shard.url,
            conninfo::percent_encode(password)
        );
    }
}

fn check_unique(var: &'static str, shards: &[ShardConfig]) -> Result<(), ConfigError> {
    for (i, shard) in shards.iter().enumerate() {
        if shards[..i].iter().any(|s| s.name == shard.name) {
            return Err(bad(
                var,
                format!("shard name {:?} appears twice", shard.name),
            ));
        }
    }
    Ok(())
}
