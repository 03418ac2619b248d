//! The queue between ingest and delivery.
//!
//! Contract with its two sides:
//! * ingest calls [`Spool::append`]; when it returns `Ok`, the records are accepted and will be
//!   delivered at least once. When the queue holds `max_bytes` of undelivered records it
//!   answers [`SpoolError::Full`] and ingest turns that into `503` + `Retry-After`.
//! * delivery calls [`Spool::next_batch`] for a contiguous run of records (cut by count, bytes
//!   or time), and [`Spool::commit`] only after the upstream answered 2xx (or the batch was
//!   dead-lettered). Batches may commit out of order (several are in flight); space is freed
//!   once every record before it has committed, which is exactly what a segment log needs to
//!   delete whole segments.
//!
//! This version keeps records in memory: a crash loses what was not yet delivered. The
//! durable spool replaces the storage behind the same methods.
//!
//! Records are the stamped events already serialized as JSON, so delivery builds request
//! bodies by concatenation and never re-encodes an event.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Why an append was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpoolError {
    /// The queue holds `max_bytes` of undelivered records.
    #[error("the spool is full ({used} of {max} bytes hold undelivered events)")]
    Full {
        /// Bytes in use.
        used: u64,
        /// The limit.
        max: u64,
    },
    /// The daemon is shutting down and accepts nothing more.
    #[error("the daemon is shutting down")]
    Closed,
}

/// A run of records handed to delivery.
#[derive(Debug)]
pub struct Batch {
    /// Sequence numbers `[start, end)`; pass to [`Spool::commit`].
    pub seqs: Range<u64>,
    /// The records (serialized events), in order.
    pub records: Vec<Bytes>,
    /// Sum of the records' lengths.
    pub bytes: usize,
}

/// How delivery wants batches cut.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most records per batch.
    pub max_events: usize,
    /// Most record bytes per batch (a single larger record still goes alone).
    pub max_bytes: usize,
    /// Longest wait after the first record of a batch before it is sent anyway.
    pub timeout: Duration,
}

struct Entry {
    record: Bytes,
    arrived: Instant,
}

struct State {
    /// Records not yet committed; `entries[i]` has sequence number `head + i`.
    entries: VecDeque<Entry>,
    head: u64,
    /// Next sequence number to hand to delivery.
    read: u64,
    /// Bytes of uncommitted records.
    bytes: u64,
    /// Committed ranges not yet at the head: start -> end.
    committed: BTreeMap<u64, u64>,
    /// An append was refused for space and no space was freed since: readiness reports full
    /// even when a smaller record would still fit.
    refused: bool,
    closed: bool,
}

/// The bounded queue.
pub struct Spool {
    /// A std `Mutex`: every critical section is a few deque operations, never an `.await`.
    state: Mutex<State>,
    /// Wakes delivery when records arrive or the spool closes.
    readable: Notify,
    max_bytes: u64,
}

/// Counts for metrics and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Uncommitted records.
    pub events: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Spool {
    /// An empty spool holding at most `max_bytes` of undelivered records.
    pub fn new(max_bytes: u64) -> Self {
        Spool {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                head: 0,
                read: 0,
                bytes: 0,
                committed: BTreeMap::new(),
                refused: false,
                closed: false,
            }),
            readable: Notify::new(),
            max_bytes,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Poisoning would mean a panic inside a few deque operations; the state is still
        // consistent at every statement boundary, so recover instead of failing every caller.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts new records, all or none; refuses when the spool is full.
    pub async fn append(&self, records: Vec<Bytes>) -> Result<(), SpoolError> {
        self.push(records, true)
    }

    /// Accepts records that were already accepted elsewhere (events released from waiting
    /// for their session): never refused for space, since refusing would lose them.
    pub async fn append_accepted(&self, records: Vec<Bytes>) -> Result<(), SpoolError> {
        self.push(records, false)
    }

    fn push(&self, records: Vec<Bytes>, check_space: bool) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let add: u64 = records.iter().map(|r| r.len() as u64).sum();
        {
            let mut st = self.state();
            if st.closed && check_space {
                return Err(SpoolError::Closed);
            }
            if check_space && st.bytes + add > self.max_bytes {
                st.refused = true;
                return Err(SpoolError::Full {
                    used: st.bytes,
                    max: self.max_bytes,
                });
            }
            let now = Instant::now();
            st.bytes += add;
            st.entries.extend(records.into_iter().map(|record| Entry {
                record,
                arrived: now,
            }));
        }
        self.readable.notify_one();
        Ok(())
    }

    /// Whether ingest would be refused for space right now.
    pub fn is_full(&self) -> bool {
        let st = self.state();
        st.refused || st.bytes >= self.max_bytes
    }

    /// Uncommitted records and bytes.
    pub fn depth(&self) -> Depth {
        let st = self.state();
        Depth {
            events: st.entries.len() as u64,
            bytes: st.bytes,
        }
    }

    /// Stops accepting new records; delivery then drains what is left without waiting for
    /// batch timeouts and gets `None` once everything was handed out.
    pub fn close(&self) {
        self.state().closed = true;
        self.readable.notify_waiters();
        self.readable.notify_one();
    }

    /// The next batch, or `None` once the spool is closed and fully handed out.
    pub async fn next_batch(&self, limits: BatchLimits) -> Option<Batch> {
        loop {
            let wait_until = {
                let mut st = self.state();
                let start = (st.read - st.head) as usize;
                let unread = st.entries.len() - start;
                if unread == 0 {
                    if st.closed {
                        return None;
                    }
                    None
                } else {
                    let mut n = 0;
                    let mut bytes = 0usize;
                    for e in st.entries.range(start..) {
                        if n == limits.max_events
                            || (n > 0 && bytes + e.record.len() > limits.max_bytes)
                        {
                            break;
                        }
                        n += 1;
                        bytes += e.record.len();
                    }
                    let full = n == limits.max_events || n < unread || bytes >= limits.max_bytes;
                    let first_arrived = st.entries[start].arrived;
                    let due = first_arrived + limits.timeout;
                    if full || st.closed || due <= Instant::now() {
                        let records: Vec<Bytes> = st
                            .entries
                            .range(start..start + n)
                            .map(|e| e.record.clone())
                            .collect();
                        let from = st.read;
                        st.read += n as u64;
                        return Some(Batch {
                            seqs: from..from + n as u64,
                            records,
                            bytes,
                        });
                    }
                    Some(due)
                }
            };
            match wait_until {
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = self.readable.notified() => {}
                    }
                }
                None => self.readable.notified().await,
            }
        }
    }

    /// Marks a batch delivered; frees space once all earlier records are delivered too.
    pub fn commit(&self, seqs: Range<u64>) {
        let mut st = self.state();
        if seqs.start < st.head || seqs.is_empty() {
            return;
        }
        st.committed.insert(seqs.start, seqs.end);
        loop {
            let head = st.head;
            let Some(end) = st.committed.remove(&head) else {
                break;
            };
            let n = (end - st.head) as usize;
            let freed: u64 = st.entries.drain(..n).map(|e| e.record.len() as u64).sum();
            st.bytes -= freed;
            st.head = end;
            st.refused = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(n: usize, size: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(vec![b'a' + (i % 26) as u8; size]))
            .collect()
    }

    fn limits(max_events: usize, max_bytes: usize) -> BatchLimits {
        BatchLimits {
            max_events,
            max_bytes,
            timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn batches_cut_by_count_then_by_time() {
        let s = Spool::new(1 << 20);
        s.append(recs(5, 10)).await.unwrap();
        let b = s.next_batch(limits(2, 1000)).await.unwrap();
        assert_eq!(b.seqs, 0..2);
        let b = s.next_batch(limits(2, 1000)).await.unwrap();
        assert_eq!(b.seqs, 2..4);
        // One record left: it waits for the timeout (the paused clock auto-advances).
        let b = s.next_batch(limits(2, 1000)).await.unwrap();
        assert_eq!(b.seqs, 4..5);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_cut_by_bytes_and_oversized_record_goes_alone() {
        let s = Spool::new(1 << 20);
        s.append(recs(3, 40)).await.unwrap();
        s.append(vec![Bytes::from(vec![b'x'; 500])]).await.unwrap();
        let b = s.next_batch(limits(100, 100)).await.unwrap();
        assert_eq!((b.seqs.clone(), b.bytes), (0..2, 80));
        let b = s.next_batch(limits(100, 100)).await.unwrap();
        assert_eq!(b.seqs, 2..3);
        let b = s.next_batch(limits(100, 100)).await.unwrap();
        assert_eq!((b.seqs, b.bytes), (3..4, 500));
    }

    #[tokio::test]
    async fn full_then_freed_by_in_order_commits() {
        let s = Spool::new(100);
        s.append(recs(5, 20)).await.unwrap();
        assert!(s.is_full());
        assert!(matches!(
            s.append(recs(1, 1)).await,
            Err(SpoolError::Full {
                used: 100,
                max: 100
            })
        ));
        // Released events are never refused.
        s.append_accepted(recs(1, 20)).await.unwrap();
        s.close();
        let b1 = s.next_batch(limits(2, 1000)).await.unwrap();
        let b2 = s.next_batch(limits(2, 1000)).await.unwrap();
        // Out-of-order commit frees nothing until the head commits.
        s.commit(b2.seqs.clone());
        assert_eq!(
            s.depth(),
            Depth {
                events: 6,
                bytes: 120
            }
        );
        s.commit(b1.seqs.clone());
        assert_eq!(
            s.depth(),
            Depth {
                events: 2,
                bytes: 40
            }
        );
        let b3 = s.next_batch(limits(2, 1000)).await.unwrap();
        s.commit(b3.seqs);
        assert_eq!(s.depth(), Depth::default());
        assert!(s.next_batch(limits(2, 1000)).await.is_none());
    }

    #[tokio::test]
    async fn closed_spool_refuses_new_records() {
        let s = Spool::new(100);
        s.close();
        assert_eq!(s.append(recs(1, 1)).await, Err(SpoolError::Closed));
    }
}
