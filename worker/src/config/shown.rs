//! Settings as a person writes them, for log lines: [`Human`] durations (`7d`, `33s`,
//! `250ms`, as RETENTION_MAX_AGE takes them) and [`retention`] (`off` or its maximum age),
//! never Rust's `Some(604800s)` / `None`.

use std::fmt;
use std::time::Duration;

use super::Retention;

/// A duration in the units a person would write it in, largest first: `7d`, `1h 30m`, `33s`,
/// `1s 500ms`, `250ms` (humantime parses each back; `0s` for zero). Below a millisecond:
/// microseconds (`20us`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u128); 5] = [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
            ("ms", 1),
        ];
        let mut left = self.0.as_millis();
        if left == 0 {
            let micros = self.0.as_micros();
            return match micros {
                0 => f.write_str("0s"),
                _ => write!(f, "{micros}us"),
            };
        }
        let mut first = true;
        for (unit, millis) in UNITS {
            let count = left / millis;
            if count > 0 {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "{count}{unit}")?;
                first = false;
                left %= millis;
            }
        }
        Ok(())
    }
}

/// RETENTION_MAX_AGE as set: `off`, or the maximum age (`7d`).
pub fn retention(retention: Option<Retention>) -> String {
    match retention {
        None => "off".to_string(),
        Some(r) => Human(r.max_age).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(d: Duration) -> String {
        Human(d).to_string()
    }

    #[test]
    fn durations_read_as_written() {
        assert_eq!(shown(Duration::from_secs(604_800)), "7d");
        assert_eq!(shown(Duration::from_secs(33)), "33s");
        assert_eq!(shown(Duration::from_millis(5_000)), "5s");
        assert_eq!(shown(Duration::from_secs(5_400)), "1h 30m");
        assert_eq!(shown(Duration::from_millis(1_500)), "1s 500ms");
        assert_eq!(shown(Duration::from_millis(250)), "250ms");
        assert_eq!(shown(Duration::from_micros(20)), "20us");
        assert_eq!(shown(Duration::ZERO), "0s");
    }

    #[test]
    fn what_is_shown_parses_back() {
        for d in [604_800_000, 33_000, 5_400_000, 1_500, 250, 90_061_001] {
            let d = Duration::from_millis(d);
            let text = shown(d);
            assert_eq!(humantime::parse_duration(&text).ok(), Some(d), "{text}");
        }
    }

    #[test]
    fn retention_is_off_or_its_age() {
        assert_eq!(retention(None), "off");
        let week = Retention {
            max_age: Duration::from_secs(604_800),
            interval: Duration::from_secs(60),
        };
        assert_eq!(retention(Some(week)), "7d");
    }
}
