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
//! be old enough. While nothing is recorded none of this runs.
//!
//! A peer of the fleet that gave up on a write tells the others so
//! (`Held`): they saw no failure, and wait for the server on their own
//! looks before they delete that key for good. Pure: the caller passes the
//! instants and does the waiting.

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

/// The shortest wait of a held record (`Held`), whatever `--timeout`
/// says. A write the peer gave up on and reset is gone from the peer's
/// kernel, but a box on its way (a forwarder, a sidecar, a NAT that
/// queues) may still hold it, and deliver it later than a settle period
/// after this process saw the server answer.
const HELD_AT_LEAST: Duration = Duration::from_secs(1);

/// How long a held record waits once the server answered a look asked
/// after it was learnt: a settle period (`period`), at least
/// `HELD_AT_LEAST`.
pub(crate) fn held_period(timeout: Duration) -> Duration {
    period(timeout).max(HELD_AT_LEAST)
}

/// One look at the server by its prober: when it was asked, and when the
/// answer came.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Look {
    pub asked: Instant,
    pub answered: Instant,
}

/// A key a peer recorded while a write it gave up on may still be on its
/// way to the server (its hint said `held`, see `fleet`). This process may
/// have seen no failure of the server at all (the peer's link was the
/// slow one, or the server stopped between this process's looks), so its
/// own settling says nothing of the peer's write. The key is deleted for
/// good only once the server has answered a look asked after the record
/// was learnt, and a held period (`held_period`) has passed since that
/// answer: the allowance a server gets after a failure this process saw,
/// and more for a box on the peer's way to the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    learnt: Instant,
    answered: Option<Instant>,
}

impl Held {
    pub(crate) fn new(learnt: Instant) -> Held {
        Held {
            learnt,
            answered: None,
        }
    }

    /// How long before the key may be deleted for good (None: now),
    /// given the prober's last look.
    pub(crate) fn ripen(
        &mut self,
        look: Option<Look>,
        now: Instant,
        period: Duration,
    ) -> Option<Duration> {
        if self.answered.is_none() {
            self.answered = look.filter(|l| l.asked >= self.learnt).map(|l| l.answered);
        }
        match self.answered {
            // At the next look.
            None => Some(Duration::ZERO),
            Some(a) => (a + period)
                .checked_duration_since(now)
                .filter(|left| !left.is_zero()),
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

    #[test]
    fn a_held_record_ripens_a_period_after_a_look_asked_once_it_was_learnt() {
        let t0 = Instant::now();
        let at = |n: u64| t0 + ms(n);
        let mut h = Held::new(at(100));
        // A look asked before the record was learnt proves nothing: its
        // answer may have overtaken the peer's write.
        let early = Look {
            asked: at(90),
            answered: at(110),
        };
        assert_eq!(h.ripen(Some(early), at(110), P), Some(Duration::ZERO));
        assert_eq!(h.ripen(None, at(120), P), Some(Duration::ZERO));
        let look = Look {
            asked: at(130),
            answered: at(140),
        };
        assert_eq!(h.ripen(Some(look), at(140), P), Some(P));
        // Later looks do not restart the count.
        let later = Look {
            asked: at(400),
            answered: at(410),
        };
        assert_eq!(h.ripen(Some(later), at(440), P), Some(ms(200)));
        assert_eq!(h.ripen(Some(later), at(640), P), None);
    }
}
