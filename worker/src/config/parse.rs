//! Parsers for one setting's text, each failing with a [`ConfigError`] that names the variable
//! and fits on one line (clap's typed parsers would print three; see the module doc of
//! [`super`]).

use std::net::SocketAddr;
use std::time::Duration;

use super::{bad, ConfigError};

/// `host:port`, or `:port` for every interface (the Go service's form).
pub(super) fn metrics_addr(value: &str) -> Result<SocketAddr, ConfigError> {
    let trimmed = value.trim();
    let full = match trimmed.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => trimmed.to_string(),
    };
    full.parse().map_err(|e| {
        bad(
            "METRICS_ADDR",
            format!("{value:?} is not host:port or :port ({e})"),
        )
    })
}

pub(super) fn non_empty(var: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(bad(var, "must not be empty"));
    }
    Ok(value.to_string())
}

/// A stream limit: -1 (unlimited) or a positive count (0 would refuse every publish).
pub(super) fn stream_limit(var: &'static str, value: &str) -> Result<i64, ConfigError> {
    let limit = number(var, value, -1, i64::MAX)?;
    if limit == 0 {
        return Err(bad(var, "0 would refuse every publish; -1 is unlimited"));
    }
    Ok(limit)
}

/// NATS subject tokens: no whitespace, no empty tokens. Wildcards are refused because a worker
/// publishing to a wildcard subject is always a mistake.
pub(super) fn subject(var: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = non_empty(var, value)?;
    if value.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        || value.split('.').any(str::is_empty)
    {
        return Err(bad(var, format!("{value:?} is not a valid NATS subject")));
    }
    Ok(value)
}

/// Stream and consumer names: one NATS token, no dots, spaces or wildcards.
pub(super) fn name_token(var: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = non_empty(var, value)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(bad(var, format!("{value:?} may only hold [A-Za-z0-9_-]")));
    }
    Ok(value)
}

/// `true` or `false` (also `1`/`0`, `yes`/`no`, any case).
pub(super) fn boolean(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(bad(var, format!("{value:?} is not true or false"))),
    }
}

/// A duration as humantime writes it (`30d`, `12h 30m`, `500ms`), at least `min`.
pub(super) fn duration(
    var: &'static str,
    value: &str,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let parsed = humantime::parse_duration(value).map_err(|e| {
        bad(
            var,
            format!("{value:?} is not a duration like 30d, 12h or 90s ({e})"),
        )
    })?;
    if parsed < min {
        return Err(bad(
            var,
            format!(
                "{value:?} is shorter than {}",
                humantime::format_duration(min)
            ),
        ));
    }
    Ok(parsed)
}

pub(super) fn number<T>(var: &'static str, value: &str, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let parsed: T = value
        .trim()
        .parse()
        .map_err(|_| bad(var, format!("{value:?} is not a number")))?;
    if parsed < min || parsed > max {
        return Err(bad(var, format!("{parsed} is outside {min}..={max}")));
    }
    Ok(parsed)
}

/// A number of milliseconds within `min..=max`, as a [`Duration`].
pub(super) fn millis(
    var: &'static str,
    value: &str,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    number(var, value, min, max).map(Duration::from_millis)
}
