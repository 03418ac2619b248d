//! The durable queue between ingest and delivery, and the daemon's durable state.
//!
//! # Promise
//! With `fsync = "always"`, [`Spool::write`] returns `Ok` only after the records are on disk
//! (fsynced); that is when ingest answers 2xx. Delivery reads records in order with
//! [`Spool::next_batch`] and calls [`Spool::commit`] only after the upstream answered 2xx (or
//! the batch was dead-lettered); only then is space freed and, later, the data deleted. So a
//! crash, a `kill -9` or a power cut loses nothing accepted: after a restart, every accepted
//! but uncommitted record is delivered again, with the same bytes and so the same event id.
//!
//! # Layout (`spool.dir`)
//! * `queue/<first seq, 20 digits>.seg` — segment files of event frames ([`frame`]), appended
//!   by one writer thread, rolled at [`SEGMENT_BYTES`], deleted once every record in them is
//!   committed;
//! * `queue/head` — the first uncommitted sequence number (text), replaced atomically by
//!   rename; it lags the in-memory head a little, which only means a few batches may be
//!   delivered twice after a crash (at-least-once, same ids);
//! * `state/state.log` — key/value operations (sessions, parked events, ...), compacted by
//!   rewriting the live keys when it grows to twice their size.
//!
//! # Group commit
//! Appenders encode their frames into a shared buffer under a mutex and wait on a oneshot.
//! The writer thread takes everything buffered, writes it with one `write`, fsyncs once, and
//! completes every waiter of that group. While it fsyncs, new appends accumulate for the next
//! group, so concurrent writers share fsyncs and throughput grows with concurrency.
//!
//! # Failure
//! A failed write (ENOSPC, EIO) is truncated away and its appenders get
//! [`SpoolError::Io`] (ingest answers 503): nothing already accepted is touched, and the next
//! append simply tries again, so the spool recovers by itself when space returns. Recovery at
//! start truncates a torn tail, skips and counts damaged frames (resynchronizing on the frame
//! magic) and never refuses to start because of damaged data.
//!
//! Why our own log rather than an embedded store: see `docs/SPOOL.md` (measurements).

pub mod frame;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::config::FsyncPolicy;

/// A segment is closed and a new one started once it holds this many bytes. Small enough that
/// delivered data is deleted soon, large enough that the directory stays short.
pub const SEGMENT_BYTES: u64 = 32 << 20;

/// When delivery has caught up and the active segment holds at least this much, the writer
/// starts a new segment so the delivered one can be deleted. Small enough to keep an idle
/// spool small on disk, large enough that a busy one does not create files per batch.
pub const ROLL_WHEN_CAUGHT_UP: u64 = 1 << 20;

/// The state log is compacted when it is this large and more than twice its live data.
pub const STATE_COMPACT_BYTES: u64 = 1 << 20;

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
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
    /// Writing failed (disk full, I/O error); the records were not accepted.
    #[error("the spool cannot write: {0}")]
    Io(String),
}

/// A key/value change to the durable state, written with the records of the same call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOp {
    /// Set a key.
    Put(String, Vec<u8>),
    /// Remove a key.
    Delete(String),
}

/// Whether a write may be refused for space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// New records: refused when the spool is full.
    Check,
    /// Records already accepted elsewhere (released from waiting for a session): never
    /// refused for space, since refusing would lose them.
    Accepted,
}

/// What delivery passes back to [`Spool::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Sequence numbers covered, `[start, end)`; consecutive batches cover consecutive ranges.
    pub seqs: Range<u64>,
    /// Records in the batch.
    pub count: u64,
    /// Their encoded bytes on disk.
    pub frame_bytes: u64,
}

/// A run of records handed to delivery.
#[derive(Debug)]
pub struct Batch {
    /// For [`Spool::commit`].
    pub ack: Ack,
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
    /// Longest wait after the first record of a batch is seen before it is sent anyway.
    pub timeout: Duration,
}

/// Counts for metrics and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Accepted, uncommitted records.
    pub events: u64,
    /// Their bytes on disk.
    pub bytes: u64,
}

/// What recovery found at start.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The durable key/value state.
    pub state: HashMap<String, Vec<u8>>,
    /// Accepted, undelivered events found.
    pub events: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Damaged frames skipped.
    pub corrupt: u64,
    /// Bytes of torn tails cut off.
    pub torn_bytes: u64,
    /// Segment files read.
    pub segments: usize,
}

struct Seg {
    first_seq: u64,
    /// Highest sequence number in it, once it holds a record.
    last_seq: Option<u64>,
    /// The writer will not append to it again (rolled away, failed, or recovered).
    sealed: bool,
    path: PathBuf,
    /// Read handle (the writer has its own append handle).
    file: Arc<File>,
    /// Bytes of valid, durable frames.
    len: u64,
    /// Damaged regions `[from, to)` recovery found; the reader jumps over them.
    skips: Vec<(u64, u64)>,
}

struct Cursor {
    seg_first_seq: u64,
    offset: u64,
}

struct State {
    next_seq: u64,
    pending: Vec<u8>,
    pending_state: Vec<u8>,
    pending_state_ops: Vec<StateOp>,
    /// Sequence number of the next state operation (its own counter, not the events').
    next_state_seq: u64,
    pending_count: u64,
    pending_first_seq: Option<u64>,
    waiters: Vec<oneshot::Sender<Result<(), SpoolError>>>,
    writing: bool,

    segments: VecDeque<Seg>,
    durable_bytes: u64,
    durable_count: u64,

    cursor: Cursor,
    read_bytes: u64,
    read_count: u64,
    read_seq: u64,
    batch_started: Option<Instant>,

    head: u64,
    committed: BTreeMap<u64, Ack>,
    used: u64,
    unacked: u64,
    head_dirty: bool,

    refused: bool,
    /// `(first seq, when)` of appends, at most one entry per second: the age of the oldest
    /// undelivered record, to within a second, without a timestamp per record.
    arrivals: VecDeque<(u64, Instant)>,
    closed: bool,
    stop: bool,
    /// Test hook: the writer exits at once, as if the process were killed.
    crashed: bool,
}

struct Shared {
    st: Mutex<State>,
    /// Wakes the writer thread (std `Condvar`: the writer is a plain thread doing blocking I/O).
    work: Condvar,
    /// Wakes the reader when records became durable or the spool closed.
    readable: Notify,
    max_bytes: u64,
    fsync: bool,
    segment_bytes: u64,
    /// Damaged records skipped by the reader since start.
    corrupt_read: std::sync::atomic::AtomicU64,
    queue_dir: PathBuf,
    state_dir: PathBuf,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in a few lines of bookkeeping; the
        // state is consistent between statements, so recover rather than wedge every caller.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The spool.
pub struct Spool {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> SpoolError {
    SpoolError::Io(format!("{what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering what is there.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        fsync: FsyncPolicy,
    ) -> Result<(Spool, Recovery), SpoolError> {
        Self::open_with(dir, max_bytes, fsync, SEGMENT_BYTES)
    }

    /// [`Spool::open`] with a chosen segment size (tests use small ones to exercise rolling).
    pub fn open_with(
        dir: &Path,
        max_bytes: u64,
        fsync: FsyncPolicy,
        segment_bytes: u64,
    ) -> Result<(Spool, Recovery), SpoolError> {
        let queue_dir = dir.join("queue");
        let state_dir = dir.join("state");
        for d in [&queue_dir, &state_dir] {
            std::fs::create_dir_all(d).map_err(|e| io_err("creating", d, e))?;
        }
        let mut rec = Recovery::default();
        let head_path = queue_dir.join("head");
        let head: u64 = match std::fs::read_to_string(&head_path) {
            Ok(s) => s.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(path = %head_path.display(), "unreadable head file; replaying the whole queue");
                0
            }),
            Err(_) => 0,
        };
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(&queue_dir)
            .map_err(|e| io_err("listing", &queue_dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                let stem = p.file_name()?.to_str()?.strip_suffix(".seg")?.to_string();
                stem.parse::<u64>().ok().map(|n| (n, p))
            })
            .collect();
        names.sort();
        let mut segments = VecDeque::new();
        let mut seg_state: Vec<(u64, StateOp)> = Vec::new();
        let mut next_seq = head;
        let mut cursor: Option<Cursor> = None;
        let last = names.len().saturating_sub(1);
        for (i, (first_seq, path)) in names.into_iter().enumerate() {
            // A segment's name is the seq of the first record ever written to it, so that seq
            // was used even if damage left nothing of it: never hand it out again, or a new
            // segment would get the same file name as this one.
            next_seq = next_seq.max(first_seq + 1);
            let data = std::fs::read(&path).map_err(|e| io_err("reading", &path, e))?;
            let scan = frame::scan(&data);
            rec.segments += 1;
            rec.corrupt += scan.corrupt;
            if scan.tail_garbage > 0 {
                if i == last {
                    // The crash tore the last write: cut it off so the file ends on a frame.
                    rec.torn_bytes += scan.tail_garbage;
                    tracing::warn!(path = %path.display(), bytes = scan.tail_garbage, "truncating a torn tail");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| io_err("opening", &path, e))?;
                    f.set_len(scan.valid_len)
                        .map_err(|e| io_err("truncating", &path, e))?;
                    f.sync_all().map_err(|e| io_err("syncing", &path, e))?;
                } else {
                    rec.corrupt += 1;
                    tracing::warn!(path = %path.display(), bytes = scan.tail_garbage, "ignoring a damaged segment tail");
                }
            }
            if scan.corrupt > 0 {
                tracing::warn!(path = %path.display(), damaged = scan.corrupt, "skipping damaged records");
            }
            let mut skips = Vec::new();
            let mut expect = 0u64;
            let mut max_seq = None;
            for &(off, kind, seq, len) in &scan.frames {
                if off != expect {
                    skips.push((expect, off));
                }
                expect = off + u64::from(len);
                if kind != frame::kind::EVENT {
                    // A copy of state operations written with events (see the writer).
                    let body = &data[off as usize + frame::HEADER + frame::BODY_PREFIX
                        ..(off + u64::from(len)) as usize];
                    if let Some(op) = decode_state_op(kind, body) {
                        seg_state.push((seq, op));
                    }
                    continue;
                }
                max_seq = Some(max_seq.map_or(seq, |m: u64| m.max(seq)));
                if seq >= head {
                    if cursor.is_none() {
                        cursor = Some(Cursor {
                            seg_first_seq: first_seq,
                            offset: off,
                        });
                    }
                    rec.events += 1;
                    rec.bytes += u64::from(len);
                }
            }
            if let Some(m) = max_seq {
                next_seq = next_seq.max(m + 1);
            }
            if max_seq.is_none_or(|m| m < head) && cursor.is_none() {
                // Everything in it was delivered (or it holds nothing): delete it now.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let file = File::open(&path).map_err(|e| io_err("opening", &path, e))?;
            segments.push_back(Seg {
                first_seq,
                last_seq: max_seq,
                sealed: true,
                path,
                file: Arc::new(file),
                len: scan.valid_len,
                skips,
            });
        }
        let state_path = state_dir.join("state.log");
        let (mut state, log_max) = recover_state(&state_path, &mut rec)?;
        // State operations that reached a segment (with their events) but not the state log
        // (a crash between the two fsyncs): apply them and make the log whole again.
        seg_state.sort_by_key(|(n, _)| *n);
        let missing: Vec<(u64, StateOp)> = seg_state
            .into_iter()
            .filter(|(n, _)| log_max.is_none_or(|m| *n > m))
            .collect();
        let mut next_state_seq = log_max.map_or(0, |m| m + 1);
        if !missing.is_empty() {
            tracing::warn!(
                ops = missing.len(),
                "replaying state operations the state log missed"
            );
            let mut buf = Vec::new();
            for (n, op) in &missing {
                encode_state_op(&mut buf, *n, op);
                apply_state_op(&mut state, op.clone());
                next_state_seq = next_state_seq.max(n + 1);
            }
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&state_path)
                .map_err(|e| io_err("opening", &state_path, e))?;
            f.write_all(&buf)
                .and_then(|()| f.sync_data())
                .map_err(|e| io_err("writing", &state_path, e))?;
        }
        rec.state = state;
        let cursor = cursor.unwrap_or(Cursor {
            seg_first_seq: next_seq,
            offset: 0,
        });
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                next_seq,
                pending: Vec::new(),
                pending_state: Vec::new(),
                pending_state_ops: Vec::new(),
                next_state_seq,
                pending_count: 0,
                pending_first_seq: None,
                waiters: Vec::new(),
                writing: false,
                segments,
                durable_bytes: rec.bytes,
                durable_count: rec.events,
                cursor,
                read_bytes: 0,
                read_count: 0,
                read_seq: head,
                batch_started: None,
                head,
                committed: BTreeMap::new(),
                used: rec.bytes,
                unacked: rec.events,
                head_dirty: false,
                refused: false,
                arrivals: if rec.events > 0 {
                    VecDeque::from([(head, Instant::now())])
                } else {
                    VecDeque::new()
                },
                closed: false,
                stop: false,
                crashed: false,
            }),
            work: Condvar::new(),
            readable: Notify::new(),
            max_bytes,
            fsync: fsync == FsyncPolicy::Always,
            segment_bytes,
            corrupt_read: std::sync::atomic::AtomicU64::new(0),
            queue_dir,
            state_dir,
        });
        let writer = Writer::new(Arc::clone(&shared), &rec.state)?;
        let handle = std::thread::Builder::new()
            .name("voicetagd-spool".into())
            .spawn(move || writer.run())
            .map_err(|e| SpoolError::Io(format!("starting the spool writer: {e}")))?;
        Ok((
            Spool {
                shared,
                writer: Mutex::new(Some(handle)),
            },
            rec,
        ))
    }

    /// Appends new records; refused when full.
    pub async fn append(&self, records: Vec<Bytes>) -> Result<(), SpoolError> {
        self.write(records, Vec::new(), Space::Check).await
    }

    /// Appends records that were already accepted; never refused for space.
    pub async fn append_accepted(&self, records: Vec<Bytes>) -> Result<(), SpoolError> {
        self.write(records, Vec::new(), Space::Accepted).await
    }

    /// Writes records and state changes together; returns once both are durable (with
    /// `fsync = "always"`) or written (with `"never"`).
    pub async fn write(
        &self,
        records: Vec<Bytes>,
        state: Vec<StateOp>,
        space: Space,
    ) -> Result<(), SpoolError> {
        if records.is_empty() && state.is_empty() {
            return Ok(());
        }
        let add: u64 = records
            .iter()
            .map(|r| frame::frame_len(r.len()) as u64)
            .sum();
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if st.closed && space == Space::Check {
                return Err(SpoolError::Closed);
            }
            if space == Space::Check && !records.is_empty() && st.used + add > self.shared.max_bytes
            {
                st.refused = true;
                return Err(SpoolError::Full {
                    used: st.used,
                    max: self.shared.max_bytes,
                });
            }
            st.used += add;
            st.unacked += records.len() as u64;
            if !records.is_empty() {
                let now = Instant::now();
                let first = st.next_seq;
                if st.unacked == records.len() as u64 {
                    // Nothing was waiting: older entries describe delivered records.
                    st.arrivals.clear();
                }
                if st
                    .arrivals
                    .back()
                    .is_none_or(|(_, t)| now.duration_since(*t) >= Duration::from_secs(1))
                {
                    st.arrivals.push_back((first, now));
                }
            }
            for r in &records {
                let seq = st.next_seq;
                st.next_seq += 1;
                if st.pending_first_seq.is_none() {
                    st.pending_first_seq = Some(seq);
                }
                frame::encode(&mut st.pending, frame::kind::EVENT, seq, r);
                st.pending_count += 1;
            }
            for op in state {
                let n = st.next_state_seq;
                st.next_state_seq += 1;
                encode_state_op(&mut st.pending_state, n, &op);
                st.pending_state_ops.push(op);
            }
            st.waiters.push(tx);
        }
        self.shared.work.notify_one();
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(SpoolError::Io("the spool writer stopped".into())),
        }
    }

    /// Whether ingest would be refused for space (or the disk failed) right now.
    pub fn is_full(&self) -> bool {
        let st = self.shared.lock();
        st.refused || st.used >= self.shared.max_bytes
    }

    /// Accepted, uncommitted records and bytes.
    pub fn depth(&self) -> Depth {
        let st = self.shared.lock();
        Depth {
            events: st.unacked,
            bytes: st.used,
        }
    }

    /// Age of the oldest undelivered record (to within a second; zero when none).
    pub fn oldest_age(&self) -> Duration {
        let st = self.shared.lock();
        if st.unacked == 0 {
            return Duration::ZERO;
        }
        st.arrivals
            .front()
            .map(|(_, t)| t.elapsed())
            .unwrap_or(Duration::ZERO)
    }

    /// Damaged records the reader skipped since start (recovery's count is in [`Recovery`]).
    pub fn corrupt_read(&self) -> u64 {
        self.shared
            .corrupt_read
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops accepting new records; delivery then drains what is left without waiting for
    /// batch timeouts and gets `None` once everything was handed out.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.readable.notify_waiters();
        self.shared.readable.notify_one();
    }

    /// The next batch, or `None` once the spool is closed and fully handed out. One reader.
    pub async fn next_batch(&self, limits: BatchLimits) -> Option<Batch> {
        loop {
            // Register interest before checking, so a notification between the check and the
            // wait is not lost.
            let notified = self.shared.readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let plan = {
                let mut st = self.shared.lock();
                let unread = st.durable_count.saturating_sub(st.read_count);
                let unread_bytes = st.durable_bytes.saturating_sub(st.read_bytes);
                if unread_bytes == 0 {
                    st.batch_started = None;
                    if st.closed && st.pending_count == 0 && !st.writing {
                        return None;
                    }
                    None
                } else {
                    let now = Instant::now();
                    let started = *st.batch_started.get_or_insert(now);
                    let due = started + limits.timeout;
                    if unread as usize >= limits.max_events
                        || unread_bytes as usize >= limits.max_bytes
                        || st.closed
                        || due <= now
                    {
                        Some(Ok(read_plan(&st)))
                    } else {
                        Some(Err(due))
                    }
                }
            };
            match plan {
                None => notified.await,
                Some(Err(due)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = notified => {}
                    }
                }
                Some(Ok(plan)) => {
                    let read = tokio::task::spawn_blocking(move || plan.read(limits)).await;
                    let read = match read {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            // The file is there and was readable at recovery; an error here is
                            // a failing disk. Keep the records and try again shortly.
                            tracing::error!(error = %e, "cannot read the spool; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                        Err(_) => continue,
                    };
                    if read.frame_bytes == 0 {
                        // Counters said there is something to read but the files hold nothing
                        // more: a bookkeeping bug. Do not spin; look again shortly.
                        tracing::error!("spool reader found no records where some were expected");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    let batch = {
                        let mut st = self.shared.lock();
                        st.cursor = read.cursor;
                        st.read_count += read.records.len() as u64 + read.corrupt;
                        st.read_bytes += read.frame_bytes;
                        st.batch_started = None;
                        let start = st.read_seq;
                        let end = if read.records.is_empty() {
                            start
                        } else {
                            read.last_seq + 1
                        };
                        st.read_seq = end;
                        Batch {
                            ack: Ack {
                                seqs: start..end,
                                count: read.records.len() as u64 + read.corrupt,
                                frame_bytes: read.frame_bytes,
                            },
                            bytes: read.payload_bytes,
                            records: read.records,
                        }
                    };
                    self.shared
                        .corrupt_read
                        .fetch_add(read.corrupt, std::sync::atomic::Ordering::Relaxed);
                    if batch.records.is_empty() {
                        // Only damage was read: release its space at once (there is nothing to
                        // deliver or commit) and read on.
                        let mut st = self.shared.lock();
                        st.used = st.used.saturating_sub(batch.ack.frame_bytes);
                        st.unacked = st.unacked.saturating_sub(batch.ack.count);
                        continue;
                    }
                    return Some(batch);
                }
            }
        }
    }

    /// Marks a batch delivered; frees space once all earlier batches are delivered too.
    pub fn commit(&self, ack: &Ack) {
        {
            let mut st = self.shared.lock();
            if ack.seqs.start < st.head {
                return;
            }
            st.committed.insert(ack.seqs.start, ack.clone());
            loop {
                let head = st.head;
                let Some(a) = st.committed.remove(&head) else {
                    break;
                };
                st.head = a.seqs.end;
                while st.arrivals.len() >= 2 && st.arrivals[1].0 <= st.head {
                    st.arrivals.pop_front();
                }
                st.used = st.used.saturating_sub(a.frame_bytes);
                st.unacked = st.unacked.saturating_sub(a.count);
                st.refused = false;
                st.head_dirty = true;
            }
        }
        self.shared.work.notify_one();
    }

    /// Simulates `kill -9` for tests: the writer stops without persisting the latest head.
    #[cfg(test)]
    pub fn crash_for_test(&self) {
        {
            let mut st = self.shared.lock();
            st.crashed = true;
            st.stop = true;
        }
        self.shutdown();
    }

    /// Stops the writer after it wrote what is buffered and persisted the head.
    pub fn shutdown(&self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_one();
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the reader needs to read without holding the lock.
/// One segment as the reader sees it: first seq, read handle, durable length, skips.
type SegView = (u64, Arc<File>, u64, Vec<(u64, u64)>);

struct ReadPlan {
    segs: Vec<SegView>,
    cursor: Cursor,
}

struct ReadOut {
    records: Vec<Bytes>,
    /// Bytes the cursor advanced over: the records' frames plus damaged regions skipped.
    frame_bytes: u64,
    /// Damaged regions found (and skipped) while reading.
    corrupt: u64,
    payload_bytes: usize,
    last_seq: u64,
    cursor: Cursor,
}

fn read_plan(st: &State) -> ReadPlan {
    let segs = st
        .segments
        .iter()
        .filter(|s| s.first_seq >= st.cursor.seg_first_seq)
        .map(|s| (s.first_seq, Arc::clone(&s.file), s.len, s.skips.clone()))
        .collect();
    ReadPlan {
        segs,
        cursor: Cursor {
            seg_first_seq: st.cursor.seg_first_seq,
            offset: st.cursor.offset,
        },
    }
}

impl ReadPlan {
    fn read(self, limits: BatchLimits) -> std::io::Result<ReadOut> {
        let mut out = ReadOut {
            records: Vec::new(),
            frame_bytes: 0,
            corrupt: 0,
            payload_bytes: 0,
            last_seq: 0,
            cursor: self.cursor,
        };
        let mut buf = Vec::new();
        for (first_seq, file, len, skips) in &self.segs {
            if *first_seq < out.cursor.seg_first_seq {
                continue;
            }
            if *first_seq > out.cursor.seg_first_seq {
                out.cursor = Cursor {
                    seg_first_seq: *first_seq,
                    offset: 0,
                };
            }
            loop {
                if let Some(&(_, to)) = skips
                    .iter()
                    .find(|(from, to)| out.cursor.offset >= *from && out.cursor.offset < *to)
                {
                    out.cursor.offset = to;
                }
                if out.cursor.offset >= *len {
                    break;
                }
                if out.records.len() >= limits.max_events
                    || (!out.records.is_empty() && out.payload_bytes >= limits.max_bytes)
                {
                    return Ok(out);
                }
                // Read the header, then the body.
                let mut header = [0u8; frame::HEADER];
                file.read_exact_at(&mut header, out.cursor.offset)?;
                let body_len =
                    u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
                let total = frame::HEADER + body_len;
                let parsed =
                    if out.cursor.offset + total as u64 > *len || body_len > frame::MAX_BODY {
                        None
                    } else {
                        buf.resize(total, 0);
                        file.read_exact_at(&mut buf, out.cursor.offset)?;
                        match frame::parse(&buf) {
                            frame::Parsed::Frame(f) => Some(f),
                            _ => None,
                        }
                    };
                let Some(f) = parsed else {
                    // Damaged after it was written (bit rot, a foreign write): skip to the next
                    // valid frame of this segment, as recovery would, rather than stall on it.
                    let mut rest = vec![0u8; (*len - out.cursor.offset) as usize];
                    file.read_exact_at(&mut rest, out.cursor.offset)?;
                    let skip = frame::resync(&rest, 0).unwrap_or(rest.len()) as u64;
                    tracing::error!(
                        offset = out.cursor.offset,
                        bytes = skip,
                        "skipping a damaged spool record"
                    );
                    out.corrupt += 1;
                    out.frame_bytes += skip;
                    out.cursor.offset += skip;
                    continue;
                };
                let payload_len = f.payload.len();
                if !out.records.is_empty() && out.payload_bytes + payload_len > limits.max_bytes {
                    return Ok(out);
                }
                if f.kind == frame::kind::EVENT {
                    out.records.push(Bytes::copy_from_slice(f.payload));
                    out.payload_bytes += payload_len;
                    out.frame_bytes += total as u64;
                    out.last_seq = f.seq;
                }
                out.cursor.offset += total as u64;
            }
        }
        Ok(out)
    }
}

fn decode_state_op(kind: u8, payload: &[u8]) -> Option<StateOp> {
    match kind {
        frame::kind::PUT => {
            let klen = u16::from_le_bytes([*payload.first()?, *payload.get(1)?]) as usize;
            let key = std::str::from_utf8(payload.get(2..2 + klen)?)
                .ok()?
                .to_string();
            Some(StateOp::Put(key, payload.get(2 + klen..)?.to_vec()))
        }
        frame::kind::DELETE => Some(StateOp::Delete(
            std::str::from_utf8(payload).ok()?.to_string(),
        )),
        _ => None,
    }
}

/// The live key/value state.
type StateMap = HashMap<String, Vec<u8>>;

fn encode_state_op(out: &mut Vec<u8>, seq: u64, op: &StateOp) {
    match op {
        StateOp::Put(k, v) => {
            let klen = k.len().min(u16::MAX as usize);
            let mut payload = Vec::with_capacity(2 + klen + v.len());
            payload.extend_from_slice(&(klen as u16).to_le_bytes());
            payload.extend_from_slice(&k.as_bytes()[..klen]);
            payload.extend_from_slice(v);
            frame::encode(out, frame::kind::PUT, seq, &payload);
        }
        StateOp::Delete(k) => {
            frame::encode(out, frame::kind::DELETE, seq, k.as_bytes());
        }
    }
}

fn apply_state_op(live: &mut HashMap<String, Vec<u8>>, op: StateOp) {
    match op {
        StateOp::Put(k, v) => {
            live.insert(k, v);
        }
        StateOp::Delete(k) => {
            live.remove(&k);
        }
    }
}

/// Reads the state log: the live keys and the highest operation seq in it.
fn recover_state(path: &Path, rec: &mut Recovery) -> Result<(StateMap, Option<u64>), SpoolError> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((HashMap::new(), None)),
        Err(e) => return Err(io_err("reading", path, e)),
    };
    let scan = frame::scan(&data);
    rec.corrupt += scan.corrupt;
    if scan.tail_garbage > 0 {
        rec.torn_bytes += scan.tail_garbage;
        tracing::warn!(path = %path.display(), bytes = scan.tail_garbage, "truncating a torn state log tail");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io_err("opening", path, e))?;
        f.set_len(scan.valid_len)
            .map_err(|e| io_err("truncating", path, e))?;
    }
    let mut live = HashMap::new();
    let mut max = None;
    for &(off, kind, seq, len) in &scan.frames {
        let body = &data
            [off as usize + frame::HEADER + frame::BODY_PREFIX..(off + u64::from(len)) as usize];
        match decode_state_op(kind, body) {
            Some(op) => {
                apply_state_op(&mut live, op);
                max = Some(max.map_or(seq, |m: u64| m.max(seq)));
            }
            None => rec.corrupt += 1,
        }
    }
    Ok((live, max))
}

/// The writer thread: the only code that writes spool files.
struct Writer {
    shared: Arc<Shared>,
    /// Seq of the last state operation of the group being written (compaction stamps it).
    group_state_seq: u64,
    active: Option<(u64, File)>,
    active_len: u64,
    state_file: File,
    state_len: u64,
    live: HashMap<String, Vec<u8>>,
    live_bytes: u64,
}

impl Writer {
    fn new(shared: Arc<Shared>, state: &HashMap<String, Vec<u8>>) -> Result<Self, SpoolError> {
        let path = shared.state_dir.join("state.log");
        let state_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        let state_len = state_file.metadata().map(|m| m.len()).unwrap_or(0);
        let live_bytes = state
            .iter()
            .map(|(k, v)| (k.len() + v.len() + 32) as u64)
            .sum();
        Ok(Writer {
            shared,
            group_state_seq: 0,
            active: None,
            active_len: 0,
            state_file,
            state_len,
            live: state.clone(),
            live_bytes,
        })
    }

    fn run(mut self) {
        loop {
            let (events, state_buf, state_ops, count, first_seq, waiters, head, doomed) = {
                let mut st = self.shared.lock();
                while st.pending.is_empty()
                    && st.pending_state.is_empty()
                    && !st.head_dirty
                    && !st.stop
                {
                    st = self.shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.crashed {
                    return;
                }
                if st.stop && st.pending.is_empty() && st.pending_state.is_empty() && !st.head_dirty
                {
                    return;
                }
                st.writing = true;
                let head = if st.head_dirty {
                    st.head_dirty = false;
                    Some(st.head)
                } else {
                    None
                };
                // Caught up with a large active segment, or out of space: stop appending to
                // it so that it can be deleted now that everything in it is delivered (on a
                // full disk this is what gives space back).
                let caught_up = st.unacked == 0 && st.pending_count == 0;
                if caught_up
                    && (self.active_len >= ROLL_WHEN_CAUGHT_UP || st.refused)
                    && self.active.is_some()
                {
                    self.active = None;
                    if let Some(seg) = st.segments.back_mut() {
                        seg.sealed = true;
                    }
                }
                // Sealed segments whose every record is below the head are delivered: delete
                // them. They form a prefix, since the head only moves forward.
                let mut doomed = Vec::new();
                while st
                    .segments
                    .front()
                    .is_some_and(|s| s.sealed && s.last_seq.is_none_or(|l| l < st.head))
                {
                    if let Some(s) = st.segments.pop_front() {
                        doomed.push(s.path);
                    }
                }
                let count = std::mem::take(&mut st.pending_count);
                (
                    std::mem::take(&mut st.pending),
                    std::mem::take(&mut st.pending_state),
                    {
                        // The seq of the last state operation in this group.
                        self.group_state_seq = st.next_state_seq.saturating_sub(1);
                        std::mem::take(&mut st.pending_state_ops)
                    },
                    count,
                    st.pending_first_seq.take(),
                    std::mem::take(&mut st.waiters),
                    head,
                    doomed,
                )
            };
            // Persist the head before deleting segments, so a crash in between never leaves a
            // head file older than the data that is gone.
            if let Some(h) = head {
                self.persist_head(h);
            }
            for p in doomed {
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot delete a delivered segment");
                }
            }
            let mut result = Ok(());
            if !events.is_empty() {
                // State operations written with events go into the same segment write too, so
                // one fsync makes both durable: a crash before the state log write below
                // cannot leave events whose state (a LiveKit seq, a parked event's removal)
                // is lost. Recovery replays such copies into the state log.
                let mut buf = events.clone();
                buf.extend_from_slice(&state_buf);
                result = self.write_events(&buf, first_seq.unwrap_or(0));
            }
            if result.is_ok() && !state_buf.is_empty() {
                result = self.write_state(&state_buf, state_ops);
            }
            {
                let mut st = self.shared.lock();
                match &result {
                    Ok(()) => {
                        if !events.is_empty() {
                            if let Some(seg) = st.segments.back_mut() {
                                seg.len = self.active_len;
                                seg.last_seq = first_seq.map(|f| f + count - 1);
                            }
                            st.durable_bytes += events.len() as u64;
                            st.durable_count += count;
                        }
                    }
                    Err(_) => {
                        st.used = st.used.saturating_sub(events.len() as u64);
                        st.unacked = st.unacked.saturating_sub(count);
                        st.refused = true;
                    }
                }
                st.writing = false;
            }
            self.shared.readable.notify_one();
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
    }

    fn persist_head(&self, head: u64) {
        let tmp = self.shared.queue_dir.join("head.tmp");
        let dst = self.shared.queue_dir.join("head");
        let r =
            std::fs::write(&tmp, format!("{head}\n")).and_then(|()| std::fs::rename(&tmp, &dst));
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot persist the delivery head; some batches may be delivered twice after a restart");
        }
    }

    fn roll(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        let path = self.shared.queue_dir.join(segment_name(first_seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err("creating", &path, e))?;
        let read = File::open(&path).map_err(|e| io_err("opening", &path, e))?;
        if self.shared.fsync {
            sync_dir(&self.shared.queue_dir)
                .map_err(|e| io_err("syncing", &self.shared.queue_dir, e))?;
        }
        self.active = Some((first_seq, file));
        self.active_len = 0;
        let mut st = self.shared.lock();
        if let Some(prev) = st.segments.back_mut() {
            prev.sealed = true;
        }
        st.segments.push_back(Seg {
            first_seq,
            last_seq: None,
            sealed: false,
            path,
            file: Arc::new(read),
            len: 0,
            skips: Vec::new(),
        });
        Ok(())
    }

    fn write_events(&mut self, buf: &[u8], first_seq: u64) -> Result<(), SpoolError> {
        if self.active.is_none() || self.active_len >= self.shared.segment_bytes {
            self.roll(first_seq)?;
        }
        let Some((seg_seq, file)) = self.active.as_mut() else {
            return Err(SpoolError::Io("no active segment".into()));
        };
        let path = self.shared.queue_dir.join(segment_name(*seg_seq));
        let before = self.active_len;
        let r = file.write_all(buf).and_then(|()| {
            if self.shared.fsync {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => {
                self.active_len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Take the partial write back so the file still ends on a frame; if even that
                // fails, start a new segment next time (recovery skips the damage).
                let _ = file.set_len(before);
                // Write to a fresh segment next time: on a full disk this one is then
                // deletable as soon as its records are delivered.
                self.active = None;
                if let Some(seg) = self.shared.lock().segments.back_mut() {
                    seg.sealed = true;
                }
                tracing::error!(path = %path.display(), error = %e, "spool write failed; refusing new events until a write succeeds");
                Err(io_err("writing", &path, e))
            }
        }
    }

    fn write_state(&mut self, buf: &[u8], ops: Vec<StateOp>) -> Result<(), SpoolError> {
        let path = self.shared.state_dir.join("state.log");
        let before = self.state_len;
        let r = self.state_file.write_all(buf).and_then(|()| {
            if self.shared.fsync {
                self.state_file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            let _ = self.state_file.set_len(before);
            return Err(io_err("writing", &path, e));
        }
        self.state_len += buf.len() as u64;
        for op in ops {
            match op {
                StateOp::Put(k, v) => {
                    let add = (k.len() + v.len() + 32) as u64;
                    if let Some(old) = self.live.insert(k.clone(), v) {
                        self.live_bytes = self
                            .live_bytes
                            .saturating_sub((k.len() + old.len() + 32) as u64);
                    }
                    self.live_bytes += add;
                }
                StateOp::Delete(k) => {
                    if let Some(old) = self.live.remove(&k) {
                        self.live_bytes = self
                            .live_bytes
                            .saturating_sub((k.len() + old.len() + 32) as u64);
                    }
                }
            }
        }
        if self.state_len > STATE_COMPACT_BYTES && self.state_len > 2 * self.live_bytes {
            if let Err(e) = self.compact_state() {
                tracing::warn!(error = %e, "state log compaction failed; will retry later");
            }
        }
        Ok(())
    }

    fn compact_state(&mut self) -> std::io::Result<()> {
        let dir = &self.shared.state_dir;
        let tmp = dir.join("state.log.tmp");
        let mut buf = Vec::new();
        // Every rewritten key carries the newest operation seq, so recovery still knows which
        // copies in segments the log already holds.
        let seq = self.group_state_seq;
        for (k, v) in &self.live {
            encode_state_op(&mut buf, seq, &StateOp::Put(k.clone(), v.clone()));
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join("state.log"))?;
        sync_dir(dir)?;
        self.state_file = OpenOptions::new()
            .append(true)
            .open(dir.join("state.log"))?;
        self.state_len = buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
