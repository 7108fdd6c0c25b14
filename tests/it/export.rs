//! The `on_renew` hook run as a real process: bounded, and killed as a
//! whole when it overruns.

use std::time::Duration;

use sheath::cert::export::{run_hook, HookOutcome};

use crate::common::eventually;

/// Is `pid` a live process (not gone, not a zombie waiting to be reaped)?
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// A hook that overruns its time is killed, and so is what it started: a
/// script stuck in a command it runs (here a `sleep`) must not leave that
/// command running on, reparented, after sheath said it killed the hook.
#[tokio::test]
async fn a_hook_that_times_out_is_killed_with_what_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("child.pid");
    let command = format!("sleep 600 & echo $! > '{}'; wait", pid_file.display());
    let outcome = run_hook(&command, &[], Duration::from_millis(500)).await;
    assert!(matches!(outcome, HookOutcome::TimedOut), "{outcome:?}");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eventually("the hook's child killed with it", || !alive(pid)).await;
}

#[tokio::test]
async fn a_hook_reports_success_and_failure() {
    let env = [("SHEATH_CERT_SERIAL", "01:02".as_ref())];
    let ok = run_hook(
        "test \"$SHEATH_CERT_SERIAL\" = 01:02",
        &env,
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(ok, HookOutcome::Succeeded), "{ok:?}");
    let failed = run_hook("exit 3", &[], Duration::from_secs(10)).await;
    assert!(
        matches!(failed, HookOutcome::Failed(s) if s.code() == Some(3)),
        "{failed:?}"
    );
}
