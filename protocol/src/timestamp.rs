//! RFC 3339 timestamps as queries take them (`since`, `until`) and answers give them (`ts`).
//!
//! Parsing accepts what RFC 3339 allows: any UTC offset (`Z`, `+05:30`, `-00:00`), any number
//! of fractional digits, `T`, `t` or a space between date and time. Stored times have
//! microsecond precision, so a bound finer than that is rounded UP to the next microsecond:
//! for `ts >= since` and `ts < until` alike, that gives exactly the entries the exact bound
//! would. Written without a date library: the arithmetic is a few lines, and a dependency's
//! feature flags would rebuild half the workspace for it.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const MICROS_PER_DAY: i64 = 86_400_000_000;
/// 0000-01-01T00:00:00Z and 10000-01-01T00:00:00Z: parsed instants lie in between.
const FIRST_MICROS: i64 = -719_528 * MICROS_PER_DAY;
const END_MICROS: i64 = 2_932_897 * MICROS_PER_DAY;

/// An instant with microsecond precision (microseconds since 1970-01-01T00:00:00Z). Displays
/// and serializes as the contract's `YYYY-MM-DDTHH:MM:SS.ffffffZ`, which sorts as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    micros: i64,
}

/// Why a text is not an RFC 3339 timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    #[error("expected YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM), e.g. 2026-11-23T14:00:00Z")]
    Shape,
    #[error("{field} {value} is out of range")]
    Range { field: &'static str, value: u32 },
    /// The offset moves the instant before 0000-01-01T00:00:00Z or past 9999-12-31T23:59:59Z
    /// (found by fuzzing): such an instant could not be written back in this format.
    #[error("the instant in UTC is outside the years 0000 to 9999")]
    Years,
}

impl Timestamp {
    pub fn from_micros(micros: i64) -> Timestamp {
        Timestamp { micros }
    }

    /// Microseconds since the Unix epoch (negative before it).
    pub fn micros(self) -> i64 {
        self.micros
    }

    /// Parse RFC 3339 (see the module documentation for what is accepted).
    pub fn parse(text: &str) -> Result<Timestamp, TimestampError> {
        let b = text.as_bytes();
        if b.len() < 20 {
            return Err(TimestampError::Shape);
        }
        let year = digits(b, 0, 4)?;
        let month = digits(b, 5, 2)?;
        let day = digits(b, 8, 2)?;
        let hour = digits(b, 11, 2)?;
        let minute = digits(b, 14, 2)?;
        let second = digits(b, 17, 2)?;
        if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return Err(TimestampError::Shape);
        }
        if b[13] != b':' || b[16] != b':' {
            return Err(TimestampError::Shape);
        }
        check("month", month, 1, 12)?;
        check("day", day, 1, days_in_month(year, month))?;
        check("hour", hour, 0, 23)?;
        check("minute", minute, 0, 59)?;
        // 60 is a leap second: it counts as the first instant of the next minute.
        check("second", second, 0, 60)?;
        let mut at = 19;
        let mut micros = 0i64;
        if b[at] == b'.' {
            at += 1;
            let start = at;
            while at < b.len() && b[at].is_ascii_digit() {
                at += 1;
            }
            let fraction = &b[start..at];
            if fraction.is_empty() {
                return Err(TimestampError::Shape);
            }
            for (place, digit) in fraction.iter().take(6).enumerate() {
                micros += i64::from(digit - b'0') * 10i64.pow(5 - place as u32);
            }
            // Finer than a microsecond: round up (see the module documentation).
            if fraction.iter().skip(6).any(|digit| *digit != b'0') {
                micros += 1;
            }
        }
        let offset_minutes: i64 = match &b[at..] {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
                let hours = digits(b, at + 1, 2)?;
                let minutes = digits(b, at + 4, 2)?;
                check("offset hour", hours, 0, 23)?;
                check("offset minute", minutes, 0, 59)?;
                let total = i64::from(hours * 60 + minutes);
                if *sign == b'-' {
                    -total
                } else {
                    total
                }
            }
            _ => return Err(TimestampError::Shape),
        };
        let days = days_from_civil(i64::from(year), month, day);
        let seconds =
            days * 86_400 + i64::from(hour) * 3_600 + i64::from(minute) * 60 + i64::from(second)
                - offset_minutes * 60;
        let micros = seconds * 1_000_000 + micros;
        if !(FIRST_MICROS..END_MICROS).contains(&micros) {
            return Err(TimestampError::Years);
        }
        Ok(Timestamp { micros })
    }

    pub fn to_system_time(self) -> SystemTime {
        let magnitude = Duration::from_micros(self.micros.unsigned_abs());
        if self.micros >= 0 {
            UNIX_EPOCH + magnitude
        } else {
            // Parsed times start at year 0, which every supported platform represents.
            UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
        }
    }

    /// The instant, truncated to microseconds.
    pub fn from_system_time(time: SystemTime) -> Timestamp {
        let micros = match time.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_micros())
                .map(|m| -m)
                .unwrap_or(i64::MIN),
        };
        Timestamp { micros }
    }
}

/// `len` ASCII digits at `at` as a number.
fn digits(b: &[u8], at: usize, len: usize) -> Result<u32, TimestampError> {
    let field = b.get(at..at + len).ok_or(TimestampError::Shape)?;
    field.iter().try_fold(0u32, |n, c| {
        if c.is_ascii_digit() {
            Ok(n * 10 + u32::from(c - b'0'))
        } else {
            Err(TimestampError::Shape)
        }
    })
}

fn check(field: &'static str, value: u32, min: u32, max: u32) -> Result<(), TimestampError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(TimestampError::Range { field, value })
    }
}

fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.micros.div_euclid(MICROS_PER_DAY);
        let in_day = self.micros.rem_euclid(MICROS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let seconds = in_day / 1_000_000;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            seconds / 3_600,
            seconds / 60 % 60,
            seconds % 60,
            in_day % 1_000_000
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn parses_every_rfc3339_form_to_the_same_instant() {
        let expected = parse("2026-11-23T14:00:00.123456Z");
        for text in [
            "2026-11-23T14:00:00.123456Z",
            "2026-11-23t14:00:00.123456z",
            "2026-11-23 14:00:00.123456Z",
            "2026-11-23T15:30:00.123456+01:30",
            "2026-11-23T09:00:00.1234560-05:00",
            "2026-11-23T14:00:00.123456-00:00",
            "2026-11-24T00:00:00.123456+10:00",
            // Finer than a microsecond rounds up.
            "2026-11-23T14:00:00.123455001Z",
            "2026-11-23T14:00:00.1234551+00:00",
        ] {
            assert_eq!(parse(text), expected, "{text}");
        }
        assert_eq!(parse("2026-11-23T14:00:00.1234560000Z"), expected);
        assert_eq!(
            parse("2026-11-23T14:00:00Z").micros() + 500_000,
            parse("2026-11-23T14:00:00.5Z").micros()
        );
        assert_eq!(parse("1970-01-01T00:00:00Z").micros(), 0);
        assert_eq!(parse("1969-12-31T23:59:59.999999Z").micros(), -1);
        assert_eq!(
            parse("2016-12-31T23:59:60Z"),
            parse("2017-01-01T00:00:00Z"),
            "a leap second is the next minute's first instant"
        );
        assert_eq!(parse("2000-03-01T00:00:00Z").micros(), 951_868_800_000_000);
    }

    #[test]
    fn displays_the_contract_format_and_round_trips() {
        for text in [
            "2026-11-23T14:00:00.123456Z",
            "1970-01-01T00:00:00.000000Z",
            "1969-12-31T23:59:59.999999Z",
            "2000-02-29T23:59:59.000001Z",
            "0001-01-01T00:00:00.000000Z",
            "9999-12-31T23:59:59.999999Z",
        ] {
            assert_eq!(parse(text).to_string(), text);
        }
        let t = parse("2026-11-23T14:00:00.123456Z");
        assert_eq!(Timestamp::from_system_time(t.to_system_time()), t);
        let before = parse("1900-01-01T00:00:00.000001Z");
        assert_eq!(Timestamp::from_system_time(before.to_system_time()), before);
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#""2026-11-23T14:00:00.123456Z""#
        );
        assert_eq!(
            serde_json::from_str::<Timestamp>(r#""2026-11-23T15:00:00.123456+01:00""#).unwrap(),
            t
        );
    }

    #[test]
    fn refuses_what_is_not_rfc3339() {
        for text in [
            "",
            "2026-11-23",
            "2026-11-23T14:00:00",
            "2026-11-23T14:00Z",
            "2026-11-23T14:00:00.Z",
            "2026-11-23T14:00:00+0100",
            "2026-11-23T14:00:00+01",
            "2026-11-23T14:00:00 Z",
            "2026-11-23T14:00:00ZZ",
            "2026-11-23X14:00:00Z",
            "26-11-23T14:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T14:60:00Z",
            "2026-11-23T14:00:61Z",
            "2026-11-23T14:00:00+24:00",
            "+2026-11-23T14:00:00Z",
            "2026-11-23T14:00:00.12a456Z",
            "１９７０-01-01T00:00:00Z",
            // Found by fuzzing: valid text whose UTC instant has no four-digit year.
            "0000-01-01T00:00:00+00:01",
            "9999-12-31T23:59:59.9999999Z",
            "9999-12-31T23:59:59-00:01",
        ] {
            assert!(Timestamp::parse(text).is_err(), "{text:?} was accepted");
        }
    }
}
