//! Secrets in connection strings: one redaction used by every error, log line and `Debug` of
//! the worker and loadgen that can show a URL, and the NATS server list split into
//! credential-free addresses plus the credentials to hand to the client separately.
//!
//! [`redact`] takes a setting's value (one connection string or a list of them), not free
//! text, and errs on the side of hiding too much: a value it cannot read with certainty is
//! masked rather than shown.

use std::fmt;

/// What every hidden part is replaced with.
pub const MASK: &str = "***";

/// `text` with every secret it may hold replaced by [`MASK`]. Handles:
/// - URL userinfo: `scheme://user:pass@host` → `scheme://user:***@host`; a user-less
///   `nats://TOKEN@host` → `nats://***@host` (for `postgres://user@host` the lone part is the
///   user name and is kept); the password ends at the last `@`, so an unescaped `@`, `/`, `?`
///   or space in it is still hidden;
/// - the same without a scheme: `user:pass@host:4222` (NATS accepts that form);
/// - lists of URLs separated by commas or whitespace, with or without `name=` prefixes;
/// - query parameters whose key names a secret (`password=`, `sslpassword=`, `auth_token=`,
///   any key containing `pass`, `pwd`, `token` or `secret`): `?a=b&password=***`;
/// - libpq key=value connection strings: `host=h password=***`, quoted values included
///   (`password='it\'s'` → `password=***`).
pub fn redact(text: &str) -> String {
    mask(text, secret_spans(text))
}

/// The comma-separated pieces of `list`, trimmed, each with its redacted form, so an error can
/// name the piece at fault. A piece is redacted as part of the whole list as well as alone: a
/// password with an unescaped comma is cut in two by the split, and its second half alone
/// would not be recognised as part of a password.
pub fn split_list(list: &str) -> Vec<(&str, String)> {
    let whole = secret_spans(list);
    let mut pieces = Vec::new();
    let mut start = 0;
    for piece in list.split(',') {
        let trimmed = piece.trim();
        let from = start + (piece.len() - piece.trim_start().len());
        let to = from + trimmed.len();
        let mut spans: Vec<(usize, usize)> = whole
            .iter()
            .map(|&(s, e)| (s.max(from), e.min(to)))
            .filter(|(s, e)| s < e)
            .map(|(s, e)| (s - from, e - from))
            .collect();
        spans.extend(secret_spans(trimmed));
        pieces.push((trimmed, mask(trimmed, spans)));
        start += piece.len() + 1;
    }
    pieces
}

/// Byte ranges of `text` to hide (may overlap).
fn secret_spans(text: &str) -> Vec<(usize, usize)> {
    let urls = url_segments(text);
    let mut spans = Vec::new();
    for url in &urls {
        userinfo_span(text, url, &mut spans);
    }
    schemeless_userinfo_spans(text, &urls, &mut spans);
    key_value_spans(text, &urls, &mut spans);
    spans
}

/// Whether a parameter named `key` carries a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "pwd", "token", "secret"]
        .iter()
        .any(|word| key.contains(word))
}

/// One `scheme://…` in the text: `[scheme_start, end)`, its authority starting at
/// `auth_start`, its query (after `?`) at `query_start`.
struct UrlSegment {
    scheme_start: usize,
    auth_start: usize,
    end: usize,
    query_start: Option<usize>,
}

fn is_scheme_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+.-".contains(&b)
}

/// Where the scheme ending at `mark` (the position of `://`) starts, not before `floor`.
fn scheme_start(bytes: &[u8], mark: usize, floor: usize) -> usize {
    let mut start = mark;
    while start > floor && is_scheme_char(bytes[start - 1]) {
        start -= 1;
    }
    start
}

fn url_segments(text: &str) -> Vec<UrlSegment> {
    let bytes = text.as_bytes();
    let mut marks = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("://") {
        marks.push(from + i);
        from += i + 3;
    }
    let mut segments: Vec<UrlSegment> = Vec::with_capacity(marks.len());
    for (k, &mark) in marks.iter().enumerate() {
        let floor = segments.last().map_or(0, |s| s.auth_start);
        let start = scheme_start(bytes, mark, floor);
        let auth_start = mark + 3;
        // A URL reaches up to the next one, less that one's separator and `name=` prefix:
        // userinfo may hold unescaped spaces or commas, so only the next URL ends it for sure.
        let end = match marks.get(k + 1) {
            Some(&next) => {
                let next_start = scheme_start(bytes, next, auth_start);
                text[auth_start..next_start]
                    .rfind(|c: char| c == ',' || c.is_whitespace())
                    .map_or(next_start, |i| auth_start + i)
            }
            None => text.len(),
        };
        let after_userinfo = text[auth_start..end]
            .rfind('@')
            .map_or(auth_start, |at| auth_start + at + 1);
        let query_start = text[after_userinfo..end]
            .find('?')
            .map(|q| after_userinfo + q + 1);
        segments.push(UrlSegment {
            scheme_start: start,
            auth_start,
            end,
            query_start,
        });
    }
    segments
}

fn userinfo_span(text: &str, url: &UrlSegment, spans: &mut Vec<(usize, usize)>) {
    let Some(at) = text[url.auth_start..url.end].rfind('@') else {
        return;
    };
    let userinfo = &text[url.auth_start..url.auth_start + at];
    match userinfo.find(':') {
        Some(colon) => spans.push((url.auth_start + colon + 1, url.auth_start + at)),
        None => {
            let scheme = text[url.scheme_start..url.auth_start - 3].to_ascii_lowercase();
            // PostgreSQL's lone userinfo part is the user name; elsewhere (NATS) a token.
            if scheme != "postgres" && scheme != "postgresql" {
                spans.push((url.auth_start, url.auth_start + at));
            }
        }
    }
}

/// `user:pass@host` / `token@host` words outside any URL (words split at commas and spaces;
/// a `key=` prefix is not part of the userinfo).
fn schemeless_userinfo_spans(text: &str, urls: &[UrlSegment], spans: &mut Vec<(usize, usize)>) {
    let mut word_start = 0;
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        if c != ',' && !c.is_whitespace() {
            continue;
        }
        let (start, end) = (word_start, i);
        word_start = i + c.len_utf8();
        if start == end || urls.iter().any(|u| start < u.end && u.scheme_start < end) {
            continue;
        }
        let word = &text[start..end];
        let Some(at) = word.rfind('@') else {
            continue;
        };
        let info_start = word[..at].rfind('=').map_or(0, |eq| eq + 1);
        let userinfo = &word[info_start..at];
        let hidden = match userinfo.find(':') {
            Some(colon) => (info_start + colon + 1, at),
            None => (info_start, at),
        };
        spans.push((start + hidden.0, start + hidden.1));
    }
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_.-".contains(&b)
}

/// Characters after which a `key=` may start.
fn is_key_boundary(b: u8) -> bool {
    b.is_ascii_whitespace() || b",?&;='\"(".contains(&b)
}

/// If a `key =` starts at `pos`: the key and where its value starts.
fn key_at(text: &str, pos: usize) -> Option<(&str, usize)> {
    let bytes = text.as_bytes();
    let mut i = pos;
    while i < bytes.len() && is_key_char(bytes[i]) {
        i += 1;
    }
    if i == pos {
        return None;
    }
    let key = &text[pos..i];
    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
        i += 1;
    }
    if bytes.get(i) != Some(&b'=') {
        return None;
    }
    i += 1;
    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
        i += 1;
    }
    Some((key, i))
}

/// Whether what starts at `pos` (after optional whitespace) begins another entry: a `key=`
/// or a `scheme://`.
fn starts_entry(text: &str, pos: usize) -> bool {
    let bytes = text.as_bytes();
    let mut i = pos;
    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
        i += 1;
    }
    if key_at(text, i).is_some() {
        return true;
    }
    let mut j = i;
    while j < bytes.len() && is_scheme_char(bytes[j]) {
        j += 1;
    }
    j > i && text[j..].starts_with("://")
}

fn key_value_spans(text: &str, urls: &[UrlSegment], spans: &mut Vec<(usize, usize)>) {
    let bytes = text.as_bytes();
    for pos in 0..bytes.len() {
        if pos > 0 && !is_key_boundary(bytes[pos - 1]) {
            continue;
        }
        let Some((key, value_start)) = key_at(text, pos) else {
            continue;
        };
        if !is_secret_key(key) {
            continue;
        }
        let value_end = if bytes.get(value_start) == Some(&b'\'') {
            quoted_end(bytes, value_start)
        } else {
            // Inside a URL query `&` separates parameters; in key=value form it is part of
            // the value. Either way a value ends only where another entry visibly starts.
            let query = urls
                .iter()
                .find(|u| u.query_start.is_some_and(|q| q <= pos) && pos < u.end);
            let limit = query.map_or(text.len(), |u| u.end);
            let mut end = value_start;
            while end < limit {
                let b = bytes[end];
                let separator =
                    (query.is_some() && b == b'&') || b == b',' || b.is_ascii_whitespace();
                if separator && starts_entry(text, end + 1) {
                    break;
                }
                end += 1;
            }
            end
        };
        if value_end > value_start {
            spans.push((value_start, value_end));
        }
    }
}

/// End (exclusive) of the single-quoted value opening at `open`, backslash escapes honoured;
/// the whole rest of the text when it is not closed.
fn quoted_end(bytes: &[u8], open: usize) -> usize {
    let mut i = open + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// Replace the union of `spans` with [`MASK`] (overlapping or touching spans become one).
fn mask(text: &str, mut spans: Vec<(usize, usize)>) -> String {
    spans.retain(|(start, end)| start < end);
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut shown = 0;
    for (start, end) in merged {
        out.push_str(&text[shown..start]);
        out.push_str(MASK);
        shown = end;
    }
    out.push_str(&text[shown..]);
    out
}

/// Credentials given in a NATS server list.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum NatsAuth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &MASK)
                .finish(),
            NatsAuth::Token(_) => f.debug_tuple("Token").field(&MASK).finish(),
        }
    }
}

/// A NATS server list (`NATS_URL`) split into addresses without credentials and the
/// credentials they carried.
///
/// The client library neither reads credentials from URLs nor hides them when it logs a
/// server's address, so the worker and loadgen connect to [`NatsServers::servers`] and pass
/// [`NatsServers::auth`] as connect options.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsServers {
    /// `nats://host:port` (scheme as given, or none), one per server, no userinfo.
    pub servers: Vec<String>,
    pub auth: NatsAuth,
    /// The whole list as given, redacted: what errors and logs show.
    pub shown: String,
}

impl NatsServers {
    /// Parse a comma-separated list such as `nats://user:pass@h1:4222,nats://h2:4222`. Servers
    /// that carry credentials must all carry the same ones (the client has one set).
    ///
    /// Errors name the server at fault, redacted as by [`split_list`].
    pub fn parse(list: &str) -> Result<NatsServers, String> {
        let mut parsed = NatsServers {
            shown: redact(list),
            ..NatsServers::default()
        };
        for (i, (entry, shown)) in split_list(list).into_iter().enumerate() {
            let n = i + 1;
            let fail = |problem: &str| format!("server {n} ({shown:?}) {problem}");
            if entry.is_empty() {
                return Err(fail("is empty (separate servers with single commas)"));
            }
            if entry.contains(char::is_whitespace) {
                return Err(fail("contains whitespace (separate servers with commas)"));
            }
            let (scheme, rest) = match entry.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, entry),
            };
            let (auth, host) = match rest.rsplit_once('@') {
                None => (NatsAuth::None, rest),
                Some((userinfo, host)) => {
                    let decode = |part: &str, what: &str| {
                        percent_decode(part, BadEscape::Keep)
                            .map_err(|_| fail(&format!("has a {what} that is not UTF-8")))
                    };
                    let auth = match userinfo.split_once(':') {
                        Some((user, password)) => NatsAuth::UserPassword {
                            user: decode(user, "user")?,
                            password: decode(password, "password")?,
                        },
                        None => NatsAuth::Token(decode(userinfo, "token")?),
                    };
                    match &auth {
                        NatsAuth::UserPassword { user, .. } if user.is_empty() => {
                            return Err(fail("has a password but no user"));
                        }
                        NatsAuth::Token(token) if token.is_empty() => {
                            return Err(fail("has an empty user or token"));
                        }
                        _ => {}
                    }
                    (auth, host)
                }
            };
            if host.is_empty() || host.contains("://") {
                return Err(fail("is not one server URL"));
            }
            if auth != NatsAuth::None {
                if parsed.auth == NatsAuth::None {
                    parsed.auth = auth;
                } else if parsed.auth != auth {
                    return Err(fail(
                        "carries other credentials than an earlier server (the client has one \
                         set for all servers)",
                    ));
                }
            }
            parsed.servers.push(match scheme {
                Some(scheme) => format!("{scheme}://{host}"),
                None => host.to_string(),
            });
        }
        Ok(parsed)
    }
}

/// How [`percent_decode`] treats a `%` that is not followed by two hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadEscape {
    /// Keep it as it is, as URL parsers do (redaction must read whatever it is given).
    Keep,
    /// Refuse the value ([`PercentError::BadEscape`]): for a value that names something, such
    /// as a file, where a guess would name the wrong one.
    Refuse,
}

/// Why [`percent_decode`] refused a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PercentError {
    #[error("a % escape is not followed by two hex digits")]
    BadEscape,
    #[error("not UTF-8 once unescaped")]
    NotUtf8,
}

/// `%XX` escapes decoded to bytes, read as UTF-8 (`+` stays `+`, as in URL userinfo and
/// tokio-postgres's URL parser). The one percent decoder of the workspace: the worker's
/// shard-URL TLS parameters use it too.
pub fn percent_decode(s: &str, bad: BadEscape) -> Result<String, PercentError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
            match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                _ if bad == BadEscape::Refuse => return Err(PercentError::BadEscape),
                _ => {}
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| PercentError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_userinfo() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("nats://user:pass@127.0.0.1:4222"),
            "nats://user:***@127.0.0.1:4222"
        );
        // The password ends at the last `@`: unescaped `@`, `/`, `?` and spaces stay hidden.
        assert_eq!(redact("postgres://u:p@s/s?x@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u:my pass@h/db"), "postgres://u:***@h/db");
        // No password: nothing to hide.
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact("postgres://u:@h/db"), "postgres://u:@h/db");
    }

    #[test]
    fn token_only_userinfo() {
        assert_eq!(redact("nats://s3cr3t@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("tls://s3cr3t@h:4222"), "tls://***@h:4222");
        assert_eq!(redact("s3cr3t@h:4222"), "***@h:4222");
        assert_eq!(redact("user:s3cr3t@h:4222"), "user:***@h:4222");
    }

    #[test]
    fn lists_of_urls() {
        assert_eq!(
            redact("nats://a:p1@h1:4222,nats://b:p2@h2:4222, nats://t0k@h3"),
            "nats://a:***@h1:4222,nats://b:***@h2:4222, nats://***@h3"
        );
        assert_eq!(
            redact("a=postgres://u:p1@h1/db,b=postgresql://u:p,2@h2/db"),
            "a=postgres://u:***@h1/db,b=postgresql://u:***@h2/db"
        );
        assert_eq!(
            redact("a=postgres://u:p1@h/db b=postgres://h/db"),
            "a=postgres://u:***@h/db b=postgres://h/db"
        );
    }

    #[test]
    fn query_parameters() {
        assert_eq!(
            redact("postgres://h/db?sslmode=disable&password=x&application_name=a"),
            "postgres://h/db?sslmode=disable&password=***&application_name=a"
        );
        assert_eq!(
            redact("postgres://h/db?sslpassword=x&sslmode=require"),
            "postgres://h/db?sslpassword=***&sslmode=require"
        );
        assert_eq!(
            redact("nats://h?auth_token=abc&client_secret=def"),
            "nats://h?auth_token=***&client_secret=***"
        );
        // An unescaped `&` inside the value: hidden up to the next parameter.
        assert_eq!(
            redact("postgres://h/db?password=a&b&sslmode=disable"),
            "postgres://h/db?password=***&sslmode=disable"
        );
        assert_eq!(
            redact("a=postgres://h/db?password=x,b=postgres://h/db?PASSWORD=y"),
            "a=postgres://h/db?password=***,b=postgres://h/db?PASSWORD=***"
        );
    }

    #[test]
    fn key_value_form() {
        assert_eq!(
            redact("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            redact(r"host=h password='quoted \' value' dbname='d'"),
            "host=h password=*** dbname='d'"
        );
        assert_eq!(redact("host=h password = s3cr3t"), "host=h password = ***");
        // Not valid libpq, but the second word may be part of the password: hidden too.
        assert_eq!(redact("password=my secret host=h"), "password=*** host=h");
        assert_eq!(redact("password=a&b host=h"), "password=*** host=h");
        assert_eq!(redact("password='unterminated"), "password=***");
        assert_eq!(redact("a=host=h password=x"), "a=host=h password=***");
        // A URL given as a password's value is hidden whole.
        assert_eq!(redact("password=nats://u:p@h"), "password=***");
    }

    #[test]
    fn nothing_secret_is_left_alone() {
        for text in [
            "",
            "postgres://h/db",
            "host=h port=5432 user='postgres' dbname='postgres'",
            "a=x://?",
            "nourl",
            "0.0.0.0:2112",
            "ünïcödé=postgres://ü@h/d",
        ] {
            assert_eq!(redact(text), text);
        }
    }

    #[test]
    fn list_pieces_are_redacted_in_context() {
        let pieces = split_list(" a=postgres://u:p1,x@h/db, ,b=postgres://h/db?password=y ");
        let shown: Vec<&str> = pieces.iter().map(|(_, shown)| shown.as_str()).collect();
        // The password `p1,x` is cut by the split; both halves stay hidden.
        assert_eq!(
            shown,
            [
                "a=postgres://u:***",
                "***@h/db",
                "",
                "b=postgres://h/db?password=***"
            ]
        );
        assert_eq!(pieces[0].0, "a=postgres://u:p1");
        assert_eq!(split_list("").len(), 1);
    }

    #[test]
    fn nats_servers_are_split_from_their_credentials() {
        let parsed = NatsServers::parse("nats://u:p%40ss@h1:4222, nats://u:p%40ss@h2").unwrap();
        assert_eq!(parsed.servers, ["nats://h1:4222", "nats://h2"]);
        assert_eq!(
            parsed.auth,
            NatsAuth::UserPassword {
                user: "u".into(),
                password: "p@ss".into()
            }
        );
        let debug = format!("{parsed:?}");
        assert!(!debug.contains("p@ss") && debug.contains(MASK), "{debug}");

        let parsed = NatsServers::parse("t0k3n@h1,nats://h2").unwrap();
        assert_eq!(parsed.servers, ["h1", "nats://h2"]);
        assert_eq!(parsed.auth, NatsAuth::Token("t0k3n".into()));
        assert!(!format!("{parsed:?}").contains("t0k3n"));

        let parsed = NatsServers::parse("nats://127.0.0.1:4222").unwrap();
        assert_eq!(parsed.auth, NatsAuth::None);

        // Split at the comma inside the password, the pieces parse; only `shown` is printed.
        let parsed = NatsServers::parse("nats://u:SEC,RET@h").unwrap();
        assert_eq!(parsed.shown, "nats://u:***@h");
    }

    #[test]
    fn bad_nats_lists_are_refused_without_their_secrets() {
        for list in [
            "nats://u:SECRET@h1 nats://u:SECRET@h2",
            "nats://u:SECRET@h1,,nats://h2",
            "nats://u:SECRET@h1,nats://v:SECRET@h2",
            "nats://:SECRET@h",
            "nats://u:SECRET@",
            "nats://u:SECRET%ff@h",
            // An unescaped comma cuts the password in two; neither piece may show.
            "nats://u:SEC,RET@h,,x",
        ] {
            let err = NatsServers::parse(list).unwrap_err();
            assert!(!err.contains("SECRET"), "{list}: {err}");
            assert!(
                !err.contains("SEC") && !err.contains("RET"),
                "{list}: {err}"
            );
        }
    }

    #[test]
    fn percent_decoding() {
        let keep = |s: &str| percent_decode(s, BadEscape::Keep);
        assert_eq!(keep("a%20b%2").as_deref(), Ok("a b%2"));
        assert_eq!(keep("%zz%41").as_deref(), Ok("%zzA"));
        assert_eq!(keep("%ff"), Err(PercentError::NotUtf8));
        let refuse = |s: &str| percent_decode(s, BadEscape::Refuse);
        assert_eq!(refuse("a%20b%2F").as_deref(), Ok("a b/"));
        for bad in ["a%2", "%zz", "%", "%+1"] {
            assert_eq!(refuse(bad), Err(PercentError::BadEscape), "{bad}");
        }
        assert_eq!(refuse("%ff"), Err(PercentError::NotUtf8));
    }
}
