//! A wake-up flag for tasks on one thread.
//!
//! tokio's `Notify` is built for many threads; within a worker everything is
//! single-threaded, so a `Cell` flag and one stored waker do the job with no
//! atomics beyond the waker's own.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub(crate) struct LocalNotify {
    notified: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl std::fmt::Debug for LocalNotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNotify")
            .field("notified", &self.notified.get())
            .finish()
    }
}

impl LocalNotify {
    pub(crate) fn notify(&self) {
        self.notified.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Resolves once `notify` has been called since the last time it resolved.
    pub(crate) async fn notified(&self) {
        poll_fn(|cx| self.poll_notified(cx)).await
    }

    /// `notified` as a poll: ready if `notify` has been called since the
    /// last time it was, otherwise `cx`'s task is woken by the next call.
    pub(crate) fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.notified.replace(false) {
            return Poll::Ready(());
        }
        match self.waker.take() {
            Some(w) if w.will_wake(cx.waker()) => self.waker.set(Some(w)),
            _ => self.waker.set(Some(cx.waker().clone())),
        }
        Poll::Pending
    }
}
