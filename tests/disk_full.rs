//! A full disk (ENOSPC): ingest answers 503, nothing accepted is touched, and ingest recovers
//! by itself once delivery frees space. Uses a real 1 MiB tmpfs, so it needs root (CI runs as
//! root); elsewhere it says so and does nothing.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{Daemon, Upstream, config, wait_until};
use serde_json::json;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn disk_full_answers_503_and_recovers_after_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&spool)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); CI runs this test as root");
        return;
    }
    let _mount = Mount(spool.clone());
    let up_addr = Upstream::free_addr();
    let text = common::with_spool_max(
        &config(
            dir.path(),
            &format!("http://{up_addr}/v1/events:batch"),
            "",
            "batch_max_events = 50",
            "",
        ),
        "1GiB",
    );
    let d = Daemon::start(dir, &text);
    let pad = "p".repeat(2000);
    let body = |n: u64| json!({"agentId": "a", "customerId": "c", "rawUsage": {"provider": "p", "model": "m", "inputTokens": n, "pad": pad}});
    let mut accepted = 0u64;
    let (status, headers, resp) = loop {
        let (status, headers, resp) = d.post("/api/v2/usage", &body(accepted));
        if status != 200 {
            break (status, headers, resp);
        }
        accepted += 1;
        assert!(accepted < 2000, "a 1 MiB disk never filled");
    };
    assert_eq!(status, 503, "{resp}");
    assert_eq!(headers["retry-after"], "1");
    let msg = resp["error"].as_str().unwrap();
    assert!(msg.contains("No space left"), "{msg}");
    assert_eq!(d.get("/readyz").0, 503);
    assert!(accepted > 100, "only {accepted} accepted");

    // The upstream comes back: delivery frees the disk and ingest accepts again by itself.
    let up = Upstream::start_on(up_addr, vec![]);
    up.wait_delivered(accepted as usize);
    wait_until("ingest to accept again", || {
        (d.post("/api/v2/usage", &body(accepted)).0 == 200).then_some(())
    });
    let events = up.wait_delivered(accepted as usize + 1);
    let got: BTreeSet<u64> = events
        .iter()
        .map(|e| e["usage"]["inputTokens"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        (0..=accepted).collect(),
        "every accepted event arrives"
    );
    assert_eq!(d.get("/readyz").0, 200);
    let (code, _) = d.terminate();
    assert_eq!(code, 0);
}
