//! [`Chain`]: an error with its causes, for the one line a person reads (a log line, a CLI's
//! error). Shared by the worker, loadgen and the CLI, whose drivers' top-level texts alone are
//! often just "db error" or "IO error".

use std::fmt;

/// Displays `top: cause: cause`, each cause once:
/// - a cause whose text is already shown is skipped, so `#[error("…: {0}")]` wrappers do not
///   print it twice;
/// - an error whose text ends with its own cause's (`authorization violation: nats:
///   authorization violation`, as async-nats writes its errors) shows only its own part, the
///   cause follows as the next link;
/// - a cause that only puts a one-word label before text already shown (`nats: authorization
///   violation` after `authorization violation`) is skipped.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = String::new();
        let mut link: Option<&(dyn std::error::Error + 'static)> = Some(self.0);
        while let Some(error) = link {
            let text = own_text(error);
            if shown.is_empty() {
                shown = text;
                f.write_str(&shown)?;
            } else if !repeats(&shown, &text) {
                write!(f, ": {text}")?;
                shown.push_str(": ");
                shown.push_str(&text);
            }
            link = error.source();
        }
        Ok(())
    }
}

/// `error`'s text without its cause's text where it ends with `: <cause>`.
fn own_text(error: &(dyn std::error::Error + 'static)) -> String {
    let text = error.to_string();
    let Some(cause) = error.source().map(|c| c.to_string()) else {
        return text;
    };
    match text
        .strip_suffix(cause.as_str())
        .and_then(|own| own.strip_suffix(": "))
    {
        Some(own) if !own.is_empty() => own.to_string(),
        _ => text,
    }
}

/// Whether `text` says nothing `shown` does not: it is there already, or it is a one-word
/// label (lowercase letters) before text that is.
fn repeats(shown: &str, text: &str) -> bool {
    if shown.contains(text) {
        return true;
    }
    match text.split_once(": ") {
        Some((label, rest)) => {
            !label.is_empty()
                && label.len() <= 16
                && label.bytes().all(|b| b.is_ascii_lowercase())
                && shown.contains(rest)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("db error")]
    struct Driver(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("shard a: {0}")]
    struct Wrapper(#[source] Driver);

    /// As async-nats writes a refused login: the kind, then the server's `-ERR` text, which
    /// repeats the kind under the label `nats`.
    #[derive(Debug, thiserror::Error)]
    #[error("authorization violation: {0}")]
    struct Nested(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("NATS at nats://h:4222 refused the login for user u")]
    struct Refused(#[source] Nested);

    #[test]
    fn a_labelled_repeat_of_the_cause_is_shown_once() {
        let e = Refused(Nested(std::io::Error::other(
            "nats: authorization violation",
        )));
        assert_eq!(
            Chain(&e).to_string(),
            "NATS at nats://h:4222 refused the login for user u: authorization violation"
        );
    }

    #[test]
    fn a_cause_with_more_than_a_label_is_kept() {
        // A path before the repeated text says something: kept.
        let e = Wrapper(Driver(std::io::Error::other("/etc/x: db error")));
        assert_eq!(Chain(&e).to_string(), "shard a: db error: /etc/x: db error");
    }

    #[test]
    fn chains_show_each_cause_once() {
        let e = Wrapper(Driver(std::io::Error::other(
            "password authentication failed",
        )));
        assert_eq!(
            Chain(&e).to_string(),
            "shard a: db error: password authentication failed"
        );
    }
}
