//! Reuse of unchanged jobs (opt-in, beyond GitLab): a job that sets `RAVE_REUSE: "1"` is not
//! run again when nothing it depends on changed since its last successful run.
//!
//! What a job depends on is its *inputs*, each hashed on its own so a miss can say what
//! changed: its script lines (`before_script`, `script`, `after_script`), its image, its
//! variables (minus the ones that change every run: pipeline and job ids, commit ids and
//! messages, timestamps, directories, rave's own `RAVE_*`), the project files it reads
//! (`RAVE_INPUTS: "src/**,Cargo.lock"`, default all of them; a tracked file unmodified in git
//! is known by its blob id without reading it), and the digests of the artifacts it receives.
//! The input digest is the hash of all of these.
//!
//! After a successful run the job's record (digest, inputs, where its artifacts are, its
//! dotenv) is kept per project under `<state>/reuse/`. A later run with the same digest copies
//! the artifacts and dotenv from there and reports the job `success`, `reused_from` the
//! earlier pipeline, without running it. Jobs with `environment:`, `when: manual` or a
//! `rave release` in their script are never reused unless the job says `RAVE_REUSE: always`.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// What the job asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    On,
    /// Even for deployments, releases and manual jobs.
    Always,
}

pub fn mode(vars: &indexmap::IndexMap<String, String>) -> Mode {
    match vars
        .get("RAVE_REUSE")
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("1" | "true" | "yes" | "on") => Mode::On,
        Some("always") => Mode::Always,
        _ => Mode::Off,
    }
}

/// Why a job that opted in may still never be reused.
pub fn refusal(j: &rave_plan::JobInstance) -> Option<&'static str> {
    if j.job.environment.is_some() {
        Some("it deploys to an environment")
    } else if j.when == rave_model::When::Manual {
        Some("it is a manual job")
    } else if j
        .job
        .script
        .iter()
        .chain(&j.job.before_script)
        .any(|l| l.contains("rave release"))
    {
        Some("it makes a release")
    } else {
        None
    }
}

/// Variables that differ on every run without changing what a job does.
const PER_RUN: &[&str] = &[
    "CI_PIPELINE_ID",
    "CI_PIPELINE_IID",
    "CI_PIPELINE_URL",
    "CI_PIPELINE_CREATED_AT",
    "CI_PIPELINE_SOURCE",
    "CI_JOB_ID",
    "CI_JOB_URL",
    "CI_JOB_STARTED_AT",
    "CI_JOB_TOKEN",
    "CI_COMMIT_SHA",
    "CI_COMMIT_SHORT_SHA",
    "CI_COMMIT_BEFORE_SHA",
    "CI_COMMIT_MESSAGE",
    "CI_COMMIT_TITLE",
    "CI_COMMIT_DESCRIPTION",
    "CI_COMMIT_TIMESTAMP",
    "CI_COMMIT_AUTHOR",
    "CI_PROJECT_DIR",
    "CI_BUILDS_DIR",
    "CI_CONCURRENT_ID",
    "CI_CONCURRENT_PROJECT_ID",
];

fn sha(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn file_sha(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The inputs of a job, each hashed: `script`, `image`, `var:NAME`, `file:PATH`,
/// `artifacts:JOB`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs(pub BTreeMap<String, String>);

impl Inputs {
    pub fn digest(&self) -> String {
        let mut h = sha2::Sha256::new();
        for (k, v) in &self.0 {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([b'\n']);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What differs from `old`, one line per input, at most `limit` lines.
    pub fn changes_since(&self, old: &Inputs, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut n = 0;
        let mut say = |s: String| {
            n += 1;
            if out.len() < limit {
                out.push(s);
            }
        };
        for (k, v) in &self.0 {
            match old.0.get(k) {
                None => say(format!("{} added", describe(k))),
                Some(o) if o != v => say(format!("{} changed", describe(k))),
                _ => {}
            }
        }
        for k in old.0.keys().filter(|k| !self.0.contains_key(*k)) {
            say(format!("{} removed", describe(k)));
        }
        if n > out.len() {
            out.push(format!("… and {} more", n - out.len()));
        }
        out
    }
}

fn describe(key: &str) -> String {
    match key.split_once(':') {
        Some(("var", name)) => format!("variable {name}"),
        Some(("file", path)) => format!("file {path}"),
        Some(("artifacts", job)) => format!("artifacts of {job}"),
        _ => key.to_string(),
    }
}

/// What a job's inputs are made of, gathered by the scheduler.
pub struct Sources<'a> {
    pub job: &'a rave_plan::JobInstance,
    /// The run's snapshot, and git's blob ids for unmodified tracked files.
    pub snapshot: &'a Path,
    pub files: &'a [String],
    pub blob_ids: &'a HashMap<String, String>,
    /// `(job name, artifacts digest)` of each job whose artifacts it receives.
    pub artifacts: Vec<(String, String)>,
}

pub fn inputs(s: &Sources) -> Result<Inputs, String> {
    let j = s.job;
    let mut m = BTreeMap::new();
    let after = "--after_script--".to_string();
    let script: Vec<&String> = j
        .job
        .before_script
        .iter()
        .chain(&j.job.script)
        .chain(std::iter::once(&after))
        .chain(&j.job.after_script)
        .collect();
    m.insert(
        "script".to_string(),
        sha(serde_json::to_string(&script)
            .unwrap_or_default()
            .as_bytes()),
    );
    if let Some(img) = &j.job.image {
        m.insert("image".to_string(), img.name.clone());
    }
    for (k, v) in &j.variables {
        if PER_RUN.contains(&k.as_str()) || k.starts_with("RAVE_") && k != "RAVE_INPUTS" {
            continue;
        }
        m.insert(format!("var:{k}"), sha(v.as_bytes()));
    }
    let globs = match j
        .variables
        .get("RAVE_INPUTS")
        .filter(|v| !v.trim().is_empty())
    {
        Some(list) => {
            let mut b = globset::GlobSetBuilder::new();
            for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                b.add(
                    globset::Glob::new(p)
                        .map_err(|e| format!("RAVE_INPUTS: bad pattern `{p}`: {e}"))?,
                );
            }
            Some(b.build().map_err(|e| e.to_string())?)
        }
        None => None,
    };
    for f in s.files {
        if globs.as_ref().is_some_and(|g| !g.is_match(f)) {
            continue;
        }
        let id = match s.blob_ids.get(f) {
            Some(id) => format!("blob:{id}"),
            None => {
                let p = s.snapshot.join(f);
                match p.symlink_metadata() {
                    Ok(m) if m.file_type().is_symlink() => format!(
                        "link:{}",
                        std::fs::read_link(&p)
                            .map(|t| t.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    ),
                    Ok(_) => file_sha(&p).map_err(|e| format!("cannot read {f}: {e}"))?,
                    Err(_) => continue,
                }
            }
        };
        m.insert(format!("file:{f}"), id);
    }
    for (job, digest) in &s.artifacts {
        m.insert(format!("artifacts:{job}"), digest.clone());
    }
    Ok(Inputs(m))
}

/// A digest of a job's saved artifacts (`none` when it saved none).
pub fn artifacts_digest(dir: &Path) -> String {
    let mut entries = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(dir)
                .map(|r| r.to_string_lossy().into_owned())
                .unwrap_or_default();
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    entries.push((rel, "dir".to_string()));
                    stack.push(p);
                }
                Ok(t) if t.is_symlink() => entries.push((
                    rel,
                    std::fs::read_link(&p)
                        .map(|t| format!("link:{}", t.display()))
                        .unwrap_or_default(),
                )),
                Ok(_) => entries.push((rel, file_sha(&p).unwrap_or_default())),
                Err(_) => {}
            }
        }
    }
    if entries.is_empty() {
        return "none".into();
    }
    entries.sort();
    sha(serde_json::to_string(&entries)
        .unwrap_or_default()
        .as_bytes())
}

/// A successful run of a job, kept for later runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub digest: String,
    pub inputs: Inputs,
    pub pipeline_id: u64,
    /// Where that run kept the job's artifacts (None: it saved none).
    pub artifacts: Option<PathBuf>,
    pub artifacts_digest: String,
    #[serde(default)]
    pub dotenv: HashMap<String, String>,
}

/// The records of one project.
pub struct ReuseStore {
    dir: PathBuf,
}

impl ReuseStore {
    pub fn new(dir: PathBuf) -> ReuseStore {
        ReuseStore { dir }
    }

    fn path(&self, job: &str) -> PathBuf {
        self.dir
            .join(format!("{}.json", crate::builds::dir_name(job)))
    }

    pub fn load(&self, job: &str) -> Option<Record> {
        serde_json::from_slice(&std::fs::read(self.path(job)).ok()?).ok()
    }

    pub fn save(&self, job: &str, r: &Record) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        crate::snapshot::write_atomic(
            &self.path(job),
            &serde_json::to_vec(r).map_err(|e| e.to_string())?,
        )
    }
}

/// The reuse decision for a job, in its record and `--explain`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub digest: String,
    /// The pipeline whose result was reused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<u64>,
    /// Why it was not reused: what changed, or why it never is.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
}

/// Decide from the job's current inputs and its last record.
pub fn decide(inputs: &Inputs, last: Option<&Record>) -> Decision {
    let digest = inputs.digest();
    match last {
        None => Decision {
            digest,
            reused_from: None,
            changed: vec!["no earlier successful run recorded".into()],
        },
        Some(r) if r.digest == digest => {
            if r.artifacts.as_ref().is_some_and(|a| !a.is_dir()) {
                return Decision {
                    digest,
                    reused_from: None,
                    changed: vec![format!(
                        "the artifacts of pipeline {} are gone",
                        r.pipeline_id
                    )],
                };
            }
            Decision {
                digest,
                reused_from: Some(r.pipeline_id),
                changed: Vec::new(),
            }
        }
        Some(r) => Decision {
            digest,
            reused_from: None,
            changed: inputs.changes_since(&r.inputs, 20),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(pairs: &[(&str, &str)]) -> Inputs {
        Inputs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_miss_names_what_changed() {
        let old = inputs(&[("script", "a"), ("file:src/a.rs", "1"), ("var:MODE", "x")]);
        let new = inputs(&[
            ("script", "a"),
            ("file:src/a.rs", "2"),
            ("file:src/b.rs", "3"),
        ]);
        assert_eq!(
            new.changes_since(&old, 10),
            [
                "file src/a.rs changed",
                "file src/b.rs added",
                "variable MODE removed"
            ]
        );
        assert_eq!(new.changes_since(&old, 1)[1], "… and 2 more");
        let rec = Record {
            digest: old.digest(),
            inputs: old.clone(),
            pipeline_id: 4,
            artifacts: None,
            artifacts_digest: "none".into(),
            dotenv: HashMap::new(),
        };
        assert_eq!(decide(&old, Some(&rec)).reused_from, Some(4));
        assert_eq!(decide(&new, Some(&rec)).reused_from, None);
        assert_ne!(old.digest(), new.digest());
    }

    #[test]
    fn artifact_digests_follow_content_and_names() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(artifacts_digest(&d.path().join("missing")), "none");
        std::fs::create_dir_all(d.path().join("a/out")).unwrap();
        std::fs::write(d.path().join("a/out/x"), "1").unwrap();
        let one = artifacts_digest(&d.path().join("a"));
        std::fs::write(d.path().join("a/out/x"), "2").unwrap();
        let two = artifacts_digest(&d.path().join("a"));
        assert_ne!(one, two);
        std::fs::rename(d.path().join("a/out/x"), d.path().join("a/out/y")).unwrap();
        assert_ne!(two, artifacts_digest(&d.path().join("a")));
    }
}
