//! A run's frozen copy of the project's files, made in time proportional to what changed.
//!
//! A persistent *mirror* (`<state>/snapshot/files/`) holds one copy of the project's files
//! and an index of what each copy is: the git blob id for a tracked file git reports
//! unmodified, else the source file's `(size, mtime, ctime, inode)` when it was copied.
//! Taking a snapshot compares the project against the index, and then:
//!
//! - when no other run is using the mirror, updates it in place (changed files copied to a
//!   temporary name and renamed over, deleted ones removed) and the run uses the mirror
//!   itself: a run whose files did not change copies nothing and creates nothing;
//! - when another run is using it (it holds the mirror's reader lock until it ends), leaves
//!   the mirror alone and builds `<run>/src` from hard links to the mirror's unchanged files
//!   and fresh copies of the changed ones.
//!
//! Either way, no file a run sees changes while it runs: edits made meanwhile reach none of
//! its jobs. Unchanged files keep their inode and mtime from run to run, so tools that compare
//! mtimes (make, cargo) see them as unchanged.
//!
//! Nothing writes into the mirror but this module: jobs see it through an overlay mount (read
//! only below) or through a copy (see [`crate::builds`]). A crash while the mirror is updated
//! leaves it without an index, and the next run rebuilds it from scratch.
//!
//! A file modified within a second of the previous snapshot ("racily clean", as git calls
//! it) is copied again rather than trusted.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What a snapshot cost: files in it, and files copied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    pub files: usize,
    pub copied: usize,
    pub bytes_copied: u64,
    /// Another run was using the mirror: this run got its own linked copy.
    pub linked_copy: bool,
}

/// A run's snapshot: the directory to read, held unchanged until this is dropped.
pub struct Snapshot {
    pub dir: PathBuf,
    pub stats: SnapshotStats,
    _reader: Option<std::fs::File>,
}

/// What a mirrored file is.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum Stamp {
    /// A tracked, unmodified file: git's blob id and mode.
    Blob(String),
    /// Anything else: the source file's stat when it was copied.
    Stat {
        len: u64,
        mtime_ns: i128,
        ctime_ns: i128,
        ino: u64,
    },
}

fn stat_stamp(m: &std::fs::Metadata) -> Stamp {
    Stamp::Stat {
        len: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        ino: m.ino(),
    }
}

#[derive(Serialize, Deserialize, Default)]
struct Index {
    /// When the snapshot that wrote this index started (ns since the epoch).
    taken_at_ns: i128,
    /// The source directory stat stamps describe: another source never matches them.
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

impl Index {
    /// Whether the mirror's copy of `f` (at `mirrored`) is what `source` holds now.
    fn trusts(
        &self,
        f: &str,
        id: Option<&String>,
        source: &Path,
        meta: Option<&std::fs::Metadata>,
        mirrored: &Path,
    ) -> bool {
        self.vouches(f, id, source, meta) || self.same_bytes(f, source, meta, mirrored)
    }

    /// By git's id, or by a stat old enough to be trusted.
    fn vouches(
        &self,
        f: &str,
        id: Option<&String>,
        source: &Path,
        meta: Option<&std::fs::Metadata>,
    ) -> bool {
        match (self.entries.get(f), id) {
            (Some(Stamp::Blob(old)), Some(id)) => old == id,
            (
                Some(
                    stamp @ Stamp::Stat {
                        mtime_ns, ctime_ns, ..
                    },
                ),
                None,
            ) => {
                self.source == source
                    && meta.is_some_and(|m| stat_stamp(m) == *stamp)
                    && *mtime_ns < self.taken_at_ns - RACY_NS
                    && *ctime_ns < self.taken_at_ns - RACY_NS
            }
            _ => false,
        }
    }

    /// A file the last snapshot could not vouch for only because it had just been written
    /// (its stat then could hide a same-size write in the same clock tick), unchanged by stat
    /// since, and whose mirrored copy holds the same bytes: kept, so the mirror's inode stays
    /// and the jobs' copies of it stay valid. Without this a file edited right before a run
    /// was copied again on the next run, and with it every job's copy (a fresh clone's files
    /// all at once).
    fn same_bytes(
        &self,
        f: &str,
        source: &Path,
        meta: Option<&std::fs::Metadata>,
        mirrored: &Path,
    ) -> bool {
        self.source == source
            && meta.is_some_and(|m| {
                self.entries.get(f) == Some(&stat_stamp(m))
                    && same_content(&source.join(f), mirrored, m.len()).unwrap_or(false)
            })
    }
}

/// Do two files hold the same `len` bytes (and no more)?
fn same_content(a: &Path, b: &Path, len: u64) -> std::io::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != len || fb.metadata()?.len() != len {
        return Ok(false);
    }
    let cap = (len as usize).clamp(1, 64 << 10);
    let (mut ba, mut bb) = (vec![0u8; cap], vec![0u8; cap]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            // Also at the end of the other one.
            return Ok(fb.read(&mut bb[..1])? == 0);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// The stamp to record for a file just copied: its blob id when git vouches for it and it
/// was not touched around the copy, else its stat.
fn record(id: Option<&String>, meta: &std::fs::Metadata, started: i128) -> Stamp {
    match (id, stat_stamp(meta)) {
        (
            Some(id),
            Stamp::Stat {
                mtime_ns, ctime_ns, ..
            },
        ) if mtime_ns < started - RACY_NS && ctime_ns < started - RACY_NS => {
            Stamp::Blob(id.clone())
        }
        (_, s) => s,
    }
}

/// A file of the snapshot that does not come from the project directory (the job's `.git`),
/// known by an id that changes whenever its content does.
#[derive(Clone, Debug)]
pub struct Extra {
    pub rel: String,
    pub from: PathBuf,
    pub id: String,
}

/// One file to freeze: where it is now and what vouches for it.
struct Item<'a> {
    rel: &'a String,
    from: PathBuf,
    id: Option<&'a String>,
    /// The id is exact (generated from it): never downgraded to a stat stamp.
    exact: bool,
}

fn items<'a>(
    source: &Path,
    files: &'a [String],
    ids: &'a HashMap<String, String>,
    extra: &'a [Extra],
) -> Vec<Item<'a>> {
    files
        .iter()
        .map(|f| Item {
            rel: f,
            from: source.join(f),
            id: ids.get(f),
            exact: false,
        })
        .chain(extra.iter().map(|e| Item {
            rel: &e.rel,
            from: e.from.clone(),
            id: Some(&e.id),
            exact: true,
        }))
        .collect()
}

/// Freeze `files` (relative paths under `source`; `ids`: blob ids of the unmodified tracked
/// ones) and `extra` through the mirror in `mirror_dir`. `farm` is where a linked copy goes
/// when another run is using the mirror.
pub fn take(
    source: &Path,
    files: &[String],
    ids: &HashMap<String, String>,
    extra: &[Extra],
    mirror_dir: &Path,
    farm: &Path,
) -> Result<Snapshot, String> {
    let all = items(source, files, ids, extra);
    use crate::builds::lock_file;
    let files_dir = mirror_dir.join("files");
    std::fs::create_dir_all(&files_dir)
        .map_err(|e| format!("cannot create {}: {e}", files_dir.display()))?;
    // Writers take turns; readers (runs using the mirror) hold `readers` shared.
    let _writer = lock_file(&mirror_dir.join("writer.lock"), true)?;
    let readers_path = mirror_dir.join("readers.lock");
    let exclusive = lock_file(&readers_path, false)?;
    let index_path = mirror_dir.join("index.json");
    let old: Option<Index> = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let started = now_ns();
    match exclusive {
        Some(lock) => {
            let stats = update_in_place(source, &all, &files_dir, &index_path, old, started)?;
            // Under the writer lock nobody can slip in between: become a reader.
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared)
                .map_err(|e| format!("cannot lock {}: {e}", readers_path.display()))?;
            Ok(Snapshot {
                dir: files_dir,
                stats,
                _reader: Some(lock),
            })
        }
        None => {
            let old = old.unwrap_or_default();
            // Another run reads the mirror: use it as it is when nothing changed.
            let unchanged = files.iter().all(|f| {
                let meta = source.join(f).symlink_metadata().ok();
                if meta.as_ref().is_some_and(|m| m.file_type().is_symlink()) {
                    return files_dir
                        .join(f)
                        .symlink_metadata()
                        .is_ok_and(|m| m.file_type().is_symlink())
                        && std::fs::read_link(files_dir.join(f)).ok()
                            == std::fs::read_link(source.join(f)).ok();
                }
                old.trusts(f, ids.get(f), source, meta.as_ref(), &files_dir.join(f))
            }) && old.entries.len() == files.len();
            if unchanged {
                let reader = lock_shared(&readers_path)?;
                return Ok(Snapshot {
                    dir: files_dir,
                    stats: SnapshotStats {
                        files: all.len(),
                        ..SnapshotStats::default()
                    },
                    _reader: Some(reader),
                });
            }
            let reader = lock_shared(&readers_path)?;
            let stats = linked_copy(source, &all, &files_dir, &old, farm)?;
            // The farm links into the mirror: hold it unchanged too.
            Ok(Snapshot {
                dir: farm.to_path_buf(),
                stats,
                _reader: Some(reader),
            })
        }
    }
}

fn lock_shared(path: &Path) -> Result<std::fs::File, String> {
    crate::builds::lock_with(path, rustix::fs::FlockOperation::LockShared)?
        .ok_or_else(|| format!("cannot lock {}", path.display()))
}

/// Bring the mirror up to date with `source`, no run reading it.
fn update_in_place(
    source: &Path,
    all: &[Item],
    files_dir: &Path,
    index_path: &Path,
    old: Option<Index>,
    started: i128,
) -> Result<SnapshotStats, String> {
    let fresh = old.is_none();
    let old = match old {
        Some(o) => o,
        None => {
            // No index (first run, or a crash mid-update): what the mirror holds is unknown.
            let _ = std::fs::remove_dir_all(files_dir);
            Index::default()
        }
    };
    // Mutating from here: a crash must not leave an index that vouches for half of it.
    let _ = std::fs::remove_file(index_path);
    let mut new = Index {
        taken_at_ns: started,
        source: source.to_path_buf(),
        entries: HashMap::with_capacity(all.len()),
    };
    let mut stats = SnapshotStats::default();
    let mut made: HashSet<PathBuf> = HashSet::new();
    // Files to copy, copied together after the walk (several at a time).
    let mut pending: Vec<(&Path, std::fs::Metadata, PathBuf)> = Vec::new();
    for it in all {
        let (f, id, from) = (it.rel, it.id, &it.from);
        let mirrored = files_dir.join(f);
        if let (Some(Stamp::Blob(old_id)), Some(id)) = (old.entries.get(f), id)
            && old_id == id
        {
            // Git vouches for the content: not even a stat.
            new.entries.insert(f.clone(), Stamp::Blob(id.clone()));
            stats.files += 1;
            continue;
        }
        // A file deleted since it was listed is simply not part of the run.
        let Ok(meta) = from.symlink_metadata() else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(from)
                .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
            if std::fs::read_link(&mirrored).ok().as_ref() != Some(&target) {
                mkdirs(&mut made, mirrored.parent())?;
                let _ = remove_any(&mirrored);
                std::os::unix::fs::symlink(&target, &mirrored)
                    .map_err(|e| format!("cannot create {}: {e}", mirrored.display()))?;
            }
            new.entries.insert(f.clone(), stat_stamp(&meta));
            stats.files += 1;
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        let stamp = match (it.exact, id) {
            (true, Some(id)) => Stamp::Blob(id.clone()),
            _ => record(id, &meta, started),
        };
        if fresh || !mirrored.is_file() || !old.trusts(f, id, source, Some(&meta), &mirrored) {
            pending.push((from, meta, mirrored));
        }
        new.entries.insert(f.clone(), stamp);
        stats.files += 1;
    }
    stats.copied = pending.len();
    stats.bytes_copied += copy_all(&pending, fresh)?;
    // Files gone from the project leave the mirror, and so do directories they leave empty.
    for gone in old.entries.keys().filter(|k| !new.entries.contains_key(*k)) {
        let p = files_dir.join(gone);
        if remove_any(&p).is_ok() {
            let mut dir = p.parent();
            while let Some(d) = dir.filter(|d| *d != files_dir) {
                if std::fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
        }
    }
    write_atomic(
        index_path,
        &serde_json::to_vec(&new).map_err(|e| e.to_string())?,
    )?;
    Ok(stats)
}

/// Copy `(from, its metadata, to)` for every pending file, on a few threads: creating a file
/// is mostly the file system's inode allocation, which proceeds in parallel for files of
/// different directories (a first snapshot of 20,000 files is all inode allocation). The list
/// is cut into contiguous runs, so each directory is mostly one thread's. `fresh`: the
/// mirror was just emptied, so nothing can hold a link to a file being replaced and copies go
/// straight to their names.
fn copy_all(pending: &[(&Path, std::fs::Metadata, PathBuf)], fresh: bool) -> Result<u64, String> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    // Below a few hundred files a thread costs more than it saves.
    let threads = if pending.len() < 256 { 1 } else { threads };
    let chunk = pending.len().div_ceil(threads).max(1);
    let copy_run = |run: &[(&Path, std::fs::Metadata, PathBuf)]| -> Result<u64, String> {
        let mut made: HashSet<PathBuf> = HashSet::new();
        let mut bytes = 0;
        for (from, meta, to) in run {
            mkdirs(&mut made, to.parent())?;
            bytes += if fresh {
                copy_file(from, meta, to, true)
                    .map_err(|e| format!("cannot copy {} into the snapshot: {e}", from.display()))?
            } else {
                replace_copy(from, meta, to)?
            };
        }
        Ok(bytes)
    };
    if threads == 1 {
        return copy_run(pending);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = pending
            .chunks(chunk)
            .map(|run| scope.spawn(move || copy_run(run)))
            .collect();
        let mut bytes = 0;
        for h in handles {
            bytes += h
                .join()
                .map_err(|_| "a snapshot copy thread panicked".to_string())??;
        }
        Ok(bytes)
    })
}

/// Copy one file's content, permissions and mtime (one open of each side; the content goes
/// through `copy_file_range`, in the kernel, for as many bytes as the stat said).
pub(crate) fn copy_file(
    from: &Path,
    meta: &std::fs::Metadata,
    to: &Path,
    create_new: bool,
) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let src = std::fs::File::open(from)?;
    let mode = meta.mode() & 0o7777;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(create_new)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(to)?;
    // As many bytes as the stat said: a file growing while it is copied is racy anyway, and
    // its stamp makes the next snapshot copy it again.
    let mut copied = 0u64;
    while copied < meta.len() {
        let want = (meta.len() - copied) as usize;
        match rustix::fs::copy_file_range(&src, None, &dst, None, want) {
            Ok(0) => break,
            Ok(n) => copied += n as u64,
            // Not on this pair of file systems: copy through user space.
            Err(rustix::io::Errno::XDEV | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL)
                if copied == 0 =>
            {
                let (mut src, mut dst) = (&src, &dst);
                copied = std::io::copy(&mut src, &mut dst)?;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // The mode given at creation passed through the umask; most modes come out whole.
    if mode & umask() != 0 {
        dst.set_permissions(meta.permissions())?;
    }
    if let Ok(mtime) = meta.modified() {
        dst.set_modified(mtime)?;
    }
    Ok(copied)
}

/// This process's umask, read once (`/proc/self/status`: reading it through `umask(2)` would
/// change it for other threads for a moment). All bits when it cannot be read, so modes are
/// always set explicitly.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o7777)
    })
}

/// `farm` from hard links to the mirror's unchanged files and copies of the changed ones.
fn linked_copy(
    source: &Path,
    all: &[Item],
    files_dir: &Path,
    old: &Index,
    farm: &Path,
) -> Result<SnapshotStats, String> {
    let mut stats = SnapshotStats {
        linked_copy: true,
        ..SnapshotStats::default()
    };
    let mut made: HashSet<PathBuf> = HashSet::new();
    for it in all {
        let (f, from) = (it.rel, &it.from);
        let Ok(meta) = from.symlink_metadata() else {
            continue;
        };
        let to = farm.join(f);
        mkdirs(&mut made, to.parent())?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(from)
                .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(|e| format!("cannot create {}: {e}", to.display()))?;
        } else if meta.is_file() {
            let linked = old.trusts(f, it.id, source, Some(&meta), &files_dir.join(f))
                && std::fs::hard_link(files_dir.join(f), &to).is_ok();
            if !linked {
                stats.bytes_copied += replace_copy(from, &meta, &to)?;
                stats.copied += 1;
            }
        } else {
            continue;
        }
        stats.files += 1;
    }
    Ok(stats)
}

fn mkdirs(made: &mut HashSet<PathBuf>, dir: Option<&Path>) -> Result<(), String> {
    let Some(dir) = dir else { return Ok(()) };
    if made.contains(dir) {
        return Ok(());
    }
    if dir.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
        // A path that was a file in the last snapshot and is a directory now.
        let _ = std::fs::remove_file(dir);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    made.insert(dir.to_path_buf());
    Ok(())
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) => Err(e),
    }
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
    let n = copy_file(from, meta, &tmp, false)
        .map_err(|e| format!("cannot copy {} into the snapshot: {e}", from.display()))?;
    std::fs::rename(&tmp, to).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot place {} in the snapshot: {e}", to.display())
    })?;
    Ok(n)
}

/// Write `bytes` to `path` through a temporary file and a rename, synced first.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    write_replacing(path, bytes, true)
}

/// Write through a temporary file and a rename; `sync` first when losing the new content in
/// a power cut would matter (a lost copy-path state only costs a full copy next time).
pub(crate) fn write_replacing(path: &Path, bytes: &[u8], sync: bool) -> Result<(), String> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
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

    fn tree(root: &Path, files: &[(&str, &str)]) -> Vec<String> {
        for (f, c) in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        }
        files.iter().map(|(f, _)| f.to_string()).collect()
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    fn settle() {
        // ctime cannot be set back: let the files age past the racy window.
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }

    #[test]
    fn the_mirror_is_updated_in_place_with_only_what_changed() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut files = tree(&src, &[("a/b/one.txt", "one"), ("two.txt", "two")]);
        std::os::unix::fs::symlink("two.txt", src.join("link")).unwrap();
        files.push("link".into());
        let mirror = d.path().join("mirror");
        let none = HashMap::new();
        settle();
        let s1 = take(&src, &files, &none, &[], &mirror, &d.path().join("farm1")).unwrap();
        assert_eq!((s1.stats.files, s1.stats.copied), (3, 2));
        assert_eq!(s1.dir, mirror.join("files"));
        drop(s1);
        let s2 = take(&src, &files, &none, &[], &mirror, &d.path().join("farm2")).unwrap();
        assert_eq!((s2.stats.files, s2.stats.copied), (3, 0), "{:?}", s2.stats);
        drop(s2);
        // The mirror keeps the source's mtime.
        assert_eq!(
            std::fs::metadata(mirror.join("files/two.txt"))
                .unwrap()
                .modified()
                .unwrap(),
            std::fs::metadata(src.join("two.txt"))
                .unwrap()
                .modified()
                .unwrap()
        );
        std::fs::write(src.join("two.txt"), "TWO!").unwrap();
        let s3 = take(&src, &files, &none, &[], &mirror, &d.path().join("farm3")).unwrap();
        assert_eq!(s3.stats.copied, 1);
        assert_eq!(read(&s3.dir.join("two.txt")), "TWO!");
        assert_eq!(
            std::fs::read_link(s3.dir.join("link")).unwrap(),
            Path::new("two.txt")
        );
        drop(s3);
        // A deleted file leaves the mirror, with the directories it leaves empty.
        let fewer = vec!["two.txt".to_string()];
        let s4 = take(&src, &fewer, &none, &[], &mirror, &d.path().join("farm4")).unwrap();
        assert!(!s4.dir.join("a").exists());
        assert!(!s4.dir.join("link").exists());
        assert!(
            !d.path().join("farm4").exists(),
            "no copy when the mirror is free"
        );
    }

    #[test]
    fn a_file_written_just_before_a_run_is_not_copied_again_while_unchanged() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        // Written now: its stat cannot vouch for it until it is older than the racy window.
        let files = tree(
            &src,
            &[("fresh.txt", "new"), ("big.bin", &"x".repeat(200_000))],
        );
        let mirror = d.path().join("mirror");
        let none = HashMap::new();
        let ino = |f: &str| {
            std::fs::metadata(mirror.join("files").join(f))
                .unwrap()
                .ino()
        };
        let s1 = take(&src, &files, &none, &[], &mirror, &d.path().join("farm1")).unwrap();
        assert_eq!(s1.stats.copied, 2);
        drop(s1);
        let before = (ino("fresh.txt"), ino("big.bin"));
        let s2 = take(&src, &files, &none, &[], &mirror, &d.path().join("farm2")).unwrap();
        assert_eq!(s2.stats.copied, 0, "{:?}", s2.stats);
        drop(s2);
        // Same inodes: the jobs' copies made from them stay valid.
        assert_eq!((ino("fresh.txt"), ino("big.bin")), before);
        // Bytes decide, not the stat: a mirrored copy that differs is replaced.
        let mut tail = "x".repeat(199_999);
        tail.push('y');
        std::fs::write(mirror.join("files/big.bin"), &tail).unwrap();
        let s3 = take(&src, &files, &none, &[], &mirror, &d.path().join("farm3")).unwrap();
        assert_eq!(s3.stats.copied, 1, "{:?}", s3.stats);
        assert_eq!(read(&s3.dir.join("big.bin")), "x".repeat(200_000));
    }

    #[test]
    fn a_large_first_snapshot_is_copied_on_several_threads_whole() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        // Enough files for the threaded copy, in many directories, some empty, some
        // executable, one larger than a single copy_file_range call might move.
        let big = "x".repeat(3 << 20);
        let contents: Vec<(String, String)> = (0..600)
            .map(|i| {
                let body = match i % 3 {
                    0 => String::new(),
                    _ if i == 301 => big.clone(),
                    _ => format!("file {i}\n"),
                };
                (format!("d{}/e{}/f{i}.txt", i % 17, i % 5), body)
            })
            .collect();
        let pairs: Vec<(&str, &str)> = contents
            .iter()
            .map(|(f, c)| (f.as_str(), c.as_str()))
            .collect();
        let files = tree(&src, &pairs);
        for (f, _) in contents.iter().step_by(7) {
            std::fs::set_permissions(src.join(f), std::fs::Permissions::from_mode(0o775)).unwrap();
        }
        settle();
        let mirror = d.path().join("mirror");
        let s = take(
            &src,
            &files,
            &HashMap::new(),
            &[],
            &mirror,
            &d.path().join("farm"),
        )
        .unwrap();
        assert_eq!((s.stats.files, s.stats.copied), (600, 600));
        for (f, body) in &contents {
            let (a, b) = (src.join(f), s.dir.join(f));
            assert_eq!(&read(&b), body, "{f}");
            let (ma, mb) = (a.metadata().unwrap(), b.metadata().unwrap());
            assert_eq!(ma.permissions().mode(), mb.permissions().mode(), "{f}");
            assert_eq!(ma.modified().unwrap(), mb.modified().unwrap(), "{f}");
        }
        assert_eq!(
            s.stats.bytes_copied,
            contents.iter().map(|(_, c)| c.len() as u64).sum::<u64>()
        );
    }

    #[test]
    fn a_run_in_progress_never_sees_a_later_run_s_edits() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let files = tree(&src, &[("one.txt", "one"), ("two.txt", "two")]);
        let mirror = d.path().join("mirror");
        let none = HashMap::new();
        settle();
        let first = take(&src, &files, &none, &[], &mirror, &d.path().join("farm1")).unwrap();
        // Nothing changed: the second run shares the mirror while the first holds it.
        let same = take(&src, &files, &none, &[], &mirror, &d.path().join("farm2")).unwrap();
        assert_eq!(same.dir, first.dir);
        assert_eq!(same.stats.copied, 0);
        drop(same);
        std::fs::write(src.join("two.txt"), "edited").unwrap();
        let later = take(&src, &files, &none, &[], &mirror, &d.path().join("farm3")).unwrap();
        assert!(later.stats.linked_copy);
        assert_eq!(later.dir, d.path().join("farm3"));
        assert_eq!(later.stats.copied, 1);
        assert_eq!(read(&later.dir.join("two.txt")), "edited");
        assert_eq!(
            read(&first.dir.join("two.txt")),
            "two",
            "the first run's files held"
        );
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(&later.dir.join("one.txt")),
            ino(&first.dir.join("one.txt"))
        );
        drop(first);
        drop(later);
        let free = take(&src, &files, &none, &[], &mirror, &d.path().join("farm4")).unwrap();
        assert_eq!(free.dir, mirror.join("files"));
        assert_eq!(read(&free.dir.join("two.txt")), "edited");
    }

    #[test]
    fn blob_ids_carry_over_to_a_fresh_checkout_elsewhere() {
        // The server checks every pipeline out into a new directory: stat stamps never match
        // there, git's blob ids do.
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("checkout-a");
        let files = tree(&a, &[("x.txt", "x"), ("y.txt", "y")]);
        let mirror = d.path().join("mirror");
        let ids: HashMap<String, String> = [("x.txt", "1111:100644"), ("y.txt", "2222:100644")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        settle();
        let s1 = take(&a, &files, &ids, &[], &mirror, &d.path().join("f1")).unwrap();
        assert_eq!(s1.stats.copied, 2);
        drop(s1);
        let b = d.path().join("checkout-b");
        tree(&b, &[("x.txt", "x"), ("y.txt", "Y2")]);
        let mut ids2 = ids.clone();
        ids2.insert("y.txt".into(), "3333:100644".into());
        let s2 = take(&b, &files, &ids2, &[], &mirror, &d.path().join("f2")).unwrap();
        assert_eq!(s2.stats.copied, 1, "only the file whose blob changed");
        assert_eq!(read(&s2.dir.join("y.txt")), "Y2");
        assert_eq!(read(&s2.dir.join("x.txt")), "x");
    }

    #[test]
    fn a_crash_mid_update_rebuilds_the_mirror() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let files = tree(&src, &[("keep.txt", "k")]);
        let mirror = d.path().join("mirror");
        let none = HashMap::new();
        drop(take(&src, &files, &none, &[], &mirror, &d.path().join("f")).unwrap());
        // As if a run died after copying a file in but before writing the index.
        std::fs::write(mirror.join("files/stray.txt"), "s").unwrap();
        std::fs::remove_file(mirror.join("index.json")).unwrap();
        let s = take(&src, &files, &none, &[], &mirror, &d.path().join("f2")).unwrap();
        assert!(!s.dir.join("stray.txt").exists());
        assert_eq!(read(&s.dir.join("keep.txt")), "k");
    }
}
