//! When to try a failed message again: exponential backoff with jitter, a pure function of the attempt.

use std::time::Duration;

use crate::config::Settings;

/// The retry policy of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    max_retries: u32,
    base: Duration,
    max: Duration,
}

impl RetryPolicy {
    pub(crate) fn new(settings: &Settings) -> Self {
        Self {
            max_retries: settings.max_retries,
            base: Duration::from_millis(settings.retry_delay_ms),
            max: Duration::from_millis(settings.max_retry_delay_ms.max(settings.retry_delay_ms)),
        }
    }

    /// The wait before the next attempt after `failed` failed attempts, or `None` when the message has
    /// used all its retries and must be dead-lettered. `jitter` in `[0, 1)` spreads retries of many
    /// messages apart (±20%).
    pub(crate) fn next_delay(&self, failed: u32, jitter: f64) -> Option<Duration> {
        if failed > self.max_retries {
            return None;
        }
        let exponent = failed.saturating_sub(1).min(20);
        let delay = self.base.saturating_mul(1 << exponent).min(self.max);
        Some(delay.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
    }
}

/// A cheap, good-enough random number in `[0, 1)` for spreading retries apart.
pub(crate) fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_retries: u32, base: u64, max: u64) -> RetryPolicy {
        RetryPolicy::new(&Settings {
            max_retries,
            retry_delay_ms: base,
            max_retry_delay_ms: max,
            ..Settings::default()
        })
    }

    #[test]
    fn doubles_up_to_the_cap_then_gives_up() {
        let p = policy(5, 100, 500);
        let delays: Vec<Option<u64>> = (1..=6)
            .map(|n| p.next_delay(n, 0.5).map(|d| d.as_millis() as u64))
            .collect();
        assert_eq!(
            delays,
            [Some(100), Some(200), Some(400), Some(500), Some(500), None]
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = policy(3, 1000, 30_000);
        assert_eq!(p.next_delay(1, 0.0), Some(Duration::from_millis(800)));
        assert!(p.next_delay(1, 0.999).unwrap() < Duration::from_millis(1200));
    }

    #[test]
    fn zero_retries_dead_letters_the_first_failure() {
        assert_eq!(policy(0, 10, 10).next_delay(1, 0.5), None);
    }
}
