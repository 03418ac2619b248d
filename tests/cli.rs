//! The command line: check-config, version, usage errors, exit codes.

mod common;

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::bin())
        .args(args)
        .env_remove("VOICETAGD_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_shipped_config() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config/voicetagd.toml");
    let (code, out, err) = run(&["check-config", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ok: listen 127.0.0.1:7878, upstream file://./var/outbox"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1);
}

#[test]
fn check_config_reports_path_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[server]\nlisten = \"127.0.0.1:1\"\nlisten_backlog = 5\n[upstream]\nurl = \"file:///x\"\n",
    )
    .unwrap();
    let (code, out, err) = run(&["check-config", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(
        err.trim(),
        format!(
            "{}:3:1: unknown field `listen_backlog`, expected one of `listen`, `max_body_bytes`, `token`, `token_file`, `token_env`, `shutdown_timeout`",
            p.display()
        )
    );
}

#[test]
fn check_config_lists_every_secret_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[server]\ntoken_env = \"VOICETAGD_TEST_UNSET\"\n[upstream]\nurl = \"file:///x\"\napi_key_file = \"missing-key\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check-config", "--config", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with(&format!("{}:2:13: server.token_env", p.display())),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{}:5:16: upstream.api_key_file: cannot read secret file",
            p.display()
        )),
        "{err}"
    );
}

#[test]
fn missing_config_file_is_exit_1() {
    let (code, _, err) = run(&["check-config", "--config", "/nonexistent/voicetagd.toml"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/voicetagd.toml:1:1: cannot read config file"),
        "{err}"
    );
    let (code, _, _) = run(&["run", "--config", "/nonexistent/voicetagd.toml"]);
    assert_eq!(code, 1);
}

#[test]
fn version_help_and_usage_errors() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("voicetagd {}", env!("CARGO_PKG_VERSION"))
    );
    for sub in [
        &["--help"][..],
        &["run", "--help"],
        &["check-config", "--help"],
    ] {
        let (code, out, _) = run(sub);
        assert_eq!(code, 0);
        assert!(out.contains("Usage: voicetagd"), "{out}");
    }
    assert_eq!(run(&["frobnicate"]).0, 64);
    assert_eq!(run(&["run", "--bogus"]).0, 64);
    assert_eq!(run(&[]).0, 64);
}
