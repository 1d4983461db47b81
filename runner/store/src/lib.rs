//! rave's artifact store: files addressed by sha256 under the data dir, an index of which
//! pipeline job produced what and until when it is kept, published releases, and garbage
//! collection that never deletes what a live release references.
//!
//! Layout under the data dir:
//!
//! ```text
//! blobs/sha256/ab/cdef…          content, written once (same content = same file)
//! index/<pipeline>/<job>.json    [{path, sha256, size, expires_at}] for one job's artifacts
//! releases/<tag>/                release-manifest.json (+ .sig), provenance, allowed_signers
//! ```
//!
//! Writes go to a temporary file in the same directory and are renamed into place, so a crash
//! never leaves a half-written blob under its final name. Files are streamed, never held whole.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// A release of this tag is already published, with other content.
    #[error("{0}")]
    ReleaseExists(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// One stored artifact file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub sha256: String,
    pub size: u64,
    /// Unix seconds after which the entry may be collected; None = never.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Default, PartialEq)]
pub struct GcReport {
    pub expired_entries: usize,
    pub deleted_blobs: usize,
    pub deleted_bytes: u64,
    pub kept_for_releases: usize,
}

pub struct Store {
    root: PathBuf,
}

/// Default lifetime of artifacts without `expire_in`: VM images 7 days, everything else 30.
pub fn default_expiry_days(path: &str) -> u64 {
    let p = path.to_ascii_lowercase();
    let vm = [
        ".qcow2",
        ".img",
        ".iso",
        ".vmdk",
        "bzimage",
        "vmlinuz",
        "initrd",
        "initramfs",
    ];
    if vm
        .iter()
        .any(|x| p.ends_with(x) || p.contains(&format!("{x}.")) || p.contains("/result/"))
    {
        7
    } else {
        30
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn valid_sha(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Names used as directories (pipeline ids, job slugs, tags) must stay one path component.
fn safe_component(s: &str) -> Result<&str, StoreError> {
    if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "`{s}` cannot be used as a name in the store"
        )));
    }
    Ok(s)
}

impl Store {
    pub fn open(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, sha: &str) -> Option<PathBuf> {
        valid_sha(sha).then(|| {
            self.root
                .join("blobs/sha256")
                .join(&sha[..2])
                .join(&sha[2..])
        })
    }

    /// Copy a file into the store; returns its digest and size.
    pub fn put_file(&self, src: &Path) -> Result<(String, u64), StoreError> {
        let tmp_dir = self.root.join("blobs/tmp");
        std::fs::create_dir_all(&tmp_dir)
            .map_err(io(format!("cannot create {}", tmp_dir.display())))?;
        let tmp = tmp_dir.join(format!("{}-{}", std::process::id(), now_nanos()));
        let mut input =
            std::fs::File::open(src).map_err(io(format!("cannot read {}", src.display())))?;
        let mut out =
            std::fs::File::create(&tmp).map_err(io(format!("cannot write {}", tmp.display())))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = input
                .read(&mut buf)
                .map_err(io(format!("cannot read {}", src.display())))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io(format!("cannot write {} (disk full?)", tmp.display())))?;
            size += n as u64;
        }
        out.sync_all().map_err(io("cannot flush a blob"))?;
        let sha = hex::encode(h.finalize());
        let dest = self
            .blob_path(&sha)
            .ok_or_else(|| StoreError::Invalid("bad digest".into()))?;
        if dest.exists() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(io(format!("cannot create {}", dir.display())))?;
            }
            std::fs::rename(&tmp, &dest).map_err(io(format!("cannot store {}", dest.display())))?;
        }
        Ok((sha, size))
    }

    /// Record one job's artifacts (all files under `dir`) with their expiry.
    pub fn ingest_dir(
        &self,
        pipeline: &str,
        job: &str,
        dir: &Path,
        expires_at: &dyn Fn(&str) -> Option<u64>,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let rd = std::fs::read_dir(&d).map_err(io(format!("cannot list {}", d.display())))?;
            for e in rd.flatten() {
                let p = e.path();
                let ft = e.file_type().map_err(io("cannot stat"))?;
                if ft.is_dir() {
                    stack.push(p);
                } else if ft.is_file() {
                    let (sha256, size) = self.put_file(&p)?;
                    let path = p
                        .strip_prefix(dir)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .replace('\\', "/");
                    let expires_at = expires_at(&path);
                    entries.push(Entry {
                        path,
                        sha256,
                        size,
                        expires_at,
                    });
                }
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let idx = self.root.join("index").join(safe_component(pipeline)?);
        std::fs::create_dir_all(&idx).map_err(io(format!("cannot create {}", idx.display())))?;
        write_atomic(
            &idx.join(format!("{}.json", safe_component(job)?)),
            &serde_json::to_vec_pretty(&entries).unwrap_or_default(),
        )?;
        Ok(entries)
    }

    /// The job (index file name, e.g. `001-build`) of `pipeline` that stored a file with this
    /// digest, if any.
    pub fn producer(&self, pipeline: &str, sha256: &str) -> Option<String> {
        let dir = self.root.join("index").join(safe_component(pipeline).ok()?);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        files.into_iter().find_map(|f| {
            let entries: Vec<Entry> =
                serde_json::from_str(&std::fs::read_to_string(&f).ok()?).ok()?;
            entries
                .iter()
                .any(|e| e.sha256 == sha256)
                .then(|| f.file_stem().map(|s| s.to_string_lossy().to_string()))
                .flatten()
        })
    }

    /// Publish a release: its metadata files are copied under `releases/<tag>/`, its artifacts
    /// go into the blob store. A published release is immutable: publishing the same tag again
    /// with another manifest fails, unless `replace` is given; then the old release is kept
    /// under `releases/.replaced/<tag>/<time>/` and the replacement is recorded in
    /// `releases/<tag>/replaced.log`. Publishing the identical manifest again is a no-op.
    pub fn publish_release(
        &self,
        tag: &str,
        meta_files: &[PathBuf],
        artifacts: &[PathBuf],
        replace: bool,
    ) -> Result<PathBuf, StoreError> {
        let dir = self.root.join("releases").join(safe_component(tag)?);
        let manifest_name = "release-manifest.json";
        let new_manifest = meta_files
            .iter()
            .find(|f| f.file_name().is_some_and(|n| n == manifest_name))
            .map(|f| std::fs::read(f).map_err(io(format!("cannot read {}", f.display()))))
            .transpose()?;
        let old_manifest = std::fs::read(dir.join(manifest_name)).ok();
        let mut record = None;
        if let (Some(old), Some(new)) = (&old_manifest, &new_manifest)
            && old != new
        {
            let (old_sha, new_sha) = (hex_sha256(old), hex_sha256(new));
            if !replace {
                return Err(StoreError::ReleaseExists(format!(
                    "release {tag} is already published (manifest sha256 {old_sha}) and a published release is immutable; this one differs (sha256 {new_sha}). Tag a new version, or replace it on purpose with `rave release create --replace` (RAVE_RELEASE_REPLACE=1), which keeps the old one and records the replacement"
                )));
            }
            let when = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .to_string();
            let keep = self
                .root
                .join("releases")
                .join(".replaced")
                .join(safe_component(tag)?)
                .join(&when);
            std::fs::create_dir_all(keep.parent().unwrap_or(&keep))
                .map_err(io(format!("cannot create {}", keep.display())))?;
            std::fs::rename(&dir, &keep)
                .map_err(io(format!("cannot move {} aside", dir.display())))?;
            let log = std::fs::read_to_string(keep.join("replaced.log")).unwrap_or_default();
            record = Some(format!(
                "{log}unix time {when}: replaced manifest sha256 {old_sha} with {new_sha}; the old release is in {}\n",
                keep.display()
            ));
        }
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        for a in artifacts {
            self.put_file(a)?;
        }
        for f in meta_files {
            let name = f
                .file_name()
                .ok_or_else(|| StoreError::Invalid(format!("{} has no file name", f.display())))?;
            let bytes = std::fs::read(f).map_err(io(format!("cannot read {}", f.display())))?;
            write_atomic(&dir.join(name), &bytes)?;
        }
        if let Some(r) = record {
            write_atomic(&dir.join("replaced.log"), r.as_bytes())?;
        }
        Ok(dir)
    }

    /// Tags of published releases, sorted.
    pub fn releases(&self) -> Vec<String> {
        let mut tags: Vec<String> = std::fs::read_dir(self.root.join("releases"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    // `.replaced/` keeps releases that were replaced on purpose.
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        tags.sort();
        tags
    }

    pub fn release_dir(&self, tag: &str) -> Option<PathBuf> {
        let d = self.root.join("releases").join(safe_component(tag).ok()?);
        d.is_dir().then_some(d)
    }

    /// Digests a live release references: (sha256s, whether the release is still kept).
    fn release_refs(&self, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        for tag in self.releases() {
            let Some(dir) = self.release_dir(&tag) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(dir.join("release-manifest.json")) else {
                continue;
            };
            let Ok(m) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let created = m["created_at"]
                .as_str()
                .and_then(parse_rfc3339_secs)
                .unwrap_or(now);
            for a in m["artifacts"].as_array().into_iter().flatten() {
                let days = a["expire_in_days"].as_u64().unwrap_or(365);
                if created.saturating_add(days * 86_400) >= now
                    && let Some(s) = a["sha256"].as_str()
                {
                    out.push(s.to_string());
                }
            }
        }
        out
    }

    /// Drop expired index entries, then delete blobs nothing live refers to.
    pub fn gc(&self, now: u64) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let mut live: std::collections::HashSet<String> = std::collections::HashSet::new();
        let index = self.root.join("index");
        for p in std::fs::read_dir(&index)
            .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            for f in std::fs::read_dir(&p)
                .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
            {
                let Ok(text) = std::fs::read_to_string(&f) else {
                    continue;
                };
                let Ok(entries) = serde_json::from_str::<Vec<Entry>>(&text) else {
                    continue;
                };
                let (keep, gone): (Vec<Entry>, Vec<Entry>) = entries
                    .into_iter()
                    .partition(|e| e.expires_at.is_none_or(|t| t >= now));
                report.expired_entries += gone.len();
                if !gone.is_empty() {
                    if keep.is_empty() {
                        let _ = std::fs::remove_file(&f);
                    } else {
                        write_atomic(&f, &serde_json::to_vec_pretty(&keep).unwrap_or_default())?;
                    }
                }
                live.extend(keep.into_iter().map(|e| e.sha256));
            }
        }
        let release_refs = self.release_refs(now);
        let blobs = self.root.join("blobs/sha256");
        for d in std::fs::read_dir(&blobs)
            .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let prefix = d
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            for b in std::fs::read_dir(&d)
                .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
            {
                let sha = format!(
                    "{prefix}{}",
                    b.file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default()
                );
                if release_refs.contains(&sha) {
                    if !live.contains(&sha) {
                        report.kept_for_releases += 1;
                    }
                    continue;
                }
                if !live.contains(&sha) {
                    let size = b.metadata().map(|m| m.len()).unwrap_or(0);
                    std::fs::remove_file(&b)
                        .map_err(io(format!("cannot delete {}", b.display())))?;
                    report.deleted_blobs += 1;
                    report.deleted_bytes += size;
                }
            }
        }
        Ok(report)
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).map_err(io(format!("cannot write {}", tmp.display())))?;
    f.write_all(bytes)
        .map_err(io(format!("cannot write {} (disk full?)", tmp.display())))?;
    f.sync_all().map_err(io("cannot flush"))?;
    std::fs::rename(&tmp, path).map_err(io(format!("cannot replace {}", path.display())))
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-11-22T00:00:00Z`, optional fraction).
pub fn parse_rfc3339_secs(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_secs("2026-11-22T00:00:00.123Z"),
            Some(1_795_305_600)
        );
        assert_eq!(parse_rfc3339_secs("garbage"), None);
    }

    #[test]
    fn content_addressed_dedup_expiry_and_release_protection() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("data"));
        let a = d.path().join("a");
        std::fs::create_dir_all(a.join("sub")).unwrap();
        std::fs::write(a.join("x.bin"), b"same").unwrap();
        std::fs::write(a.join("sub/y.bin"), b"same").unwrap();
        std::fs::write(a.join("z.bin"), b"other").unwrap();
        let e = s.ingest_dir("1", "001-build", &a, &|_| Some(1000)).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].sha256, e[1].sha256, "same content, same blob");
        let blobs = std::fs::read_dir(d.path().join("data/blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(blobs, 2);
        // A release referencing z.bin's blob, kept a year from its creation.
        let rel = d.path().join("rel");
        std::fs::create_dir_all(&rel).unwrap();
        let m = serde_json::json!({"created_at": "1970-01-01T00:00:00Z", "artifacts": [{"sha256": e[2].sha256, "expire_in_days": 365}]});
        std::fs::write(rel.join("release-manifest.json"), m.to_string()).unwrap();
        s.publish_release("v1", &[rel.join("release-manifest.json")], &[], false)
            .unwrap();
        // Before expiry nothing goes.
        assert_eq!(s.gc(999).unwrap().deleted_blobs, 0);
        // After the artifacts expire, only the blob no release holds is deleted.
        let r = s.gc(5000).unwrap();
        assert_eq!(
            (r.expired_entries, r.deleted_blobs, r.kept_for_releases),
            (3, 1, 1)
        );
        assert!(s.blob_path(&e[2].sha256).unwrap().exists());
        assert!(!s.blob_path(&e[0].sha256).unwrap().exists());
        // After the release's year, it goes too.
        assert_eq!(s.gc(366 * 86_400).unwrap().deleted_blobs, 1);
        assert_eq!(s.releases(), ["v1"]);
        assert!(s.publish_release("../evil", &[], &[], false).is_err());
    }

    #[test]
    fn a_published_release_is_immutable_unless_replaced_on_purpose() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("data"));
        let rel = d.path().join("rel");
        std::fs::create_dir_all(&rel).unwrap();
        let manifest = rel.join("release-manifest.json");
        std::fs::write(&manifest, r#"{"v": 1}"#).unwrap();
        s.publish_release("v1", std::slice::from_ref(&manifest), &[], false)
            .unwrap();
        // The same manifest again: a no-op.
        s.publish_release("v1", std::slice::from_ref(&manifest), &[], false)
            .unwrap();
        std::fs::write(&manifest, r#"{"v": 2}"#).unwrap();
        let e = s
            .publish_release("v1", std::slice::from_ref(&manifest), &[], false)
            .unwrap_err();
        assert!(e.to_string().contains("immutable"), "{e}");
        let dir = s.release_dir("v1").unwrap();
        let kept = std::fs::read_to_string(dir.join("release-manifest.json")).unwrap();
        assert_eq!(kept, r#"{"v": 1}"#);
        s.publish_release("v1", std::slice::from_ref(&manifest), &[], true)
            .unwrap();
        let now = std::fs::read_to_string(dir.join("release-manifest.json")).unwrap();
        assert_eq!(now, r#"{"v": 2}"#);
        let log = std::fs::read_to_string(dir.join("replaced.log")).unwrap();
        assert!(log.contains("replaced manifest sha256"), "{log}");
        assert_eq!(s.releases(), ["v1"]);
    }
}
