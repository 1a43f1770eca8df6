//! A queue of bytes waiting to be written to a socket.
//!
//! Small pieces (reply lines, request lines, small values) are copied into
//! one growing tail buffer, so a burst of small replies becomes one write;
//! large pieces (values) are queued as the `Bytes` they already are, never
//! copied, and written with vectored writes. Buffers are reused: the tail is
//! split off as a frozen `Bytes` only when it must be ordered before a large
//! piece or handed to the socket.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};

/// Pieces at most this large are copied instead of queued by reference:
/// copying a few KiB is cheaper than an extra iovec and refcount.
const COPY_THRESHOLD: usize = 4096;

/// At most this many iovecs per write (Linux accepts 1024; more is no faster).
const MAX_IOVECS: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl OutQueue {
    pub(crate) fn new() -> OutQueue {
        OutQueue::default()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a copy of `s`.
    pub(crate) fn put_slice(&mut self, s: &[u8]) {
        self.tail.extend_from_slice(s);
        self.len += s.len();
    }

    /// Appends `b`, by reference when it is large.
    pub(crate) fn put_bytes(&mut self, b: Bytes) {
        if b.len() <= COPY_THRESHOLD {
            self.put_slice(&b);
        } else {
            self.seal();
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    /// Lets a composer write directly into the tail; the closure returns
    /// nothing, and whatever it appended is counted.
    pub(crate) fn compose(&mut self, f: impl FnOnce(&mut BytesMut)) {
        let before = self.tail.len();
        f(&mut self.tail);
        self.len += self.tail.len() - before;
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
    }

    /// Drops everything queued (the connection is going away).
    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.tail.clear();
        self.len = 0;
    }

    /// Writes as much as the socket takes without blocking. Returns the
    /// number of bytes written; `WouldBlock` when nothing could be written.
    pub(crate) fn write_to(
        &mut self,
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut total = 0;
        while self.len > 0 {
            let n = self.write_once(usize::MAX, &mut write)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            total += n;
        }
        if self.tail.is_empty() && self.tail.capacity() > 256 * 1024 {
            // Do not keep a huge buffer around after a burst.
            self.tail = BytesMut::new();
        }
        Ok(total)
    }

    /// How many bytes from the front one vectored write can carry (all of
    /// them, unless they lie in more than `MAX_IOVECS` pieces).
    pub(crate) fn span(&mut self) -> usize {
        if self.chunks.is_empty() {
            return self.tail.len();
        }
        self.seal();
        self.chunks.iter().take(MAX_IOVECS).map(Bytes::len).sum()
    }

    /// One vectored write of the first `limit` bytes at most (see `span`);
    /// drops what `write` took and returns how much that was. For a writer
    /// whose write boundaries mean something (TLS records, see
    /// `backend::records`).
    pub(crate) fn write_prefix(
        &mut self,
        limit: usize,
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.write_once(limit, &mut write)
    }

    fn write_once(
        &mut self,
        limit: usize,
        write: &mut impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let n = if self.chunks.is_empty() {
            // Fast path: only the tail; write it in place, no split.
            let end = self.tail.len().min(limit);
            let n = write(&[IoSlice::new(&self.tail[..end])])?;
            self.tail.advance(n);
            n
        } else {
            self.seal();
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            let mut left = limit;
            for c in self.chunks.iter().take(MAX_IOVECS) {
                if left == 0 {
                    break;
                }
                let take = c.len().min(left);
                slices[count] = IoSlice::new(&c[..take]);
                count += 1;
                left -= take;
            }
            let n = write(&slices[..count])?;
            let mut left = n;
            while left > 0 {
                let Some(front) = self.chunks.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
            n
        };
        self.len -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_across_small_and_large_pieces() {
        let mut q = OutQueue::new();
        q.put_slice(b"a");
        q.put_bytes(Bytes::from(vec![b'b'; 5000]));
        q.put_slice(b"c");
        let mut out = Vec::new();
        // A socket that takes 7 bytes at a time.
        while !q.is_empty() {
            q.write_to(|iov| {
                let mut n = 0;
                for s in iov {
                    let take = (7 - n).min(s.len());
                    out.extend_from_slice(&s[..take]);
                    n += take;
                    if n == 7 {
                        break;
                    }
                }
                Ok(n)
            })
            .unwrap();
        }
        assert_eq!(out.len(), 5002);
        assert_eq!(out[0], b'a');
        assert_eq!(out[5001], b'c');
        assert!(out[1..5001].iter().all(|&b| b == b'b'));
    }
}
