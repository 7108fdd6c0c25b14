//! The TLS policy as an outside auditor sees it: testssl.sh's protocol,
//! cipher, forward-secrecy and vulnerability checks against a listener.

use std::collections::HashMap;

use tokio::process::Command;

use crate::common::{self, backend, TestPki};
use crate::http::http_proxy;

#[tokio::test]
async fn testssl_reports_no_weakness() {
    if !common::require_tool("testssl") {
        return;
    }
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let addr = proxy.addr("web");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("testssl.json");
    // Protocols (-p), cipher categories (-s), forward secrecy (-f),
    // vulnerabilities (-U) and the server's preferences (-P). The
    // certificate checks are left out: a test certificate from a test CA is
    // untrusted and short-lived by design.
    // A full run takes ~25 s alone on this machine, beyond the usual
    // per-step deadline; the bound here is for a loaded CI runner.
    let run = tokio::time::timeout(
        std::time::Duration::from_secs(150),
        Command::new("testssl")
            .args(["--quiet", "--color", "0", "--warnings", "off"])
            .arg("--jsonfile")
            .arg(&report)
            .args(["-p", "-s", "-f", "-U", "-P"])
            .arg(addr.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let out = run
        .expect("testssl still running after 150 s")
        .expect("run testssl");
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!(
            "no report from testssl ({e}); it printed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let field = |f: &serde_json::Value, key: &str| f[key].as_str().unwrap_or("").to_string();

    // Anything testssl rates above INFO, or could not test, is a failure.
    let flagged: Vec<String> = findings
        .iter()
        .filter(|f| {
            matches!(
                field(f, "severity").as_str(),
                "LOW" | "MEDIUM" | "HIGH" | "CRITICAL" | "WARN" | "FATAL"
            )
        })
        .map(|f| {
            format!(
                "{} {}: {}",
                field(f, "severity"),
                field(f, "id"),
                field(f, "finding")
            )
        })
        .collect();
    assert!(
        flagged.is_empty(),
        "testssl flagged:\n{}",
        flagged.join("\n")
    );

    // And it did test what the policy says.
    let by_id: HashMap<String, String> = findings
        .iter()
        .map(|f| (field(f, "id"), field(f, "finding")))
        .collect();
    for (id, expect) in [
        ("SSLv2", "not offered"),
        ("SSLv3", "not offered"),
        ("TLS1", "not offered"),
        ("TLS1_1", "not offered"),
        ("TLS1_2", "offered"),
        ("TLS1_3", "offered"),
        ("cipherlist_NULL", "not offered"),
        ("cipherlist_aNULL", "not offered"),
        ("cipherlist_EXPORT", "not offered"),
        ("cipherlist_LOW", "not offered"),
        ("cipherlist_3DES_IDEA", "not offered"),
        ("secure_client_renego", "not vulnerable"),
        ("CRIME_TLS", "not vulnerable"),
    ] {
        let found = by_id.get(id).map(String::as_str).unwrap_or("(missing)");
        assert!(
            found.starts_with(expect),
            "{id}: {found}, expected {expect}"
        );
    }
}
