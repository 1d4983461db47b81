//! The docker executor against a real Docker engine (./x test installs docker.io and starts
//! dockerd). No registry is reachable, so the test image is made here: `docker import` of a
//! root filesystem holding Debian's static busybox.

use std::process::Command;

use crate::support::*;

const IMAGE: &str = "rave-test/busybox:latest";

fn docker(args: &[&str]) -> (bool, String) {
    let o = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI is required");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// Make sure the engine answers and the test image exists. Fails (never skips) otherwise.
fn engine_with_image() {
    let (ok, out) = docker(&["version", "--format", "{{.Server.Version}}"]);
    assert!(
        ok,
        "no Docker engine answers ({out}); ./x test starts dockerd"
    );
    if docker(&["image", "inspect", IMAGE]).0 {
        return;
    }
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("busybox-static is required (./x test installs it)");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy(busybox, root.path().join("bin/busybox")).unwrap();
    for tool in [
        "sh", "echo", "cat", "ls", "mkdir", "sleep", "head", "tail", "true", "false", "env", "id",
        "test", "[",
    ] {
        std::os::unix::fs::symlink("busybox", root.path().join("bin").join(tool)).unwrap();
    }
    sh(
        root.path(),
        &format!(
            "tar -C {} -c . | docker import - {IMAGE} > /dev/null",
            root.path().display()
        ),
    );
}

/// Containers rave made for runs under `dir` (tests run in parallel; each checks its own).
fn rave_containers(dir: &std::path::Path) -> String {
    let all = docker(&[
        "ps",
        "-a",
        "--filter",
        "label=rave",
        "--format",
        "{{.ID}} {{.Labels}}",
    ])
    .1;
    let me = dir.display().to_string();
    all.lines()
        .filter(|l| l.contains(&me))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn jobs_with_an_image_run_in_containers_under_their_limits() {
    engine_with_image();
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        &format!(
            "stages: [build, test]\nbuild:\n  stage: build\n  image: {IMAGE}\n  script:\n    - test \"$CI_PROJECT_DIR\" = /builds/local/$(basename $CI_PROJECT_DIR)\n    - mkdir -p out && echo built-in-container > out/x.txt\n  artifacts: {{paths: [out/]}}\n  after_script: ['echo after=$CI_JOB_STATUS']\nuse:\n  stage: test\n  script: [cat out/x.txt]\nhog:\n  stage: test\n  image: {IMAGE}\n  variables: {{RAVE_MEMORY: 64M}}\n  script: ['head -c 300000000 /dev/zero | tail > /dev/null']\nmissing:\n  stage: test\n  image: {{name: 'rave-test/not-here:1', pull_policy: never}}\n  script: [echo never]\n"
        ),
    )]);
    let r = rave(d.path(), &["run", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    assert_eq!(job(&v, "build")["status"], "success", "{}", r.stderr);
    assert!(r.stderr.contains("build   > after=success"), "{}", r.stderr);
    // The artifact made in the container reaches the next (local) job.
    assert_eq!(job(&v, "use")["status"], "success", "{}", r.stderr);
    assert!(
        r.stderr.contains("use     > built-in-container"),
        "{}",
        r.stderr
    );
    let hog = job(&v, "hog");
    assert_eq!(hog["failure_reason"], "oom_killed", "{}", r.stderr);
    assert!(
        r.stderr
            .contains("hog: killed: exceeded its memory limit of 64 MiB"),
        "{}",
        r.stderr
    );
    let missing = job(&v, "missing");
    assert_eq!(missing["failure_reason"], "runner_error");
    assert!(
        missing["note"].as_str().unwrap().contains(
            "image `rave-test/not-here:1` is not on this machine and its pull_policy is `never`"
        ),
        "{missing:#}"
    );
    assert!(
        rave_containers(d.path()).trim().is_empty(),
        "left behind: {}",
        rave_containers(d.path())
    );
}

#[test]
fn cancel_removes_the_container() {
    engine_with_image();
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        &format!("long:\n  image: {IMAGE}\n  script: [echo READY, sleep 600]\n"),
    )]);
    let child = spawn_rave(d.path(), &["run", "--json"]);
    let log = d.path().join(".rave/runs/1/logs/000-long.log");
    wait_until("the container never started", 60, || {
        file_contains(&log, "READY")
    });
    assert!(!rave_containers(d.path()).trim().is_empty());
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        job(&json(&String::from_utf8_lossy(&out.stdout)), "long")["status"],
        "canceled"
    );
    assert!(
        rave_containers(d.path()).trim().is_empty(),
        "left behind: {}",
        rave_containers(d.path())
    );
}

#[test]
fn image_entrypoint_is_kept_unless_the_job_overrides_it() {
    engine_with_image();
    // An image whose entrypoint refuses to run anything.
    let tag = "rave-test/entry-false:latest";
    if !docker(&["image", "inspect", tag]).0 {
        let d = tempfile::tempdir().unwrap();
        sh(
            d.path(),
            &format!(
                "id=$(docker create {IMAGE} true) && docker export $id | docker import --change 'ENTRYPOINT [\"/bin/false\"]' - {tag} >/dev/null && docker rm $id >/dev/null"
            ),
        );
    }
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        &format!(
            "kept:\n  image: {tag}\n  script: [echo ran]\ncleared:\n  image: {{name: '{tag}', entrypoint: ['']}}\n  script: [echo ran-cleared]\n"
        ),
    )]);
    let r = rave(d.path(), &["run", "--json"]);
    let v = json(&r.stdout);
    assert_eq!(job(&v, "kept")["status"], "failed", "{}", r.stderr);
    assert_eq!(job(&v, "cleared")["status"], "success", "{}", r.stderr);
    assert!(r.stderr.contains("cleared > ran-cleared"), "{}", r.stderr);
}
