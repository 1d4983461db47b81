//! `npm audit --json`: the npm 7+ `vulnerabilities` report and the older `advisories` one.

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

fn advisory_id(url: Option<&str>, source: Option<&Value>) -> String {
    // GHSA ids are what people allowlist; the numeric source id is the fallback.
    url.and_then(|u| u.rsplit('/').next())
        .filter(|t| t.starts_with("GHSA-"))
        .map(str::to_string)
        .or_else(|| source.map(|v| format!("npm-{v}")))
        .unwrap_or_else(|| "npm-advisory".into())
}

pub fn parse(json: &str) -> Result<Vec<Finding>, ScanError> {
    let v: Value = serde_json::from_str(json).map_err(|e| ScanError::Unparseable {
        tool: "npm-audit",
        detail: e.to_string(),
    })?;
    if let Some(err) = v.get("error") {
        // npm puts the cause in different places by version: `error.code`/`summary`
        // (npm 7-10), `error.detail`, or a top-level `message` with an empty `error` (npm 11).
        let parts: Vec<String> = [
            s(err, "code"),
            s(err, "summary"),
            s(err, "detail"),
            s(&v, "message"),
        ]
        .into_iter()
        .flatten()
        .collect();
        return Err(ScanError::Failed {
            tool: "npm-audit",
            detail: if parts.is_empty() {
                "npm audit reported an error without saying which".into()
            } else {
                parts.join(": ")
            },
            fix: "npm audit needs a package-lock.json and a registry that answers advisory requests (rave scan --npm-registry URL)",
        });
    }
    let mut out = Vec::new();
    if let Some(vulns) = v.get("vulnerabilities").and_then(Value::as_object) {
        for (pkg, entry) in vulns {
            let fixed = match entry.get("fixAvailable") {
                Some(Value::Object(o)) if o.get("name").and_then(Value::as_str) == Some(pkg) => {
                    o.get("version").and_then(Value::as_str).map(str::to_string)
                }
                _ => None,
            };
            let target = entry
                .get("nodes")
                .and_then(Value::as_array)
                .and_then(|n| n.first())
                .and_then(Value::as_str)
                .map(str::to_string);
            for via in entry
                .get("via")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                // A string `via` names another package whose own entry carries the advisory.
                if !via.is_object() {
                    continue;
                }
                let url = s(via, "url");
                out.push(Finding {
                    tool: Tool::NpmAudit,
                    id: advisory_id(url.as_deref(), via.get("source")),
                    title: s(via, "title").unwrap_or_default(),
                    severity: via
                        .get("severity")
                        .and_then(Value::as_str)
                        .and_then(Severity::parse)
                        .unwrap_or(Severity::Unknown),
                    package: Some(pkg.clone()),
                    installed_version: s(via, "range").map(|r| format!("in {r}")),
                    fixed_version: fixed.clone(),
                    target: target.clone(),
                    line: None,
                    link: url,
                });
            }
        }
        return Ok(out);
    }
    if let Some(advs) = v.get("advisories").and_then(Value::as_object) {
        for adv in advs.values() {
            let url = s(adv, "url");
            let versions: Vec<String> = adv
                .get("findings")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|f| s(f, "version"))
                .collect();
            out.push(Finding {
                tool: Tool::NpmAudit,
                id: advisory_id(url.as_deref(), adv.get("id")),
                title: s(adv, "title").unwrap_or_default(),
                severity: adv
                    .get("severity")
                    .and_then(Value::as_str)
                    .and_then(Severity::parse)
                    .unwrap_or(Severity::Unknown),
                package: s(adv, "module_name"),
                installed_version: (!versions.is_empty()).then(|| versions.join(", ")),
                fixed_version: s(adv, "patched_versions"),
                target: Some("package-lock.json".into()),
                line: None,
                link: url,
            });
        }
        return Ok(out);
    }
    Err(ScanError::Unparseable {
        tool: "npm-audit",
        detail: "neither `vulnerabilities` (npm 7+) nor `advisories` (npm 6) in the report".into(),
    })
}

/// Directories under `root` holding a `package-lock.json` (or `npm-shrinkwrap.json`), `root`
/// first; `node_modules`, `.git` and rave's own `.rave` are not searched. Bounded in depth.
pub fn lock_dirs(root: &Path) -> Vec<std::path::PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<std::path::PathBuf>) {
        if dir.join("package-lock.json").is_file() || dir.join("npm-shrinkwrap.json").is_file() {
            out.push(dir.to_path_buf());
        }
        if depth >= 8 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut subs: Vec<std::path::PathBuf> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| {
                let n = e.file_name();
                n != "node_modules" && n != ".git" && n != ".rave" && n != "target"
            })
            .map(|e| e.path())
            .collect();
        subs.sort();
        for s in subs {
            walk(&s, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(root, 0, &mut out);
    out
}

/// Run the real `npm audit --json` in `dir`.
pub fn run(dir: &Path, registry: Option<&str>) -> Result<Vec<Finding>, ScanError> {
    if !dir.join("package-lock.json").exists() && !dir.join("npm-shrinkwrap.json").exists() {
        return Err(ScanError::Failed {
            tool: "npm-audit",
            detail: format!("no package-lock.json in {}", dir.display()),
            fix: "commit a lock file (`npm install --package-lock-only`), or don't run npm audit here",
        });
    }
    let mut cmd = Command::new("npm");
    cmd.current_dir(dir).args(["audit", "--json"]);
    if let Some(r) = registry {
        cmd.arg("--registry").arg(r);
    }
    let out = cmd.output().map_err(|e| ScanError::Missing {
        tool: "npm-audit",
        detail: e.to_string(),
        fix: "install Node.js and npm, or put npm on PATH",
    })?;
    // Exit 1 means "vulnerabilities found"; the JSON says which, or carries the error.
    let code = out.status.code();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !matches!(code, Some(0) | Some(1)) || stdout.trim().is_empty() {
        return Err(ScanError::Failed {
            tool: "npm-audit",
            detail: format!(
                "npm audit exited with {code:?}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
            fix: "check that the registry is reachable (rave scan --npm-registry URL) and package-lock.json is valid",
        });
    }
    parse(&stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V7: &str = r#"{"auditReportVersion": 2, "vulnerabilities": {
      "lodash": {"name": "lodash", "severity": "high", "isDirect": true,
        "via": [{"source": 1094, "name": "lodash", "dependency": "lodash", "title": "Command Injection in lodash",
                 "url": "https://github.com/advisories/GHSA-35jh-r3h4-6jhm", "severity": "high", "range": "<4.17.21"}],
        "effects": ["app-lib"], "range": "<=4.17.20", "nodes": ["node_modules/lodash"],
        "fixAvailable": {"name": "lodash", "version": "4.17.21", "isSemVerMajor": false}},
      "app-lib": {"name": "app-lib", "severity": "high", "isDirect": true, "via": ["lodash"], "effects": [],
        "range": "*", "nodes": ["node_modules/app-lib"], "fixAvailable": true}},
      "metadata": {"vulnerabilities": {"high": 2, "total": 2}}}"#;

    const V6: &str = r#"{"actions": [], "advisories": {"1094": {"id": 1094, "title": "Prototype Pollution",
      "module_name": "lodash", "severity": "moderate", "url": "https://npmjs.com/advisories/1094",
      "patched_versions": ">=4.17.19", "findings": [{"version": "4.17.15", "paths": ["lodash"]}]}},
      "metadata": {}}"#;

    #[test]
    fn npm7_report() {
        let f = parse(V7).unwrap();
        assert_eq!(
            f.len(),
            1,
            "the `via: [\"lodash\"]` entry points at lodash's own advisory"
        );
        assert_eq!(f[0].id, "GHSA-35jh-r3h4-6jhm");
        assert_eq!(f[0].severity, Severity::High);
        assert_eq!(f[0].fixed_version.as_deref(), Some("4.17.21"));
        assert_eq!(f[0].target.as_deref(), Some("node_modules/lodash"));
    }

    #[test]
    fn npm6_report() {
        let f = parse(V6).unwrap();
        assert_eq!(f[0].id, "npm-1094");
        assert_eq!(f[0].severity, Severity::Medium);
        assert_eq!(f[0].installed_version.as_deref(), Some("4.17.15"));
    }

    #[test]
    fn npm_errors_are_errors() {
        let e = parse(r#"{"error": {"code": "ENOLOCK", "summary": "This command requires an existing lockfile."}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("ENOLOCK"));
        assert!(parse("{}").is_err());
        // npm 11: the cause is a top-level message; the hint names rave's own flag.
        let e = parse(r#"{"message": "request to http://127.0.0.1:9/-/npm/v1/security/advisories/bulk failed, reason: connect ECONNREFUSED 127.0.0.1:9", "error": {"summary": "", "detail": ""}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ECONNREFUSED"), "{e}");
        assert!(e.contains("--npm-registry"), "{e}");
    }
}
