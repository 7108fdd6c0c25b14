//! Crash-safe writes of state files.
//!
//! Every file is written to a temporary file in the same directory, flushed
//! to disk, then renamed over the target, and the directory itself is
//! synced: a process killed at any moment leaves either the old file or the
//! new one, never half of one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Permissions for private keys and account credentials.
pub const PRIVATE: u32 = 0o600;
/// Permissions for certificates, which are public.
pub const PUBLIC: u32 = 0o644;

/// Write `contents` to `path` atomically with the given permission bits.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
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
    fn parent_of_a_bare_file_name_is_the_current_directory() {
        assert_eq!(parent_dir(Path::new("root.pem")), Path::new("."));
        assert_eq!(parent_dir(Path::new("./root.pem")), Path::new("."));
        assert_eq!(parent_dir(Path::new("certs/root.pem")), Path::new("certs"));
        assert_eq!(parent_dir(Path::new("/etc/root.pem")), Path::new("/etc"));
        // The current directory can actually be synced, unlike "".
        sync_dir(parent_dir(Path::new("root.pem"))).unwrap();
    }
}
