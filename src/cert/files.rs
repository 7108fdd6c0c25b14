//! The `files` certificate source: a PEM chain and a PEM private key,
//! watched for changes.
//!
//! Change notifications (inotify) come from the files' directories, which is
//! where atomic renames, Kubernetes' `..data` symlink swap and certbot's
//! `live/` symlink updates show up. A periodic re-read (in the manager)
//! covers filesystems that never notify. Whatever triggered it, a reload
//! reads both files and accepts them only as a matching, valid pair.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use rustls::sign::CertifiedKey;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::manager::Material;
use rustls_pki_types::PrivateKeyDer;

use super::{certified_key, read_chain, read_key, without_bom, CertError, CertInfo};

/// Read and check a certificate chain and its key from disk.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<(Arc<CertifiedKey>, CertInfo), CertError> {
    load_material(cert_path, key_path).map(|m| (m.certified, m.info))
}

/// Read and check a certificate chain and its key, keeping their PEM text
/// (DER files are given it) for an export.
pub fn load_material(cert_path: &Path, key_path: &Path) -> Result<Material, CertError> {
    // Bytes, not text: a DER or PKCS#12 file is not UTF-8, and the error
    // for it must say what it is, not that it is not UTF-8.
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| CertError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let cert_data = read(cert_path)?;
    let key_data = read(key_path)?;
    let chain = read_chain(cert_path, &cert_data)?;
    let key = read_key(key_path, &key_data)?;
    let chain_pem = match std::str::from_utf8(without_bom(&cert_data)) {
        Ok(text) if text.contains("-----BEGIN ") => text.to_string(),
        _ => pem::encode_many(
            &chain
                .iter()
                .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref()))
                .collect::<Vec<_>>(),
        ),
    };
    let key_pem = match std::str::from_utf8(without_bom(&key_data)) {
        Ok(text) if text.contains("-----BEGIN ") => text.to_string(),
        _ => pem::encode(&pem::Pem::new(
            match &key {
                PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
                PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
                _ => "PRIVATE KEY",
            },
            key.secret_der(),
        )),
    };
    let (certified, info) = certified_key(&cert_path.display().to_string(), chain, key)?;
    Ok(Material {
        certified,
        info,
        chain_pem,
        key_pem,
    })
}

/// Does this event say a file's content or name changed? Opening or
/// reading a file does not. Counted, they made every reload wake the
/// watcher again with its own reads (and the watchers of other listeners
/// on the same files): an idle sheath with two such listeners re-read them
/// 18 times a second, and under load some rotations were never installed.
/// Closing a file written to does count: it ends a non-atomic write.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The longest `Watcher::settle` waits for a directory to go quiet.
const MAX_SETTLE: Duration = Duration::from_secs(2);

/// Change notifications for the directories holding some files.
#[derive(Debug)]
pub struct Watcher {
    events: mpsc::Receiver<()>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Watcher {
    /// Watch the directories of `paths`. If the platform refuses (no
    /// inotify, watch limit reached), the watcher stays silent and polling
    /// alone picks up changes.
    pub fn new(paths: &[&Path]) -> Watcher {
        let (tx, events) = mpsc::channel(1);
        let dirs: HashSet<PathBuf> = paths
            .iter()
            .map(|p| p.parent().unwrap_or(Path::new(".")).to_path_buf())
            .collect();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| is_change(&e.kind)) {
                // A full channel already means "something changed".
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            for dir in &dirs {
                w.watch(dir, RecursiveMode::NonRecursive)?;
            }
            Ok(w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch certificate files; relying on polling");
                None
            }
        };
        Watcher {
            events,
            _watcher: watcher,
        }
    }

    /// Resolves when something changed in a watched directory.
    pub async fn changed(&mut self) {
        if self._watcher.is_none() || self.events.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// Wait until it is time to read the files again: a change has been
    /// seen and has settled, or `poll` has passed (a change notify cannot
    /// see, on a network filesystem say). False once `stop` is cancelled,
    /// at once even mid-settle: a task a reload replaced must not keep its
    /// watcher (a thread, descriptors) until its files go quiet, or a
    /// reload storm during a rotation piles them up.
    pub async fn next_look(&mut self, poll: Duration, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = async {
                tokio::select! {
                    _ = self.changed() => {
                        // Writers often replace files in several steps;
                        // wait for a quiet moment before reading.
                        self.settle(Duration::from_millis(250)).await;
                    }
                    _ = tokio::time::sleep(poll) => {}
                }
            } => true,
        }
    }

    /// Wait until no change has been seen for `quiet`, for
    /// `MAX_SETTLE` at most. The directory is watched, not the files, so
    /// a neighbour written all the time (a log, a database) would otherwise
    /// hold off every read for as long as it is written, polling included.
    /// Reading a pair still being written is harmless: it fails the checks
    /// and the next change reads it again.
    pub async fn settle(&mut self, quiet: Duration) {
        let _ = tokio::time::timeout(MAX_SETTLE, async {
            while let Ok(Some(())) = tokio::time::timeout(quiet, self.events.recv()).await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading the watched files (as every reload does) must not look like
    /// a change; writing one must.
    #[tokio::test]
    async fn reads_are_not_changes_but_writes_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, "one").unwrap();
        let mut watcher = Watcher::new(&[path.as_path()]);
        assert!(watcher._watcher.is_some(), "inotify unavailable");

        for _ in 0..3 {
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "one");
        }
        // A negative can only be bounded: inotify delivers within
        // milliseconds, so half a second without an event means none came.
        let read = tokio::time::timeout(Duration::from_millis(500), watcher.changed()).await;
        assert!(read.is_err(), "reading the file was reported as a change");

        std::fs::write(&path, "two").unwrap();
        tokio::time::timeout(Duration::from_secs(10), watcher.changed())
            .await
            .expect("writing the file was not reported");
    }
}
