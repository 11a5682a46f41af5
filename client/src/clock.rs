//! Time as the client needs it: wall-clock for the engine's timers and the report's `"t"`,
//! monotonic for round trips (a wall-clock step must not make a DPD look 10 s slow).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// One reading of both clocks, passed into every [`crate::Session`] call (tests pass made-up
/// ones).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Now {
    /// Microseconds since the UNIX epoch.
    pub unix_us: u64,
    /// Microseconds on a monotonic clock with an arbitrary origin.
    pub mono_us: u64,
}

impl Now {
    /// Milliseconds since the UNIX epoch: the engine's `now`.
    pub fn engine_ms(&self) -> u64 {
        self.unix_us / 1000
    }

    /// The report's `"t"`: Unix time in milliseconds with microsecond precision (an f64 holds
    /// today's ~1.8e15 µs exactly).
    pub fn t(&self) -> f64 {
        self.unix_us as f64 / 1000.0
    }

    /// Milliseconds from `earlier` to this reading on the monotonic clock.
    pub fn ms_since(&self, earlier: Now) -> f64 {
        self.mono_us.saturating_sub(earlier.mono_us) as f64 / 1000.0
    }
}

/// The process's clocks.
#[derive(Copy, Clone, Debug)]
pub struct Clock {
    origin: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// A clock whose monotonic origin is now.
    pub fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Reads both clocks.
    pub fn now(&self) -> Now {
        let unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Now {
            unix_us,
            mono_us: self.origin.elapsed().as_micros() as u64,
        }
    }

    /// The instant at which the wall clock reads `engine_ms` (an engine deadline), assuming it
    /// moves with the monotonic clock from `now`; a deadline in the past is `now`.
    pub fn instant_of(&self, now: Now, engine_ms: u64) -> Instant {
        let wait_ms = engine_ms.saturating_sub(now.engine_ms());
        self.origin
            + std::time::Duration::from_micros(now.mono_us)
            + std::time::Duration::from_millis(wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_keeps_microseconds() {
        let now = Now {
            unix_us: 1_760_000_000_123_456,
            mono_us: 0,
        };
        assert_eq!(now.t(), 1_760_000_000_123.456);
        assert_eq!(now.engine_ms(), 1_760_000_000_123);
    }

    #[test]
    fn deadlines_in_the_past_are_due_now() {
        let clock = Clock::new();
        let now = clock.now();
        let at = clock.instant_of(now, now.engine_ms().saturating_sub(5_000));
        assert!(at <= Instant::now());
        let later = clock.instant_of(now, now.engine_ms() + 2_000);
        assert!(later > Instant::now() + std::time::Duration::from_millis(1_500));
    }
}
