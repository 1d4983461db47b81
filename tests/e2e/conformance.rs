//! GitLab conformance: every folder under `tests/conformance/` is a small project written from
//! GitLab's documentation, with a `case.json` saying what GitLab does with it. Each case is
//! committed to a fresh git repository (includes are read from the commit) and checked through
//! the real binary: `rave lint --json` (errors and warnings), `rave graph --format json` (the
//! planned job instances with stage, `when`, `allow_failure` and what each waits for) and, where
//! the case says so, `rave run --json` (pipeline and job statuses).
//!
//! `case.json` keys (all optional but `about`):
//! - `about`: the GitLab behaviour, in our words.
//! - `args`: extra arguments for lint, graph and run (`--ref`, `--tag`, `--var`).
//! - `untracked`: files written after the commit (never committed).
//! - `lint`: `{"errors": [substrings], "warnings": [substrings], "absent": [substrings]}`;
//!   without errors listed the file must be valid. Every listed substring must appear in some
//!   diagnostic of that severity, and no diagnostic may contain an `absent` one; with `errors`
//!   listed, no plan is checked.
//! - `plan`: `{"jobs": [{"name", "stage", "when", "allow_failure", "needs"}]}`: exactly these
//!   instances, in any order; each listed field must match (`needs` is the set of instances
//!   the job waits for directly: its `needs`, or the last jobs of earlier stages).
//! - `run`: `{"status": "...", "jobs": {"name": "status"}}` after `rave run --json`, or
//!   `{"reason": "..."}` when no pipeline should run.

use std::path::Path;

use serde_json::Value;

use crate::support::{json, rave, sh};

fn conformance_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance")
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("read case dir") {
        let e = e.expect("entry");
        let name = e.file_name();
        if name == "case.json" {
            continue;
        }
        let dest = to.join(&name);
        if e.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&dest).expect("mkdir");
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Check one case; Err lists what differs.
fn check(case_dir: &Path) -> Result<(), Vec<String>> {
    let case: Value =
        json(&std::fs::read_to_string(case_dir.join("case.json")).expect("case.json"));
    let mut problems = Vec::new();
    let work = tempfile::tempdir().expect("tempdir");
    copy_dir(case_dir, work.path());
    sh(
        work.path(),
        "git init -q -b main . && git remote add origin https://forge.example/acme/widgets.git && git add -A && git commit -qm init",
    );
    if let Some(files) = case.get("untracked").and_then(Value::as_object) {
        for (path, text) in files {
            let p = work.path().join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text.as_str().unwrap_or_default()).expect("write");
        }
    }
    let extra = strings(case.get("args").unwrap_or(&Value::Null));
    let with = |base: &[&str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().cloned())
            .collect()
    };
    let run_rave = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        rave(work.path(), &refs)
    };

    // Lint.
    let lint = run_rave(with(&["lint", "--json"]));
    let lint_doc: Value = match serde_json::from_str(&lint.stdout) {
        Ok(v) => v,
        Err(e) => {
            return Err(vec![format!(
                "lint --json printed no JSON ({e}): {}",
                lint.stderr
            )]);
        }
    };
    let diags = lint_doc["diagnostics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let messages = |sev: &str| -> Vec<String> {
        diags
            .iter()
            .filter(|d| d["severity"] == sev)
            .map(|d| {
                format!(
                    "{} [{}:{}] {}",
                    d["message"].as_str().unwrap_or(""),
                    d["line"],
                    d["col"],
                    d["help"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    let errors = messages("error");
    let warnings = messages("warning");
    let want_errors = case
        .get("lint")
        .map(|l| strings(&l["errors"]))
        .unwrap_or_default();
    let want_warnings = case
        .get("lint")
        .map(|l| strings(&l["warnings"]))
        .unwrap_or_default();
    for w in &want_errors {
        if !errors.iter().any(|e| e.contains(w.as_str())) {
            problems.push(format!(
                "expected an error containing {w:?}; errors: {errors:#?}"
            ));
        }
    }
    for w in &want_warnings {
        if !warnings.iter().any(|e| e.contains(w.as_str())) {
            problems.push(format!(
                "expected a warning containing {w:?}; warnings: {warnings:#?}"
            ));
        }
    }
    let absent = case
        .get("lint")
        .map(|l| strings(&l["absent"]))
        .unwrap_or_default();
    for a in &absent {
        if let Some(d) = errors
            .iter()
            .chain(&warnings)
            .find(|d| d.contains(a.as_str()))
        {
            problems.push(format!(
                "expected no diagnostic containing {a:?}, got {d:?}"
            ));
        }
    }
    if want_errors.is_empty() && !errors.is_empty() {
        problems.push(format!("expected a valid pipeline; errors: {errors:#?}"));
    }
    if !want_errors.is_empty() {
        if lint.code != 2 {
            problems.push(format!(
                "lint exit code {} for an invalid pipeline",
                lint.code
            ));
        }
        return if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        };
    }

    // Plan.
    if let Some(plan) = case.get("plan") {
        let graph = run_rave(with(&["graph", "--format", "json"]));
        let doc: Value = match serde_json::from_str(&graph.stdout) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("graph printed no JSON ({e}): {}", graph.stderr));
                return Err(problems);
            }
        };
        let got = doc["jobs"].as_array().cloned().unwrap_or_default();
        let want = plan["jobs"].as_array().cloned().unwrap_or_default();
        let mut got_names: Vec<&str> = got.iter().filter_map(|j| j["name"].as_str()).collect();
        let mut want_names: Vec<&str> = want.iter().filter_map(|j| j["name"].as_str()).collect();
        got_names.sort_unstable();
        want_names.sort_unstable();
        if got_names != want_names {
            problems.push(format!(
                "planned jobs {got_names:?}, expected {want_names:?}"
            ));
        }
        for w in &want {
            let name = w["name"].as_str().unwrap_or_default();
            let Some(g) = got.iter().find(|g| g["name"] == name) else {
                continue;
            };
            for field in ["stage", "when", "allow_failure"] {
                if let Some(v) = w.get(field)
                    && g[field] != *v
                {
                    problems.push(format!("`{name}`: {field} is {}, expected {v}", g[field]));
                }
            }
            if let Some(v) = w.get("needs") {
                let mut a = strings(&g["needs"]);
                let mut b = strings(v);
                a.sort();
                b.sort();
                if a != b {
                    problems.push(format!("`{name}`: waits for {a:?}, expected {b:?}"));
                }
            }
        }
    }

    // Run.
    if let Some(run) = case.get("run") {
        let out = run_rave(with(&[
            "run",
            "--json",
            "--no-cgroups",
            "--executor",
            "local",
        ]));
        let doc: Value = match serde_json::from_str(&out.stdout) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("run --json printed no JSON ({e}): {}", out.stderr));
                return Err(problems);
            }
        };
        if let Some(reason) = run.get("reason")
            && (doc["reason"] != *reason || !doc["pipeline"].is_null())
        {
            problems.push(format!(
                "expected no pipeline with reason {reason}, got {doc}"
            ));
        }
        if let Some(status) = run.get("status")
            && doc["pipeline"]["status"] != *status
        {
            problems.push(format!(
                "pipeline status {}, expected {status}\n{}",
                doc["pipeline"]["status"], out.stderr
            ));
        }
        if let Some(jobs) = run.get("jobs").and_then(Value::as_object) {
            for (name, status) in jobs {
                let got = doc["jobs"]
                    .as_array()
                    .and_then(|a| a.iter().find(|j| j["name"] == name.as_str()))
                    .map(|j| j["status"].clone())
                    .unwrap_or(Value::Null);
                if got != *status {
                    problems.push(format!("job `{name}`: status {got}, expected {status}"));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[test]
fn gitlab_conformance_suite() {
    let mut cases: Vec<_> = std::fs::read_dir(conformance_dir())
        .expect("tests/conformance")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("case.json").is_file())
        .map(|e| e.path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "the conformance suite lost its cases");
    let mut failed = Vec::new();
    for c in &cases {
        let name = c
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        match check(c) {
            Ok(()) => println!("conformance {name} ... ok"),
            Err(p) => {
                println!("conformance {name} ... FAILED");
                failed.push(format!("{name}:\n  {}", p.join("\n  ")));
            }
        }
    }
    println!(
        "conformance: {} passed, {} failed",
        cases.len() - failed.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
