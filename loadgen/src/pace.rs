//! Pacing math: when operation `n` of a fixed-rate run is due.
//!
//! Every deadline is computed from the run's start (`start + n / rate`), never from the previous
//! tick, so rounding and late wake-ups never accumulate: after an hour at 1,000/s exactly
//! 3,600,000 operations are due. An operation that is late (the in-flight bound held it back)
//! does not delay the ones after it; the run catches up, at most `--in-flight` at a time.

use std::time::Duration;

/// A fixed rate, in operations per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate: f64,
}

impl Schedule {
    /// `None` unless `rate` is positive and finite (a zero or NaN rate would never send, or
    /// panic in duration arithmetic).
    pub fn new(rate: f64) -> Option<Schedule> {
        (rate.is_finite() && rate > 0.0).then_some(Schedule { rate })
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// When operation `n` (counting from 0) is due, relative to the start, to the nanosecond.
    /// Saturates instead of panicking for absurdly slow rates.
    pub fn offset(&self, n: u64) -> Duration {
        let nanos = (n as f64 * 1e9 / self.rate).round();
        if nanos >= u64::MAX as f64 {
            Duration::MAX
        } else {
            Duration::from_nanos(nanos as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_rates_that_cannot_pace() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Schedule::new(rate).is_none(), "{rate}");
        }
    }

    #[test]
    fn deadlines_are_exact_and_do_not_drift() {
        let s = Schedule::new(1000.0).unwrap();
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(1));
        assert_eq!(s.offset(1000), Duration::from_secs(1));
        // An hour in: still exact to the microsecond (a tick-by-tick sum would have drifted).
        let hour = s.offset(3_600_000);
        assert!(hour.abs_diff(Duration::from_secs(3600)) < Duration::from_micros(1));
        // QUERIES_MIN=60 is one per second.
        let per_minute = Schedule::new(60.0 / 60.0).unwrap();
        assert_eq!(per_minute.offset(59), Duration::from_secs(59));
    }

    #[test]
    fn deadlines_increase_and_beat_tick_by_tick_summing() {
        let s = Schedule::new(3.0).unwrap();
        for n in 0..10_000u64 {
            assert!(s.offset(n + 1) > s.offset(n));
        }
        // Adding a rounded period per tick drifts (here by 1 ms over 3 million ops); deadlines
        // from the start do not.
        let period = s.offset(1);
        let summed = period * 3_000_000;
        assert_eq!(s.offset(3_000_000), Duration::from_secs(1_000_000));
        assert_eq!(
            Duration::from_secs(1_000_000) - summed,
            Duration::from_millis(1)
        );
        assert_eq!(Schedule::new(1e-300).unwrap().offset(5), Duration::MAX);
    }
}
