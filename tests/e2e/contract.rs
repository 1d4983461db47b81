//! One executor contract, checked against every executor: the same pipelines run with
//! `--executor local` and `--executor docker` (in the busybox test image) and must behave the
//! same: exit codes, `after_script` with `CI_JOB_STATUS`, a graceful cancel (SIGTERM reaches
//! the script, then after_script runs), a forced cancel (after_script stopped at once).

use std::time::{Duration, Instant};

use crate::docker::{IMAGE, engine_with_image};
use crate::support::*;

const EXECUTORS: [&str; 2] = ["local", "docker"];

fn pipeline(body: &str) -> String {
    format!("default:\n  image: {IMAGE}\n{body}")
}

/// Start `rave run` on a one-job pipeline `long` with `executor` and wait until its script
/// printed READY; returns the repository, the running rave and the job's log.
fn started(ex: &str, body: &str) -> (tempfile::TempDir, std::process::Child, std::path::PathBuf) {
    let d = git_repo(&[(".gitlab-ci.yml", &pipeline(body))]);
    let child = spawn_rave(d.path(), &["run", "--json", "--executor", ex]);
    let log = d.path().join(".rave/runs/1/logs/000-long.log");
    wait_until(&format!("{ex}: the job never started"), 60, || {
        file_contains(&log, "READY")
    });
    std::thread::sleep(Duration::from_millis(300));
    (d, child, log)
}

#[test]
fn exit_codes_and_after_script_status_are_the_same_on_every_executor() {
    engine_with_image();
    for ex in EXECUTORS {
        let d = git_repo(&[(
            ".gitlab-ci.yml",
            &pipeline(
                "fails:\n  script: [echo out-line, exit 3]\n  after_script: ['echo AFTER=$CI_JOB_STATUS']\n  allow_failure: true\npasses:\n  script: [echo ok]\n  after_script: ['echo AFTER=$CI_JOB_STATUS']\n",
            ),
        )]);
        let r = rave(d.path(), &["run", "--json", "--executor", ex]);
        assert_eq!(r.code, 0, "{ex}: {}", r.stderr);
        let v = json(&r.stdout);
        assert_eq!(job(&v, "fails")["status"], "warning", "{ex}");
        assert_eq!(job(&v, "fails")["exit_code"], 3, "{ex}");
        assert_eq!(job(&v, "passes")["status"], "success", "{ex}");
        let logs = d.path().join(".rave/runs/1/logs");
        let fails = std::fs::read_to_string(logs.join("000-fails.log")).unwrap();
        assert!(
            fails.contains("out-line") && fails.contains("AFTER=failed"),
            "{ex}: {fails}"
        );
        let passes = std::fs::read_to_string(logs.join("001-passes.log")).unwrap();
        assert!(passes.contains("AFTER=success"), "{ex}: {passes}");
    }
}

#[test]
fn a_graceful_cancel_sends_sigterm_then_runs_after_script_on_every_executor() {
    engine_with_image();
    for ex in EXECUTORS {
        let (_d, child, log) = started(
            ex,
            "long:\n  script:\n    - trap 'echo TERM-SEEN-$((6*7)); exit 7' TERM\n    - echo READY\n    - sleep 1000 & wait\n  after_script: ['echo AFTER=$CI_JOB_STATUS']\n",
        );
        interrupt(&child);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "{ex}");
        let v = json(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(job(&v, "long")["status"], "canceled", "{ex}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("TERM-SEEN-42"),
            "{ex}: the script got no SIGTERM:\n{text}"
        );
        assert!(text.contains("AFTER=canceled"), "{ex}: {text}");
    }
}

#[test]
fn a_forced_cancel_stops_after_script_on_every_executor() {
    engine_with_image();
    for ex in EXECUTORS {
        let (_d, child, log) = started(
            ex,
            "long:\n  script: [echo READY, sleep 1000]\n  after_script: [echo AFTER-START, sleep 1000, echo AFTER-END]\n",
        );
        interrupt(&child);
        wait_until(&format!("{ex}: after_script never started"), 60, || {
            file_contains(&log, "AFTER-START")
        });
        let forced = Instant::now();
        interrupt(&child);
        let out = child.wait_with_output().unwrap();
        assert!(
            forced.elapsed() < Duration::from_secs(30),
            "{ex}: a forced cancel must stop after_script at once"
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("AFTER-END"), "{ex}: {text}");
        assert_ne!(out.status.code(), Some(0), "{ex}");
    }
}
