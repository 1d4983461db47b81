//! `rave scan` with the real Trivy and npm binaries.
//!
//! No vulnerability DB or advisory API is reachable from CI, so: Trivy's secret scanner (which
//! needs no DB) runs for real, and its missing-DB failure is checked for a clear error; the real
//! `npm audit` asks a small HTTP server this test starts, which answers npm's bulk advisory
//! request with a response in the registry's format.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use crate::support::*;

const TOKEN_FILE: &str = "settings = {\n  \"name\": \"demo\",\n  \"token\": \"ghp_aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5\",\n}\n";

fn tool_present(cmd: &str) {
    let ok = std::process::Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "{cmd} is required for this test (./x test installs it)");
}

#[test]
fn trivy_finds_a_secret_and_the_gate_fails_with_sarif() {
    tool_present("trivy");
    let d = git_repo(&[("config.py", TOKEN_FILE), ("README.md", "# demo\n")]);
    let cache = tempfile::tempdir().unwrap();
    let r = rave(
        d.path(),
        &[
            "scan",
            "trivy",
            "--trivy-scanners",
            "secret",
            "--offline",
            "--trivy-cache-dir",
            cache.path().to_str().unwrap(),
            "--sarif",
            "out/scan.sarif",
            "--junit",
            "out/scan.xml",
            "--summary",
            "out/summary.json",
        ],
    );
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("gate FAILED: 1 finding(s) at or above HIGH"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("CRITICAL github-pat [trivy]"),
        "{}",
        r.stdout
    );
    let sarif = json(&std::fs::read_to_string(d.path().join("out/scan.sarif")).unwrap());
    validate_sarif(&sarif);
    validate_sarif_officially(&d.path().join("out/scan.sarif"));
    let result = &sarif["runs"][0]["results"][0];
    assert_eq!(result["ruleId"], "github-pat");
    assert_eq!(
        result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
        "config.py"
    );
    assert_eq!(
        result["locations"][0]["physicalLocation"]["region"]["startLine"],
        3
    );
    let junit = std::fs::read_to_string(d.path().join("out/scan.xml")).unwrap();
    assert!(
        junit.contains("<failure message=\"GitHub Personal Access Token\" type=\"CRITICAL\">"),
        "{junit}"
    );
    let summary = json(&std::fs::read_to_string(d.path().join("out/summary.json")).unwrap());
    assert_eq!(summary["total"]["CRITICAL"], 1);
    assert_eq!(summary["gate"]["passed"], false);
    // The secret itself never reaches the reports.
    for f in ["out/scan.sarif", "out/scan.xml", "out/summary.json"] {
        assert!(
            !std::fs::read_to_string(d.path().join(f))
                .unwrap()
                .contains("ghp_aB3d"),
            "{f}"
        );
    }
    // An allowlist entry with a reason and a future date lets it pass; an expired one doesn't.
    std::fs::create_dir_all(d.path().join(".rave")).unwrap();
    std::fs::write(
        d.path().join(".rave/scan-allow.yml"),
        "- id: github-pat\n  reason: test fixture token, revoked\n  expires: 2999-01-01\n",
    )
    .unwrap();
    let args = [
        "scan",
        "trivy",
        "--trivy-scanners",
        "secret",
        "--offline",
        "--trivy-cache-dir",
        cache.path().to_str().unwrap(),
    ];
    let r = rave(d.path(), &args);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains("allowed: github-pat"), "{}", r.stdout);
    std::fs::write(
        d.path().join(".rave/scan-allow.yml"),
        "- id: github-pat\n  reason: was fine once\n  expires: 2020-01-01\n",
    )
    .unwrap();
    let r = rave(d.path(), &args);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout
            .contains("expired allowlist entry: github-pat (expired 2020-01-01)"),
        "{}",
        r.stdout
    );
}

#[test]
fn trivy_without_a_vulnerability_db_is_an_error_not_a_pass() {
    tool_present("trivy");
    let d = git_repo(&[("README.md", "# demo\n")]);
    let cache = tempfile::tempdir().unwrap();
    let r = rave(
        d.path(),
        &[
            "scan",
            "trivy",
            "--offline",
            "--trivy-cache-dir",
            cache.path().to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("vulnerability DB is missing"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--skip-db-update"), "{}", r.stderr);
    let r = rave(
        d.path(),
        &[
            "scan",
            "trivy",
            "--offline",
            "--trivy-cache-dir",
            cache.path().to_str().unwrap(),
            "--unavailable",
            "warn",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("warning: trivy failed"),
        "{}",
        r.stderr
    );
}

/// A registry stand-in: answers npm's bulk advisory request for lodash, 404 to the rest.
fn advisory_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let (status, payload) = if request_line
                .starts_with("POST /-/npm/v1/security/advisories/bulk")
            {
                (
                    "200 OK",
                    r#"{"lodash":[{"id":1094,"url":"https://github.com/advisories/GHSA-35jh-r3h4-6jhm","title":"Command Injection in lodash","severity":"high","vulnerable_versions":"<4.17.21","cwe":["CWE-77"],"cvss":{"score":7.2,"vectorString":null}}]}"#,
                )
            } else {
                ("404 Not Found", "{}")
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{payload}",
                payload.len()
            );
        }
    });
    (url, h)
}

const LOCK: &str = r#"{
  "name": "app", "version": "1.0.0", "lockfileVersion": 3, "requires": true,
  "packages": {
    "": {"name": "app", "version": "1.0.0", "dependencies": {"lodash": "4.17.20"}},
    "node_modules/lodash": {"version": "4.17.20", "resolved": "https://registry.npmjs.org/lodash/-/lodash-4.17.20.tgz"}
  }
}"#;

#[test]
fn npm_audit_against_a_local_advisory_server() {
    tool_present("npm");
    let (url, _server) = advisory_server();
    let d = git_repo(&[
        (
            "package.json",
            r#"{"name": "app", "version": "1.0.0", "dependencies": {"lodash": "4.17.20"}}"#,
        ),
        ("package-lock.json", LOCK),
    ]);
    let r = rave(
        d.path(),
        &[
            "scan",
            "npm-audit",
            "--npm-registry",
            &url,
            "--sarif",
            "npm.sarif",
        ],
    );
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("HIGH GHSA-35jh-r3h4-6jhm [npm-audit] lodash: Command Injection in lodash"),
        "{}",
        r.stdout
    );
    let sarif = json(&std::fs::read_to_string(d.path().join("npm.sarif")).unwrap());
    validate_sarif(&sarif);
    validate_sarif_officially(&d.path().join("npm.sarif"));
    assert_eq!(sarif["runs"][0]["tool"]["driver"]["name"], "npm-audit");
    // --fail-on CRITICAL lets a HIGH pass.
    let r = rave(
        d.path(),
        &[
            "scan",
            "npm-audit",
            "--npm-registry",
            &url,
            "--fail-on",
            "CRITICAL",
        ],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // No lock file: a clear error, not a pass.
    std::fs::remove_file(d.path().join("package-lock.json")).unwrap();
    let r = rave(d.path(), &["scan", "npm-audit", "--npm-registry", &url]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no package-lock.json"), "{}", r.stderr);
}

#[test]
fn a_scan_in_a_pipeline_fails_the_job_with_scan_gate() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "build:\n  stage: build\n  script:\n    - echo \"deploy key is $DEPLOY_KEY\" > build.log\n  artifacts: {paths: [build.log]}\nscan:\n  stage: test\n  script:\n    - rave scan secrets --masked DEPLOY_KEY --sarif gl-secrets.sarif\n  artifacts:\n    when: always\n    paths: [gl-secrets.sarif]\n",
    )]);
    let r = rave(
        d.path(),
        &[
            "run",
            "--json",
            "--var",
            "DEPLOY_KEY=k3y-Th4t-mu5t-n0t-l3ak",
        ],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    let scan = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "scan")
        .unwrap();
    assert_eq!(scan["failure_reason"], "scan_gate", "{scan:#}");
    // The leaked value came in with build's artifact; the scan names the variable, not the value.
    let log = std::fs::read_to_string(d.path().join(".rave/runs/1/logs/001-scan.log")).unwrap();
    assert!(log.contains("masked variable DEPLOY_KEY"), "{log}");
    assert!(
        !log.contains("k3y-Th4t"),
        "the scan must not print the secret:\n{log}"
    );
}

/// Validate a SARIF file with Microsoft's SARIF multitool (`validate` checks the official
/// 2.1.0 JSON schema, errors JSON1xxx, plus SARIF's own rules). ./x test installs it and sets
/// RAVE_SARIF_MULTITOOL; without it the test fails rather than skipping.
fn validate_sarif_officially(path: &std::path::Path) {
    let tool = std::env::var("RAVE_SARIF_MULTITOOL").unwrap_or_else(|_| {
        fixtures()
            .join("../.tools/node_modules/@microsoft/sarif-multitool-linux/Sarif.Multitool")
            .to_string_lossy()
            .into_owned()
    });
    assert!(
        std::path::Path::new(&tool).exists(),
        "the SARIF multitool is required ({tool}); ./x test installs it"
    );
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("validation.sarif");
    let o = std::process::Command::new(&tool)
        .args([
            "validate",
            path.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .env("DOTNET_CLI_TELEMETRY_OPTOUT", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let report = json(&std::fs::read_to_string(&out).unwrap());
    let errors: Vec<String> = report["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["level"] == "error")
        .map(|r| format!("{}: {}", r["ruleId"], r["message"]["text"]))
        .collect();
    assert!(
        errors.is_empty(),
        "SARIF validation errors in {}:\n{}",
        path.display(),
        errors.join("\n")
    );
}

/// Structural checks on top: rule indexes point at the right rules.
fn validate_sarif(v: &serde_json::Value) {
    assert_eq!(v["version"], "2.1.0");
    assert!(v["$schema"].as_str().unwrap().contains("sarif-2.1.0"));
    for run in v["runs"].as_array().unwrap() {
        let driver = &run["tool"]["driver"];
        assert!(driver["name"].is_string());
        let rules = driver["rules"].as_array().unwrap();
        for r in run["results"].as_array().unwrap() {
            let idx = r["ruleIndex"].as_u64().unwrap() as usize;
            assert_eq!(rules[idx]["id"], r["ruleId"]);
            assert!(["error", "warning", "note", "none"].contains(&r["level"].as_str().unwrap()));
            assert!(r["message"]["text"].is_string());
            if let Some(locs) = r["locations"].as_array() {
                for l in locs {
                    assert!(l["physicalLocation"]["artifactLocation"]["uri"].is_string());
                }
            }
        }
    }
}

#[test]
fn scan_stage_kind_expands_into_a_gating_job() {
    tool_present("trivy");
    let cache = tempfile::tempdir().unwrap();
    let yaml = format!(
        "stages: [build, scan]\n.rave:\n  scan:\n    tools: [trivy, npm-audit, secrets]\n    args: [--offline, --trivy-scanners, secret, --trivy-cache-dir, {}]\nbuild:\n  stage: build\n  script: [echo built]\n",
        cache.path().display()
    );
    let d = git_repo(&[(".gitlab-ci.yml", &yaml), ("config.py", TOKEN_FILE)]);
    let r = rave(d.path(), &["graph", "--format", "json"]);
    let v = json(&r.stdout);
    let scan = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "rave-scan")
        .unwrap();
    assert_eq!(scan["stage"], "scan");
    assert_eq!(scan["needs"], serde_json::json!(["build"]));
    let r = rave(d.path(), &["run", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    let scan = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "rave-scan")
        .unwrap();
    assert_eq!(scan["failure_reason"], "scan_gate", "{}", r.stderr);
    // The secrets check ran after Trivy's gate failed, and reports were kept (when: always).
    assert!(r.stderr.contains("rave-secrets"), "{}", r.stderr);
    let art = d
        .path()
        .join(".rave/runs/1/artifacts/001-rave-scan/rave-scan");
    for f in ["trivy.sarif", "trivy.xml", "trivy.json", "secrets.sarif"] {
        assert!(art.join(f).exists(), "{f} missing in {}", art.display());
    }
    validate_sarif_officially(&art.join("trivy.sarif"));
    // Without the token the same pipeline passes.
    std::fs::remove_file(d.path().join("config.py")).unwrap();
    let r = rave(d.path(), &["run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `rave scan all` audits lock files in subdirectories too; npm's own message says why an audit
/// could not run, the hint names rave's flag, and "gate passed" is never printed then.
#[test]
fn npm_audit_in_subdirectories_and_its_errors_say_the_cause() {
    tool_present("npm");
    let (url, _server) = advisory_server();
    let d = git_repo(&[
        (
            "web/package.json",
            r#"{"name": "app", "version": "1.0.0", "dependencies": {"lodash": "4.17.20"}}"#,
        ),
        ("web/package-lock.json", LOCK),
    ]);
    let r = rave(
        d.path(),
        &[
            "scan",
            "all",
            "--npm-registry",
            &url,
            "--trivy-scanners",
            "secret",
            "--offline",
        ],
    );
    assert!(
        r.stdout.contains("GHSA-35jh-r3h4-6jhm") && r.stdout.contains("web/node_modules/lodash"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    // A registry that does not answer: npm's cause, rave's flag, no "gate passed".
    let r = rave(
        d.path(),
        &[
            "scan",
            "all",
            "--npm-registry",
            "http://127.0.0.1:9/",
            "--trivy-scanners",
            "secret",
            "--offline",
        ],
    );
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("ECONNREFUSED"), "{}", r.stderr);
    assert!(r.stderr.contains("--npm-registry"), "{}", r.stderr);
    assert!(!r.stdout.contains("gate passed"), "{}", r.stdout);
    assert!(r.stdout.contains("gate NOT PASSED"), "{}", r.stdout);
}
