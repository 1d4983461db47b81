//! Job working directories: one stable directory per job name, reset from the run's
//! snapshot at a cost that does not grow with the repository.
//!
//! `<builds>/<job>` is the job's `CI_PROJECT_DIR` run after run (a second run of the same job
//! while the first still holds it gets `<job>~2`, as GitLab Runner's `CI_CONCURRENT_ID`
//! does), so tools that record absolute paths (cargo's fingerprints, ccache) hit their caches.
//!
//! Two ways to fill it, chosen once per run (by default: overlay for a tree of at least
//! [`OVERLAY_MIN_FILES`] files, where mounting is allowed; copies for smaller ones, whose
//! sync costs less than a mount and an unmount; `RAVE_WORKSPACE=overlay|copy` forces one):
//! - **overlay** (root): an overlay mount with the run's snapshot as its read-only lower
//!   layer and the job's writes in an upper directory kept beside it. Setting it up is one
//!   mount, whatever the size of the repository; resetting it is removing what the job wrote.
//! - **copy** (where mounting is not allowed): the directory persists and is synchronised
//!   from the snapshot the way GitLab Runner's `GIT_STRATEGY: fetch` updates its build
//!   directory: files whose snapshot inode and own stat are unchanged since the last sync are
//!   kept, the rest copied; untracked files are cleaned by `GIT_CLEAN_FLAGS`.
//!
//! `GIT_STRATEGY: clone` starts from nothing, `fetch` (the default) resets tracked files and
//! cleans, `none` leaves the directory as the job's last run left it (artifacts still come).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

/// `GIT_STRATEGY`, as GitLab Runner reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GitStrategy {
    Clone,
    Fetch,
    None,
}

impl GitStrategy {
    pub fn parse(s: Option<&str>) -> Result<GitStrategy, String> {
        match s.map(str::trim) {
            None | Some("") | Some("fetch") => Ok(GitStrategy::Fetch),
            Some("clone") => Ok(GitStrategy::Clone),
            Some("none") | Some("empty") => Ok(GitStrategy::None),
            Some(o) => Err(format!(
                "GIT_STRATEGY `{o}` is not one of clone, fetch, none"
            )),
        }
    }
}

/// Which untracked files `git clean` removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// Only files `.gitignore` does not ignore (no `-x`).
    Keep,
    /// Ignored files too (`-x`).
    Also,
    /// Only ignored files (`-X`).
    Only,
}

/// `GIT_CLEAN_FLAGS` (GitLab's default: `-ffdx`; `none` turns cleaning off).
#[derive(Clone, Debug)]
pub struct CleanFlags {
    pub enabled: bool,
    pub dirs: bool,
    pub ignored: Ignored,
    exclude: GlobSet,
    excluded_any: bool,
}

impl Default for CleanFlags {
    fn default() -> Self {
        CleanFlags {
            enabled: true,
            dirs: true,
            ignored: Ignored::Also,
            exclude: GlobSet::empty(),
            excluded_any: false,
        }
    }
}

impl CleanFlags {
    pub fn parse(s: Option<&str>) -> Result<CleanFlags, String> {
        let Some(s) = s.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(CleanFlags::default());
        };
        if s == "none" {
            return Ok(CleanFlags {
                enabled: false,
                ..CleanFlags::default()
            });
        }
        let mut out = CleanFlags {
            dirs: false,
            ignored: Ignored::Keep,
            ..CleanFlags::default()
        };
        let mut excludes = Vec::new();
        let mut words = s.split_whitespace();
        while let Some(w) = words.next() {
            if let Some(p) = w.strip_prefix("--exclude=") {
                excludes.push(p.to_string());
            } else if w == "-e" || w == "--exclude" {
                let p = words
                    .next()
                    .ok_or_else(|| format!("GIT_CLEAN_FLAGS `{s}`: `{w}` needs a pattern"))?;
                excludes.push(p.to_string());
            } else if let Some(p) = w.strip_prefix("-e") {
                excludes.push(p.to_string());
            } else if w == "--force" || w == "--quiet" {
            } else if let Some(short) = w.strip_prefix('-').filter(|f| !f.starts_with('-')) {
                for c in short.chars() {
                    match c {
                        'f' | 'q' => {}
                        'd' => out.dirs = true,
                        'x' => out.ignored = Ignored::Also,
                        'X' => out.ignored = Ignored::Only,
                        _ => {
                            return Err(format!(
                                "GIT_CLEAN_FLAGS `{s}`: rave understands -f, -d, -x, -X, -q and -e PATTERN (or `none`), not -{c}"
                            ));
                        }
                    }
                }
            } else {
                return Err(format!(
                    "GIT_CLEAN_FLAGS `{s}`: unexpected `{w}`; rave understands -f, -d, -x, -X, -q and -e PATTERN (or `none`)"
                ));
            }
        }
        let mut b = GlobSetBuilder::new();
        for p in &excludes {
            // `git clean -e` takes .gitignore patterns: a name without a slash matches at any
            // depth, a trailing slash means a directory (here: the directory and what is in it).
            let trimmed = p.trim_end_matches('/');
            let anchored = trimmed.trim_start_matches('/');
            let base = if trimmed.contains('/') {
                anchored.to_string()
            } else {
                format!("**/{anchored}")
            };
            for pat in [base.clone(), format!("{base}/**")] {
                let g = GlobBuilder::new(&pat)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| format!("GIT_CLEAN_FLAGS: bad pattern `{p}`: {e}"))?;
                b.add(g);
            }
        }
        out.exclude = b.build().map_err(|e| e.to_string())?;
        out.excluded_any = !excludes.is_empty();
        Ok(out)
    }

    /// `-ffdx` with no exclusions: every untracked file goes, so a reset can start over.
    fn removes_everything(&self) -> bool {
        self.enabled && self.dirs && self.ignored == Ignored::Also && !self.excluded_any
    }

    fn removes(&self, rel: &str, is_dir: bool, ignore: &dyn IgnoreCheck) -> bool {
        if !self.enabled || self.exclude.is_match(rel) {
            return false;
        }
        match self.ignored {
            Ignored::Also => true,
            Ignored::Keep => !ignore.is_ignored(rel, is_dir),
            Ignored::Only => ignore.is_ignored(rel, is_dir),
        }
    }
}

/// Whether a path is ignored by the project's `.gitignore` files.
pub trait IgnoreCheck: Send + Sync {
    fn is_ignored(&self, rel: &str, is_dir: bool) -> bool;
}

/// No `.gitignore` rules known (a tree exported without its repository).
pub struct NoIgnores;
impl IgnoreCheck for NoIgnores {
    fn is_ignored(&self, _: &str, _: bool) -> bool {
        false
    }
}

/// The files of a run's snapshot and the directories that hold them.
#[derive(Default)]
pub struct Tracked {
    files: HashSet<String>,
    dirs: HashSet<String>,
    children: HashMap<String, Vec<(String, bool)>>,
}

impl Tracked {
    /// Whether `rel` is a file of the snapshot.
    pub fn has_file(&self, rel: &str) -> bool {
        self.files.contains(rel)
    }

    /// Whether `rel` is a directory holding files of the snapshot.
    pub fn has_dir(&self, rel: &str) -> bool {
        self.dirs.contains(rel)
    }

    pub fn new(files: &[String]) -> Tracked {
        let mut dirs = HashSet::new();
        for f in files {
            let mut p = f.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                if !dirs.insert(parent.to_string()) {
                    break;
                }
                p = parent;
            }
        }
        let mut children: HashMap<String, Vec<(String, bool)>> = HashMap::new();
        for (path, is_dir) in files
            .iter()
            .map(|f| (f, false))
            .chain(dirs.iter().map(|d| (d, true)))
        {
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
            children
                .entry(parent.to_string())
                .or_default()
                .push((name.to_string(), is_dir));
        }
        Tracked {
            files: files.iter().cloned().collect(),
            dirs,
            children,
        }
    }

    /// The tracked files and directories directly in `rel_dir` ("" for the top): (name, is a
    /// directory).
    fn children(&self, rel_dir: &str) -> &[(String, bool)] {
        self.children.get(rel_dir).map_or(&[], Vec::as_slice)
    }
}

/// How a job's directory was filled, for its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    Overlay,
    Copied { copied: usize, kept: usize },
    Untouched,
}

/// A job's claim on a build directory: held (an exclusive lock) until dropped.
pub struct Claim {
    pub dir: PathBuf,
    name: String,
    _lock: std::fs::File,
    mounted: bool,
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

/// From this many tracked files up, a job's directory is an overlay mount (where allowed):
/// measured on this project's benchmark machine, a mount and an unmount cost about 1.3 ms
/// a job, a copy sync about 2 µs a file.
pub const OVERLAY_MIN_FILES: usize = 500;

/// The build directories of one project.
pub struct Builds {
    root: PathBuf,
    overlay: AtomicU8,
    /// Overlay only for trees of at least this many files.
    overlay_min_files: usize,
    /// Does the kernel take `volatile` overlay mounts (5.10 on)? Unknown until the first.
    volatile: AtomicU8,
}

/// Take an exclusive lock on `path` (created), waiting for it when `wait`; `None` when it is
/// held and not waiting.
pub fn lock_file(path: &Path, wait: bool) -> Result<Option<std::fs::File>, String> {
    let op = if wait {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::NonBlockingLockExclusive
    };
    lock_with(path, op)
}

/// Take a lock on `path` (created) with `op`; `None` when a non-blocking `op` finds it held.
pub fn lock_with(
    path: &Path,
    op: rustix::fs::FlockOperation,
) -> Result<Option<std::fs::File>, String> {
    use rustix::fs::flock;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match flock(&f, op) {
        Ok(()) => Ok(Some(f)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// A directory name for a job: its name where that is safe, else a safe form plus a short
/// hash of the name (so `a b` and `a-b` do not share a directory).
pub fn dir_name(job: &str) -> String {
    let safe: String = job
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let safe = safe.trim_matches(['-', '.']);
    let safe: String = safe.chars().take(60).collect();
    if safe == job && !safe.is_empty() {
        return safe;
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(job.as_bytes());
    let hex: String = h.iter().take(4).map(|b| format!("{b:02x}")).collect();
    if safe.is_empty() {
        hex
    } else {
        format!("{safe}-{hex}")
    }
}

#[derive(Serialize, Deserialize, Default)]
struct SyncState {
    /// Per tracked file: the snapshot's inode it was copied from, and the copy's length, mtime
    /// and ctime right after copying. The ctime catches what length and mtime miss: a job
    /// that rewrites a file and sets its mtime back (it cannot set a ctime).
    files: std::collections::BTreeMap<String, FileStamp>,
    /// Per tracked directory, when the sync left nothing untracked in the copy (`-ffdx`): its
    /// inode and ctime then. A directory whose ctime has not moved since had no entry added,
    /// removed or renamed, so the next sync checks its tracked files without listing it. Only
    /// ctimes older than the sync by a second are recorded (a change within the same clock
    /// tick could leave the ctime as it was; a job cannot set a ctime back).
    #[serde(default)]
    dirs: std::collections::BTreeMap<String, (u64, i64, i64)>,
}

/// (snapshot inode, length, mtime s, mtime ns, ctime s, ctime ns).
type FileStamp = (u64, u64, i64, i64, i64, i64);

/// A copy's stamp, with the inode of the snapshot file it came from.
fn file_stamp(snap_ino: u64, m: &std::fs::Metadata) -> FileStamp {
    (
        snap_ino,
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// A directory's inode and ctime (seconds, nanoseconds).
fn dir_stamp(path: &Path) -> Option<(u64, i64, i64)> {
    let m = path.symlink_metadata().ok().filter(|m| m.is_dir())?;
    Some((m.ino(), m.ctime(), m.ctime_nsec()))
}

impl Builds {
    pub fn new(root: PathBuf) -> Builds {
        Builds {
            root,
            overlay: AtomicU8::new(UNKNOWN),
            overlay_min_files: OVERLAY_MIN_FILES,
            volatile: AtomicU8::new(UNKNOWN),
        }
    }

    /// Overlay mounts whatever the size of the tree (`RAVE_WORKSPACE=overlay`).
    pub fn overlay_always(mut self) -> Builds {
        self.overlay_min_files = 0;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Forbid overlay mounts (tests of the copy path; `RAVE_WORKSPACE=copy`).
    pub fn copy_only(self) -> Builds {
        self.overlay.store(NO, Ordering::Relaxed);
        self
    }

    /// Claim the job's stable directory, or the next free `~N` one when another run holds it.
    pub fn claim(&self, job: &str) -> Result<Claim, String> {
        let base = dir_name(job);
        for n in 1..=64 {
            let name = if n == 1 {
                base.clone()
            } else {
                format!("{base}~{n}")
            };
            let lock = self.root.join(".locks").join(format!("{name}.lock"));
            if let Some(f) = lock_file(&lock, false)? {
                return Ok(Claim {
                    dir: self.root.join(&name),
                    name,
                    _lock: f,
                    mounted: false,
                });
            }
        }
        Err(format!(
            "64 runs hold the build directory of `{job}` at once under {}",
            self.root.display()
        ))
    }

    fn upper(&self, name: &str) -> (PathBuf, PathBuf) {
        let d = self.root.join(".overlay").join(name);
        (d.join("upper"), d.join("work"))
    }

    /// Fill the claimed directory from `snapshot`. Returns how, and a note for the log when
    /// the overlay could not be used.
    pub fn prepare(
        &self,
        claim: &mut Claim,
        snapshot: &Path,
        tracked: &Tracked,
        strategy: GitStrategy,
        clean: &CleanFlags,
        ignore: &dyn IgnoreCheck,
    ) -> Result<(Filled, Option<String>), String> {
        // A mount left behind by a run that died (or by `--keep`).
        unmount(&claim.dir);
        if strategy == GitStrategy::None {
            std::fs::create_dir_all(&claim.dir)
                .map_err(|e| format!("cannot create {}: {e}", claim.dir.display()))?;
            return Ok((Filled::Untouched, None));
        }
        let mut note = None;
        if self.overlay.load(Ordering::Relaxed) != NO
            && tracked.files.len() >= self.overlay_min_files
        {
            match self.mount_overlay(claim, snapshot, tracked, strategy, clean, ignore) {
                Ok(()) => {
                    self.overlay.store(YES, Ordering::Relaxed);
                    return Ok((Filled::Overlay, None));
                }
                Err(e) => {
                    // Decided once per run: later jobs go straight to copies.
                    if self.overlay.swap(NO, Ordering::Relaxed) != NO {
                        note = Some(format!(
                            "working directories are copies, not overlay mounts ({e}); a job's setup grows with the repository"
                        ));
                    }
                }
            }
        }
        let (copied, kept) = self.sync_copy(claim, snapshot, tracked, strategy, clean, ignore)?;
        Ok((Filled::Copied { copied, kept }, note))
    }

    fn mount_overlay(
        &self,
        claim: &mut Claim,
        snapshot: &Path,
        tracked: &Tracked,
        strategy: GitStrategy,
        clean: &CleanFlags,
        ignore: &dyn IgnoreCheck,
    ) -> Result<(), String> {
        let (upper, work) = self.upper(&claim.name);
        for p in [snapshot, &upper, &work] {
            let s = p.to_string_lossy();
            if s.contains([',', ':', '\\']) {
                return Err(format!("the path {s} holds a `,`, `:` or `\\`"));
            }
        }
        // The layer is mounted `volatile` (below): what it holds is only as durable as the
        // page cache. One written before the last boot may have lost writes in a crash, so it
        // is emptied; the boot it was written in is kept beside it.
        let boot_file = upper.with_file_name("boot");
        let boot = boot_id();
        let same_boot =
            !boot.is_empty() && std::fs::read(&boot_file).is_ok_and(|b| b == boot.as_bytes());
        // Emptied, not removed: on ext4, creating directories right after deleting some is
        // what a job's setup would mostly cost. The kernel resets `work` itself at mount.
        if strategy == GitStrategy::Clone || clean.removes_everything() || !same_boot {
            empty_dir(&upper)?;
        } else if upper.is_dir() {
            reset_tree(&upper, "", tracked, clean, ignore, true)?;
        }
        for d in [&upper, &work, &claim.dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        if !same_boot {
            std::fs::write(&boot_file, boot)
                .map_err(|e| format!("cannot write {}: {e}", boot_file.display()))?;
        }
        // A volatile mount leaves `incompat/volatile/dirty` in its work directory and the kernel
        // refuses the next mount while it is there. The upper layer is known intact here (same
        // boot, or just emptied), which is when the kernel's documentation allows removing it.
        remove_all(&work.join("work").join("incompat"))?;
        // A directory that held a copy (the copy path ran here before) is emptied: the
        // overlay would hide it, and its size would stay on disk.
        if std::fs::read_dir(&claim.dir).is_ok_and(|mut r| r.next().is_some()) {
            remove_all(&claim.dir)?;
            std::fs::create_dir_all(&claim.dir)
                .map_err(|e| format!("cannot create {}: {e}", claim.dir.display()))?;
            let _ = std::fs::remove_file(self.state_path(&claim.name));
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            snapshot.display(),
            upper.display(),
            work.display()
        );
        let mount = |opts: String| {
            let data = std::ffi::CString::new(opts).map_err(|e| e.to_string())?;
            rustix::mount::mount(
                "rave",
                &claim.dir,
                "overlay",
                rustix::mount::MountFlags::NODEV,
                data.as_c_str(),
            )
            .map_err(|e| format!("overlay mount refused: {e}"))
        };
        // `volatile`: overlayfs syncs the whole upper file system at unmount otherwise, so the
        // first jobs after a snapshot of a large tree each waited for all of it to reach the
        // disk (60-170 ms an unmount for 80 MB), and later ones for whatever jobs wrote.
        if self.volatile.load(Ordering::Relaxed) != NO {
            match mount(format!("{opts},volatile")) {
                Ok(()) => {
                    self.volatile.store(YES, Ordering::Relaxed);
                    claim.mounted = true;
                    return Ok(());
                }
                // An older kernel (before 5.10) does not know the option: decided once.
                Err(_) if self.volatile.load(Ordering::Relaxed) == UNKNOWN => {
                    self.volatile.store(NO, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        mount(opts)?;
        claim.mounted = true;
        Ok(())
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.root.join(".state").join(format!("{name}.json"))
    }

    fn sync_copy(
        &self,
        claim: &Claim,
        snapshot: &Path,
        tracked: &Tracked,
        strategy: GitStrategy,
        clean: &CleanFlags,
        ignore: &dyn IgnoreCheck,
    ) -> Result<(usize, usize), String> {
        let state_path = self.state_path(&claim.name);
        let old_bytes = std::fs::read(&state_path).ok();
        let old: Option<SyncState> = old_bytes
            .as_deref()
            .and_then(|b| serde_json::from_slice(b).ok());
        let dir = &claim.dir;
        // Tracked files the copy already has, with their state entry (read during the walk,
        // not stat'ed again below).
        let mut keep: HashMap<String, FileStamp> = HashMap::new();
        let sync_started = std::time::SystemTime::now();
        let trust_dirs = clean.removes_everything();
        // Directories found as the last sync left them (their stamps carry over).
        let mut unchanged_dirs: HashMap<String, (u64, i64, i64)> = HashMap::new();
        let same_file = |old: &SyncState, rel: &str, mine: Option<std::fs::Metadata>| {
            old.files.get(rel).copied().filter(|stamp| {
                let snap = snapshot.join(rel).symlink_metadata().ok();
                snap.is_some_and(|m| m.ino() == stamp.0)
                    && mine.is_some_and(|m| file_stamp(stamp.0, &m) == *stamp)
            })
        };
        match old {
            Some(old) if strategy == GitStrategy::Fetch && dir.is_dir() => {
                // A directory that held files the project no longer has is listed whatever its
                // stamp says, and so is every directory above (a removed directory's parent
                // must find it).
                let mut untrusted: HashSet<&str> = HashSet::new();
                for gone in old.files.keys().filter(|f| !tracked.files.contains(*f)) {
                    untrusted.insert("");
                    let mut p = gone.as_str();
                    while let Some((parent, _)) = p.rsplit_once('/') {
                        if !untrusted.insert(parent) {
                            break;
                        }
                        p = parent;
                    }
                }
                // Tracked files unchanged on both sides stay; untracked ones are cleaned.
                let mut stack = vec![String::new()];
                while let Some(rel_dir) = stack.pop() {
                    let here = dir.join(&rel_dir);
                    if trust_dirs
                        && !untrusted.contains(rel_dir.as_str())
                        && let Some(stamp) = old.dirs.get(&rel_dir)
                        && dir_stamp(&here).as_ref() == Some(stamp)
                    {
                        // Holds only tracked entries, as the last sync left it.
                        for (name, is_dir) in tracked.children(&rel_dir) {
                            let rel = join(&rel_dir, name);
                            if *is_dir {
                                stack.push(rel);
                            } else if let Some(entry) =
                                same_file(&old, &rel, dir.join(&rel).symlink_metadata().ok())
                            {
                                keep.insert(rel, entry);
                            } else {
                                let _ = std::fs::remove_file(dir.join(&rel));
                            }
                        }
                        unchanged_dirs.insert(rel_dir, *stamp);
                        continue;
                    }
                    let Ok(rd) = std::fs::read_dir(&here) else {
                        continue;
                    };
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let rel = join(&rel_dir, &name);
                        let Ok(ft) = e.file_type() else { continue };
                        if ft.is_dir() {
                            if tracked.dirs.contains(&rel) {
                                stack.push(rel);
                            } else if tracked.files.contains(&rel) {
                                remove_all(&e.path())?;
                            } else {
                                clean_untracked_dir(dir, &rel, clean, ignore)?;
                            }
                            continue;
                        }
                        if tracked.files.contains(&rel) {
                            if let Some(entry) = same_file(&old, &rel, e.metadata().ok()) {
                                keep.insert(rel, entry);
                            } else {
                                let _ = std::fs::remove_file(e.path());
                            }
                        } else if clean.removes(&rel, false, ignore) {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
            }
            _ => {
                remove_all(dir)?;
            }
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut state = SyncState::default();
        let mut copied = 0;
        for f in &tracked.files {
            if let Some(entry) = keep.get(f) {
                state.files.insert(f.clone(), *entry);
                continue;
            }
            let from = snapshot.join(f);
            let Ok(snap) = from.symlink_metadata() else {
                continue;
            };
            let to = dir.join(f);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            if to.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                remove_all(&to)?;
            }
            if snap.file_type().is_symlink() {
                let _ = std::fs::remove_file(&to);
                let target = std::fs::read_link(&from)
                    .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
                std::os::unix::fs::symlink(target, &to)
                    .map_err(|e| format!("cannot create {}: {e}", to.display()))?;
            } else {
                // Content, mode and mtime, as the snapshot copies them.
                crate::snapshot::copy_file(&from, &snap, &to, false)
                    .map_err(|e| format!("cannot copy {f} into {}: {e}", dir.display()))?;
            }
            copied += 1;
            if let Ok(m) = to.symlink_metadata() {
                state.files.insert(f.clone(), file_stamp(snap.ino(), &m));
            }
        }
        if trust_dirs {
            let settled = sync_started - std::time::Duration::from_secs(1);
            let settled = settled
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| (d.as_secs() as i64, d.subsec_nanos() as i64))
                .unwrap_or_default();
            for d in std::iter::once("").chain(tracked.dirs.iter().map(String::as_str)) {
                let stamp = match unchanged_dirs.get(d) {
                    Some(s) => Some(*s),
                    None => dir_stamp(&dir.join(d)),
                };
                if let Some(s @ (_, secs, nanos)) = stamp
                    && (secs, nanos) < settled
                {
                    state.dirs.insert(d.to_string(), s);
                }
            }
        }
        let bytes = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
        // Most syncs change nothing: then the state file stays as it is. When it changed it
        // is rewritten in place, not through a new file and a rename: only the holder of the
        // claim reads it, and a half-written state does not parse, so the next sync starts
        // the directory over (a file less to allocate for every job of a first run).
        if old_bytes.as_deref() != Some(bytes.as_slice()) {
            std::fs::create_dir_all(state_path.parent().unwrap_or(&self.root))
                .map_err(|e| format!("cannot create {}: {e}", self.root.display()))?;
            std::fs::write(&state_path, &bytes)
                .map_err(|e| format!("cannot write {}: {e}", state_path.display()))?;
        }
        Ok((copied, keep.len()))
    }

    /// After the job (and its artifacts): take the overlay down. The upper layer stays until
    /// the job's next run resets it, as GitLab Runner's build directory does.
    pub fn release(&self, claim: &mut Claim, keep_mounted: bool) {
        if claim.mounted && !keep_mounted {
            unmount(&claim.dir);
            claim.mounted = false;
        }
    }

    /// Remove build directories (and their overlay layers) not used for `older_than`.
    /// Returns how many were removed; directories held by a running job are skipped.
    pub fn prune(&self, older_than: std::time::Duration) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        let now = std::time::SystemTime::now();
        let mut n = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let lock = self.root.join(".locks").join(format!("{name}.lock"));
            let used = std::fs::metadata(&lock)
                .and_then(|m| m.modified())
                .or_else(|_| e.metadata().and_then(|m| m.modified()))
                .ok();
            if used.is_some_and(|t| now.duration_since(t).unwrap_or_default() < older_than) {
                continue;
            }
            let Ok(Some(_held)) = lock_file(&lock, false) else {
                continue;
            };
            unmount(&e.path());
            let _ = remove_all(&e.path());
            let _ = remove_all(&self.root.join(".overlay").join(&name));
            let _ = std::fs::remove_file(self.state_path(&name));
            let _ = std::fs::remove_file(&lock);
            n += 1;
        }
        n
    }
}

impl Claim {
    /// Is an overlay mounted on the directory (releasing it means an unmount)?
    pub fn is_mounted(&self) -> bool {
        self.mounted
    }

    /// Mark the claim as used now (for `prune`).
    pub fn touch(&self) {
        let _ = self._lock.set_modified(std::time::SystemTime::now());
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// This boot's id: a layer written under another boot may have lost writes in a crash.
fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// Unmount whatever is mounted at `dir` (nothing when nothing is).
fn unmount(dir: &Path) {
    use rustix::mount::{UnmountFlags, unmount};
    if unmount(dir, UnmountFlags::empty()).is_err() {
        // Busy (a process the job left, a shell in it): detach, it goes when released.
        let _ = unmount(dir, UnmountFlags::DETACH);
    }
}

/// Remove what `dir` holds, keeping `dir`.
fn empty_dir(dir: &Path) -> Result<(), String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        let res = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        res.map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
    }
    Ok(())
}

fn remove_all(p: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", p.display())),
    }
}

/// An untracked directory under `root`: removed whole when `clean` removes everything in it,
/// else file by file.
fn clean_untracked_dir(
    root: &Path,
    rel: &str,
    clean: &CleanFlags,
    ignore: &dyn IgnoreCheck,
) -> Result<(), String> {
    // git clean without -d leaves untracked directories alone.
    if !clean.enabled || !clean.dirs || clean.exclude.is_match(rel) {
        return Ok(());
    }
    if clean.ignored == Ignored::Also && !clean.excluded_any {
        return remove_all(&root.join(rel));
    }
    if clean.removes(rel, true, ignore) && clean.ignored != Ignored::Keep {
        return remove_all(&root.join(rel));
    }
    if clean.ignored == Ignored::Keep && ignore.is_ignored(rel, true) {
        return Ok(());
    }
    let Ok(rd) = std::fs::read_dir(root.join(rel)) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let sub = join(rel, &e.file_name().to_string_lossy());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            clean_untracked_dir(root, &sub, clean, ignore)?;
        } else if clean.removes(&sub, false, ignore) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(root.join(rel));
    Ok(())
}

/// Reset an overlay's upper layer to "the snapshot plus untracked files the clean flags
/// keep": whiteouts and copies of tracked files go (the lower layer shows through again),
/// opaque directories become transparent, untracked files are cleaned.
fn reset_tree(
    upper: &Path,
    rel_dir: &str,
    tracked: &Tracked,
    clean: &CleanFlags,
    ignore: &dyn IgnoreCheck,
    _overlay: bool,
) -> Result<(), String> {
    let Ok(rd) = std::fs::read_dir(upper.join(rel_dir)) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let rel = join(rel_dir, &e.file_name().to_string_lossy());
        let path = e.path();
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            // A whiteout: the job deleted something; the snapshot's version comes back.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if ft.is_dir() {
            let _ = rustix::fs::lremovexattr(&path, "trusted.overlay.opaque");
            if tracked.dirs.contains(&rel) {
                reset_tree(upper, &rel, tracked, clean, ignore, true)?;
            } else if tracked.files.contains(&rel) {
                remove_all(&path)?;
            } else {
                clean_untracked_dir(upper, &rel, clean, ignore)?;
            }
            continue;
        }
        if tracked.files.contains(&rel) || clean.removes(&rel, false, ignore) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes down whatever a test mounted on the directory, even when an assertion fails
    /// half-way (a panicking test would leave the overlay mounted under /tmp).
    struct UnmountOnDrop(PathBuf);
    impl Drop for UnmountOnDrop {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }

    struct IgnoreTarget;
    impl IgnoreCheck for IgnoreTarget {
        fn is_ignored(&self, rel: &str, _: bool) -> bool {
            rel == "target" || rel.starts_with("target/")
        }
    }

    #[test]
    fn clean_flags_parse_as_git_clean_reads_them() {
        let d = CleanFlags::parse(None).unwrap();
        assert!(d.removes_everything());
        let n = CleanFlags::parse(Some("none")).unwrap();
        assert!(!n.enabled);
        let e = CleanFlags::parse(Some("-ffdx -e target/ --exclude=*.log")).unwrap();
        assert!(e.dirs && e.ignored == Ignored::Also && !e.removes_everything());
        assert!(!e.removes("target", true, &NoIgnores));
        assert!(!e.removes("sub/target/x", false, &NoIgnores));
        assert!(!e.removes("a/b.log", false, &NoIgnores));
        assert!(e.removes("out.bin", false, &NoIgnores));
        let k = CleanFlags::parse(Some("-fd")).unwrap();
        assert!(!k.removes("target/x", false, &IgnoreTarget));
        assert!(k.removes("new.txt", false, &IgnoreTarget));
        let only = CleanFlags::parse(Some("-fdX")).unwrap();
        assert!(only.removes("target/x", false, &IgnoreTarget));
        assert!(!only.removes("new.txt", false, &IgnoreTarget));
        let bad = CleanFlags::parse(Some("-fdz")).unwrap_err();
        assert!(bad.contains("not -z"), "{bad}");
        assert!(GitStrategy::parse(Some("depth")).is_err());
        assert_eq!(GitStrategy::parse(None).unwrap(), GitStrategy::Fetch);
    }

    #[test]
    fn dir_names_are_stable_safe_and_distinct() {
        assert_eq!(dir_name("build"), "build");
        assert_eq!(dir_name("unit-tests_1.2"), "unit-tests_1.2");
        let a = dir_name("a b");
        let b = dir_name("a-b");
        assert_ne!(a, b);
        assert!(a.starts_with("a-b-"), "{a}");
        assert_eq!(dir_name("test 1/3"), dir_name("test 1/3"));
        assert!(!dir_name("../x").contains('/'));
    }

    fn tree(files: &[(&str, &str)], root: &Path) -> Vec<String> {
        for (f, c) in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        }
        files.iter().map(|(f, _)| f.to_string()).collect()
    }

    fn run_copy(
        strategy: GitStrategy,
        clean: &str,
        builds: &Builds,
        snap: &Path,
        files: &[String],
    ) -> Filled {
        let mut c = builds.claim("job").unwrap();
        let flags = CleanFlags::parse(Some(clean)).unwrap();
        let (f, _) = builds
            .prepare(
                &mut c,
                snap,
                &Tracked::new(files),
                strategy,
                &flags,
                &IgnoreTarget,
            )
            .unwrap();
        builds.release(&mut c, false);
        f
    }

    #[test]
    fn copy_path_resets_tracked_files_keeps_unchanged_ones_and_cleans_by_flags() {
        let d = tempfile::tempdir().unwrap();
        let snap = d.path().join("snap");
        let files = tree(
            &[("a.txt", "a"), ("src/b.rs", "b"), ("src/c.rs", "c")],
            &snap,
        );
        let builds = Builds::new(d.path().join("builds")).copy_only();
        let dir = d.path().join("builds/job");
        assert_eq!(
            run_copy(GitStrategy::Fetch, "", &builds, &snap, &files),
            Filled::Copied { copied: 3, kept: 0 }
        );
        // The job edits a tracked file, deletes one and writes outputs.
        std::fs::write(dir.join("src/b.rs"), "edited by the job").unwrap();
        std::fs::remove_file(dir.join("a.txt")).unwrap();
        std::fs::create_dir_all(dir.join("target/debug")).unwrap();
        std::fs::write(dir.join("target/debug/app"), "bin").unwrap();
        std::fs::write(dir.join("notes.txt"), "n").unwrap();
        // `-fd` without -x: the ignored target/ stays, the untracked notes go.
        assert_eq!(
            run_copy(GitStrategy::Fetch, "-fd", &builds, &snap, &files),
            Filled::Copied { copied: 2, kept: 1 }
        );
        assert_eq!(std::fs::read_to_string(dir.join("src/b.rs")).unwrap(), "b");
        assert!(dir.join("a.txt").is_file());
        assert!(dir.join("target/debug/app").is_file());
        assert!(!dir.join("notes.txt").exists());
        // The default (-ffdx) removes it; nothing tracked is copied again.
        assert_eq!(
            run_copy(GitStrategy::Fetch, "", &builds, &snap, &files),
            Filled::Copied { copied: 0, kept: 3 }
        );
        assert!(!dir.join("target").exists());
        // none: untouched.
        std::fs::write(dir.join("left.txt"), "l").unwrap();
        assert_eq!(
            run_copy(GitStrategy::None, "", &builds, &snap, &files),
            Filled::Untouched
        );
        assert!(dir.join("left.txt").exists());
        // clone: from nothing.
        assert_eq!(
            run_copy(GitStrategy::Clone, "none", &builds, &snap, &files),
            Filled::Copied { copied: 3, kept: 0 }
        );
        assert!(!dir.join("left.txt").exists());
    }

    #[test]
    fn copy_sync_skips_listing_settled_directories_yet_sees_every_change() {
        let d = tempfile::tempdir().unwrap();
        let snap = d.path().join("snap");
        let files = tree(
            &[("a.txt", "a"), ("src/b.rs", "b"), ("src/deep/c.rs", "c")],
            &snap,
        );
        let builds = Builds::new(d.path().join("builds")).copy_only();
        let dir = d.path().join("builds/job");
        let sync = || run_copy(GitStrategy::Fetch, "", &builds, &snap, &files);
        assert_eq!(sync(), Filled::Copied { copied: 3, kept: 0 });
        // Directories just written are not trusted: their ctime may not move again within
        // the same tick. A second later they are, and the state records them.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(sync(), Filled::Copied { copied: 0, kept: 3 });
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.path().join("builds/.state/job.json")).unwrap(),
        )
        .unwrap();
        let dirs = state["dirs"].as_object().unwrap();
        assert!(
            ["", "src", "src/deep"]
                .iter()
                .all(|k| dirs.contains_key(*k)),
            "{state}"
        );
        // What a job does to its directory is still seen: new files and directories in a
        // recorded directory, a tracked file edited in place, one deleted.
        std::fs::write(dir.join("src/deep/new.txt"), "n").unwrap();
        std::fs::create_dir_all(dir.join("src/generated")).unwrap();
        std::fs::write(dir.join("src/generated/x"), "x").unwrap();
        std::fs::write(dir.join("a.txt"), "A").unwrap();
        std::fs::remove_file(dir.join("src/b.rs")).unwrap();
        assert_eq!(sync(), Filled::Copied { copied: 2, kept: 1 });
        assert!(!dir.join("src/deep/new.txt").exists());
        assert!(!dir.join("src/generated").exists());
        assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "a");
        assert_eq!(std::fs::read_to_string(dir.join("src/b.rs")).unwrap(), "b");
        // A job that rewrites a tracked file with as many bytes and sets its mtime back is
        // caught by the ctime it cannot set.
        let c = dir.join("src/deep/c.rs");
        let mtime = std::fs::metadata(&c).unwrap().modified().unwrap();
        std::fs::write(&c, "C").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&c)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(sync(), Filled::Copied { copied: 1, kept: 2 });
        assert_eq!(std::fs::read_to_string(&c).unwrap(), "c");
        // Files and a whole directory the project no longer has leave a recorded directory.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(sync(), Filled::Copied { copied: 0, kept: 3 });
        let fewer: Vec<String> = files
            .iter()
            .filter(|f| f.as_str() == "a.txt")
            .cloned()
            .collect();
        assert_eq!(
            run_copy(GitStrategy::Fetch, "", &builds, &snap, &fewer),
            Filled::Copied { copied: 0, kept: 1 }
        );
        assert!(!dir.join("src").exists(), "src/ left behind");
        assert_eq!(sync(), Filled::Copied { copied: 2, kept: 1 });
        // Cleaning flags that keep untracked files never trust a recorded directory.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(sync(), Filled::Copied { copied: 0, kept: 3 });
        std::fs::write(dir.join("src/keep.log"), "k").unwrap();
        assert_eq!(
            run_copy(GitStrategy::Fetch, "-f -e keep.log", &builds, &snap, &files),
            Filled::Copied { copied: 0, kept: 3 }
        );
        assert!(dir.join("src/keep.log").exists());
        assert_eq!(sync(), Filled::Copied { copied: 0, kept: 3 });
        assert!(!dir.join("src/keep.log").exists());
    }

    #[test]
    fn overlay_path_never_writes_the_snapshot_and_resets_like_fetch() {
        let d = tempfile::tempdir().unwrap();
        let snap = d.path().join("snap");
        let files = tree(&[("a.txt", "a"), ("src/b.rs", "b")], &snap);
        let tracked = Tracked::new(&files);
        let builds = Builds::new(d.path().join("builds")).overlay_always();
        let flags = |s: &str| CleanFlags::parse(Some(s)).unwrap();
        let mut c = builds.claim("job").unwrap();
        let _unmount = UnmountOnDrop(c.dir.clone());
        let (filled, note) = builds
            .prepare(
                &mut c,
                &snap,
                &tracked,
                GitStrategy::Fetch,
                &flags(""),
                &NoIgnores,
            )
            .unwrap();
        if !rustix::process::geteuid().is_root() {
            // Without root the mount is refused; the copy path takes over and says so once.
            assert!(matches!(filled, Filled::Copied { .. }), "{filled:?}");
            assert!(note.unwrap().contains("copies, not overlay"));
            return;
        }
        assert_eq!(filled, Filled::Overlay);
        std::fs::write(c.dir.join("src/b.rs"), "edited").unwrap();
        std::fs::remove_file(c.dir.join("a.txt")).unwrap();
        std::fs::create_dir_all(c.dir.join("target")).unwrap();
        std::fs::write(c.dir.join("target/out"), "o").unwrap();
        builds.release(&mut c, false);
        assert_eq!(std::fs::read_to_string(snap.join("src/b.rs")).unwrap(), "b");
        assert!(snap.join("a.txt").exists());
        assert!(!c.dir.join("src").exists(), "unmounted");
        // Keep target/, reset the rest.
        let (filled, _) = builds
            .prepare(
                &mut c,
                &snap,
                &tracked,
                GitStrategy::Fetch,
                &flags("-ffdx -e target/"),
                &NoIgnores,
            )
            .unwrap();
        assert_eq!(filled, Filled::Overlay);
        assert_eq!(
            std::fs::read_to_string(c.dir.join("src/b.rs")).unwrap(),
            "b"
        );
        assert!(c.dir.join("a.txt").exists());
        assert_eq!(
            std::fs::read_to_string(c.dir.join("target/out")).unwrap(),
            "o"
        );
        builds.release(&mut c, false);
        builds
            .prepare(
                &mut c,
                &snap,
                &tracked,
                GitStrategy::Fetch,
                &flags(""),
                &NoIgnores,
            )
            .unwrap();
        assert!(!c.dir.join("target").exists());
        builds.release(&mut c, false);
    }

    #[test]
    fn an_overlay_is_volatile_and_forgets_what_an_earlier_boot_left() {
        if !rustix::process::geteuid().is_root() {
            // Without root no overlay is mounted (the copy path, tested above). CI runs the
            // suite as root, so this test never passes there without running.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the tests as root"
            );
            eprintln!("needs root: overlay mounts are refused");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let snap = d.path().join("snap");
        let files = tree(&[("a.txt", "a")], &snap);
        let tracked = Tracked::new(&files);
        let builds = Builds::new(d.path().join("builds")).overlay_always();
        let keep = CleanFlags::parse(Some("none")).unwrap();
        let mut c = builds.claim("job").unwrap();
        let _unmount = UnmountOnDrop(c.dir.clone());
        let prepare = |c: &mut Claim| {
            let (filled, note) = builds
                .prepare(c, &snap, &tracked, GitStrategy::Fetch, &keep, &NoIgnores)
                .unwrap();
            assert_eq!(filled, Filled::Overlay, "{note:?}");
        };
        prepare(&mut c);
        // The mount skips overlayfs' sync of the whole upper file system at unmount.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(c.dir.to_str().unwrap()))
            .expect("the job's directory is a mount");
        // `volatile` before 6.5, `fsync=volatile` since.
        let options = line.rsplit(' ').next().unwrap();
        assert!(
            options.split(',').any(|o| o.ends_with("volatile")),
            "{line}"
        );
        std::fs::write(c.dir.join("out.bin"), "o").unwrap();
        builds.release(&mut c, false);
        // Same boot: the layer is whole, kept (no clean), and mounts again.
        prepare(&mut c);
        assert_eq!(std::fs::read_to_string(c.dir.join("out.bin")).unwrap(), "o");
        builds.release(&mut c, false);
        // Written under another boot: a crash may have lost part of it, so it starts empty.
        let boot = d.path().join("builds/.overlay/job/boot");
        assert_eq!(std::fs::read_to_string(&boot).unwrap(), boot_id());
        std::fs::write(&boot, "an-earlier-boot").unwrap();
        prepare(&mut c);
        assert!(!c.dir.join("out.bin").exists());
        assert_eq!(std::fs::read_to_string(c.dir.join("a.txt")).unwrap(), "a");
        assert_eq!(std::fs::read_to_string(&boot).unwrap(), boot_id());
        builds.release(&mut c, false);
    }

    #[test]
    fn a_held_directory_is_not_shared() {
        let d = tempfile::tempdir().unwrap();
        let builds = Builds::new(d.path().to_path_buf());
        let a = builds.claim("lint").unwrap();
        let b = builds.claim("lint").unwrap();
        assert_eq!(a.dir, d.path().join("lint"));
        assert_eq!(b.dir, d.path().join("lint~2"));
        drop(a);
        let c = builds.claim("lint").unwrap();
        assert_eq!(c.dir, d.path().join("lint"));
    }
}
