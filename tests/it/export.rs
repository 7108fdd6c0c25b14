//! The `on_renew` hook run as a real process: bounded, and killed as a
//! whole when it overruns.

use std::time::Duration;

use sheath::cert::export::{run_hook, HookOutcome, HOOK_OUTPUT_LIMIT};

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
    let outcome = run_hook(&command, &[], Duration::from_millis(500))
        .await
        .outcome;
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
    .await
    .outcome;
    assert!(matches!(ok, HookOutcome::Succeeded), "{ok:?}");
    let failed = run_hook("exit 3", &[], Duration::from_secs(10))
        .await
        .outcome;
    assert!(
        matches!(failed, HookOutcome::Failed(s) if s.code() == Some(3)),
        "{failed:?}"
    );
}

/// A hook's output goes into the line that reports it, not into sheath's
/// own output (where, with JSON logs, it was lines of another format):
/// each stream kept up to a bound, the rest read and dropped so that a
/// talkative hook never blocks on a full pipe.
#[tokio::test]
async fn a_hooks_output_is_captured_for_its_log_line() {
    let run = run_hook(
        "echo updated nginx; echo 'reload: permission denied' >&2; exit 1",
        &[],
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(run.outcome, HookOutcome::Failed(_)), "{run:?}");
    assert_eq!(run.stdout, "updated nginx");
    assert_eq!(run.stderr, "reload: permission denied");

    // A megabyte, far past a pipe's 64 KiB: the hook must still finish.
    let run = run_hook(
        "head -c 1048576 /dev/zero | tr '\\0' x",
        &[],
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(run.outcome, HookOutcome::Succeeded), "{run:?}");
    let (kept, note) = run.stdout.split_at(HOOK_OUTPUT_LIMIT);
    assert!(kept.bytes().all(|b| b == b'x'));
    assert_eq!(
        note,
        format!(" [{} more bytes]", 1048576 - HOOK_OUTPUT_LIMIT)
    );
}

/// A hook that leaves a process running with its output open (a daemon it
/// started) is reported once it has exited, with what it wrote.
#[tokio::test]
async fn a_hook_that_leaves_a_process_behind_is_reported_when_it_exits() {
    let started = std::time::Instant::now();
    let run = run_hook("sleep 600 & echo $!", &[], Duration::from_secs(30)).await;
    assert!(matches!(run.outcome, HookOutcome::Succeeded), "{run:?}");
    let pid: i32 = run.stdout.parse().unwrap();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
