//! Types for settings that hold a secret, so that `#[derive(Debug)]` on the structs that carry
//! them can never print one: the field's type, not a hand-kept list, decides how it is shown.
//! A new secret-bearing field must be given one of these types (a plain `String` is shown as
//! is); the unit test `debug_never_shows_secrets` checks the ones there are.

use std::fmt;

use logstore_protocol::redact::{redact, MASK};

/// A URL or connection string that may hold credentials (NATS_URL, POSTGRES_SHARDS,
/// POSTGRES_IPS). `Debug` shows it through [`redact`]: the hosts stay visible, the passwords
/// do not.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Redacted(String);

/// A bare secret (POSTGRES_PASSWORD, a password read from a file). `Debug` shows `"***"`, or
/// `""` when it is empty, so an operator can still tell whether one was given.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Masked(String);

impl Redacted {
    /// The value with its credentials: for connecting and parsing, never for showing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Masked {
    /// The secret itself: for logging in, never for showing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

// `From<String>` is what clap's derive needs to parse the field from a flag or variable.
impl From<String> for Redacted {
    fn from(value: String) -> Redacted {
        Redacted(value)
    }
}

impl From<String> for Masked {
    fn from(value: String) -> Masked {
        Masked(value)
    }
}

impl From<&str> for Redacted {
    fn from(value: &str) -> Redacted {
        Redacted(value.to_string())
    }
}

impl From<&str> for Masked {
    fn from(value: &str) -> Masked {
        Masked(value.to_string())
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&redact(&self.0), f)
    }
}

impl fmt::Debug for Masked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.0.is_empty() { "" } else { MASK };
        fmt::Debug::fmt(shown, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_secret_and_nothing_else() {
        let url = Redacted::from("nats://u:S3CRET@h:4222".to_string());
        assert_eq!(format!("{url:?}"), r#""nats://u:***@h:4222""#);
        assert_eq!(url.expose(), "nats://u:S3CRET@h:4222");
        assert_eq!(
            format!("{:?}", Masked::from("S3CRET".to_string())),
            r#""***""#
        );
        assert_eq!(format!("{:?}", Masked::default()), r#""""#);
    }
}
