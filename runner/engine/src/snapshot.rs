//! A run's frozen copy of the project's files, made in time proportional to what changed.
//!
//! A persistent *mirror* (`<state>/snapshot/files/`) holds one copy of every file the last
//! run saw, and an index of each source file's `(size, mtime, ctime, inode)` when it was
//! copied. Taking a snapshot stats every source file, copies only those whose stat changed
//! into the mirror (a new file renamed over the old, never a write in place), and hard-links
//! the mirror's files into `<run>/src`. Because the mirror only ever *replaces* files, a
//! run's links keep the content it started with, whatever a later run copies: edits made
//! while a run goes reach none of its jobs. Unchanged files keep their inode and mtime from
//! run to run, so tools that compare mtimes (make, cargo) see them as unchanged.
//!
//! Nothing writes through the links: jobs see the snapshot through an overlay mount (read
//! only below) or through a copy (see [`crate::builds`]).
//!
//! A file modified within a second of the previous snapshot ("racily clean", as git calls
//! it) is copied again rather than trusted.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What a snapshot cost: files linked from the mirror unchanged, and files copied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    pub files: usize,
    pub copied: usize,
    pub bytes_copied: u64,
}

/// A source file's identity at the time it was copied into the mirror.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            ino: m.ino(),
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct Index {
    /// When the snapshot that wrote this index started (ns since the epoch).
    taken_at_ns: i128,
    /// The source directory the stamps describe: another source never matches.
    source: PathBuf,
    entries: HashMap<String, Stamp>,
}

const RACY_NS: i128 = 1_000_000_000;

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Freeze `files` (relative paths under `source`) into `dest` (created, must not exist or be
/// empty) through the mirror in `mirror_dir`. Concurrent snapshots of one mirror take turns.
pub fn take(
    source: &Path,
    files: &[String],
    mirror_dir: &Path,
    dest: &Path,
) -> Result<SnapshotStats, String> {
    let files_dir = mirror_dir.join("files");
    std::fs::create_dir_all(&files_dir)
        .map_err(|e| format!("cannot create {}: {e}", files_dir.display()))?;
    std::fs::create_dir_all(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let _lock = crate::builds::lock_file(&mirror_dir.join("lock"), true)?
        .ok_or_else(|| "the snapshot mirror is locked".to_string())?;
    let index_path = mirror_dir.join("index.json");
    let old: Index = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|i: &Index| i.source == source)
        .unwrap_or_default();
    let started = now_ns();
    let mut new = Index {
        taken_at_ns: started,
        source: source.to_path_buf(),
        entries: HashMap::with_capacity(files.len()),
    };
    let mut stats = SnapshotStats::default();
    let mut made: HashSet<PathBuf> = HashSet::new();
    let mut mkdirs = |dir: &Path| -> Result<(), String> {
        if made.contains(dir) {
            return Ok(());
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        made.insert(dir.to_path_buf());
        Ok(())
    };
    for f in files {
        let from = source.join(f);
        // A file deleted since it was listed is simply not part of the run.
        let Ok(meta) = from.symlink_metadata() else {
            continue;
        };
        let to = dest.join(f);
        if let Some(parent) = to.parent() {
            mkdirs(parent)?;
        }
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&from)
                .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(|e| format!("cannot create {}: {e}", to.display()))?;
            stats.files += 1;
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        let stamp = Stamp::of(&meta);
        let mirrored = files_dir.join(f);
        let trusted = old.entries.get(f) == Some(&stamp)
            && stamp.mtime_ns < old.taken_at_ns - RACY_NS
            && stamp.ctime_ns < old.taken_at_ns - RACY_NS;
        let linked = trusted && std::fs::hard_link(&mirrored, &to).is_ok();
        if !linked {
            if let Some(parent) = mirrored.parent() {
                mkdirs(parent)?;
            }
            let n = replace_copy(&from, &meta, &mirrored)?;
            stats.copied += 1;
            stats.bytes_copied += n;
            if std::fs::hard_link(&mirrored, &to).is_err() {
                // Another file system (a run directory elsewhere): a plain copy.
                std::fs::copy(&mirrored, &to)
                    .map_err(|e| format!("cannot copy {} to {}: {e}", f, to.display()))?;
            }
        }
        stats.files += 1;
        new.entries.insert(f.clone(), stamp);
    }
    // Files gone from the project leave the mirror (runs that linked them keep their links).
    for gone in old.entries.keys().filter(|k| !new.entries.contains_key(*k)) {
        let _ = std::fs::remove_file(files_dir.join(gone));
    }
    write_atomic(
        &index_path,
        &serde_json::to_vec(&new).map_err(|e| e.to_string())?,
    )?;
    Ok(stats)
}

/// Copy `from` to a temporary name next to `to` and rename it over `to`: whoever holds a
/// link to the old `to` keeps the old content. The copy keeps the source's mtime.
fn replace_copy(from: &Path, meta: &std::fs::Metadata, to: &Path) -> Result<u64, String> {
    let dir = to.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".rave-tmp-{}-{}",
        std::process::id(),
        to.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    if to.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        // A path that was a directory in the last snapshot and is a file now.
        let _ = std::fs::remove_dir_all(to);
    }
    let n = std::fs::copy(from, &tmp)
        .map_err(|e| format!("cannot copy {} into the snapshot: {e}", from.display()))?;
    if let Ok(mtime) = meta.modified()
        && let Ok(f) = std::fs::File::options().write(true).open(&tmp)
    {
        let _ = f.set_modified(mtime);
    }
    std::fs::rename(&tmp, to).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot place {} in the snapshot: {e}", to.display())
    })?;
    Ok(n)
}

/// Write `bytes` to `path` through a temporary file and a rename, synced first.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn set_old(p: &Path) {
        // Make a file's mtime safely older than the next snapshot, as files normally are.
        let t = SystemTime::now() - std::time::Duration::from_secs(10);
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn unchanged_files_are_linked_and_changed_ones_copied_without_touching_old_runs() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/one.txt"), "one").unwrap();
        std::fs::write(src.join("two.txt"), "two").unwrap();
        std::os::unix::fs::symlink("two.txt", src.join("link")).unwrap();
        set_old(&src.join("a/b/one.txt"));
        set_old(&src.join("two.txt"));
        let files: Vec<String> = ["a/b/one.txt", "link", "two.txt"]
            .map(String::from)
            .to_vec();
        let mirror = d.path().join("mirror");
        // ctime cannot be set back: let the files age past the racy window.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let s1 = take(&src, &files, &mirror, &d.path().join("run1")).unwrap();
        assert_eq!((s1.files, s1.copied), (3, 2));
        let s2 = take(&src, &files, &mirror, &d.path().join("run2")).unwrap();
        assert_eq!((s2.files, s2.copied), (3, 0), "nothing changed: {s2:?}");
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(&d.path().join("run1/two.txt")),
            ino(&d.path().join("run2/two.txt"))
        );
        // An edit reaches the next run only; the earlier run keeps what it started with.
        std::fs::write(src.join("two.txt"), "TWO!").unwrap();
        let s3 = take(&src, &files, &mirror, &d.path().join("run3")).unwrap();
        assert_eq!(s3.copied, 1, "{s3:?}");
        assert_eq!(
            std::fs::read_to_string(d.path().join("run3/two.txt")).unwrap(),
            "TWO!"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("run2/two.txt")).unwrap(),
            "two"
        );
        assert_eq!(
            std::fs::read_link(d.path().join("run3/link")).unwrap(),
            Path::new("two.txt")
        );
        // The mirror keeps the source's mtime.
        assert_eq!(
            std::fs::metadata(d.path().join("run3/two.txt"))
                .unwrap()
                .modified()
                .unwrap(),
            std::fs::metadata(src.join("two.txt"))
                .unwrap()
                .modified()
                .unwrap()
        );
        // A file deleted from the project is no longer in the mirror or later runs.
        let fewer: Vec<String> = ["two.txt".to_string()].to_vec();
        take(&src, &fewer, &mirror, &d.path().join("run4")).unwrap();
        assert!(!mirror.join("files/a/b/one.txt").exists());
        assert!(d.path().join("run1/a/b/one.txt").exists());
        assert!(!d.path().join("run4/a").exists());
    }
}
