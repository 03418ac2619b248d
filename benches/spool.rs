//! Spool throughput and recovery time.
//!
//! `cargo bench --bench spool` prints, for fsync = always at 1, 8 and 64 concurrent writers
//! and fsync = never at 64: accepted events/s and append latency (p50, p99), each writer
//! appending one ~400-byte event and waiting for its acknowledgement before the next, as an
//! ingest handler does; then the recovery time of a 1 GiB spool.
//! Under `cargo test` (no `--bench` argument) it only runs a tiny smoke pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use voicetagd::config::FsyncPolicy;
use voicetagd::spool::Spool;

fn event(i: usize) -> Bytes {
    let pad = "x".repeat(260);
    Bytes::from(format!(
        r#"{{"id":"01a242ec-8bb2-7318-a32e-{i:012}","kind":"llm","source":"api","session_id":"sess-1","agent_id":"my-agent","customer_id":"customer-123","meta_tags":{{"env":"staging"}},"usage":{{"pad":"{pad}"}}}}"#
    ))
}

fn dir() -> tempfile::TempDir {
    // On the real disk (the working tree), never a tmpfs, so fsync means something.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

struct Run {
    events: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
}

fn throughput(writers: usize, fsync: FsyncPolicy, duration: Duration) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let d = dir();
    let (spool, _) = Spool::open(d.path(), u64::MAX / 2, fsync).expect("open");
    let spool = Arc::new(spool);
    let start = Instant::now();
    let lat: Vec<Vec<u32>> = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let spool = Arc::clone(&spool);
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = w * 10_000_000;
                while start.elapsed() < duration {
                    let t = Instant::now();
                    spool.append(vec![event(i)]).await.expect("append");
                    lat.push(t.elapsed().as_micros() as u32);
                    i += 1;
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.expect("writer"));
        }
        all
    });
    let secs = start.elapsed().as_secs_f64();
    let mut all: Vec<u32> = lat.into_iter().flatten().collect();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    Run {
        events: all.len() as u64,
        secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn recovery(bytes: u64) -> (u64, f64) {
    let d = dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    {
        let (spool, _) = Spool::open(d.path(), u64::MAX / 2, FsyncPolicy::Never).expect("open");
        rt.block_on(async {
            let per_call = 1000;
            let mut written = 0u64;
            let mut i = 0;
            while written < bytes {
                let batch: Vec<Bytes> = (0..per_call).map(|k| event(i + k)).collect();
                written += batch.iter().map(|b| b.len() as u64 + 21).sum::<u64>();
                i += per_call;
                spool.append(batch).await.expect("append");
            }
        });
    }
    let t = Instant::now();
    let (_spool, rec) = Spool::open(d.path(), u64::MAX / 2, FsyncPolicy::Always).expect("reopen");
    (rec.events, t.elapsed().as_secs_f64())
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (duration, recover) = if bench {
        (Duration::from_secs(5), 1u64 << 30)
    } else {
        (Duration::from_millis(50), 1 << 20)
    };
    println!("| fsync | writers | events | seconds | events/s | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|---|---|");
    for (fsync, writers) in [
        (FsyncPolicy::Always, 1),
        (FsyncPolicy::Always, 8),
        (FsyncPolicy::Always, 64),
        (FsyncPolicy::Never, 64),
    ] {
        let r = throughput(writers, fsync, duration);
        println!(
            "| {:?} | {writers} | {} | {:.1} | {:.0} | {:.0} | {:.0} |",
            fsync,
            r.events,
            r.secs,
            r.events as f64 / r.secs,
            r.p50_us,
            r.p99_us
        );
    }
    let (events, secs) = recovery(recover);
    println!(
        "\nrecovery of {} MiB ({events} events): {secs:.2} s",
        recover >> 20
    );
}
