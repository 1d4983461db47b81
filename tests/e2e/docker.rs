//! The docker executor against a real Docker engine (./x test installs docker.io and starts
//! dockerd). No registry is reachable, so the test image is made here: `docker import` of a
//! root filesystem holding Debian's static busybox.

use std::process::Command;

use crate::support::*;

pub const IMAGE: &str = "rave-test/busybox:latest";

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
pub fn engine_with_image() {
    busybox_image(IMAGE, &[]);
}

/// An image of Debian's static busybox made with `docker import` (`changes` are Dockerfile
/// lines such as `EXPOSE 8080`), built once per machine.
fn busybox_image(tag: &str, changes: &[&str]) {
    let (ok, out) = docker(&["version", "--format", "{{.Server.Version}}"]);
    assert!(
        ok,
        "no Docker engine answers ({out}); ./x test starts dockerd"
    );
    if docker(&["image", "inspect", tag]).0 {
        return;
    }
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("busybox-static is required (./x test installs it)");
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::create_dir_all(root.path().join("www")).unwrap();
    std::fs::write(
        root.path().join("www/hello.txt"),
        "hello from the service\n",
    )
    .unwrap();
    std::fs::copy(busybox, root.path().join("bin/busybox")).unwrap();
    for tool in [
        "sh", "echo", "cat", "ls", "mkdir", "sleep", "head", "tail", "true", "false", "env", "id",
        "test", "[", "wget", "httpd",
    ] {
        std::os::unix::fs::symlink("busybox", root.path().join("bin").join(tool)).unwrap();
    }
    let changes: String = changes.iter().map(|c| format!(" --change '{c}'")).collect();
    sh(
        root.path(),
        &format!(
            "tar -C {} -c . | docker import{changes} - {tag} > /dev/null",
            root.path().display()
        ),
    );
}

/// An image serving /www/hello.txt on port 8080 (declared with EXPOSE).
fn web_image() -> &'static str {
    let tag = "rave-test/web:latest";
    busybox_image(
        tag,
        &[
            "EXPOSE 8080",
            r#"CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]"#,
        ],
    );
    tag
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
    mine(&all, dir)
}

/// Networks rave made for runs under `dir`.
fn rave_networks(dir: &std::path::Path) -> String {
    let all = docker(&[
        "network",
        "ls",
        "--filter",
        "label=rave",
        "--format",
        "{{.Name}} {{.Labels}}",
    ])
    .1;
    mine(&all, dir)
}

/// No container or network of a run under `dir` is left.
fn assert_nothing_left(dir: &std::path::Path) {
    let (c, n) = (rave_containers(dir), rave_networks(dir));
    assert!(c.trim().is_empty(), "containers left behind: {c}");
    assert!(n.trim().is_empty(), "networks left behind: {n}");
}

fn mine(all: &str, dir: &std::path::Path) -> String {
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
            "stages: [build, test]\nbuild:\n  stage: build\n  image: {IMAGE}\n  script:\n    - test \"$CI_PROJECT_DIR\" = /builds/local/$(basename $CI_PROJECT_DIR)\n    - mkdir -p out && echo built-in-container > out/x.txt\n  artifacts: {{paths: [out/]}}\n  after_script: ['echo after=$CI_JOB_STATUS']\nuse:\n  stage: test\n  script: [cat out/x.txt]\nhog:\n  stage: test\n  image: {IMAGE}\n  variables: {{RAVE_MEMORY: 64M}}\n  script: ['head -c 300000000 /dev/zero | tail > /dev/null']\nslowhog:\n  stage: test\n  image: {IMAGE}\n  variables: {{RAVE_MEMORY: 64M}}\n  script: ['for i in $(seq 1 40); do head -c 4000000 /dev/zero; sleep 0.1; done | tail > /dev/null']\nmissing:\n  stage: test\n  image: {{name: 'rave-test/not-here:1', pull_policy: never}}\n  script: [echo never]\n"
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
    // Growing slowly, the job's biggest process is sampled inside its container's group.
    let slow = job(&v, "slowhog");
    assert_eq!(slow["failure_reason"], "oom_killed", "{}", r.stderr);
    assert!(
        slow["note"]
            .as_str()
            .unwrap_or_default()
            .contains("largest process: tail"),
        "{slow:#}"
    );
    let missing = job(&v, "missing");
    assert_eq!(missing["failure_reason"], "runner_error");
    assert!(
        missing["note"].as_str().unwrap().contains(
            "image `rave-test/not-here:1` is not on this machine and its pull_policy is `never`"
        ),
        "{missing:#}"
    );
    assert_nothing_left(d.path());
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
    assert_nothing_left(d.path());
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

#[test]
fn services_are_reachable_by_alias_and_a_deaf_one_fails_with_its_output() {
    let web = web_image();
    let mute = "rave-test/mute:latest";
    busybox_image(
        mute,
        &[
            "EXPOSE 9999",
            r#"CMD ["sh", "-c", "echo mute-started; sleep 600"]"#,
        ],
    );
    let crash = "rave-test/crash:latest";
    busybox_image(
        crash,
        &["EXPOSE 7777", r#"CMD ["sh", "-c", "echo boom; exit 3"]"#],
    );
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        &format!(
            "talk:\n  image: {web}\n  services: [{{name: '{web}', alias: api}}]\n  script:\n    - wget -q -O- http://api:8080/hello.txt\n    - wget -q -O- http://rave-test-web:8080/hello.txt > /dev/null\n    - wget -q -O- http://rave-test__web:8080/hello.txt > /dev/null\n\
             deaf:\n  image: {web}\n  variables: {{RAVE_SERVICE_WAIT: '2'}}\n  services: ['{mute}']\n  script: [echo never-runs]\n\
             crashes:\n  image: {web}\n  services: ['{crash}']\n  script: [echo never-runs]\n"
        ),
    )]);
    let r = rave(d.path(), &["run", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    let talk = job(&v, "talk");
    assert_eq!(talk["status"], "success", "{}", r.stderr);
    assert!(
        r.stderr.contains("talk    > hello from the service"),
        "{}",
        r.stderr
    );
    // The job and its service share the job's cgroup: the peak is measured for the pair.
    assert!(talk["peak_memory_bytes"].as_u64().unwrap() > 0, "{talk:#}");
    let deaf = job(&v, "deaf");
    assert_eq!(deaf["failure_reason"], "runner_error", "{deaf:#}");
    let note = deaf["note"].as_str().unwrap();
    assert!(
        note.contains("service `rave-test/mute:latest` (rave-test__mute, rave-test-mute) did not accept connections on port 9999 within 2s"),
        "{note}"
    );
    assert!(note.contains("mute-started"), "{note}");
    assert!(!r.stderr.contains("never-runs"), "{}", r.stderr);
    let crashes = job(&v, "crashes");
    let note = crashes["note"].as_str().unwrap();
    assert!(
        note.contains("exited with code 3 before accepting connections on port 7777"),
        "{note}"
    );
    assert!(note.contains("boom"), "{note}");
    assert_nothing_left(d.path());
}

#[test]
fn a_restart_sweeps_what_a_killed_rave_left() {
    let web = web_image();
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        &format!(
            "long:\n  image: {web}\n  services: ['{web}']\n  script: [echo READY, sleep 600]\nquick:\n  image: {web}\n  script: [echo quick]\n"
        ),
    )]);
    let mut child = spawn_rave(d.path(), &["run", "long"]);
    let log = d.path().join(".rave/runs/1/logs/000-long.log");
    wait_until("the job never started", 60, || file_contains(&log, "READY"));
    let pid = child.id();
    child.kill().unwrap(); // SIGKILL: rave gets no chance to clean up
    child.wait().unwrap();
    // The job's container and its service outlive it, with their network and cgroup.
    assert_eq!(rave_containers(d.path()).lines().count(), 2);
    assert!(!rave_networks(d.path()).trim().is_empty());
    // The job's group (cgroup v1 here; where the memory controller lives elsewhere the
    // group is simply not looked at).
    let group = std::path::PathBuf::from(format!("/sys/fs/cgroup/memory/rave-{pid}"));
    let had_group = group.exists();
    // The next rave on this machine removes them, whatever it runs.
    let r = rave(d.path(), &["run", "quick"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // (Tests run in parallel: another rave starting now may be the one that sweeps them; any
    // rave does, which is the point. Without the sweep they would stay.)
    assert_nothing_left(d.path());
    assert!(
        !(had_group && group.exists()),
        "{} is left",
        group.display()
    );
}

#[test]
fn container_jobs_get_a_stable_workspace_and_their_cache() {
    // The overlay (or copy) workspace is what the container sees at /builds/…, and the cache
    // is restored into it before the container starts and saved from it after.
    engine_with_image();
    let d = git_repo(&[
        (
            ".gitlab-ci.yml",
            &format!(
                "job:\n  image: {IMAGE}\n  cache: {{key: c, paths: [vendor/]}}\n  script:\n    - test \"$(cat data.txt)\" = original\n    - echo \"CACHE-$(test -f vendor/seen && echo HIT || echo MISS)\"\n    - mkdir -p vendor && touch vendor/seen\n    - echo scribble > data.txt\n"
            ),
        ),
        ("data.txt", "original"),
    ]);
    let first = rave(d.path(), &["run"]);
    assert_eq!(first.code, 0, "{}\n{}", first.stdout, first.stderr);
    assert!(first.stdout.contains("CACHE-MISS"), "{}", first.stdout);
    let second = rave(d.path(), &["run"]);
    assert_eq!(second.code, 0, "{}\n{}", second.stdout, second.stderr);
    assert!(second.stdout.contains("CACHE-HIT"), "{}", second.stdout);
    assert_eq!(
        std::fs::read_to_string(d.path().join("data.txt")).unwrap(),
        "original"
    );
    assert_nothing_left(d.path());
}
