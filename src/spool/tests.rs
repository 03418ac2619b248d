use super::*;
use proptest::prelude::*;

fn limits(max_events: usize) -> BatchLimits {
    BatchLimits {
        max_events,
        max_bytes: 1 << 20,
        timeout: Duration::from_millis(1),
    }
}

fn rec(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

fn open(dir: &Path, max: u64) -> (Spool, Recovery) {
    Spool::open_with(dir, max, FsyncPolicy::Always, 4096).unwrap()
}

async fn drain(s: &Spool, commit: bool) -> Vec<String> {
    s.close();
    let mut out = Vec::new();
    while let Some(b) = s.next_batch(limits(7)).await {
        out.extend(
            b.records
                .iter()
                .map(|r| String::from_utf8(r.to_vec()).unwrap()),
        );
        if commit {
            s.commit(&b.ack);
        }
    }
    out
}

#[tokio::test]
async fn accepted_records_survive_a_restart_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, r) = open(dir.path(), 1 << 20);
        assert_eq!(r.events, 0);
        s.append(vec![rec("a"), rec("b")]).await.unwrap();
        s.append(vec![rec("c")]).await.unwrap();
        let b = s.next_batch(limits(2)).await.unwrap();
        assert_eq!(b.records, vec![rec("a"), rec("b")]);
        s.commit(&b.ack);
        // "c" is read but not committed when the process goes away.
        let b = s.next_batch(limits(2)).await.unwrap();
        assert_eq!(b.records, vec![rec("c")]);
    }
    let (s, r) = open(dir.path(), 1 << 20);
    assert_eq!((r.events, r.corrupt, r.torn_bytes), (1, 0, 0));
    assert_eq!(s.depth().events, 1);
    assert_eq!(drain(&s, true).await, vec!["c"]);
    drop(s);
    let (s, r) = open(dir.path(), 1 << 20);
    assert_eq!(r.events, 0);
    assert_eq!(drain(&s, true).await, Vec::<String>::new());
}

#[tokio::test]
async fn segments_roll_and_delivered_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path(), 1 << 20);
    for i in 0..200 {
        s.append(vec![rec(&format!("{i:0100}"))]).await.unwrap();
    }
    let segs = || {
        std::fs::read_dir(dir.path().join("queue"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count()
    };
    assert!(
        segs() > 3,
        "200 x 121 bytes must span several 4 KiB segments"
    );
    let got = drain(&s, true).await;
    assert_eq!(got.len(), 200);
    assert_eq!(got[199], format!("{:0100}", 199));
    s.shutdown();
    assert_eq!(segs(), 1, "only the active segment is left");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("queue/head"))
            .unwrap()
            .trim(),
        "200"
    );
    assert_eq!(s.depth(), Depth::default());
}

#[tokio::test]
async fn full_spool_refuses_then_recovers_when_delivery_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let one = frame::frame_len(10) as u64;
    let (s, _) = open(dir.path(), 3 * one);
    for _ in 0..3 {
        s.append(vec![rec("0123456789")]).await.unwrap();
    }
    let err = s.append(vec![rec("0123456789")]).await.unwrap_err();
    assert_eq!(
        err,
        SpoolError::Full {
            used: 3 * one,
            max: 3 * one
        }
    );
    assert!(s.is_full());
    // Already-accepted records are never refused.
    s.append_accepted(vec![rec("released!!")]).await.unwrap();
    let b = s.next_batch(limits(2)).await.unwrap();
    s.commit(&b.ack);
    assert!(!s.is_full());
    s.append(vec![rec("0123456789")]).await.unwrap();
    assert_eq!(s.depth().events, 3);
}

#[tokio::test]
async fn state_survives_restart_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, _) = open(dir.path(), 1 << 20);
        s.write(
            vec![],
            vec![
                StateOp::Put("s/1".into(), b"one".to_vec()),
                StateOp::Put("s/2".into(), b"two".to_vec()),
            ],
            Space::Check,
        )
        .await
        .unwrap();
        s.write(
            vec![rec("e")],
            vec![StateOp::Delete("s/1".into())],
            Space::Check,
        )
        .await
        .unwrap();
        // Enough churn on one key to trigger compaction (> 1 MiB, > 2x live).
        let big = vec![b'x'; 64 << 10];
        for _ in 0..40 {
            s.write(
                vec![],
                vec![StateOp::Put("s/3".into(), big.clone())],
                Space::Check,
            )
            .await
            .unwrap();
        }
    }
    let log = std::fs::metadata(dir.path().join("state/state.log"))
        .unwrap()
        .len();
    assert!(log < 1 << 20, "the log was compacted ({log} bytes)");
    let (_, r) = open(dir.path(), 1 << 20);
    assert_eq!(r.state.len(), 2);
    assert_eq!(r.state["s/2"], b"two");
    assert_eq!(r.state["s/3"].len(), 64 << 10);
    assert_eq!(r.events, 1);
}

#[tokio::test]
async fn torn_state_log_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, _) = open(dir.path(), 1 << 20);
        s.write(
            vec![],
            vec![StateOp::Put("k".into(), b"v".to_vec())],
            Space::Check,
        )
        .await
        .unwrap();
    }
    let p = dir.path().join("state/state.log");
    let mut data = std::fs::read(&p).unwrap();
    let mut extra = Vec::new();
    frame::encode(&mut extra, frame::kind::PUT, 0, b"\x01\x00kvalue");
    data.extend_from_slice(&extra[..extra.len() - 2]);
    std::fs::write(&p, &data).unwrap();
    let (_, r) = open(dir.path(), 1 << 20);
    assert_eq!(r.state.len(), 1);
    assert!(r.torn_bytes > 0);
}

#[tokio::test]
async fn closed_spool_refuses_new_records_but_drains() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path(), 1 << 20);
    s.append(vec![rec("x")]).await.unwrap();
    s.close();
    assert_eq!(s.append(vec![rec("y")]).await, Err(SpoolError::Closed));
    assert_eq!(drain(&s, true).await, vec!["x"]);
}

#[tokio::test]
async fn batches_cut_by_count_bytes_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path(), 1 << 20);
    s.append((0..5).map(|i| rec(&format!("{i:040}"))).collect())
        .await
        .unwrap();
    let l = BatchLimits {
        max_events: 100,
        max_bytes: 100,
        timeout: Duration::from_millis(5),
    };
    assert_eq!(
        s.next_batch(l).await.unwrap().records.len(),
        2,
        "cut by bytes"
    );
    let l = BatchLimits {
        max_events: 2,
        max_bytes: 1 << 20,
        timeout: Duration::from_secs(3600),
    };
    assert_eq!(
        s.next_batch(l).await.unwrap().records.len(),
        2,
        "cut by count"
    );
    let l = BatchLimits {
        max_events: 100,
        max_bytes: 1 << 20,
        timeout: Duration::from_millis(5),
    };
    assert_eq!(
        s.next_batch(l).await.unwrap().records.len(),
        1,
        "cut by time"
    );
}

// ---------------------------------------------------------------------------------------------
// Property test: the spool against a model, with crashes.

#[derive(Debug, Clone)]
enum Crash {
    /// The process goes away (files as written).
    Clean,
    /// The process died in the middle of writing a frame that was never acknowledged.
    TornTail(usize),
    /// A byte of a segment file is damaged (position as a fraction of the queue bytes).
    FlipByte(u32, u8),
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<usize>),
    Read(usize),
    CommitOldest,
    CommitNewest,
    Crash(Crash),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(1usize..300, 1..6).prop_map(Op::Append),
        3 => (1usize..6).prop_map(Op::Read),
        2 => Just(Op::CommitOldest),
        1 => Just(Op::CommitNewest),
        1 => prop_oneof![
            Just(Crash::Clean),
            (1usize..40).prop_map(Crash::TornTail),
            (any::<u32>(), 1u8..=255).prop_map(|(p, m)| Crash::FlipByte(p, m)),
        ].prop_map(Op::Crash),
    ]
}

/// A record as the model knows it: its payload (unique) and, once read, its sequence number.
#[derive(Debug, Clone)]
struct M {
    payload: String,
    seq: Option<u64>,
    committed: bool,
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("queue"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

async fn run_model(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let seg = 2048;
    let (mut s, _) = Spool::open_with(dir.path(), 1 << 30, FsyncPolicy::Never, seg).unwrap();
    let mut model: Vec<M> = Vec::new();
    let mut inflight: Vec<(Ack, Vec<usize>)> = Vec::new();
    let mut counter = 0usize;
    for op in ops {
        match op {
            Op::Append(sizes) => {
                let recs: Vec<Bytes> = sizes
                    .iter()
                    .map(|n| {
                        counter += 1;
                        let p = format!("{counter:08}:{}", "x".repeat(*n));
                        model.push(M {
                            payload: p.clone(),
                            seq: None,
                            committed: false,
                        });
                        Bytes::from(p)
                    })
                    .collect();
                s.append(recs).await.unwrap();
            }
            Op::Read(n) => {
                let unread: Vec<usize> = model
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.seq.is_none())
                    .map(|(i, _)| i)
                    .collect();
                if unread.is_empty() {
                    continue;
                }
                let b = s
                    .next_batch(BatchLimits {
                        max_events: n,
                        max_bytes: 1 << 20,
                        timeout: Duration::ZERO,
                    })
                    .await
                    .unwrap();
                assert_eq!(b.records.len(), n.min(unread.len()));
                for (k, r) in b.records.iter().enumerate() {
                    let i = unread[k];
                    assert_eq!(
                        std::str::from_utf8(r).unwrap(),
                        model[i].payload,
                        "records come in order"
                    );
                    model[i].seq = Some(b.ack.seqs.start + k as u64);
                }
                inflight.push((b.ack, unread[..b.records.len()].to_vec()));
            }
            Op::CommitOldest | Op::CommitNewest => {
                if inflight.is_empty() {
                    continue;
                }
                let (ack, idx) = if matches!(op, Op::CommitOldest) {
                    inflight.remove(0)
                } else {
                    inflight.pop().unwrap()
                };
                s.commit(&ack);
                for i in idx {
                    model[i].committed = true;
                }
            }
            Op::Crash(kind) => {
                // A real crash: the writer stops without persisting the latest head.
                s.crash_for_test();
                drop(s);
                let head: u64 = std::fs::read_to_string(dir.path().join("queue/head"))
                    .map(|t| t.trim().parse().unwrap())
                    .unwrap_or(0);
                // Replayed: everything not known to be below the persisted head.
                let mut expect: Vec<String> = model
                    .iter()
                    .filter(|m| m.seq.is_none_or(|q| q >= head))
                    .map(|m| m.payload.clone())
                    .collect();
                let files = seg_files(dir.path());
                match kind {
                    Crash::Clean => {}
                    Crash::TornTail(n) => {
                        if let Some(last) = files.last() {
                            let mut extra = Vec::new();
                            frame::encode(
                                &mut extra,
                                frame::kind::EVENT,
                                u64::MAX / 2,
                                b"never acknowledged record payload bytes",
                            );
                            let keep = n.min(extra.len() - 1);
                            let mut f = OpenOptions::new().append(true).open(last).unwrap();
                            f.write_all(&extra[..keep]).unwrap();
                        }
                    }
                    Crash::FlipByte(pos, mask) => {
                        let total: u64 = files
                            .iter()
                            .map(|f| std::fs::metadata(f).unwrap().len())
                            .sum();
                        if total > 0 {
                            let mut at = u64::from(pos) % total;
                            for f in &files {
                                let len = std::fs::metadata(f).unwrap().len();
                                if at < len {
                                    let mut data = std::fs::read(f).unwrap();
                                    // Which record does the byte belong to?
                                    let scan = frame::scan(&data);
                                    let hit = scan.frames.iter().find(|(off, _, _, l)| {
                                        at >= *off && at < off + u64::from(*l)
                                    });
                                    if let Some(&(_, _, seq, _)) = hit {
                                        let payload =
                                            String::from_utf8(frame_payload(&data, &scan, seq))
                                                .unwrap();
                                        if seq >= head {
                                            expect.retain(|p| *p != payload);
                                        }
                                    }
                                    data[at as usize] ^= mask;
                                    std::fs::write(f, &data).unwrap();
                                    break;
                                }
                                at -= len;
                            }
                        }
                    }
                }
                let (s2, r) =
                    Spool::open_with(dir.path(), 1 << 30, FsyncPolicy::Never, seg).unwrap();
                assert_eq!(r.events as usize, expect.len(), "recovered count");
                let got = drain(&s2, false).await;
                assert_eq!(got, expect, "replay after {kind:?}");
                drop(s2);
                let (s3, _) =
                    Spool::open_with(dir.path(), 1 << 30, FsyncPolicy::Never, seg).unwrap();
                s = s3;
                model = expect
                    .into_iter()
                    .map(|payload| M {
                        payload,
                        seq: None,
                        committed: false,
                    })
                    .collect();
                inflight.clear();
            }
        }
    }
    // Finally: a clean restart replays exactly the uncommitted records, each once, in order.
    drop(s);
    let (s, _) = Spool::open_with(dir.path(), 1 << 30, FsyncPolicy::Never, seg).unwrap();
    let head: u64 = std::fs::read_to_string(dir.path().join("queue/head"))
        .map(|t| t.trim().parse().unwrap())
        .unwrap_or(0);
    let expect: Vec<String> = model
        .iter()
        .filter(|m| !m.committed || m.seq.is_some_and(|q| q >= head))
        .map(|m| m.payload.clone())
        .collect();
    let got = drain(&s, true).await;
    // Every uncommitted record, plus batches committed out of order beyond the head (the head
    // only moves over contiguous commits): at least once, in order, never a record twice.
    assert_eq!(got, expect);
}

fn frame_payload(data: &[u8], scan: &frame::Scan, seq: u64) -> Vec<u8> {
    let &(off, _, _, len) = scan.frames.iter().find(|f| f.2 == seq).unwrap();
    data[off as usize + frame::HEADER + frame::BODY_PREFIX..(off + u64::from(len)) as usize]
        .to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn spool_matches_model_across_crashes(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_model(ops));
    }
}

#[tokio::test]
async fn damage_after_start_is_skipped_not_stalled_on() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path(), 1 << 20);
    s.append(vec![
        rec("first-record"),
        rec("second-record"),
        rec("third-record"),
    ])
    .await
    .unwrap();
    // Bit rot in the middle record while the daemon runs.
    let f = seg_files(dir.path()).pop().unwrap();
    let mut data = std::fs::read(&f).unwrap();
    let one = frame::frame_len("first-record".len());
    data[one + 20] ^= 0xff;
    std::fs::write(&f, &data).unwrap();
    assert_eq!(drain(&s, true).await, vec!["first-record", "third-record"]);
    assert_eq!(s.corrupt_read(), 1);
    assert_eq!(
        s.depth(),
        Depth::default(),
        "the damaged record's space is released"
    );
}

#[tokio::test]
async fn state_written_with_events_survives_a_crash_between_the_two_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, _) = open(dir.path(), 1 << 20);
        s.write(
            vec![],
            vec![StateOp::Put("lk/s".into(), b"seq=1".to_vec())],
            Space::Check,
        )
        .await
        .unwrap();
        s.write(
            vec![rec("event-2")],
            vec![StateOp::Put("lk/s".into(), b"seq=2".to_vec())],
            Space::Check,
        )
        .await
        .unwrap();
    }
    // Simulate the crash: the state log lost its last write (the event's segment has it).
    let log = dir.path().join("state/state.log");
    let data = std::fs::read(&log).unwrap();
    let scan = frame::scan(&data);
    assert_eq!(scan.frames.len(), 2);
    let first_len = scan.frames[0].3 as usize;
    std::fs::write(&log, &data[..first_len]).unwrap();
    let (_, r) = open(dir.path(), 1 << 20);
    assert_eq!(
        r.state["lk/s"], b"seq=2",
        "the copy in the segment is replayed"
    );
    assert_eq!(r.events, 1);
    // ... and written back to the log, so it outlives the segment.
    let (_, r2) = {
        drop(r);
        open(dir.path(), 1 << 20)
    };
    assert_eq!(r2.state["lk/s"], b"seq=2");
    let scan = frame::scan(&std::fs::read(&log).unwrap());
    assert_eq!(scan.frames.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn oldest_age_follows_the_oldest_undelivered_record() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path(), 1 << 20);
    assert_eq!(s.oldest_age(), Duration::ZERO);
    s.append(vec![rec("a")]).await.unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    s.append(vec![rec("b")]).await.unwrap();
    assert!(s.oldest_age() >= Duration::from_secs(10));
    let b = s.next_batch(limits(1)).await.unwrap();
    s.commit(&b.ack);
    assert!(
        s.oldest_age() < Duration::from_secs(1),
        "the oldest left is b"
    );
    let b = s.next_batch(limits(1)).await.unwrap();
    s.commit(&b.ack);
    assert_eq!(s.oldest_age(), Duration::ZERO);
}

/// Regression (found by the model test): the last segment's only record was damaged, so
/// recovery truncated it to nothing and handed its seq out again; the next segment got the
/// same file name, and deleting the empty recovered segment deleted the new records too.
#[tokio::test]
async fn a_segment_emptied_by_damage_does_not_share_its_name_with_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, _) = open(dir.path(), 1 << 20);
        s.append(vec![rec("first")]).await.unwrap();
    }
    {
        let (s, _) = open(dir.path(), 1 << 20);
        s.append(vec![rec("second")]).await.unwrap();
    }
    // Damage the second segment's only record (its magic): recovery truncates it to nothing.
    let last = seg_files(dir.path()).pop().unwrap();
    let mut data = std::fs::read(&last).unwrap();
    data[0] ^= 1;
    std::fs::write(&last, &data).unwrap();
    {
        let (s, r) = open(dir.path(), 1 << 20);
        assert_eq!(r.events, 1);
        s.append((0..4).map(|i| rec(&format!("new-{i}"))).collect())
            .await
            .unwrap();
        let b = s.next_batch(limits(1)).await.unwrap();
        assert_eq!(b.records, vec![rec("first")]);
        s.commit(&b.ack);
    }
    let (s, r) = open(dir.path(), 1 << 20);
    assert_eq!(r.events, 4);
    assert_eq!(
        drain(&s, true).await,
        vec!["new-0", "new-1", "new-2", "new-3"]
    );
}
