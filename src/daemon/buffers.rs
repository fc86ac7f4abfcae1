//! Upload buffers kept for reuse while the spool drains: the chunk read back from disk and the
//! `upload_chunk` body built around it, about a MiB each.
//!
//! Why: freshly allocated, each of those is a new mapping the kernel faults in page by page,
//! zeroes and unmaps again once the request is sent. In a `perf record` of the daemon
//! draining a full spool that was a quarter of its CPU, taken from a backend that shares the
//! machine's cores. The pool is emptied whenever no upload is left, so an idle daemon holds
//! none of it.

use std::sync::{Arc, Mutex};

/// Enough for every upload slot's body on the wire, the next chunk read ahead, and a read.
const KEEP: usize = 2 * super::UPLOAD_CONCURRENCY + 2;

#[derive(Debug, Default)]
pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    /// An empty buffer, with the capacity of one used before when there is one.
    pub fn take(&self) -> Vec<u8> {
        super::lock(&self.free).pop().unwrap_or_default()
    }

    pub fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = super::lock(&self.free);
        if free.len() < KEEP && buf.capacity() > 0 {
            free.push(buf);
        }
    }

    pub fn clear(&self) {
        super::lock(&self.free).clear();
    }
}

/// A request body that goes back to its pool once the HTTP client is done with it.
pub struct Body {
    buf: Vec<u8>,
    pool: Arc<Pool>,
}

impl Body {
    pub fn new(buf: Vec<u8>, pool: Arc<Pool>) -> Self {
        Body { buf, pool }
    }

    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_sent_body_comes_back_for_the_next_chunk() {
        let pool = Arc::new(Pool::default());
        let mut b = pool.take();
        b.extend_from_slice(&[7; 4096]);
        let cap = b.capacity();
        let bytes = Body::new(b, pool.clone()).into_bytes();
        assert_eq!(bytes.len(), 4096);
        assert!(pool.take().capacity() == 0, "still in use: not in the pool");
        drop(bytes);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        pool.give(again);
        pool.clear();
        assert_eq!(pool.take().capacity(), 0);
    }
}
