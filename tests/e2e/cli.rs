//! The command line as people use it: pipes that close early, subdirectories, budgets bigger
//! than the machine, keys where `rave keys generate` put them.

use std::process::{Command, Stdio};

use crate::support::*;

/// `rave … | head` ends quietly: no panic, and the status a pipe's writer gets (0 or SIGPIPE's
/// 141).
#[test]
fn a_closed_pipe_ends_quietly() {
    // A log far bigger than a pipe's buffer, so the writer outlives the reader.
    let d = git_repo(&[(".gitlab-ci.yml", "job:\n  script: [seq 1 100000]\n")]);
    let r = rave(d.path(), &["run", "--no-cgroups"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for _ in 0..5 {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{} logs job | head -c 10 >/dev/null; echo \"status=${{PIPESTATUS[0]}}\" >&2",
                rave_bin().display()
            ))
            .current_dir(d.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("status=0") || stderr.contains("status=141"),
            "{stderr}"
        );
    }
}

/// A memory budget larger than the machine is refused with the machine's size, unless forced.
#[test]
fn a_budget_larger_than_the_host_is_refused_unless_forced() {
    let d = git_repo(&[(".gitlab-ci.yml", "job:\n  script: [echo hi]\n")]);
    let r = rave(d.path(), &["graph", "--memory", "100T"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("larger than this machine's memory")
            && r.stderr.contains("--force-budget"),
        "{}",
        r.stderr
    );
    let r = rave(d.path(), &["graph", "--memory", "100T", "--force-budget"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Nearly all of it is refused too: the system and rave need room.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    let almost = format!("{}M", kb / 1024 - 100);
    let r = rave(d.path(), &["graph", "--memory", &almost]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("for the system and rave"), "{}", r.stderr);
}

/// `rave release create` finds the key `rave keys generate` made, and `rave release list`
/// finds the project's store from a subdirectory, as `rave run` finds the project.
#[test]
fn release_finds_the_generated_key_and_the_store_from_a_subdirectory() {
    let keys = tempfile::tempdir().unwrap();
    let kd = keys.path().join("k");
    let env = [("RAVE_KEYS_DIR", kd.to_str().unwrap())];
    let d = git_repo(&[
        (".gitlab-ci.yml", "job:\n  script: [echo hi]\n"),
        ("release/app.bin", "app"),
        ("src/sub/file.txt", "x"),
    ]);
    let r = rave_env(d.path(), &["keys", "generate"], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let store = d.path().join(".rave");
    let r = rave_env(
        d.path(),
        &[
            "release",
            "create",
            "--tag",
            "v9.9.9",
            "--dir",
            "release",
            "--data-dir",
            store.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let r = rave_env(&d.path().join("src/sub"), &["release", "list"], &[]);
    assert!(r.stdout.contains("v9.9.9"), "{}{}", r.stdout, r.stderr);
}
