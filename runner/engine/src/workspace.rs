//! A run's files on disk: job working copies, artifacts, logs, dotenv reports.
//!
//! Layout under the run directory (`.rave/runs/<id>/` for `rave run`):
//!
//! ```text
//! src/                  the snapshot of the project's files the run started with
//! artifacts/<slug>/     files the job declared in `artifacts:`, copied out of its directory
//! logs/<slug>.log       the job's full log
//! scratch/<slug>-<n>/   the executor's scripts for attempt n
//! ```
//!
//! Jobs work in stable per-job directories under the project's builds directory (see
//! [`crate::builds`]), filled from `src/` at a cost that does not grow with the repository;
//! artifacts of the jobs a job depends on are copied in on top.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::builds::{Builds, Claim, CleanFlags, Filled, GitStrategy, IgnoreCheck, Tracked};

pub struct Workspace {
    pub source_root: PathBuf,
    pub files: Vec<String>,
    pub run_dir: PathBuf,
    /// Where artifacts are kept content-addressed with their expiry (None: only in the run dir).
    pub store: Option<rave_store::Store>,
    /// The pipeline's id in the store's index.
    pub pipeline_id: u64,
    /// The project's persistent state: `snapshot/` (the mirror), `builds/` (job dirs),
    /// `caches/`, `reuse/`.
    pub state_dir: PathBuf,
    pub builds: Builds,
    pub mirror_dir: PathBuf,
    /// The project's `.gitignore` rules, for `GIT_CLEAN_FLAGS` without `-x`.
    pub ignore: Box<dyn IgnoreCheck>,
    /// Blob ids of the tracked files git reports unmodified (see [`crate::snapshot`]).
    pub blob_ids: HashMap<String, String>,
    /// The project's `cache:` archives.
    pub caches: crate::cache::CacheStore,
    /// Records of successful runs of jobs that opt into reuse.
    pub reuse: crate::reuse::ReuseStore,
    /// The `.git` jobs get (None: the project is not the top of a git repository).
    pub git: Option<JobGit>,
    tracked: Tracked,
    snapshot: Option<crate::snapshot::Snapshot>,
}

/// The `.git` directory of every job's working directory: generated once per commit (HEAD
/// detached at the pipeline's commit, tags, an index, objects borrowed from the project's
/// repository), frozen with the snapshot; `GIT_DEPTH` adds a per-job `.git/shallow`.
pub struct JobGit {
    pub sha: String,
    pub extra: Vec<crate::snapshot::Extra>,
    pub objects: PathBuf,
    repo: std::sync::Mutex<rave_repo::Repo>,
    /// The commit's submodules, read once per run (every job needs them).
    submodules: std::sync::OnceLock<Vec<rave_repo::Submodule>>,
}

impl JobGit {
    /// Generate (or find, when this commit, branch and these tags were seen before) the
    /// `.git` files under `<state>/snapshot/git/`.
    pub fn new(
        repo: rave_repo::Repo,
        state_dir: &Path,
        sha: &str,
        branch: Option<&str>,
    ) -> Result<JobGit, String> {
        let stamp = repo.job_git_stamp(sha, branch);
        let base = state_dir.join("snapshot").join("git");
        let dir = base.join(&stamp[..16]);
        let names = if dir.join(".done").is_file() {
            rave_repo::JOB_GIT_FILES.map(String::from).to_vec()
        } else {
            // Written aside and renamed: a concurrent run never reads half of it.
            let tmp = base.join(format!(".tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let (names, _) = repo
                .write_job_git(&tmp, sha, branch)
                .map_err(|e| e.to_string())?;
            std::fs::write(tmp.join(".done"), &stamp).map_err(|e| e.to_string())?;
            if std::fs::rename(&tmp, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            prune_old(&base, &dir);
            names
        };
        let objects = repo.objects_dir();
        Ok(JobGit {
            sha: sha.to_string(),
            extra: names
                .into_iter()
                .map(|n| crate::snapshot::Extra {
                    from: dir.join(&n),
                    id: format!("gen:{stamp}:{n}"),
                    rel: format!(".git/{n}"),
                })
                .collect(),
            objects,
            repo: std::sync::Mutex::new(repo),
            submodules: std::sync::OnceLock::new(),
        })
    }

    /// `.git/shallow` for `GIT_DEPTH` (None: full history).
    fn shallow(&self, depth: u32) -> Result<Vec<String>, String> {
        let repo = self.repo.lock().unwrap_or_else(|p| p.into_inner());
        repo.shallow_boundary(&self.sha, depth)
            .map_err(|e| e.to_string())
    }

    /// The submodules of the pipeline's commit (none when it cannot be read).
    fn submodules(&self, root: &Path) -> &[rave_repo::Submodule] {
        self.submodules
            .get_or_init(|| rave_repo::submodules_at(root, &self.sha).unwrap_or_default())
    }
}

/// A submodule URL as `.gitmodules` writes it: relative ones (`../lib.git`) are relative to
/// the superproject's `origin`, else to its directory.
fn resolve_submodule_url(repo_dir: &Path, url: &str) -> String {
    if !(url.starts_with("./") || url.starts_with("../")) {
        return url.to_string();
    }
    let base = rave_repo::Repo::discover(repo_dir)
        .ok()
        .and_then(|r| r.origin_url())
        .unwrap_or_else(|| repo_dir.display().to_string());
    let mut base = base.trim_end_matches('/').to_string();
    let mut rest = url;
    loop {
        if let Some(r) = rest.strip_prefix("./") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix("../") {
            rest = r;
            if let Some(i) = base.rfind('/') {
                base.truncate(i);
            }
        } else {
            break;
        }
    }
    format!("{base}/{rest}")
}

/// Keep the few most recent generated `.git` directories.
fn prune_old(base: &Path, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(base) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.path() != keep && !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    let n = dirs.len();
    for (_, d) in dirs.into_iter().take(n.saturating_sub(3)) {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `.gitignore` rules of a real repository, through git2.
pub struct RepoIgnores(std::sync::Mutex<rave_repo::Repo>);

impl RepoIgnores {
    pub fn new(repo: rave_repo::Repo) -> RepoIgnores {
        RepoIgnores(std::sync::Mutex::new(repo))
    }
}

impl IgnoreCheck for RepoIgnores {
    fn is_ignored(&self, rel: &str, is_dir: bool) -> bool {
        let repo = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let path = if is_dir {
            format!("{rel}/")
        } else {
            rel.to_string()
        };
        repo.is_ignored(&path)
    }
}

/// A file-system-safe, unique name for a job instance.
pub fn slug(id: usize, name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-');
    let s: String = s.chars().take(60).collect();
    format!("{id:03}-{s}")
}

/// A job's git variables (`GIT_DEPTH`, `GIT_SUBMODULE_STRATEGY`).
#[derive(Clone, Debug, Default)]
pub struct GitVars {
    pub depth: Option<String>,
    pub submodules: Option<String>,
}

impl Workspace {
    /// A run's workspace over the project's state directory (`.rave/` for `rave run`).
    pub fn new(
        source_root: PathBuf,
        files: Vec<String>,
        run_dir: PathBuf,
        state_dir: &Path,
        ignore: Box<dyn IgnoreCheck>,
    ) -> Workspace {
        let mut builds = Builds::new(state_dir.join("builds"));
        match std::env::var("RAVE_WORKSPACE").as_deref() {
            Ok("copy") => builds = builds.copy_only(),
            Ok("overlay") => builds = builds.overlay_always(),
            _ => {}
        }
        Workspace {
            source_root,
            files,
            run_dir,
            store: None,
            pipeline_id: 0,
            state_dir: state_dir.to_path_buf(),
            builds,
            mirror_dir: state_dir.join("snapshot"),
            ignore,
            blob_ids: HashMap::new(),
            caches: crate::cache::CacheStore::new(state_dir.join("caches")),
            reuse: crate::reuse::ReuseStore::new(state_dir.join("reuse")),
            git: None,
            tracked: Tracked::default(),
            snapshot: None,
        }
    }

    pub fn artifacts_dir(&self, slug: &str) -> PathBuf {
        self.run_dir.join("artifacts").join(slug)
    }
    pub fn log_path(&self, slug: &str) -> PathBuf {
        self.run_dir.join("logs").join(format!("{slug}.log"))
    }
    pub fn scratch_dir(&self, slug: &str, attempt: u32) -> PathBuf {
        self.run_dir
            .join("scratch")
            .join(format!("{slug}-{attempt}"))
    }
    pub fn snapshot_dir(&self) -> PathBuf {
        self.run_dir.join("src")
    }

    /// Freeze the files the run starts with, so every job sees the tree as it was when the
    /// pipeline started, whatever is edited while it runs. Only files changed since the last
    /// run are copied (see [`crate::snapshot`]); the snapshot is held until the workspace is
    /// dropped.
    pub fn snapshot(&mut self) -> Result<crate::snapshot::SnapshotStats, String> {
        let extra = self
            .git
            .as_ref()
            .map(|g| g.extra.clone())
            .unwrap_or_default();
        let snap = crate::snapshot::take(
            &self.source_root,
            &self.files,
            &self.blob_ids,
            &extra,
            &self.mirror_dir,
            &self.snapshot_dir(),
        )?;
        let mut tracked: Vec<String> = self.files.clone();
        tracked.extend(extra.iter().map(|e| e.rel.clone()));
        self.tracked = Tracked::new(&tracked);
        self.source_root = snap.dir.clone();
        let stats = snap.stats;
        self.snapshot = Some(snap);
        Ok(stats)
    }

    /// The files of the run's snapshot.
    pub fn tracked(&self) -> &Tracked {
        &self.tracked
    }

    /// Claim the job's stable build directory (its `CI_PROJECT_DIR`).
    pub fn claim(&self, job: &str) -> Result<Claim, String> {
        self.builds.claim(job)
    }

    /// Fill a claimed directory for a job and copy in the artifacts of `deps` (slugs).
    /// Returns lines for the job's log.
    pub fn prepare(
        &self,
        claim: &mut Claim,
        deps: &[String],
        strategy: GitStrategy,
        clean: &CleanFlags,
        git_vars: &GitVars,
    ) -> Result<Vec<String>, String> {
        claim.touch();
        let (filled, note) = self.builds.prepare(
            claim,
            &self.source_root,
            &self.tracked,
            strategy,
            clean,
            self.ignore.as_ref(),
        )?;
        let mut notes: Vec<String> = note.into_iter().collect();
        match filled {
            Filled::Overlay | Filled::Copied { .. } if strategy == GitStrategy::Clone => {
                notes.push("Fresh working directory (GIT_STRATEGY: clone)".into())
            }
            Filled::Copied { copied, kept } if kept > 0 => notes.push(format!(
                "Working directory updated: {copied} file(s) copied, {kept} unchanged"
            )),
            Filled::Untouched => notes.push(
                "GIT_STRATEGY: none: the working directory is left as the job's last run left it"
                    .into(),
            ),
            _ => {}
        }
        if strategy != GitStrategy::None {
            self.git_extras(&claim.dir, git_vars, &mut notes)?;
        }
        for d in deps {
            let src = self.artifacts_dir(d);
            if src.is_dir() {
                copy_dir(&src, &claim.dir, false)
                    .map_err(|e| format!("cannot copy artifacts of {d}: {e}"))?;
            }
        }
        Ok(notes)
    }

    /// Per job: `.git/shallow` for `GIT_DEPTH`, and a word on submodules.
    fn git_extras(&self, dir: &Path, v: &GitVars, notes: &mut Vec<String>) -> Result<(), String> {
        let shallow = dir.join(".git").join("shallow");
        let Some(git) = &self.git else {
            return Ok(());
        };
        let depth = match v.depth.as_deref().map(str::trim) {
            None | Some("") | Some("0") => None,
            Some(d) => Some(d.parse::<u32>().map_err(|_| {
                format!("GIT_DEPTH `{d}` is not a number (0 or unset: the whole history)")
            })?),
        };
        match depth {
            Some(d) => {
                let boundary = git.shallow(d)?;
                if boundary.is_empty() {
                    let _ = std::fs::remove_file(&shallow);
                } else {
                    std::fs::write(&shallow, boundary.join("\n") + "\n")
                        .map_err(|e| format!("cannot write {}: {e}", shallow.display()))?;
                }
            }
            None => {
                let _ = std::fs::remove_file(&shallow);
            }
        }
        let root = git
            .repo
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .root()
            .to_path_buf();
        match v.submodules.as_deref().map(str::trim) {
            None | Some("") | Some("none") => {
                // As a clone without submodules: their directories exist, empty.
                for s in git.submodules(&root) {
                    let _ = std::fs::create_dir_all(dir.join(&s.path));
                }
            }
            Some(strategy @ ("normal" | "recursive")) => {
                let n =
                    self.check_out_submodules(&root, &git.sha, dir, strategy == "recursive", 0)?;
                notes.push(format!(
                    "Checked out {n} submodule(s) (GIT_SUBMODULE_STRATEGY: {strategy})"
                ));
            }
            Some(other) => {
                return Err(format!(
                    "GIT_SUBMODULE_STRATEGY `{other}` is not none, normal or recursive"
                ));
            }
        }
        Ok(())
    }

    /// Check the submodules of `commit` (of the repository at `repo_dir`) out into `dest`, at
    /// the commits the superproject records: from the project's own checkout of them when it
    /// has those commits (`rave run` on a developer's tree), else fetched from their URL into
    /// a mirror kept in the project's state. Returns how many were checked out.
    fn check_out_submodules(
        &self,
        repo_dir: &Path,
        commit: &str,
        dest: &Path,
        recursive: bool,
        depth: usize,
    ) -> Result<usize, String> {
        if depth > 5 {
            return Ok(0);
        }
        let subs = rave_repo::submodules_at(repo_dir, commit).map_err(|e| e.to_string())?;
        let mut n = 0;
        for s in subs {
            let local = [
                repo_dir.join(&s.path),
                repo_dir.join(".git").join("modules").join(&s.name),
            ]
            .into_iter()
            .find(|p| rave_repo::has_commit(p, &s.commit));
            let source = match local {
                Some(p) => p,
                None => {
                    let url = resolve_submodule_url(repo_dir, &s.url);
                    let safe: String = s
                        .name
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '-' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect();
                    let mirror = self
                        .state_dir
                        .join("submodules")
                        .join(format!("{safe}.git"));
                    std::fs::create_dir_all(&mirror)
                        .map_err(|e| format!("{}: {e}", mirror.display()))?;
                    rave_repo::fetch_mirror(&url, &rave_repo::Credentials::None, &mirror)
                        .map_err(|e| format!("submodule `{}`: cannot fetch {url}: {e}", s.name))?;
                    if !rave_repo::has_commit(&mirror, &s.commit) {
                        return Err(format!(
                            "submodule `{}`: {url} has no commit {}",
                            s.name, s.commit
                        ));
                    }
                    mirror
                }
            };
            let to = dest.join(&s.path);
            rave_repo::write_tree(&source, &s.commit, &to)
                .map_err(|e| format!("submodule `{}`: {e}", s.name))?;
            n += 1;
            if recursive {
                n += self.check_out_submodules(&source, &s.commit, &to, true, depth + 1)?;
            }
        }
        Ok(n)
    }

    /// After the job's artifacts are saved: take its directory's overlay down.
    pub fn release(&self, claim: &mut Claim, keep: bool) {
        self.builds.release(claim, keep);
    }
}

/// Copy a directory tree over `dest`, symlinks as symlinks. With `link`, files are hard
/// links where the file system allows (only for files never written in place: artifacts).
pub fn copy_dir(src: &Path, dest: &Path, link: bool) -> std::io::Result<()> {
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let to = dest.join(entry.file_name());
        if ft.is_dir() {
            std::fs::create_dir_all(&to)?;
            copy_dir(&entry.path(), &to, link)?;
        } else if ft.is_symlink() {
            let _ = std::fs::remove_file(&to);
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &to)?;
        } else if !(link && std::fs::hard_link(entry.path(), &to).is_ok()) {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

/// Check that an artifact pattern stays inside the working copy. An absolute path inside it
/// (`$CI_PROJECT_DIR/out/`, as GitLab allows) becomes relative.
pub(crate) fn check_pattern(p: &str, workdir: &Path) -> Result<String, String> {
    let canon = workdir.canonicalize().ok();
    let inside = [Some(workdir), canon.as_deref()]
        .into_iter()
        .flatten()
        .find_map(|w| Path::new(p).strip_prefix(w).ok().map(Path::to_path_buf));
    let owned;
    let p = match inside {
        Some(rel) if rel.as_os_str().is_empty() => ".",
        Some(rel) => {
            owned = rel.to_string_lossy().to_string();
            owned.as_str()
        }
        None => p,
    };
    let path = Path::new(p);
    if path.is_absolute() {
        return Err(format!(
            "artifact path `{p}` is absolute; artifact paths are relative to the project directory"
        ));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "artifact path `{p}` leaves the project directory (`..`)"
        ));
    }
    Ok(p.trim_start_matches("./").trim_end_matches('/').to_string())
}

/// What artifact collection found: files copied, and warnings for the job log.
#[derive(Default, Debug)]
pub struct Collected {
    pub files: usize,
    pub bytes: u64,
    pub warnings: Vec<String>,
}

pub(crate) fn globset(patterns: &[String]) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = Glob::new(p).map_err(|e| format!("bad artifact pattern `{p}`: {e}"))?;
        b.add(g);
        // A directory pattern takes everything under it.
        let sub = Glob::new(&format!("{p}/**"))
            .map_err(|e| format!("bad artifact pattern `{p}`: {e}"))?;
        b.add(sub);
    }
    b.build().map_err(|e| e.to_string())
}

/// Copy the files matching `paths` (minus `exclude`) from `workdir` into `dest`. Symlinks
/// that point outside the working copy are refused, never followed.
pub fn collect_artifacts(
    workdir: &Path,
    paths: &[String],
    exclude: &[String],
    dest: &Path,
) -> Collected {
    let mut c = Collected::default();
    let mut ok = Vec::new();
    for p in paths {
        match check_pattern(p, workdir) {
            Ok(p) => ok.push(p),
            Err(e) => c.warnings.push(e),
        }
    }
    if ok.is_empty() {
        return c;
    }
    let include = match globset(&ok) {
        Ok(g) => g,
        Err(e) => {
            c.warnings.push(e);
            return c;
        }
    };
    let exclude = match globset(
        &exclude
            .iter()
            .filter_map(|p| check_pattern(p, workdir).ok())
            .collect::<Vec<_>>(),
    ) {
        Ok(g) => g,
        Err(e) => {
            c.warnings.push(e);
            return c;
        }
    };
    let root = workdir
        .canonicalize()
        .unwrap_or_else(|_| workdir.to_path_buf());
    let mut matched_any = vec![false; ok.len()];
    let mut stack = vec![workdir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let Ok(rel) = path.strip_prefix(workdir) else {
                continue;
            };
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                // A directory named by a pattern is kept even when it is empty.
                if include.is_match(rel) && !exclude.is_match(rel) {
                    for m in include.matches(rel) {
                        if let Some(f) = matched_any.get_mut(m / 2) {
                            *f = true;
                        }
                    }
                    if let Err(e) = std::fs::create_dir_all(dest.join(rel)) {
                        c.warnings
                            .push(format!("cannot create {}: {e}", dest.join(rel).display()));
                    }
                }
                stack.push(path);
                continue;
            }
            if !include.is_match(rel) || exclude.is_match(rel) {
                continue;
            }
            // Each pattern was added twice (itself and `pattern/**`).
            for m in include.matches(rel) {
                if let Some(f) = matched_any.get_mut(m / 2) {
                    *f = true;
                }
            }
            if ft.is_symlink() {
                let inside = std::fs::canonicalize(&path).is_ok_and(|t| t.starts_with(&root));
                if !inside {
                    c.warnings.push(format!(
                        "artifact `{}` is a symlink pointing outside the project directory; not saved",
                        rel.display()
                    ));
                    continue;
                }
            }
            let to = dest.join(rel);
            if let Some(parent) = to.parent()
                && let Err(e) = std::fs::create_dir_all(parent)
            {
                c.warnings
                    .push(format!("cannot create {}: {e}", parent.display()));
                continue;
            }
            let res = if ft.is_symlink() {
                std::fs::read_link(&path)
                    .and_then(|t| std::os::unix::fs::symlink(t, &to))
                    .map(|_| 0)
            } else {
                std::fs::copy(&path, &to)
            };
            match res {
                Ok(n) => {
                    c.files += 1;
                    c.bytes += n;
                }
                Err(e) => c
                    .warnings
                    .push(format!("cannot save artifact {}: {e}", rel.display())),
            }
        }
    }
    for (p, hit) in ok.iter().zip(matched_any) {
        if !hit {
            c.warnings.push(format!("{p}: no matching files"));
        }
    }
    c
}

/// Read a dotenv report: `KEY=VALUE` lines, `#` comments and blank lines ignored, optional
/// surrounding quotes removed. GitLab's limits apply: names are identifiers, values one line.
pub fn read_dotenv(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read dotenv report {}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("{}:{}: expected KEY=VALUE", path.display(), n + 1));
        };
        let k = k.trim();
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "{}:{}: `{k}` is not a valid variable name",
                path.display(),
                n + 1
            ));
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
            .unwrap_or(v);
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_safe_and_unique() {
        assert_eq!(slug(3, "build: [linux, amd64]"), "003-build-linux-amd64");
        assert_eq!(slug(12, "test 1/3"), "012-test-1-3");
    }

    #[test]
    fn project_dir_paths_and_empty_directories_are_artifacts() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("w");
        std::fs::create_dir_all(w.join("out/empty")).unwrap();
        std::fs::write(w.join("out/x.txt"), "x").unwrap();
        std::fs::create_dir_all(w.join("cache-dir")).unwrap();
        let out = d.path().join("out");
        let c = collect_artifacts(
            &w,
            &[
                format!("{}/out/", w.display()),
                format!("{}/cache-dir", w.display()),
            ],
            &[],
            &out,
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(out.join("out/x.txt").is_file());
        assert!(out.join("out/empty").is_dir());
        assert!(out.join("cache-dir").is_dir());
    }

    #[test]
    fn artifacts_are_collected_and_escapes_refused() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("w");
        std::fs::create_dir_all(w.join("dist/sub")).unwrap();
        std::fs::write(w.join("dist/a.bin"), "a").unwrap();
        std::fs::write(w.join("dist/sub/b.log"), "b").unwrap();
        std::fs::write(w.join("report.xml"), "r").unwrap();
        std::fs::write(d.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(d.path().join("secret"), w.join("dist/leak")).unwrap();
        let out = d.path().join("out");
        let c = collect_artifacts(
            &w,
            &[
                "dist/".into(),
                "*.xml".into(),
                "../secret".into(),
                "/etc/passwd".into(),
                "missing/".into(),
            ],
            &["dist/**/*.log".into()],
            &out,
        );
        assert_eq!(c.files, 2, "{c:?}");
        assert!(out.join("dist/a.bin").exists());
        assert!(out.join("report.xml").exists());
        assert!(!out.join("dist/sub/b.log").exists());
        assert!(!out.join("dist/leak").exists());
        let w = c.warnings.join("\n");
        assert!(w.contains("leaves the project directory"), "{w}");
        assert!(w.contains("is absolute"), "{w}");
        assert!(w.contains("symlink pointing outside"), "{w}");
        assert!(w.contains("missing: no matching files"), "{w}");
    }

    #[test]
    fn dotenv_parses_gitlab_style() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("build.env");
        std::fs::write(&p, "# c\nVERSION=1.2\nexport URL=\"http://x\"\n\n").unwrap();
        let v = read_dotenv(&p).unwrap();
        assert_eq!(v["VERSION"], "1.2");
        assert_eq!(v["URL"], "http://x");
        std::fs::write(&p, "not a pair\n").unwrap();
        assert!(read_dotenv(&p).is_err());
    }
}
