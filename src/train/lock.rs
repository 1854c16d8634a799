//! One writer per run directory: an exclusive `flock` on `<run dir>/train.lock`, held for the
//! whole run and released by the kernel when the process ends, however it ends. The lock file
//! names its holder (process ID and host), since a lock cannot say who holds it. Where `flock`
//! is not shared between machines (NFS without lock support, Lustre mounted without
//! `-o flock`), two machines can both take it: there the lock only guards against a second
//! process on the same machine.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{bail, Error, Result};

/// The lock file's name in a run directory.
pub const LOCK: &str = "train.lock";
/// Tries to take a lock file that was replaced meanwhile (see [`RunLock::take`]).
const RETRIES: usize = 8;

/// The held lock of a run directory; dropping it releases the lock, and removes the run
/// directory again if taking the lock created it and nothing else was written there.
pub struct RunLock {
    file: File,
    path: PathBuf,
    /// The run directory, when taking the lock created it.
    created: Option<PathBuf>,
}

impl RunLock {
    /// Takes the lock of run `name` in `dir` (created if missing), or says who holds it.
    pub fn take(dir: &Path, name: &str) -> Result<RunLock> {
        let created = (!dir.exists()).then(|| dir.to_path_buf());
        std::fs::create_dir_all(dir).map_err(|e| Error(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(LOCK);
        let fail = |e: std::io::Error| Error(format!("cannot lock {}: {e}", path.display()));
        for _ in 0..RETRIES {
            let mut file =
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(fail)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let holder = holder.trim();
                    bail!(
                        "run '{name}' is in use by {} ({}): wait for it to end, or use another run directory \
                         (--name or --runs-dir; with --resume, --change-recipe --name)",
                        if holder.is_empty() { "another process" } else { holder },
                        path.display()
                    );
                }
                Err(TryLockError::Error(e)) => return Err(fail(e)),
            }
            // The file may have been removed and made anew between our open and our lock (a
            // holder cleaning up): then this lock guards nothing, so take the new file's.
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            file.set_len(0).map_err(fail)?;
            writeln!(file, "process {} on {}", std::process::id(), hostname()).map_err(fail)?;
            file.sync_all().map_err(fail)?;
            return Ok(RunLock { file, path, created });
        }
        bail!("cannot lock {}: it keeps being replaced", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let Some(dir) = &self.created else { return };
        let only_the_lock =
            std::fs::read_dir(dir).is_ok_and(|entries| entries.filter_map(|e| e.ok()).all(|e| e.file_name() == LOCK));
        if only_the_lock {
            // Removed while still locked, so a process that opens it now sees it replaced.
            let _ = std::fs::remove_file(&self.path).and_then(|()| std::fs::remove_dir(dir));
        }
        let _ = self.file.unlock();
    }
}

/// This machine's name (`/proc/sys/kernel/hostname`), or `an unnamed host`.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    match name.trim() {
        "" => "an unnamed host".into(),
        n => format!("host {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_learns_who_holds_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = RunLock::take(&dir, "run").unwrap();
        let text = std::fs::read_to_string(dir.join(LOCK)).unwrap();
        assert_eq!(text, format!("process {} on {}\n", std::process::id(), hostname()));
        let e = RunLock::take(&dir, "run").err().expect("the run is locked").to_string();
        assert!(e.starts_with("run 'run' is in use by process "), "{e}");
        assert!(e.contains(&format!("process {} on ", std::process::id())) && e.contains(LOCK), "{e}");
        drop(first);
        // Taking it created the directory and nothing else was written: both are gone.
        assert!(!dir.exists());
        let again = RunLock::take(&dir, "run").unwrap();
        std::fs::write(dir.join("checkpoint.safetensors"), b"x").unwrap();
        drop(again);
        assert!(dir.join(LOCK).exists(), "a run with files keeps its lock file");
        let _third = RunLock::take(&dir, "run").unwrap();
    }
}
