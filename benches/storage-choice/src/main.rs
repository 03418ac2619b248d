//! storage-choice: measures candidate storage engines for voicetagd's durable
//! event spool (append with group commit + fsync, read in order, delete from head).
//!
//! Backends:
//!   log   - append-only file, frames [u32 len][u32 crc32][bytes], one write_all + sync_data per group
//!   log-prealloc - same, but the segment is pre-sized with set_len (like fjall's journal), pwrite
//!   redb  - one write transaction per group (Durability::Immediate), u64 key -> bytes
//!   fjall - one write batch per group, then Database::persist(PersistMode::SyncAll)
//!
//! Every backend is driven by the same group-commit harness: writer threads push
//! a record into a Mutex<Vec> and block on a Condvar until a single committer
//! thread has made the group that contains it durable.
//!
//! Run: `cargo run --release`. Optional env: SC_SECS=3 (per case), SC_ROUNDS=3,
//! SC_DIR=<scratch dir, default ./target/tmp; must not be tmpfs>, SC_DELETE_N=200000,
//! SC_ONLY=log,redb (backends), SC_WRITERS=1,8,64, SC_NO_DELETE=1,
//! SC_IDLE_WAIT_S=300 (max wait for the rest of the machine to go idle before a case).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const RECORD_LEN: usize = 400;

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A committer-side backend. `commit` must make `batch` durable (if `durable`)
/// before returning. `first_seq` is the sequence number of `batch[0]`.
trait Backend: Send {
    fn commit(&mut self, first_seq: u64, batch: &[Vec<u8>]) -> std::io::Result<()>;
}

fn frame(out: &mut Vec<u8>, rec: &[u8]) {
    out.extend_from_slice(&(rec.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(rec).to_le_bytes());
    out.extend_from_slice(rec);
}

/// `prealloc == false`: O_APPEND file that grows with every group, so each
/// sync_data() must also persist the new file size (an ext4 journal commit).
/// `prealloc == true`: the segment is sized up front with set_len(64 MiB) (as
/// fjall does with its journal) and written with pwrite at a tracked offset;
/// recovery would treat the first zero/invalid frame as the end of the log.
struct LogBackend {
    file: File,
    durable: bool,
    prealloc: bool,
    off: u64,
    buf: Vec<u8>,
}

const LOG_PREALLOC: u64 = 64 << 20;

impl LogBackend {
    fn open(dir: &Path, durable: bool, prealloc: bool) -> Self {
        let path = dir.join("00000000000000000000.seg");
        let file = if prealloc {
            let f = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path).unwrap();
            f.set_len(LOG_PREALLOC).unwrap();
            f.sync_all().unwrap();
            f
        } else {
            OpenOptions::new().create(true).append(true).open(path).unwrap()
        };
        LogBackend { file, durable, prealloc, off: 0, buf: Vec::with_capacity(1 << 20) }
    }
}

impl Backend for LogBackend {
    fn commit(&mut self, _first_seq: u64, batch: &[Vec<u8>]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.buf.clear();
        for r in batch {
            frame(&mut self.buf, r);
        }
        if self.prealloc {
            if self.off + self.buf.len() as u64 > self.file.metadata()?.len() {
                // Segment full: a real log would roll to a new preallocated segment.
                self.file.set_len(self.off + self.buf.len() as u64 + LOG_PREALLOC)?;
            }
            self.file.write_all_at(&self.buf, self.off)?;
            self.off += self.buf.len() as u64;
        } else {
            self.file.write_all(&self.buf)?;
        }
        if self.durable {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

const REDB_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");

struct RedbBackend {
    db: redb::Database,
    durable: bool,
}

impl RedbBackend {
    fn open(dir: &Path, durable: bool) -> Self {
        let db = redb::Database::create(dir.join("spool.redb")).unwrap();
        RedbBackend { db, durable }
    }
}

fn redb_err<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Backend for RedbBackend {
    fn commit(&mut self, first_seq: u64, batch: &[Vec<u8>]) -> std::io::Result<()> {
        let mut tx = self.db.begin_write().map_err(redb_err)?;
        if !self.durable {
            tx.set_durability(redb::Durability::None).map_err(redb_err)?;
        }
        {
            let mut t = tx.open_table(REDB_TABLE).map_err(redb_err)?;
            for (i, r) in batch.iter().enumerate() {
                t.insert(first_seq + i as u64, r.as_slice()).map_err(redb_err)?;
            }
        }
        tx.commit().map_err(redb_err)?;
        Ok(())
    }
}

struct FjallBackend {
    db: fjall::Database,
    ks: fjall::Keyspace,
    durable: bool,
}

impl FjallBackend {
    fn open(dir: &Path, durable: bool) -> Self {
        let db = fjall::Database::builder(dir.join("fjall")).open().unwrap();
        let ks = db.keyspace("events", fjall::KeyspaceCreateOptions::default).unwrap();
        FjallBackend { db, ks, durable }
    }
}

impl Backend for FjallBackend {
    fn commit(&mut self, first_seq: u64, batch: &[Vec<u8>]) -> std::io::Result<()> {
        let mut b = self.db.batch();
        for (i, r) in batch.iter().enumerate() {
            b.insert(&self.ks, (first_seq + i as u64).to_be_bytes(), r.as_slice());
        }
        b.commit().map_err(redb_err)?;
        if self.durable {
            self.db.persist(fjall::PersistMode::SyncAll).map_err(redb_err)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Group-commit harness
// ---------------------------------------------------------------------------

struct State {
    pending: Vec<Vec<u8>>,
    next_seq: u64,    // seq that the next pushed record gets
    durable_upto: u64, // all seq < durable_upto are durable
    shutdown: bool,
}

struct Shared {
    st: Mutex<State>,
    work: Condvar,
    done: Condvar,
}

struct CaseResult {
    events: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    commits: u64,
    write_bytes: u64,
    disturbed: bool,
}

/// Bytes this process caused to be sent to the storage layer (/proc/self/io write_bytes).
fn proc_write_bytes() -> u64 {
    let s = fs::read_to_string("/proc/self/io").unwrap_or_default();
    for line in s.lines() {
        if let Some(v) = line.strip_prefix("write_bytes: ") {
            return v.trim().parse().unwrap_or(0);
        }
    }
    0
}

fn make_record(thread: usize, i: u64) -> Vec<u8> {
    // JSON-ish payload, padded to exactly RECORD_LEN bytes.
    let mut s = format!(
        "{{\"event_id\":\"{:016x}-{:08x}\",\"session\":\"sess-{:04}\",\"kind\":\"usage\",\"model\":\"voice-1\",\"tokens_in\":{},\"tokens_out\":{},\"tags\":{{\"tenant\":\"t{}\",\"region\":\"eu-west\"}},\"pad\":\"",
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        thread,
        thread,
        i % 997,
        i % 313,
        thread % 7
    );
    while s.len() < RECORD_LEN - 2 {
        s.push((b'a' + ((s.len() as u64 ^ i) % 26) as u8) as char);
    }
    s.push_str("\"}");
    let mut v = s.into_bytes();
    v.truncate(RECORD_LEN);
    v
}

fn run_case(mut backend: Box<dyn Backend>, writers: usize, dur: Duration) -> CaseResult {
    let shared = Arc::new(Shared {
        st: Mutex::new(State { pending: Vec::new(), next_seq: 0, durable_upto: 0, shutdown: false }),
        work: Condvar::new(),
        done: Condvar::new(),
    });

    let committer = {
        let shared = shared.clone();
        thread::spawn(move || {
            let mut commits = 0u64;
            loop {
                let (batch, first) = {
                    let mut st = shared.st.lock().unwrap();
                    while st.pending.is_empty() && !st.shutdown {
                        st = shared.work.wait(st).unwrap();
                    }
                    if st.pending.is_empty() && st.shutdown {
                        break;
                    }
                    let batch = std::mem::take(&mut st.pending);
                    let first = st.next_seq - batch.len() as u64;
                    (batch, first)
                };
                backend.commit(first, &batch).expect("commit failed");
                commits += 1;
                let mut st = shared.st.lock().unwrap();
                st.durable_upto = first + batch.len() as u64;
                drop(st);
                shared.done.notify_all();
            }
            drop(backend); // close db (fjall persists on drop; nothing pending)
            commits
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(writers + 1));
    let wb0 = proc_write_bytes();
    let mut handles = Vec::new();
    for t in 0..writers {
        let shared = shared.clone();
        let stop = stop.clone();
        let barrier = barrier.clone();
        handles.push(thread::spawn(move || {
            let mut lats: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut i = 0u64;
            barrier.wait();
            while !stop.load(Ordering::Relaxed) {
                let rec = make_record(t, i);
                i += 1;
                let start = Instant::now();
                let mut st = shared.st.lock().unwrap();
                st.pending.push(rec);
                st.next_seq += 1;
                let my = st.next_seq; // need durable_upto >= my
                shared.work.notify_one();
                while st.durable_upto < my {
                    st = shared.done.wait(st).unwrap();
                }
                drop(st);
                let ns = start.elapsed().as_nanos().min(u32::MAX as u128 * 100) as u64;
                lats.push((ns / 100) as u32); // 100ns units
            }
            lats
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u32> = Vec::new();
    for h in handles {
        all.extend(h.join().unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    {
        let mut st = shared.st.lock().unwrap();
        st.shutdown = true;
    }
    shared.work.notify_all();
    let commits = committer.join().unwrap();
    let write_bytes = proc_write_bytes().saturating_sub(wb0);
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let idx = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[idx] as f64 / 10.0
    };
    CaseResult {
        events: all.len() as u64,
        secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        commits,
        write_bytes,
        disturbed: false,
    }
}

// ---------------------------------------------------------------------------
// Head-deletion cost
// ---------------------------------------------------------------------------

struct DeleteResult {
    load_secs: f64,
    size_before: u64,
    delete_ms: f64,
    size_after: u64,
    first_after_us: f64,
    scan_rest_ms: f64,
    note: String,
}

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                n += dir_size(&e.path());
            } else {
                n += m.len();
            }
        }
    }
    n
}

fn fsync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

const SEG_BYTES: u64 = 8 << 20;

fn delete_log(dir: &Path, n: u64) -> DeleteResult {
    // Write n records into 8 MiB segments; remember the first seq of each.
    let t = Instant::now();
    let mut segs: Vec<(u64, PathBuf)> = Vec::new();
    let mut cur: Option<(File, u64)> = None;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut seq = 0u64;
    let head = n / 2;
    let mut head_pos = (0usize, 0u64); // (segment index, byte offset) of record `head`
    while seq < n {
        if cur.as_ref().map(|(_, sz)| *sz >= SEG_BYTES).unwrap_or(true) {
            if let Some((f, _)) = cur.take() {
                f.sync_data().unwrap();
            }
            let p = dir.join(format!("{seq:020}.seg"));
            let f = OpenOptions::new().create(true).append(true).open(&p).unwrap();
            segs.push((seq, p));
            cur = Some((f, 0));
        }
        buf.clear();
        let (_, sz0) = cur.as_ref().unwrap();
        for _ in 0..1000.min(n - seq) {
            if seq == head {
                head_pos = (segs.len() - 1, sz0 + buf.len() as u64);
            }
            frame(&mut buf, &make_record(0, seq));
            seq += 1;
        }
        let (f, sz) = cur.as_mut().unwrap();
        f.write_all(&buf).unwrap();
        *sz += buf.len() as u64;
    }
    cur.unwrap().0.sync_data().unwrap();
    fsync_dir(dir);
    let load_secs = t.elapsed().as_secs_f64();
    let size_before = dir_size(dir);

    // Delete the first n/2: unlink every segment wholly below the new head,
    // persist the head position (seq, segment, offset) atomically, fsync the directory.
    let t = Instant::now();
    let mut unlinked = 0;
    for w in 0..segs.len() {
        let next_first = segs.get(w + 1).map(|s| s.0).unwrap_or(u64::MAX);
        if next_first <= head {
            fs::remove_file(&segs[w].1).unwrap();
            unlinked += 1;
        }
    }
    let tmp = dir.join("head.tmp");
    {
        let mut f = File::create(&tmp).unwrap();
        f.write_all(&head.to_le_bytes()).unwrap();
        f.write_all(&segs[head_pos.0].0.to_le_bytes()).unwrap();
        f.write_all(&head_pos.1.to_le_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    fs::rename(&tmp, dir.join("head")).unwrap();
    fsync_dir(dir);
    let delete_ms = t.elapsed().as_secs_f64() * 1e3;
    let size_after = dir_size(dir);

    // Find first live record: read the head file, seek into the segment, read one frame.
    let t = Instant::now();
    let hf = fs::read(dir.join("head")).unwrap();
    let seg_first = u64::from_le_bytes(hf[8..16].try_into().unwrap());
    let off = u64::from_le_bytes(hf[16..24].try_into().unwrap());
    {
        use std::os::unix::fs::FileExt;
        let f = File::open(dir.join(format!("{seg_first:020}.seg"))).unwrap();
        let mut hdr = [0u8; 8];
        f.read_exact_at(&mut hdr, off).unwrap();
        let len = u32::from_le_bytes(hdr[0..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let mut rec = vec![0u8; len];
        f.read_exact_at(&mut rec, off + 8).unwrap();
        assert_eq!(crc, crc32fast::hash(&rec));
        assert_eq!(rec, make_record(0, head));
    }
    let first_after_us = t.elapsed().as_secs_f64() * 1e6;
    let first_seg = head_pos.0;

    // Scan the remaining records in order, verifying CRCs.
    let t = Instant::now();
    let mut count = 0u64;
    for (first, p) in segs.iter().skip(first_seg) {
        let data = fs::read(p).unwrap();
        let mut off = 0usize;
        let mut s = *first;
        while off + 8 <= data.len() {
            let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap());
            let rec = &data[off + 8..off + 8 + len];
            if s >= head {
                assert_eq!(crc, crc32fast::hash(rec));
                count += 1;
            }
            off += 8 + len;
            s += 1;
        }
    }
    assert_eq!(count, n - head);
    let scan_rest_ms = t.elapsed().as_secs_f64() * 1e3;
    DeleteResult {
        load_secs,
        size_before,
        delete_ms,
        size_after,
        first_after_us,
        scan_rest_ms,
        note: format!("unlinked {unlinked} of {} 8 MiB segments + fsync head file + dir", segs.len()),
    }
}

fn delete_redb(dir: &Path, n: u64) -> DeleteResult {
    let path = dir.join("spool.redb");
    let db = redb::Database::create(&path).unwrap();
    let t = Instant::now();
    let mut seq = 0;
    while seq < n {
        let tx = db.begin_write().unwrap();
        {
            let mut tb = tx.open_table(REDB_TABLE).unwrap();
            for _ in 0..1000.min(n - seq) {
                tb.insert(seq, make_record(0, seq).as_slice()).unwrap();
                seq += 1;
            }
        }
        tx.commit().unwrap();
    }
    let load_secs = t.elapsed().as_secs_f64();
    let size_before = dir_size(dir);

    let head = n / 2;
    let t = Instant::now();
    let tx = db.begin_write().unwrap();
    {
        let mut tb = tx.open_table(REDB_TABLE).unwrap();
        tb.retain_in(0..head, |_, _| false).unwrap();
    }
    tx.commit().unwrap(); // Durability::Immediate
    let delete_ms = t.elapsed().as_secs_f64() * 1e3;
    let size_after = dir_size(dir);

    use redb::{ReadableDatabase, ReadableTable};
    let t = Instant::now();
    let rtx = db.begin_read().unwrap();
    let tb = rtx.open_table(REDB_TABLE).unwrap();
    let (k, _v) = tb.first().unwrap().unwrap();
    assert_eq!(k.value(), head);
    let first_after_us = t.elapsed().as_secs_f64() * 1e6;
    let t = Instant::now();
    let mut count = 0u64;
    for kv in tb.range(head..).unwrap() {
        let (_k, v) = kv.unwrap();
        std::hint::black_box(v.value().len());
        count += 1;
    }
    assert_eq!(count, n - head);
    let scan_rest_ms = t.elapsed().as_secs_f64() * 1e3;
    DeleteResult {
        load_secs,
        size_before,
        delete_ms,
        size_after,
        first_after_us,
        scan_rest_ms,
        note: format!("retain_in(0..{head}, |_,_| false) in one Immediate txn; file does not shrink (pages freed for reuse)"),
    }
}

fn delete_fjall(dir: &Path, n: u64) -> DeleteResult {
    let db = fjall::Database::builder(dir.join("fjall")).open().unwrap();
    let ks = db.keyspace("events", fjall::KeyspaceCreateOptions::default).unwrap();
    let t = Instant::now();
    let mut seq = 0u64;
    while seq < n {
        let mut b = db.batch();
        for _ in 0..1000.min(n - seq) {
            b.insert(&ks, seq.to_be_bytes(), make_record(0, seq));
            seq += 1;
        }
        b.commit().unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let load_secs = t.elapsed().as_secs_f64();
    let size_before = dir_size(dir);

    let head = n / 2;
    let t = Instant::now();
    let mut b = db.batch();
    for k in 0..head {
        b.remove(&ks, k.to_be_bytes());
    }
    b.commit().unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
    let delete_ms = t.elapsed().as_secs_f64() * 1e3;
    let size_after = dir_size(dir);

    let t = Instant::now();
    let g = ks.first_key_value().unwrap();
    let k = g.key().unwrap();
    assert_eq!(u64::from_be_bytes((&*k).try_into().unwrap()), head);
    let first_after_us = t.elapsed().as_secs_f64() * 1e6;
    let t = Instant::now();
    let mut count = 0u64;
    for g in ks.range(head.to_be_bytes()..) {
        let (_k, v) = g.into_inner().unwrap();
        std::hint::black_box(v.len());
        count += 1;
    }
    assert_eq!(count, n - head);
    let scan_rest_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(ks);
    drop(db);
    DeleteResult {
        load_secs,
        size_before,
        delete_ms,
        size_after,
        first_after_us,
        scan_rest_ms,
        note: format!("{head} point tombstones in one batch + persist(SyncAll); space reclaimed only by later compaction"),
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

fn scratch_root() -> PathBuf {
    if let Ok(d) = std::env::var("SC_DIR") {
        return PathBuf::from(d);
    }
    // Never use a tmpfs: fsync would be meaningless. Default under ./target/tmp.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join("tmp")
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn fs_type(p: &Path) -> String {
    // Longest mount-point prefix match in /proc/mounts.
    let canon = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best = (0usize, String::from("?"));
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if canon.starts_with(f[1]) && f[1].len() >= best.0 {
            best = (f[1].len(), format!("{} on {} ({})", f[0], f[1], f[2]));
        }
    }
    best.1
}

/// Flush everything dirty (e.g. the previous case's data and unlinks) and pause,
/// so one case's background writeback does not land in the next case's fsyncs.
/// Then wait (up to SC_IDLE_WAIT_S, default 300 s) until the rest of the machine
/// is quiet: the dev box is shared, and a concurrent compile wrecks fsync latency.
fn settle() {
    let _ = std::process::Command::new("sync").status();
    thread::sleep(Duration::from_millis(500));
    let max_wait: f64 = std::env::var("SC_IDLE_WAIT_S").ok().and_then(|s| s.parse().ok()).unwrap_or(300.0);
    let t = Instant::now();
    loop {
        let m = CpuMeter::start();
        thread::sleep(Duration::from_millis(500));
        let other = m.other_cores();
        if other < IDLE_OTHER_CORES || t.elapsed().as_secs_f64() > max_wait {
            break;
        }
        eprintln!("    waiting for machine to be idle (other processes using {other:.2} cores)");
    }
}

/// A case counts as disturbed if the rest of the machine (all CPU time minus this
/// process's) averaged more than this many cores while it ran.
const IDLE_OTHER_CORES: f64 = 0.10;

/// Measures CPU used by everything except this process, from /proc/stat and /proc/self/stat.
struct CpuMeter {
    t: Instant,
    total: u64,
    mine: u64,
}

fn jiffies_total_busy() -> u64 {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let l = s.lines().next().unwrap_or("");
    let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    if v.len() < 8 {
        return 0;
    }
    v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
}

fn jiffies_self() -> u64 {
    let s = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the ")" of comm: state is field 3; utime=14, stime=15, cutime=16, cstime=17
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let g = |i: usize| f.get(i - 3).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    g(14) + g(15) + g(16) + g(17)
}

impl CpuMeter {
    fn start() -> Self {
        CpuMeter { t: Instant::now(), total: jiffies_total_busy(), mine: jiffies_self() }
    }
    /// Average number of cores used by other processes (incl. kernel threads) since start.
    fn other_cores(&self) -> f64 {
        let secs = self.t.elapsed().as_secs_f64().max(1e-3);
        let total = jiffies_total_busy().saturating_sub(self.total) as f64;
        let mine = jiffies_self().saturating_sub(self.mine) as f64;
        ((total - mine).max(0.0) / 100.0) / secs // USER_HZ = 100
    }
}

fn main() {
    let secs: f64 = std::env::var("SC_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let del_n: u64 = std::env::var("SC_DELETE_N").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let rounds: usize = std::env::var("SC_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let root = scratch_root();
    fs::create_dir_all(&root).unwrap();
    let fst = fs_type(&root);
    println!("scratch dir: {}  [{}]", root.display(), fst);
    if fst.contains("tmpfs") {
        eprintln!("WARNING: scratch dir is on tmpfs; fsync numbers are meaningless");
    }
    println!(
        "cpus: {}  record: {} bytes  case duration: {:.1}s  rounds: {}",
        thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        RECORD_LEN,
        secs,
        rounds
    );
    println!();

    type Opener = fn(&Path, bool) -> Box<dyn Backend>;
    let backends: [(&str, Opener); 4] = [
        ("log", |d, dur| Box::new(LogBackend::open(d, dur, false))),
        ("log-prealloc", |d, dur| Box::new(LogBackend::open(d, dur, true))),
        ("redb", |d, dur| Box::new(RedbBackend::open(d, dur))),
        ("fjall", |d, dur| Box::new(FjallBackend::open(d, dur))),
    ];
    // Optional filters: SC_ONLY=log,fjall  SC_WRITERS=1,64  SC_NO_DELETE=1
    let only: Option<Vec<String>> =
        std::env::var("SC_ONLY").ok().map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    let wanted = |name: &str| only.as_ref().map(|o| o.iter().any(|x| x == name)).unwrap_or(true);
    let writer_counts: Vec<usize> = std::env::var("SC_WRITERS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 64]);
    let backends: Vec<(&str, Opener)> = backends.into_iter().filter(|(n, _)| wanted(n)).collect();
    let mut cases: Vec<(&str, Opener, usize, bool)> = Vec::new();
    for (name, open) in backends.iter() {
        for &w in &writer_counts {
            cases.push((name, *open, w, true));
        }
    }
    if writer_counts.contains(&64) {
        for (name, open) in backends.iter() {
            cases.push((name, *open, 64, false));
        }
    }

    // Run all cases SC_ROUNDS times (rounds, so a transient disturbance of the
    // shared VM disk hits different cases), then report per case the round with the
    // median events/s, plus the min..max events/s over rounds.
    let mut results: Vec<Vec<CaseResult>> = (0..cases.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        eprintln!("round {}/{}", round + 1, rounds);
        for (ci, (name, open, w, durable)) in cases.iter().enumerate() {
            // Retry a case (up to 4 tries) if another process used the CPU meanwhile.
            for attempt in 1..=4 {
                let dir = fresh_dir(&root, &format!("{name}-{w}-{}", if *durable { "sync" } else { "nosync" }));
                settle();
                let m = CpuMeter::start();
                let be = open(&dir, *durable);
                let mut r = run_case(be, *w, Duration::from_secs_f64(secs));
                let other = m.other_cores();
                r.disturbed = other >= IDLE_OTHER_CORES;
                eprintln!(
                    "  {name} {w} {}: {:.0}/s  (others used {other:.2} cores{})",
                    if *durable { "fsync" } else { "off" },
                    r.events as f64 / r.secs,
                    if r.disturbed { ", DISTURBED" } else { "" }
                );
                let _ = fs::remove_dir_all(&dir);
                if !r.disturbed || attempt == 4 {
                    results[ci].push(r);
                    break;
                }
            }
        }
    }
    println!(
        "| backend | durable | writers | events/s (median) | min..max events/s | p50 µs | p99 µs | fsyncs/s | avg group | disk write bytes / payload byte | undisturbed rounds |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (ci, (name, _open, w, durable)) in cases.iter().enumerate() {
        let rs = &mut results[ci];
        rs.sort_by(|a, b| (a.events as f64 / a.secs).partial_cmp(&(b.events as f64 / b.secs)).unwrap());
        let lo = rs[0].events as f64 / rs[0].secs;
        let hi = rs[rs.len() - 1].events as f64 / rs[rs.len() - 1].secs;
        let r = &rs[rs.len() / 2];
        let clean = rs.iter().filter(|r| !r.disturbed).count();
        let payload = r.events * RECORD_LEN as u64;
        println!(
            "| {} | {} | {} | {:.0} | {:.0}..{:.0} | {:.1} | {:.1} | {} | {:.1} | {:.2} | {}/{} |",
            name,
            if *durable { "fsync" } else { "off" },
            w,
            r.events as f64 / r.secs,
            lo,
            hi,
            r.p50_us,
            r.p99_us,
            if *durable { format!("{:.0}", r.commits as f64 / r.secs) } else { "-".into() },
            r.events as f64 / r.commits.max(1) as f64,
            r.write_bytes as f64 / payload.max(1) as f64,
            clean,
            rs.len(),
        );
    }

    if std::env::var("SC_NO_DELETE").is_ok() {
        return;
    }
    println!();
    println!("Head deletion: write {} records, then durably delete the first {}", del_n, del_n / 2);
    println!();
    println!("| backend | load s | size before MiB | delete ms | size after MiB | first-live lookup µs | scan rest ms | how |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let dels: [(&str, fn(&Path, u64) -> DeleteResult); 3] =
        [("log", delete_log), ("redb", delete_redb), ("fjall", delete_fjall)];
    for (name, f) in dels {
        if !wanted(name) {
            continue;
        }
        let dir = fresh_dir(&root, &format!("{name}-delete"));
        settle();
        let r = f(&dir, del_n);
        println!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {} |",
            name,
            r.load_secs,
            mib(r.size_before),
            r.delete_ms,
            mib(r.size_after),
            r.first_after_us,
            r.scan_rest_ms,
            r.note
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
