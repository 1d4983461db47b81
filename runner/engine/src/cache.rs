//! GitLab's `cache:`: files a job keeps for the next run of any job with the same key.
//!
//! Archives live per project under `<state>/caches/` as `<key>.tar.gz`. A key is the
//! job's `key:` with its variables expanded (or `default`; or `<prefix>-<hash>` of the
//! contents of the one or two `key: files`), plus `-protected` on a protected ref and
//! `-non_protected` elsewhere (or always with `unprotect: true`), as GitLab names them, so a
//! feature branch cannot poison the cache a release build uses.
//!
//! - **Restore** (policy `pull` or `pull-push`), after the working directory is filled and
//!   before the script: the first of `key`, `fallback_keys` and `CACHE_FALLBACK_KEY` that has
//!   an archive is extracted into a temporary directory inside the job's directory and only
//!   then moved into place: a truncated or corrupt archive is dropped with a warning, never
//!   extracted half.
//! - **Save** (policy `push` or `pull-push`, per `when:`), after the script and after_script:
//!   the files under `paths` (and with `untracked: true` every file that is not part of the
//!   snapshot) are streamed into a temporary file next to the archive, synced, and renamed
//!   over it: two jobs saving one key at once never corrupt it (the last one wins), and a
//!   crash leaves no half archive visible. A failed save (a full disk) is a warning, not a
//!   job failure.
//! - **Size**: after a save, the least recently used archives go until the total fits the cap
//!   (`RAVE_CACHE_MAX_SIZE`, default 5 GiB). A restore counts as a use.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::Digest;

use crate::builds::Tracked;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Pull,
    Push,
    PullPush,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveWhen {
    OnSuccess,
    OnFailure,
    Always,
}

/// One `cache:` entry of a job, resolved for this run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCache {
    /// The full key (with its protection suffix).
    pub key: String,
    /// Keys tried in order when `key` has no archive.
    pub fallbacks: Vec<String>,
    pub paths: Vec<String>,
    pub untracked: bool,
    pub policy: Policy,
    pub when: SaveWhen,
}

const DEFAULT_MAX: u64 = 5 << 30;

/// GitLab refuses keys that would name another directory.
fn check_key(key: &str) -> Result<(), String> {
    let lower = key.to_ascii_lowercase();
    if key.contains('/') || key.contains('\\') || lower.contains("%2f") || lower.contains("%5c") {
        return Err(format!("cache key `{key}` contains a `/` or `\\`"));
    }
    if matches!(
        lower.as_str(),
        "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."
    ) {
        return Err(format!("cache key `{key}` is `.` or `..`"));
    }
    Ok(())
}

/// Resolve a job's `cache:` entry: expand variables with `vars`, hash `key: files` from
/// `snapshot`, add the protection suffix.
pub fn resolve(
    c: &rave_model::Cache,
    vars: &dyn Fn(&str) -> Option<String>,
    snapshot: &Path,
    protected: bool,
) -> Result<JobCache, String> {
    let expand = |s: &str| rave_model::vars::expand(s, vars);
    let suffix = if protected && !c.unprotect {
        "-protected"
    } else {
        "-non_protected"
    };
    let base = if !c.key_files.is_empty() {
        let mut h = sha2::Sha256::new();
        let mut found = false;
        for f in &c.key_files {
            let f = expand(f);
            if let Ok(bytes) = std::fs::read(snapshot.join(f.trim_start_matches("./"))) {
                found = true;
                h.update(f.as_bytes());
                h.update([0]);
                h.update(sha2::Sha256::digest(&bytes));
            }
        }
        let hash: String = h
            .finalize()
            .iter()
            .take(20)
            .map(|b| format!("{b:02x}"))
            .collect();
        match (found, &c.key_prefix) {
            // As GitLab: no listed file exists, the key is `default` (prefix or not).
            (false, _) => "default".to_string(),
            (true, Some(p)) => format!("{}-{hash}", expand(p)),
            (true, None) => hash,
        }
    } else {
        match c.key.as_deref().map(expand) {
            Some(k) if !k.trim().is_empty() => k,
            _ => "default".to_string(),
        }
    };
    check_key(&base)?;
    let mut fallbacks = Vec::new();
    for f in &c.fallback_keys {
        let f = expand(f);
        if !f.is_empty() && check_key(&f).is_ok() {
            fallbacks.push(format!("{f}{suffix}"));
        }
    }
    // The global fallback is used as written; a protected cache is out of reach of an
    // unprotected ref (GitLab Runner refuses it the same way).
    if let Some(g) = vars("CACHE_FALLBACK_KEY").filter(|g| !g.is_empty()) {
        let trimmed = g.trim_end_matches([' ', '/', '\\']);
        if check_key(trimmed).is_ok() && (protected || !trimmed.ends_with("-protected")) {
            fallbacks.push(trimmed.to_string());
        }
    }
    let policy = match c.policy.as_deref().map(expand).as_deref() {
        None | Some("") | Some("pull-push") => Policy::PullPush,
        Some("pull") => Policy::Pull,
        Some("push") => Policy::Push,
        Some(o) => return Err(format!("unknown cache policy `{o}`")),
    };
    let when = match c.when.as_deref() {
        None | Some("on_success") => SaveWhen::OnSuccess,
        Some("on_failure") => SaveWhen::OnFailure,
        _ => SaveWhen::Always,
    };
    Ok(JobCache {
        key: format!("{base}{suffix}"),
        fallbacks,
        paths: c.paths.iter().map(|p| expand(p)).collect(),
        untracked: c.untracked,
        policy,
        when,
    })
}

/// One archive of the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    pub key: String,
    pub bytes: u64,
    #[serde(skip)]
    pub last_used: SystemTime,
    pub last_used_unix: u64,
}

/// A project's cache archives.
pub struct CacheStore {
    dir: PathBuf,
    max_bytes: u64,
}

/// A file name for a key: safe characters as they are, the rest percent-encoded.
fn file_name(key: &str) -> String {
    let mut s = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{s}.tar.gz")
}

fn key_of(file: &str) -> Option<String> {
    let stem = file.strip_suffix(".tar.gz")?;
    let b = stem.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl CacheStore {
    pub fn new(dir: PathBuf) -> CacheStore {
        let max_bytes = std::env::var("RAVE_CACHE_MAX_SIZE")
            .ok()
            .and_then(|v| rave_model::units::parse_memory(&v).ok())
            .unwrap_or(DEFAULT_MAX);
        CacheStore { dir, max_bytes }
    }

    pub fn with_max(mut self, max_bytes: u64) -> CacheStore {
        self.max_bytes = max_bytes;
        self
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// Restore the first archive found among the cache's keys into `workdir`.
    pub fn restore(&self, c: &JobCache, workdir: &Path) -> Vec<String> {
        let mut notes = Vec::new();
        if c.policy == Policy::Push {
            notes.push(format!("Not downloading cache {} due to policy", c.key));
            return notes;
        }
        for key in std::iter::once(&c.key).chain(&c.fallbacks) {
            let archive = self.path(key);
            if !archive.is_file() {
                continue;
            }
            notes.push(format!("Checking cache for {key}..."));
            match extract(&archive, workdir) {
                Ok(n) => {
                    // A restore is a use: least recently used archives are evicted first.
                    if let Ok(f) = std::fs::File::options().write(true).open(&archive) {
                        let _ = f.set_modified(SystemTime::now());
                    }
                    notes.push(format!("Successfully extracted cache ({n} entries)"));
                    return notes;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&archive);
                    notes.push(format!(
                        "WARNING: cache {key} is damaged and was dropped ({e}); the job runs without it"
                    ));
                }
            }
        }
        notes.push(format!("No cache found for {}", c.key));
        notes
    }

    /// Save the cache from `workdir` after the job, as its `when:` and `policy` say.
    pub fn save(&self, c: &JobCache, workdir: &Path, tracked: &Tracked, ok: bool) -> Vec<String> {
        let mut notes = Vec::new();
        if c.policy == Policy::Pull {
            notes.push(format!("Not uploading cache {} due to policy", c.key));
            return notes;
        }
        let wanted = match c.when {
            SaveWhen::OnSuccess => ok,
            SaveWhen::OnFailure => !ok,
            SaveWhen::Always => true,
        };
        if !wanted {
            return notes;
        }
        notes.push(format!("Creating cache {}...", c.key));
        let (entries, warnings) = match select(workdir, &c.paths, c.untracked, tracked) {
            Ok(x) => x,
            Err(e) => {
                notes.push(format!("WARNING: cache not saved: {e}"));
                return notes;
            }
        };
        notes.extend(warnings.into_iter().map(|w| format!("WARNING: {w}")));
        if entries.is_empty() {
            notes.push("No files to cache; nothing saved".into());
            return notes;
        }
        match self.write(&c.key, workdir, &entries) {
            Ok(bytes) => notes.push(format!(
                "Saved cache {} ({} entries, {})",
                c.key,
                entries.len(),
                rave_model::units::format_memory(bytes)
            )),
            Err(e) => notes.push(format!("WARNING: cache {} not saved: {e}", c.key)),
        }
        let evicted = self.evict();
        if evicted > 0 {
            notes.push(format!(
                "Removed {evicted} least recently used cache archive(s) to stay under {}",
                rave_model::units::format_memory(self.max_bytes)
            ));
        }
        notes
    }

    fn write(&self, key: &str, workdir: &Path, entries: &[(String, bool)]) -> Result<u64, String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        self.remove_stale_temporaries();
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{nanos}", std::process::id()));
        let res = (|| -> std::io::Result<u64> {
            let f = std::fs::File::create(&tmp)?;
            let gz = flate2::write::GzEncoder::new(
                std::io::BufWriter::new(f),
                flate2::Compression::fast(),
            );
            let mut tar = tar::Builder::new(gz);
            tar.follow_symlinks(false);
            for (rel, is_dir) in entries {
                let abs = workdir.join(rel);
                if *is_dir {
                    tar.append_dir(rel, &abs)?;
                } else {
                    tar.append_path_with_name(&abs, rel)?;
                }
            }
            let gz = tar.into_inner()?;
            let mut w = gz.finish()?;
            w.flush()?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            let n = f.metadata()?.len();
            std::fs::rename(&tmp, self.path(key))?;
            Ok(n)
        })();
        res.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            e.to_string()
        })
    }

    /// Temporary files of saves that died (kill -9) more than an hour ago.
    fn remove_stale_temporaries(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(3600))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The archives, most recently used first.
    pub fn list(&self) -> Vec<Entry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Entry> = rd
            .flatten()
            .filter_map(|e| {
                let key = key_of(&e.file_name().to_string_lossy())?;
                let m = e.metadata().ok()?;
                let last_used = m.modified().ok()?;
                Some(Entry {
                    key,
                    bytes: m.len(),
                    last_used,
                    last_used_unix: last_used
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                })
            })
            .collect();
        out.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.key.cmp(&b.key)));
        out
    }

    /// Remove archives: all, or those whose key is `key` (with or without its suffix).
    pub fn clear(&self, key: Option<&str>) -> usize {
        let mut n = 0;
        for e in self.list() {
            let hit = match key {
                None => true,
                Some(k) => {
                    e.key == k
                        || e.key == format!("{k}-protected")
                        || e.key == format!("{k}-non_protected")
                }
            };
            if hit && std::fs::remove_file(self.path(&e.key)).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Drop least recently used archives until the total fits the cap.
    fn evict(&self) -> usize {
        let mut all = self.list();
        let mut total: u64 = all.iter().map(|e| e.bytes).sum();
        let mut n = 0;
        while total > self.max_bytes {
            let Some(oldest) = all.pop() else { break };
            if std::fs::remove_file(self.path(&oldest.key)).is_ok() {
                n += 1;
            }
            total = total.saturating_sub(oldest.bytes);
        }
        n
    }
}

/// What to archive: `(relative path, is a directory)`, and warnings.
type Selection = (Vec<(String, bool)>, Vec<String>);

fn select(
    workdir: &Path,
    paths: &[String],
    untracked: bool,
    tracked: &Tracked,
) -> Result<Selection, String> {
    let mut warnings = Vec::new();
    let mut ok = Vec::new();
    for p in paths {
        match crate::workspace::check_pattern(p, workdir) {
            Ok(p) => ok.push(p),
            Err(e) => warnings.push(e.replace("artifact path", "cache path")),
        }
    }
    let include = crate::workspace::globset(&ok)?;
    let root = workdir
        .canonicalize()
        .unwrap_or_else(|_| workdir.to_path_buf());
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(workdir.join(&dir)) else {
            continue;
        };
        let mut names: Vec<_> = rd.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if dir.is_empty() {
                name.clone()
            } else {
                format!("{dir}/{name}")
            };
            if dir.is_empty() && name.starts_with(".rave-cache-") {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            let named = include.is_match(&rel);
            if ft.is_dir() {
                if named {
                    out.push((rel.clone(), true));
                }
                stack.push(rel);
                continue;
            }
            let untracked_hit = untracked && !tracked.has_file(&rel);
            if !named && !untracked_hit {
                continue;
            }
            if ft.is_symlink() {
                let inside = std::fs::canonicalize(e.path()).is_ok_and(|t| t.starts_with(&root));
                if !inside {
                    warnings.push(format!(
                        "`{rel}` is a symlink pointing outside the project directory; not cached"
                    ));
                    continue;
                }
            }
            out.push((rel, false));
        }
    }
    // A directory is archived before what it holds.
    out.sort();
    out.dedup();
    if out.is_empty() && !paths.is_empty() {
        warnings.push(format!("{}: no matching files", paths.join(", ")));
    }
    Ok((out, warnings))
}

/// Extract `archive` into `workdir`: first into a temporary directory inside it (so a
/// damaged archive leaves nothing behind), then moved into place.
fn extract(archive: &Path, workdir: &Path) -> Result<usize, String> {
    let tmp = workdir.join(format!(".rave-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let res = (|| -> std::io::Result<usize> {
        let f = std::fs::File::open(archive)?;
        let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(f));
        let mut a = tar::Archive::new(gz);
        a.set_preserve_mtime(true);
        a.set_overwrite(true);
        let mut n = 0;
        for entry in a.entries()? {
            let mut entry = entry?;
            // `unpack_in` refuses paths that leave the directory.
            if !entry.unpack_in(&tmp)? {
                return Err(std::io::Error::other("an entry leaves the directory"));
            }
            n += 1;
        }
        Ok(n)
    })();
    let n = match res {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.to_string());
        }
    };
    let moved = merge_move(&tmp, workdir);
    let _ = std::fs::remove_dir_all(&tmp);
    moved.map_err(|e| format!("cannot move the cache into place: {e}"))?;
    Ok(n)
}

/// Move everything under `src` into `dst`, merging directories, replacing files.
fn merge_move(src: &Path, dst: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        let from_dir = e.file_type()?.is_dir();
        let to_meta = to.symlink_metadata().ok();
        if from_dir && to_meta.as_ref().is_some_and(|m| m.is_dir()) {
            merge_move(&e.path(), &to)?;
            continue;
        }
        match to_meta {
            Some(m) if m.is_dir() => std::fs::remove_dir_all(&to)?,
            Some(_) => std::fs::remove_file(&to)?,
            None => {}
        }
        std::fs::rename(e.path(), &to)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(key: Option<&str>) -> rave_model::Cache {
        rave_model::Cache {
            key: key.map(String::from),
            paths: vec!["vendor/".into()],
            ..Default::default()
        }
    }

    #[test]
    fn keys_are_expanded_suffixed_and_checked_as_gitlab_does() {
        let d = tempfile::tempdir().unwrap();
        let vars = |k: &str| match k {
            "CI_COMMIT_REF_SLUG" => Some("main".to_string()),
            "CACHE_FALLBACK_KEY" => Some("shared-protected".to_string()),
            _ => None,
        };
        let c = resolve(
            &cache(Some("gems-$CI_COMMIT_REF_SLUG")),
            &vars,
            d.path(),
            true,
        )
        .unwrap();
        assert_eq!(c.key, "gems-main-protected");
        assert_eq!(c.fallbacks, ["shared-protected"]);
        // On an unprotected ref the protected global fallback is out of reach.
        let c = resolve(&cache(Some("gems")), &vars, d.path(), false).unwrap();
        assert_eq!(c.key, "gems-non_protected");
        assert!(c.fallbacks.is_empty());
        let mut u = cache(None);
        u.unprotect = true;
        u.fallback_keys = vec!["gems-$CI_COMMIT_REF_SLUG".into()];
        let c = resolve(&u, &vars, d.path(), true).unwrap();
        assert_eq!(c.key, "default-non_protected");
        assert_eq!(c.fallbacks[0], "gems-main-non_protected");
        assert!(resolve(&cache(Some("a/b")), &vars, d.path(), true).is_err());
        assert!(resolve(&cache(Some("%2e%2E")), &vars, d.path(), true).is_err());
        // key: files hashes contents: same content, same key; no such file, `default`.
        std::fs::write(d.path().join("Cargo.lock"), "v1").unwrap();
        let mut f = cache(None);
        f.key_files = vec!["Cargo.lock".into(), "missing.lock".into()];
        f.key_prefix = Some("deps-$CI_COMMIT_REF_SLUG".into());
        let k1 = resolve(&f, &vars, d.path(), false).unwrap().key;
        assert!(
            k1.starts_with("deps-main-") && k1.ends_with("-non_protected"),
            "{k1}"
        );
        assert_eq!(resolve(&f, &vars, d.path(), false).unwrap().key, k1);
        std::fs::write(d.path().join("Cargo.lock"), "v2").unwrap();
        assert_ne!(resolve(&f, &vars, d.path(), false).unwrap().key, k1);
        f.key_files = vec!["none.lock".into()];
        assert_eq!(
            resolve(&f, &vars, d.path(), false).unwrap().key,
            "default-non_protected"
        );
    }

    #[test]
    fn file_names_round_trip_any_key() {
        for k in [
            "default-protected",
            "a:b c%d",
            "jest:mobile:main-non_protected",
        ] {
            assert_eq!(key_of(&file_name(k)).as_deref(), Some(k));
        }
    }

    fn job_cache(key: &str) -> JobCache {
        JobCache {
            key: key.into(),
            fallbacks: vec![],
            paths: vec!["vendor/".into()],
            untracked: false,
            policy: Policy::PullPush,
            when: SaveWhen::OnSuccess,
        }
    }

    #[test]
    fn save_then_restore_and_a_damaged_archive_is_dropped_not_half_extracted() {
        let d = tempfile::tempdir().unwrap();
        let store = CacheStore::new(d.path().join("caches"));
        let w1 = d.path().join("w1");
        std::fs::create_dir_all(w1.join("vendor/lib")).unwrap();
        std::fs::write(w1.join("vendor/lib/a.rb"), "a").unwrap();
        std::fs::create_dir_all(w1.join("vendor/empty")).unwrap();
        let c = job_cache("k-protected");
        let notes = store.save(&c, &w1, &Tracked::default(), true).join("\n");
        assert!(notes.contains("Saved cache k-protected"), "{notes}");
        let w2 = d.path().join("w2");
        std::fs::create_dir_all(w2.join("vendor")).unwrap();
        std::fs::write(w2.join("vendor/old.txt"), "old").unwrap();
        let notes = store.restore(&c, &w2).join("\n");
        assert!(notes.contains("Successfully extracted"), "{notes}");
        assert_eq!(
            std::fs::read_to_string(w2.join("vendor/lib/a.rb")).unwrap(),
            "a"
        );
        assert!(w2.join("vendor/empty").is_dir());
        assert!(
            w2.join("vendor/old.txt").exists(),
            "restoring merges, as unzip does"
        );
        assert!(
            std::fs::read_dir(&w2)
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with(".rave-cache-"))
        );
        // Truncate the archive: dropped with a warning, nothing extracted.
        let archive = store.path("k-protected");
        let len = std::fs::metadata(&archive).unwrap().len();
        let f = std::fs::File::options().write(true).open(&archive).unwrap();
        f.set_len(len / 2).unwrap();
        let w3 = d.path().join("w3");
        std::fs::create_dir_all(&w3).unwrap();
        let notes = store.restore(&c, &w3).join("\n");
        assert!(notes.contains("damaged and was dropped"), "{notes}");
        assert!(!archive.exists());
        assert_eq!(
            std::fs::read_dir(&w3).unwrap().count(),
            0,
            "nothing half extracted"
        );
    }

    #[test]
    fn policy_when_fallbacks_and_lru_eviction() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("w");
        std::fs::create_dir_all(w.join("vendor")).unwrap();
        std::fs::write(w.join("vendor/x"), vec![7u8; 4096]).unwrap();
        let store = CacheStore::new(d.path().join("caches"));
        let mut pull = job_cache("a");
        pull.policy = Policy::Pull;
        assert!(store.save(&pull, &w, &Tracked::default(), true)[0].contains("due to policy"));
        let failed_only = JobCache {
            when: SaveWhen::OnFailure,
            ..job_cache("a")
        };
        assert!(
            store
                .save(&failed_only, &w, &Tracked::default(), true)
                .is_empty()
        );
        store.save(&job_cache("main"), &w, &Tracked::default(), true);
        let mut fb = job_cache("feature");
        fb.fallbacks = vec!["nope".into(), "main".into()];
        let notes = store.restore(&fb, &d.path().join("w2")).join("\n");
        assert!(notes.contains("Checking cache for main"), "{notes}");
        assert!(notes.contains("Successfully extracted"), "{notes}");
        // A cap that holds one archive: the least recently used goes.
        let one = std::fs::metadata(store.path("main")).unwrap().len();
        let small = CacheStore::new(d.path().join("caches")).with_max(one + one / 2);
        std::thread::sleep(Duration::from_millis(20));
        let notes = small
            .save(&job_cache("newer"), &w, &Tracked::default(), true)
            .join("\n");
        assert!(notes.contains("Removed 1 least recently used"), "{notes}");
        let keys: Vec<String> = small.list().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["newer"]);
        assert_eq!(small.clear(None), 1);
        assert!(small.list().is_empty());
    }
}
