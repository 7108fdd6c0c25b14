//! Crash-safe writes of state files.
//!
//! Every file is written to a temporary file in the same directory, flushed
//! to disk, then renamed over the target, and the directory itself is
//! synced: a process killed at any moment leaves either the old file or the
//! new one, never half of one.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Permissions for private keys and account credentials.
pub const PRIVATE: u32 = 0o600;
/// Permissions for certificates, which are public.
pub const PUBLIC: u32 = 0o644;

/// One lock per path for the whole process, for writers of one file or
/// directory that may run at once (every certificate from one ACME server
/// shares its account, every export into a directory its file names),
/// with the state the writers leave for the next one.
#[derive(Debug)]
pub struct PathLocks<T>(Mutex<BTreeMap<PathBuf, Arc<tokio::sync::Mutex<T>>>>);

impl<T: Default> Default for PathLocks<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Default> PathLocks<T> {
    pub const fn new() -> Self {
        PathLocks(Mutex::new(BTreeMap::new()))
    }

    /// The lock for `path`, created on first use.
    pub fn of(&self, path: &Path) -> Arc<tokio::sync::Mutex<T>> {
        Arc::clone(
            self.0
                .lock()
                .expect("poisoned")
                .entry(path.to_path_buf())
                .or_default(),
        )
    }
}

/// Write `contents` to `path` atomically with the given permission bits.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?
        .to_string_lossy();
    let prefix = format!(".{file_name}.tmp.");
    remove_stale_temporaries(dir, &prefix);
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // The mode applies at creation, so a key is never readable by
            // others, not even for the instant before a chmod.
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A temporary untouched for this long has no writer left, whatever its
/// pid says: a write takes milliseconds.
const ABANDONED_AFTER: Duration = Duration::from_secs(600);

/// Remove the temporaries (`<prefix><pid>`, files or directories) that
/// writers killed part-way left in `dir`, so a crash leaves no litter (the
/// temporary of a key is a copy of the key) once the next write happens.
///
/// A temporary is abandoned when no process with its pid exists here, or
/// when it is old: the writer may run in another pid namespace sharing the
/// directory, where its pid means nothing to us. Our own temporaries, and
/// young ones of live pids, are left alone.
pub fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    // Without /proc nothing can be said about a pid.
    let pids_visible = Path::new("/proc/self").exists();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let gone = pids_visible && !Path::new("/proc").join(pid.to_string()).exists();
        let old = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ABANDONED_AFTER);
        if gone || old {
            let path = entry.path();
            let removed = if meta.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a temporary left by an interrupted write")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a temporary left by an interrupted write")
                }
            }
        }
    }
}

/// The directory that holds `path`, for the temporary file and the sync.
/// A bare file name (`root.pem`) has the empty path as its parent, which
/// cannot be opened; it lives in the current directory.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Create a directory (and parents) readable only by the owner.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Make a rename in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_of_dead_writers_go_and_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let ours = std::process::id();
        // pid 1 is alive in any namespace; no pid reaches u32::MAX - 1.
        let dead = u32::MAX - 1;
        for name in [
            format!(".ca.pem.tmp.{dead}"),
            format!(".ca.pem.tmp.{ours}"),
            ".ca.pem.tmp.1".to_string(),
            format!(".ca.key.tmp.{dead}"),
            "ca.pem".to_string(),
        ] {
            fs::write(dir.path().join(name), "x").unwrap();
        }
        fs::create_dir(dir.path().join(format!(".local-ca.tmp.{dead}"))).unwrap();
        fs::write(dir.path().join(format!(".local-ca.tmp.{dead}/ca.key")), "x").unwrap();

        remove_stale_temporaries(dir.path(), ".ca.pem.tmp.");
        remove_stale_temporaries(dir.path(), ".local-ca.tmp.");
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            // Another file's temporary: that file's next write removes it.
            format!(".ca.key.tmp.{dead}"),
            ".ca.pem.tmp.1".to_string(),
            format!(".ca.pem.tmp.{ours}"),
            "ca.pem".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn parent_of_a_bare_file_name_is_the_current_directory() {
        assert_eq!(parent_dir(Path::new("root.pem")), Path::new("."));
        assert_eq!(parent_dir(Path::new("./root.pem")), Path::new("."));
        assert_eq!(parent_dir(Path::new("certs/root.pem")), Path::new("certs"));
        assert_eq!(parent_dir(Path::new("/etc/root.pem")), Path::new("/etc"));
        // The current directory can actually be synced, unlike "".
        sync_dir(parent_dir(Path::new("root.pem"))).unwrap();
    }
}
