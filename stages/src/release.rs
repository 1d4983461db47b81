//! Release manifests: every artifact with its size and sha256, signed; an in-toto / SLSA v1
//! provenance statement next to it; and verification that recomputes every digest.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::ReleaseError;
use crate::keys::{self, SigningKey};

pub const MANIFEST: &str = "release-manifest.json";
pub const PROVENANCE: &str = "provenance.intoto.json";

/// The signed release manifest: every artifact with its size, digest and the job that made
/// it. Written with its keys sorted (see [`canonical`]) so the same release has the same bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub project: String,
    pub tag: String,
    pub commit: String,
    pub pipeline: String,
    pub created_at: String,
    pub builder: Builder,
    pub key_id: String,
    pub artifacts: Vec<ManifestArtifact>,
    /// The scan summary of the pipeline (`rave scan`), when it had one.
    #[serde(default)]
    pub scan: Value,
    #[serde(default)]
    pub images: Vec<Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Builder {
    pub id: String,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestArtifact {
    pub name: String,
    /// Relative to the release directory.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub media_type: String,
    pub expire_in_days: u64,
    /// The job that made it.
    pub job: String,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest, ReleaseError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ReleaseError::Io(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| {
            ReleaseError::Io(format!("{} is not a release manifest: {e}", path.display()))
        })
    }
}

/// What the release is of.
#[derive(Clone, Debug, Default)]
pub struct ReleaseInfo {
    pub project: String,
    pub tag: String,
    pub commit: String,
    pub pipeline: String,
    pub job: String,
    /// RFC 3339; an input, so the same inputs give the same bytes.
    pub created_at: String,
    pub repository: String,
    /// sha256 of the pipeline definition file.
    pub pipeline_definition: Option<(String, String)>,
    pub scan_summary: Option<Value>,
    /// Files the pipeline included from outside the repository: (kind, location, resolved
    /// commit or `sha256:<hex>`).
    pub included: Vec<(String, String, String)>,
}

/// Hash a file without holding it in memory.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), size))
}

fn media_type(path: &str) -> &'static str {
    let lower = path.to_ascii_lowercase();
    let ends = |s: &str| lower.ends_with(s);
    if ends(".qcow2") {
        "application/x-qemu-disk"
    } else if ends(".tar.gz") || ends(".tgz") {
        "application/gzip"
    } else if ends(".tar") {
        "application/x-tar"
    } else if ends(".json") {
        "application/json"
    } else if ends(".sarif") {
        "application/sarif+json"
    } else if ends(".txt") || ends(".md") || ends("sums") {
        "text/plain"
    } else if ends(".img")
        || ends(".cpio")
        || ends(".cpio.gz")
        || ends("bzimage")
        || ends("vmlinuz")
    {
        "application/octet-stream; kind=vm-image"
    } else {
        "application/octet-stream"
    }
}

/// Every regular file under `dir`, relative, sorted (symlinks are refused, not followed).
pub fn list_files(dir: &Path) -> Result<Vec<String>, ReleaseError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d)
            .map_err(|e| ReleaseError::Io(format!("cannot list {}: {e}", d.display())))?;
        for e in rd.flatten() {
            let ft = e.file_type().map_err(|e| ReleaseError::Io(e.to_string()))?;
            let p = e.path();
            let rel = p
                .strip_prefix(dir)
                .unwrap_or(&p)
                .to_string_lossy()
                .replace('\\', "/");
            if ft.is_symlink() {
                return Err(ReleaseError::Io(format!(
                    "{rel} is a symlink; release artifacts must be regular files"
                )));
            } else if ft.is_dir() {
                stack.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Keys sorted at every level and no insignificant whitespace: the same manifest always has
/// the same bytes, so its signature and digest are stable.
pub fn canonical(v: &Value) -> Vec<u8> {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    let mut bytes = serde_json::to_vec(&sort(v)).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Build the manifest for the files under `dir`.
///
/// `producer` names the job that made a file (by digest) when the store knows it; otherwise
/// the release job is named.
pub fn manifest(
    info: &ReleaseInfo,
    dir: &Path,
    key_id: &str,
    expires_days: u64,
    producer: &dyn Fn(&str) -> Option<String>,
) -> Result<Manifest, ReleaseError> {
    let files: Vec<String> = list_files(dir)?
        .into_iter()
        .filter(|f| {
            ![MANIFEST, PROVENANCE]
                .iter()
                .any(|m| f == m || f == &format!("{m}.sig") || f == &format!("{m}.minisig"))
                && f != "allowed_signers"
                && f != "minisign.pub"
        })
        .collect();
    if files.is_empty() {
        return Err(ReleaseError::Io(format!(
            "{} holds no artifacts to release",
            dir.display()
        )));
    }
    let mut artifacts = Vec::new();
    for f in &files {
        let (sha, size) = sha256_file(&dir.join(f))
            .map_err(|e| ReleaseError::Io(format!("cannot read {f}: {e}")))?;
        artifacts.push(ManifestArtifact {
            name: f.rsplit('/').next().unwrap_or(f).to_string(),
            path: f.clone(),
            size,
            job: producer(&sha).unwrap_or_else(|| info.job.clone()),
            sha256: sha,
            media_type: media_type(f).to_string(),
            expire_in_days: expires_days,
        });
    }
    Ok(Manifest {
        schema: "https://rave.invalid/release-manifest/v1".into(),
        project: info.project.clone(),
        tag: info.tag.clone(),
        commit: info.commit.clone(),
        pipeline: info.pipeline.clone(),
        created_at: info.created_at.clone(),
        builder: Builder {
            id: "rave".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        key_id: key_id.to_string(),
        artifacts,
        scan: info.scan_summary.clone().unwrap_or(Value::Null),
        images: Vec::new(),
    })
}

/// An in-toto Statement v1 with a SLSA provenance v1 predicate for the manifest's artifacts.
pub fn provenance(info: &ReleaseInfo, manifest: &Manifest) -> Value {
    let subjects: Vec<Value> = manifest
        .artifacts
        .iter()
        .map(|a| json!({"name": a.path, "digest": {"sha256": a.sha256}}))
        .collect();
    let mut deps = vec![json!({
        "uri": format!("git+{}@refs/tags/{}", info.repository, info.tag),
        "digest": {"gitCommit": info.commit},
    })];
    if let Some((name, sha)) = &info.pipeline_definition {
        deps.push(json!({"uri": name, "digest": {"sha256": sha}}));
    }
    for (kind, location, resolved) in &info.included {
        let digest = match resolved.strip_prefix("sha256:") {
            Some(hex) => json!({"sha256": hex}),
            None => json!({"gitCommit": resolved}),
        };
        deps.push(json!({"uri": format!("include+{kind}:{location}"), "digest": digest}));
    }
    json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": subjects,
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": "https://rave.invalid/pipeline/v1",
                "externalParameters": {"tag": info.tag, "pipeline": info.pipeline},
                "internalParameters": {"job": info.job},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": format!("https://rave.invalid/builder/rave@{}", env!("CARGO_PKG_VERSION"))},
                "metadata": {"invocationId": format!("{}/{}", info.pipeline, info.job), "startedOn": info.created_at},
            },
        },
    })
}

/// Write manifest, provenance, their signatures and an allowed_signers file into `dir`.
pub fn write_release(
    info: &ReleaseInfo,
    dir: &Path,
    key: &SigningKey,
    expires_days: u64,
    producer: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<PathBuf>, ReleaseError> {
    let m = manifest(info, dir, &key.id(), expires_days, producer)?;
    let m_bytes = canonical(
        &serde_json::to_value(&m).map_err(|e| ReleaseError::Io(format!("manifest: {e}")))?,
    );
    let p_bytes = canonical(&provenance(info, &m));
    let mut written = Vec::new();
    for (name, bytes) in [(MANIFEST, &m_bytes), (PROVENANCE, &p_bytes)] {
        let path = dir.join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| ReleaseError::Io(format!("cannot write {}: {e}", path.display())))?;
        let sig = dir.join(format!("{name}.sig"));
        std::fs::write(&sig, key.sign(bytes)?).map_err(|e| ReleaseError::Io(e.to_string()))?;
        // The same key's signature in minisign's format, for `minisign -V`.
        let minisig = dir.join(format!("{name}.minisig"));
        let trusted = format!("rave release {} {name}", info.tag);
        std::fs::write(&minisig, key.sign_minisign(bytes, &trusted)?)
            .map_err(|e| ReleaseError::Io(e.to_string()))?;
        written.push(path);
        written.push(sig);
        written.push(minisig);
    }
    let minisign_pub = dir.join("minisign.pub");
    std::fs::write(&minisign_pub, key.minisign_public()?)
        .map_err(|e| ReleaseError::Io(e.to_string()))?;
    written.push(minisign_pub);
    let allowed = dir.join("allowed_signers");
    std::fs::write(&allowed, keys::allowed_signers_line(&key.public())?)
        .map_err(|e| ReleaseError::Io(e.to_string()))?;
    written.push(allowed);
    Ok(written)
}

/// Check a manifest's signature, then every artifact's size and digest under `artifacts`.
/// Returns the verified manifest and the signing key id.
pub fn verify(
    manifest_path: &Path,
    trusted: &keys::Trusted,
    artifacts: &Path,
) -> Result<(Manifest, String), ReleaseError> {
    let bytes = std::fs::read(manifest_path)
        .map_err(|e| ReleaseError::Io(format!("cannot read {}: {e}", manifest_path.display())))?;
    let ext = match trusted {
        keys::Trusted::Ssh(_) => "sig",
        keys::Trusted::Minisign(_) => "minisig",
    };
    let sig_path = PathBuf::from(format!("{}.{ext}", manifest_path.display()));
    let sig = std::fs::read_to_string(&sig_path).map_err(|e| {
        ReleaseError::Signature(format!(
            "cannot read the signature {}: {e}",
            sig_path.display()
        ))
    })?;
    let key_id = match trusted {
        keys::Trusted::Ssh(keys) => keys::verify(&bytes, &sig, keys)?,
        keys::Trusted::Minisign(key) => keys::verify_minisign(&bytes, &sig, key)?,
    };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| ReleaseError::Io(format!("the manifest is not a release manifest: {e}")))?;
    let mut problems = Vec::new();
    for a in &m.artifacts {
        let rel = a.path.as_str();
        if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
            problems.push(format!("{rel}: path leaves the artifact directory"));
            continue;
        }
        let path = artifacts.join(rel);
        match sha256_file(&path) {
            Ok((sha, size)) => {
                if sha != a.sha256 || size != a.size {
                    problems.push(format!(
                        "{rel}: sha256 {sha} ({size} bytes) does not match the manifest's {} ({} bytes)",
                        a.sha256, a.size
                    ));
                }
            }
            Err(e) => problems.push(format!("{rel}: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(ReleaseError::Digest(problems.join("\n")));
    }
    Ok((m, key_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_is_stable() {
        let a = json!({"b": 1, "a": {"d": [1, {"z": 0, "y": 1}], "c": "x"}});
        let b: Value =
            serde_json::from_str(r#"{"a": {"c": "x", "d": [1, {"y": 1, "z": 0}]}, "b": 1}"#)
                .unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(
            String::from_utf8(canonical(&a)).unwrap(),
            "{\"a\":{\"c\":\"x\",\"d\":[1,{\"y\":1,\"z\":0}]},\"b\":1}\n"
        );
    }

    #[test]
    fn provenance_lists_included_files_pinned() {
        let info = ReleaseInfo {
            tag: "v1".into(),
            commit: "abc".into(),
            included: vec![
                (
                    "project".into(),
                    "ci/templates@main:build.yml".into(),
                    "1".repeat(40),
                ),
                (
                    "remote".into(),
                    "https://x.example/ci.yml".into(),
                    "sha256:ab12".into(),
                ),
            ],
            ..Default::default()
        };
        let m = Manifest {
            schema: String::new(),
            project: String::new(),
            tag: "v1".into(),
            commit: "abc".into(),
            pipeline: String::new(),
            created_at: String::new(),
            builder: Builder {
                id: "rave".into(),
                version: "0".into(),
            },
            key_id: String::new(),
            artifacts: Vec::new(),
            scan: Value::Null,
            images: Vec::new(),
        };
        let p = provenance(&info, &m);
        let deps = p["predicate"]["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap();
        assert!(deps.iter().any(
            |d| d["uri"] == "include+project:ci/templates@main:build.yml"
                && d["digest"]["gitCommit"] == "1".repeat(40)
        ));
        assert!(
            deps.iter()
                .any(|d| d["uri"] == "include+remote:https://x.example/ci.yml"
                    && d["digest"]["sha256"] == "ab12")
        );
    }

    #[test]
    fn sign_write_and_verify_round_trip() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("bin/app"), b"binary").unwrap();
        let key = SigningKey::generate().unwrap();
        let info = ReleaseInfo {
            tag: "v1".into(),
            commit: "abc".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        };
        write_release(&info, d.path(), &key, 365, &|_| None).unwrap();
        let first = std::fs::read(d.path().join(MANIFEST)).unwrap();
        // Same inputs, same bytes.
        write_release(&info, d.path(), &key, 365, &|_| None).unwrap();
        assert_eq!(first, std::fs::read(d.path().join(MANIFEST)).unwrap());
        let (m, id) = verify(
            &d.path().join(MANIFEST),
            &keys::Trusted::Ssh(vec![key.public()]),
            d.path(),
        )
        .unwrap();
        assert_eq!(id, key.id());
        assert_eq!(m.artifacts[0].path, "bin/app");
        std::fs::write(d.path().join("bin/app"), b"binarY").unwrap();
        let e = verify(
            &d.path().join(MANIFEST),
            &keys::Trusted::Ssh(vec![key.public()]),
            d.path(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("bin/app: sha256"), "{e}");
        let other = SigningKey::generate().unwrap();
        assert!(
            verify(
                &d.path().join(MANIFEST),
                &keys::Trusted::Ssh(vec![other.public()]),
                d.path()
            )
            .is_err()
        );
        // The minisign signature of the same key verifies; another key's does not.
        std::fs::write(d.path().join("bin/app"), b"binary").unwrap();
        let mpub = d.path().join("minisign.pub");
        let (_, mid) = verify(
            &d.path().join(MANIFEST),
            &keys::read_trusted(&mpub).unwrap(),
            d.path(),
        )
        .unwrap();
        assert!(mid.starts_with("minisign:"), "{mid}");
        std::fs::write(&mpub, other.minisign_public().unwrap()).unwrap();
        let e = verify(
            &d.path().join(MANIFEST),
            &keys::read_trusted(&mpub).unwrap(),
            d.path(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("minisign signature does not match"),
            "{e}"
        );
        assert!(
            !format!("{key:?}").contains("BEGIN"),
            "Debug must not print the key"
        );
    }
}
