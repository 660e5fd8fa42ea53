//! [`Chain`]: an error with its causes, for the one line a person reads (a log line, a CLI's
//! error). Shared by the worker, loadgen and the CLI, whose drivers' top-level texts alone are
//! often just "db error" or "IO error".

use std::fmt;

/// Displays `top: cause: cause`. A cause whose text is already shown is skipped,
/// so `#[error("…: {0}")]` wrappers (and async-nats, which repeats its cause) do not print it
/// twice.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !shown.contains(&text) {
                write!(f, ": {text}")?;
                shown.push_str(": ");
                shown.push_str(&text);
            }
            source = cause.source();
        }
        Ok(())
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
