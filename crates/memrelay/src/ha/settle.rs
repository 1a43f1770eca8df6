//! When a delete on a server may clear its missed keys: once what the
//! server still held from before its last failure has been applied.
//!
//! A write memrelay gives up on (it timed out: the key is recorded as
//! missed, the write answered from another replica) is not always lost to
//! the server. memrelay resets the connection, but what the server's kernel
//! had already taken stays in its socket buffer (a reset does not empty
//! it), and a stopped server (SIGSTOP, a paused VM) applies it once it runs
//! again; bytes held up on the way can land late the same way. A delete
//! that gets there first, and clears the record, leaves the older value on
//! the server with nothing to keep it from being served.
//!
//! So a delete clears records only if it is sent once the server has been
//! answering for a settle period since its last failure (the count starts
//! at the first answer seen after the failure: a server stopped for a
//! minute holds its buffers for that minute). A failure during the wait
//! starts the count again; a server that keeps failing never settles (it
//! is failing anyway), and once it stops, its records are cleared within a
//! period. Only the server's settling counts, not the records' age: a key
//! written all the time is recorded again all the time, and would never
//! be old enough. While nothing is recorded none of this runs. Pure: the
//! caller passes the instants and does the waiting.

use std::time::{Duration, Instant};

/// The shortest settle period, whatever `--timeout` says: after a stop,
/// memcached's threads take their turns on a host that may be busy, and
/// one turn can take tens of milliseconds; a `--timeout` set lower than
/// this must not make the wait shorter than a few of them.
const SETTLE_AT_LEAST: Duration = Duration::from_millis(250);

/// The settle period for a server whose requests have `timeout` to be
/// answered: that timeout (`--timeout`), at least `SETTLE_AT_LEAST`.
/// memrelay already counts a server that sits longer than `--timeout` on a
/// request it was sent as failing; once it answers again, the same
/// allowance is what it gets to apply what it held. Sitting on it longer
/// is the slowness that makes its other requests time out, which is a
/// failure and starts the count again.
pub(crate) fn period(timeout: Duration) -> Duration {
    timeout.max(SETTLE_AT_LEAST)
}

/// What the upkeep knows of one server's settling.
#[derive(Debug, Default)]
pub(crate) struct Settle {
    /// When the server was first seen answering after its last failure.
    answering_since: Option<Instant>,
}

/// Whether a delete sent now may clear records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The server settled: clear them.
    Clear,
    /// Not yet: look again after this long (zero: at the next answer).
    Wait(Duration),
}

impl Settle {
    /// The server answered at `now`; `failed`: its last failure.
    pub(crate) fn answered(&mut self, now: Instant, failed: Option<Instant>) {
        if self.current(failed).is_none() {
            self.answering_since = Some(now);
        }
    }

    /// When the server was first seen answering after `failed`, if it has
    /// been seen answering since.
    fn current(&self, failed: Option<Instant>) -> Option<Instant> {
        self.answering_since
            .filter(|&since| failed.is_none_or(|f| f < since))
    }

    /// Whether a delete sent at `now` may clear records. `failed`: the
    /// server's last failure.
    pub(crate) fn verdict(
        &mut self,
        now: Instant,
        failed: Option<Instant>,
        period: Duration,
    ) -> Verdict {
        let Some(since) = self.current(failed) else {
            // Failed after the last answer seen: the count starts again
            // at the next one.
            self.answering_since = None;
            return Verdict::Wait(Duration::ZERO);
        };
        match (since + period).checked_duration_since(now) {
            Some(left) if !left.is_zero() => Verdict::Wait(left),
            _ => Verdict::Clear,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_millis(500);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_period_is_the_timeout_and_never_very_short() {
        assert_eq!(period(ms(500)), ms(500));
        assert_eq!(period(ms(2000)), ms(2000));
        assert_eq!(period(ms(10)), SETTLE_AT_LEAST);
    }

    #[test]
    fn a_server_clears_records_a_period_after_it_answers_again() {
        let t0 = Instant::now();
        let mut s = Settle::default();
        // Recorded when a write timed out at t0; the server
        // is stopped, then answers again 10 s later.
        let failed = Some(t0);
        s.answered(t0 + ms(10_000), failed);
        let at = |n: u64| t0 + ms(10_000 + n);
        assert_eq!(s.verdict(at(0), failed, P), Verdict::Wait(P));
        assert_eq!(s.verdict(at(300), failed, P), Verdict::Wait(ms(200)));
        s.answered(at(300), failed);
        // Answers since do not restart the count.
        assert_eq!(s.verdict(at(500), failed, P), Verdict::Clear);
    }

    #[test]
    fn a_failure_while_settling_starts_the_count_again() {
        let t0 = Instant::now();
        let mut s = Settle::default();
        s.answered(t0, None);
        assert_eq!(s.verdict(t0, None, P), Verdict::Wait(P));
        // It fails 400 ms in (a probe or a request timed out).
        let failed = Some(t0 + ms(400));
        assert_eq!(
            s.verdict(t0 + ms(500), failed, P),
            Verdict::Wait(Duration::ZERO),
            "not settled, whatever the clock says"
        );
        s.answered(t0 + ms(900), failed);
        assert_eq!(s.verdict(t0 + ms(1000), failed, P), Verdict::Wait(ms(400)));
        assert_eq!(s.verdict(t0 + ms(1400), failed, P), Verdict::Clear);
    }
}
