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
//! So a delete clears records only if it is sent once the server settled:
//!
//! - it has been answering for a settle period since its last failure (the
//!   count starts at the first answer seen after the failure: a server
//!   stopped for a minute holds its buffers for that minute);
//! - the records it clears are a period old too (by their generation, see
//!   `MissedKeys::generation`): a record a peer of the fleet made stands
//!   for a failure this process never saw, and counts from when it came.
//!
//! A server that keeps failing never settles; it is failing anyway, and
//! once it stops, its records are cleared within two periods. New records
//! do not hold back older ones. While nothing is recorded none of this
//! runs. Pure: the caller passes the instants and does the waiting.

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
    /// Records of this generation or older are at least a period old.
    aged: u64,
    /// A later generation of the missed-key list, and when it was read:
    /// it becomes `aged` a period later.
    aging: Option<(Instant, u64)>,
}

/// Whether a delete sent now may clear records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The server settled: clear the records of this generation or older.
    Clear(u64),
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
    /// server's last failure; `generation`: the missed-key list's now.
    pub(crate) fn verdict(
        &mut self,
        now: Instant,
        failed: Option<Instant>,
        period: Duration,
        generation: u64,
    ) -> Verdict {
        self.age(now, period, generation);
        let Some(since) = self.current(failed) else {
            // Failed after the last answer seen: the count starts again
            // at the next one.
            self.answering_since = None;
            return Verdict::Wait(Duration::ZERO);
        };
        match (since + period).checked_duration_since(now) {
            Some(left) if !left.is_zero() => Verdict::Wait(left),
            _ => Verdict::Clear(self.aged),
        }
    }

    /// The generation read a period ago becomes the aged one, and the one
    /// read now starts aging.
    fn age(&mut self, now: Instant, period: Duration, generation: u64) {
        match self.aging {
            Some((read, gen)) if now.saturating_duration_since(read) >= period => {
                self.aged = self.aged.max(gen);
                self.aging = Some((now, generation));
            }
            Some(_) => {}
            None => self.aging = Some((now, generation)),
        }
    }

    /// How long after `now` the records too young to clear so far will
    /// have aged (after `verdict` said `Clear`, and none were that old).
    pub(crate) fn until_aged(&self, now: Instant, period: Duration) -> Duration {
        self.aging.map_or(Duration::ZERO, |(read, _)| {
            (read + period).saturating_duration_since(now)
        })
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
        // Recorded (generation 1) when a write timed out at t0; the server
        // is stopped, then answers again 10 s later.
        let failed = Some(t0);
        s.answered(t0 + ms(10_000), failed);
        let at = |n: u64| t0 + ms(10_000 + n);
        assert_eq!(s.verdict(at(0), failed, P, 1), Verdict::Wait(P));
        assert_eq!(s.verdict(at(300), failed, P, 1), Verdict::Wait(ms(200)));
        s.answered(at(300), failed);
        // Answers since do not restart the count.
        assert_eq!(s.verdict(at(500), failed, P, 1), Verdict::Clear(1));
    }

    #[test]
    fn a_failure_while_settling_starts_the_count_again() {
        let t0 = Instant::now();
        let mut s = Settle::default();
        s.answered(t0, None);
        assert_eq!(s.verdict(t0, None, P, 0), Verdict::Wait(P));
        // It fails 400 ms in (a probe or a request timed out).
        let failed = Some(t0 + ms(400));
        assert_eq!(
            s.verdict(t0 + ms(500), failed, P, 0),
            Verdict::Wait(Duration::ZERO),
            "not settled, whatever the clock says"
        );
        s.answered(t0 + ms(900), failed);
        assert_eq!(
            s.verdict(t0 + ms(1000), failed, P, 0),
            Verdict::Wait(ms(400))
        );
        assert_eq!(s.verdict(t0 + ms(1400), failed, P, 0), Verdict::Clear(0));
    }

    #[test]
    fn a_server_that_never_failed_still_waits_for_its_records_to_age() {
        let t0 = Instant::now();
        let mut s = Settle::default();
        s.answered(t0, None);
        // A peer recorded generations 1 to 3 (this process saw nothing
        // fail); the upkeep looks at once.
        let at = |n: u64| t0 + ms(10_000 + n);
        assert_eq!(s.verdict(at(0), None, P, 3), Verdict::Clear(0));
        assert_eq!(s.until_aged(at(0), P), P);
        assert_eq!(s.until_aged(at(200), P), ms(300));
        // More come meanwhile (4, 5): they wait for the next mark.
        assert_eq!(s.verdict(at(500), None, P, 5), Verdict::Clear(3));
        assert_eq!(s.verdict(at(700), None, P, 5), Verdict::Clear(3));
        assert_eq!(s.verdict(at(1000), None, P, 5), Verdict::Clear(5));
    }

    #[test]
    fn records_coming_all_the_time_do_not_hold_back_older_ones() {
        let t0 = Instant::now();
        let mut s = Settle::default();
        s.answered(t0, None);
        let mut cleared = 0;
        for step in 0..40u64 {
            // A new record every 50 ms, the upkeep looking as often.
            if let Verdict::Clear(g) = s.verdict(t0 + ms(step * 50), None, P, step) {
                cleared = g;
            }
        }
        // At 1950 ms: what was recorded by the mark read at 1000 ms.
        assert_eq!(cleared, 20);
    }
}
