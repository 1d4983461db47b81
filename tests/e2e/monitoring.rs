//! The alert rules and the dashboard in docs/, checked with Prometheus' own `promtool` (rules
//! valid, and each alert firing and staying quiet on the series it should), and every metric
//! they name checked against what a running `rave serve` really exports.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::serve::{Origin, READER, api_pipeline, client, config, finished, start};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool is required (./x test installs Debian's prometheus package)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let root = repo();
    let (ok, out) = promtool(
        &["check", "rules", "docs/prometheus/rave-alerts.yml"],
        &root,
    );
    assert!(ok && out.contains("SUCCESS: 5 rules found"), "{out}");
    let (ok, out) = promtool(
        &["test", "rules", "rave-alerts.test.yml"],
        &root.join("tests/prometheus"),
    );
    assert!(ok, "{out}");
}

/// Metric names a running server exports, as they appear in queries (counters with
/// `_total`, histograms with `_bucket`, `_sum`, `_count`).
fn exported_names() -> HashSet<String> {
    let origin = Origin::new(&[(".gitlab-ci.yml", "job: {script: [true]}\n")]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), &origin, "");
    let s = start(&data.path().join("data"), &cfg);
    // Families with labels appear once they have a sample: a pipeline, a refused delivery.
    let id = api_pipeline(
        &s,
        serde_json::json!({"project": "team/app", "ref": "main"}),
    );
    finished(&s, id);
    let r = client()
        .post(format!("{}/hooks/github", s.url))
        .header("X-GitHub-Event", "push")
        .header("X-Hub-Signature-256", "sha256=00")
        .body("{}")
        .send()
        .unwrap();
    // Refused (an unknown project in an empty body): counted as a request and an error.
    assert!(r.status().is_client_error(), "{}", r.status());
    let text = client()
        .get(format!("{}/metrics", s.url))
        .bearer_auth(READER)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let mut names = HashSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    assert!(names.contains("rave_queue_depth"), "{text}");
    names
}

/// The `rave_*` and `webhook_*` metric names a text of queries uses.
fn used_names(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts = (rest.starts_with("rave_") || rest.starts_with("webhook_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn rules_and_the_dashboard_use_only_metrics_rave_exports() {
    let exported = exported_names();
    let rules = std::fs::read_to_string(repo().join("docs/prometheus/rave-alerts.yml")).unwrap();
    // The three dashboards: project health, runner, system.
    let mut exprs = String::new();
    let mut uids = HashSet::new();
    let mut boards = 0;
    for e in std::fs::read_dir(repo().join("docs/grafana"))
        .unwrap()
        .flatten()
    {
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap())
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
        assert!(
            uids.insert(dash["uid"].as_str().unwrap().to_string()),
            "uids differ"
        );
        let panels = dash["panels"].as_array().unwrap();
        assert!(!panels.is_empty(), "{}", e.path().display());
        for t in panels
            .iter()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
        boards += 1;
    }
    assert_eq!(boards, 3);
    assert!(!exprs.is_empty(), "the dashboards have queries");
    // Every query is valid PromQL: promtool checks them as recording rules (Grafana's
    // `$project` variable stands for any project).
    let dir = tempfile::tempdir().unwrap();
    let mut dash_rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, e) in exprs.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let e = e.replace("$project", ".*");
        dash_rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    std::fs::write(dir.path().join("dashboards.yml"), dash_rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", "dashboards.yml"], dir.path());
    assert!(ok, "a dashboard query is not valid PromQL: {out}");
    // Only the expressions of the rules: names in annotations are prose.
    let rule_exprs: String = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect::<Vec<_>>()
        .join("\n");
    for (what, text) in [("alert rules", rule_exprs), ("dashboards", exprs)] {
        let used = used_names(&text);
        assert!(!used.is_empty(), "{what} use rave's metrics");
        let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{what} use metrics rave does not export: {unknown:?} (exported: {exported:?})"
        );
    }
}

struct Pushgateway {
    child: std::process::Child,
    url: String,
}

impl Drop for Pushgateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's prometheus-pushgateway on a free loopback port, keeping nothing on disk.
fn pushgateway() -> Pushgateway {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("prometheus-pushgateway")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus-pushgateway is required (./x test installs it)");
    crate::support::wait_until("the pushgateway never listened", 20, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Pushgateway {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

#[test]
fn a_run_pushes_its_metrics_to_a_real_pushgateway() {
    let pgw = pushgateway();
    let d = crate::support::git_repo(&[(
        ".gitlab-ci.yml",
        "ok: {script: ['echo fine']}\nbroken: {script: ['exit 3']}\nhog:\n  variables: {RAVE_MEMORY: 32M}\n  script: ['head -c 300000000 /dev/zero | tail > /dev/null']\n",
    )]);
    let r = crate::support::rave(d.path(), &["run", "--push-metrics", &pgw.url]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("not pushed"), "{}", r.stderr);
    let text = client()
        .get(format!("{}/metrics", pgw.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let line = |needle: &[&str]| {
        text.lines()
            .find(|l| needle.iter().all(|n| l.contains(n)))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
            .to_string()
    };
    // The Pushgateway prints values its own way (3.3554432e+07): compare numbers.
    let value = |l: &str| -> f64 { l.rsplit(' ').next().unwrap().parse().unwrap() };
    let ok = line(&["rave_job_success{", "rave_job=\"ok\""]);
    assert!(
        ok.contains("job=\"rave\"") && ok.contains("pipeline=\"1\""),
        "{ok}"
    );
    assert_eq!(value(&ok), 1.0);
    assert_eq!(
        value(&line(&["rave_job_success{", "rave_job=\"broken\""])),
        0.0
    );
    let hog = line(&["rave_job_memory_limit_bytes{", "rave_job=\"hog\""]);
    assert_eq!(value(&hog), 33554432.0);
    assert_eq!(value(&line(&["rave_run_oom_kills{"])), 1.0, "{text}");
    assert_eq!(
        value(&line(&["rave_run_success{", "status=\"failed\""])),
        0.0
    );
    line(&[
        "rave_job_duration_seconds{",
        "rave_job=\"ok\"",
        "status=\"success\"",
    ]);

    // A Pushgateway that is not there costs a warning, never the run's result.
    std::fs::write(
        d.path().join(".gitlab-ci.yml"),
        "ok: {script: ['echo fine']}\n",
    )
    .unwrap();
    let r = crate::support::rave(d.path(), &["run", "--push-metrics", "http://127.0.0.1:1"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("metrics not pushed"), "{}", r.stderr);
}

#[test]
fn the_server_pushes_each_pipelines_metrics() {
    let pgw = pushgateway();
    // The job also checks it sees the project's configured path, not the mirror's.
    let origin = Origin::new(&[(
        ".gitlab-ci.yml",
        "job: {script: ['test \"$CI_PROJECT_PATH\" = team/app', 'test \"$CI_PROJECT_NAME\" = app']}\n",
    )]);
    let data = tempfile::tempdir().unwrap();
    let cfg = config(
        data.path(),
        &origin,
        &format!("push_metrics = \"{}\"", pgw.url),
    );
    let s = start(&data.path().join("data"), &cfg);
    let id = api_pipeline(
        &s,
        serde_json::json!({"project": "team/app", "ref": "main"}),
    );
    assert_eq!(finished(&s, id)["pipeline"]["status"], "success");
    let text = client()
        .get(format!("{}/metrics", pgw.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("rave_job_success{") && l.contains("rave_job=\"job\""))
        .unwrap_or_else(|| panic!("no rave_job_success in:\n{text}"));
    assert!(line.contains(&format!("pipeline=\"{id}\"")), "{line}");
    assert!(line.contains("project=\"team/app\""), "{line}");
    // The server's own /metrics: the pipeline's budget utilisation was observed.
    let own = client()
        .get(format!("{}/metrics", s.url))
        .bearer_auth(READER)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(own.contains("rave_budget_utilisation_count 1"), "{own}");
}
