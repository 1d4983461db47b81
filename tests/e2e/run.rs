//! `rave run` with real processes, real cgroups and real git repositories.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

fn run_json(dir: &Path, extra: &[&str]) -> (Run, serde_json::Value) {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    let r = rave(dir, &args);
    let v = json(&r.stdout);
    (r, v)
}

fn time(v: &serde_json::Value, key: &str) -> std::time::SystemTime {
    humantime::parse_rfc3339(v[key].as_str().unwrap()).unwrap()
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

#[test]
fn five_stage_pipeline_runs_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    sh(
        d.path(),
        &format!(
            "cp -r {}/. . && git init -q -b main . && git add -A && git commit -qm init && git tag v1.4.2",
            fixtures().join("five-stage").display()
        ),
    );
    let (r, v) = run_json(d.path(), &["--tag", "v1.4.2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(v["pipeline"]["status"], "success");
    let names: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "lint", "build", "vm-image", "unit", "vm-test", "scan", "release"
        ]
    );
    for j in v["jobs"].as_array().unwrap() {
        assert_eq!(j["status"], "success", "{j:#}");
        assert!(j["peak_memory_bytes"].as_u64().unwrap() > 0, "{j:#}");
    }
    // vm-test asked for 1.5 GiB: QEMU gets at most 3/4 of it, whatever the pipeline said;
    // vm-image has 1 CPU, so Nix gets 1 core though the pipeline sets NIX_BUILD_CORES=2.
    assert!(
        r.stderr.contains("vm-test  > qemu -m 1152 -smp 2"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("vm-image > nix cores=1 max-jobs=1"),
        "{}",
        r.stderr
    );
    let run_dir = d.path().join(".rave/runs/1");
    let sums =
        std::fs::read_to_string(run_dir.join("artifacts/006-release/release/SHA256SUMS")).unwrap();
    assert!(
        sums.contains("app") && sums.contains("rootfs.tar"),
        "{sums}"
    );
    assert!(run_dir.join("logs/003-unit.log").exists());
    assert_eq!(
        json(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap())["pipeline"]["status"],
        "success"
    );
    // .rave/ is kept out of git.
    sh(d.path(), "test -z \"$(git status --porcelain)\"");
}

#[test]
fn oom_kill_is_named_with_limit_and_peak() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "hog:\n  variables: {RAVE_MEMORY: 128M}\n  script:\n    - head -c 600M /dev/zero | tail > /dev/null\n    - echo unreachable\n",
    )]);
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let hog = job(&v, "hog");
    assert_eq!(hog["status"], "failed");
    assert_eq!(hog["failure_reason"], "oom_killed");
    assert_eq!(hog["memory_limit_bytes"], 128u64 << 20);
    let peak = hog["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak > 100 << 20 && peak <= 128 << 20, "peak {peak}");
    // (The biggest process is named when a sample caught it: not asserted here, the job dies
    // within a quarter second.)
    assert!(
        r.stderr
            .contains("hog: killed: exceeded its memory limit of 128 MiB (peak 128 MiB")
            && r.stderr
                .contains("raise RAVE_MEMORY or lower its parallelism"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("unreachable\n"), "{}", r.stderr);
}

/// One job at a time, so each job gets the cgroup the one before it emptied (rave keeps
/// emptied v1 groups for later jobs): nothing of the job before carries over, neither its OOM,
/// nor its peak, nor its limit.
#[test]
fn a_reused_cgroup_carries_nothing_of_the_job_before() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "stages: [a, b, c]\n\
         hog:\n  stage: a\n  allow_failure: true\n  variables: {RAVE_MEMORY: 64M}\n  script:\n    - grep memory /proc/self/cgroup > hog.cg\n    - head -c 600M /dev/zero | tail > /dev/null\n  artifacts: {when: always, paths: [hog.cg]}\n\
         big:\n  stage: b\n  variables: {RAVE_MEMORY: 256M}\n  script:\n    - grep memory /proc/self/cgroup > big.cg\n    - head -c 100M /dev/zero | tail > /dev/null\n  artifacts: {paths: [big.cg]}\n\
         small:\n  stage: c\n  variables: {RAVE_MEMORY: 32M}\n  script:\n    - grep memory /proc/self/cgroup > small.cg\n    - cmp hog.cg big.cg && cmp hog.cg small.cg\n",
    )]);
    let (r, v) = run_json(d.path(), &["--jobs", "1", "--no-learn"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(job(&v, "hog")["failure_reason"], "oom_killed");
    let big = job(&v, "big");
    assert_eq!(big["status"], "success", "{big:#}");
    let peak = big["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak > 90 << 20 && peak <= 256 << 20, "big's peak {peak}");
    let small = job(&v, "small");
    assert_eq!(
        small["status"], "success",
        "the three jobs ran in one group: {small:#}"
    );
    let peak = small["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak < 16 << 20, "small's peak {peak} is not big's");
    assert_eq!(small["memory_limit_bytes"], 32u64 << 20);
}

#[test]
fn big_jobs_never_overlap_when_the_budget_holds_one() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "a:\n  variables: {RAVE_MEMORY: 1536M}\n  script: [sleep 1]\nb:\n  variables: {RAVE_MEMORY: 1536M}\n  script: [sleep 1]\nsmall:\n  variables: {RAVE_MEMORY: 256M}\n  script: [sleep 1]\n",
    )]);
    let (r, v) = run_json(d.path(), &["--memory", "2G", "--jobs", "4", "--cpus", "4"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (a, b) = (job(&v, "a"), job(&v, "b"));
    let overlap = time(a, "started_at") < time(b, "finished_at")
        && time(b, "started_at") < time(a, "finished_at");
    assert!(!overlap, "a and b overlapped:\n{a:#}\n{b:#}");
    // The small one fits next to either.
    let s = job(&v, "small");
    let with_a = time(s, "started_at") < time(a, "finished_at")
        && time(a, "started_at") < time(s, "finished_at");
    let with_b = time(s, "started_at") < time(b, "finished_at")
        && time(b, "started_at") < time(s, "finished_at");
    assert!(
        with_a || with_b,
        "small should run beside a big job:\n{v:#}"
    );
}

#[test]
fn ctrl_c_kills_the_whole_tree_and_runs_after_script() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "long:\n  script:\n    - (sleep 987651; echo never) &\n    - setsid sleep 987652 &\n    - echo READY\n    - sleep 987653\n  after_script:\n    - echo AFTER=$CI_JOB_STATUS\n",
    )]);
    let child = spawn_rave(d.path(), &["run", "--json"]);
    let log = d.path().join(".rave/runs/1/logs/000-long.log");
    wait_until("job never started", 30, || {
        file_contains(&log, "READY") || !processes_with("sleep 987653").is_empty()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        processes_with("sleep 98765").len(),
        3,
        "{:?}",
        processes_with("sleep 98765")
    );
    interrupt(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(job(&v, "long")["status"], "canceled");
    assert_eq!(job(&v, "long")["failure_reason"], "canceled");
    // Everything is gone, the setsid'd one included (it stayed in the job's cgroup).
    assert!(
        processes_with("sleep 98765").is_empty(),
        "{:?}",
        processes_with("sleep 98765")
    );
    let log = std::fs::read_to_string(d.path().join(".rave/runs/1/logs/000-long.log")).unwrap();
    assert!(log.contains("AFTER=canceled"), "{log}");
}

#[test]
fn timeout_kills_the_tree_and_is_reported() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "slow:\n  timeout: 1s\n  script:\n    - sleep 876541 &\n    - sleep 876542\n",
    )]);
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(job(&v, "slow")["failure_reason"], "timeout");
    assert!(
        processes_with("sleep 87654").is_empty(),
        "{:?}",
        processes_with("sleep 87654")
    );
}

#[test]
fn retry_after_script_and_allow_failure() {
    let counter = tempfile::NamedTempFile::new().unwrap();
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "flaky:\n  retry: 1\n  script:\n    - n=$(cat $COUNTER || true); echo $((n+1)) > $COUNTER\n    - test \"$n\" = 1\nbroken:\n  script: [exit 7]\n  after_script: ['echo \"after: $CI_JOB_STATUS\"']\n  allow_failure: {exit_codes: [7]}\nstrict:\n  script: [exit 8]\n  allow_failure: {exit_codes: [7]}\n",
    )]);
    std::fs::write(counter.path(), "0").unwrap();
    let var = format!("COUNTER={}", counter.path().display());
    let (r, v) = run_json(d.path(), &["--var", &var]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let flaky = job(&v, "flaky");
    assert_eq!(flaky["status"], "success");
    assert_eq!(flaky["attempts"], 2);
    assert!(
        r.stderr
            .contains("flaky  > script_failure — retrying (attempt 2)"),
        "{}",
        r.stderr
    );
    assert_eq!(job(&v, "broken")["status"], "warning");
    assert_eq!(job(&v, "broken")["exit_code"], 7);
    assert!(r.stderr.contains("broken > after: failed"), "{}", r.stderr);
    assert_eq!(job(&v, "strict")["status"], "failed");
    assert_eq!(v["pipeline"]["status"], "failed");
}

#[test]
fn artifacts_flow_between_stages_and_parallel_jobs_are_isolated() {
    let d = git_repo(&[
        (
            ".gitlab-ci.yml",
            "stages: [one, two]\nwriter:\n  stage: one\n  script:\n    - echo from-writer > shared.txt\n    - sleep 1\n  artifacts: {paths: [shared.txt]}\nneighbour:\n  stage: one\n  script:\n    - sleep 0.5\n    - test ! -e shared.txt\n    - echo mine > seed.txt\n    - test \"$(cat seed.txt)\" = mine\nreader:\n  stage: two\n  script:\n    - test \"$(cat shared.txt)\" = from-writer\n    - test \"$(cat seed.txt)\" = seed\n",
        ),
        ("seed.txt", "seed\n"),
    ]);
    // An untracked, non-ignored file is part of the working copy too; an ignored one is not.
    sh(
        d.path(),
        "echo local > untracked.txt && echo '*.log' > .gitignore && echo x > debug.log && git add .gitignore && git commit -qm ignore",
    );
    std::fs::write(
        d.path().join(".gitlab-ci.yml"),
        std::fs::read_to_string(d.path().join(".gitlab-ci.yml")).unwrap()
            + "    - test -e untracked.txt\n    - test ! -e debug.log\n",
    )
    .unwrap();
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}\n{v:#}", r.stderr);
}

#[test]
fn caps_reach_the_job_environment() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "caps:\n  variables: {RAVE_MEMORY: 1G, RAVE_CPUS: 2}\n  script:\n    - echo \"C=$CARGO_BUILD_JOBS M=$MAKEFLAGS N=$NIX_BUILD_CORES L=$RAVE_MEMORY_LIMIT_MB NODE=$NODE_OPTIONS Q=$QEMU_RAM_MB/$QEMU_CPUS P=$CI_PIPELINE_ID J=$CI_JOB_NAME T=$CI_COMMIT_REF_NAME\"\n    - printf '%s\\n' \"$NIX_CONFIG\"\n",
    )]);
    let (r, _) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "C=2 M=-j2 N=2 L=1024 NODE=--max-old-space-size=768 Q=768/2 P=1 J=caps T=main"
        ),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("caps > cores = 2\ncaps > max-jobs = 1"),
        "{}",
        r.stderr
    );
}

#[test]
fn named_jobs_run_alone_or_with_their_needs() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "stages: [a, b]\nfirst: {stage: a, script: [echo one]}\nother: {stage: a, script: [echo other]}\nsecond: {stage: b, needs: [first], script: [echo two]}\ndeploy: {stage: b, when: manual, script: [echo deployed]}\n",
    )]);
    let (r, v) = run_json(d.path(), &["second"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
    let (_, v) = run_json(d.path(), &["second", "--needs"]);
    let names: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"]);
    // Manual jobs wait unless named.
    let (_, v) = run_json(d.path(), &[]);
    assert_eq!(job(&v, "deploy")["status"], "manual");
    let (_, v) = run_json(d.path(), &["deploy"]);
    assert_eq!(job(&v, "deploy")["status"], "success");
    let r = rave(d.path(), &["run", "secnod"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did you mean `second`?"), "{}", r.stderr);
}

#[test]
fn failure_skips_later_stages_but_runs_on_failure_jobs() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "stages: [build, test, cleanup]\nbuild: {stage: build, script: [exit 1]}\ntest: {stage: test, script: [echo never]}\nnotify: {stage: cleanup, when: on_failure, script: [echo notified]}\nalways: {stage: cleanup, when: always, script: [echo always]}\n",
    )]);
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 1);
    assert_eq!(job(&v, "build")["failure_reason"], "script_failure");
    assert_eq!(job(&v, "build")["exit_code"], 1);
    assert_eq!(job(&v, "test")["status"], "skipped");
    assert_eq!(job(&v, "notify")["status"], "success");
    assert_eq!(job(&v, "always")["status"], "success");
    let ms = job(&v, "build")["started_at"].as_str().unwrap();
    assert!(
        ms.ends_with('Z') && ms.len() == 24,
        "RFC 3339 with milliseconds: {ms}"
    );
}

#[test]
fn definition_errors_exit_2() {
    let d = git_repo(&[(".gitlab-ci.yml", "job:\n  scirpt: [x]\n")]);
    let r = rave(d.path(), &["run"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did you mean `script`?"), "{}", r.stderr);
}

/// Real Nix (Debian's nix-bin, offline): a `nix-build` started by a job gets the job's caps
/// and its builder runs inside the job's memory cgroup.
#[test]
fn nix_builds_inside_the_job_cgroup_with_its_caps() {
    assert!(
        std::process::Command::new("nix-build")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "nix-build is required (./x test installs Debian's nix-bin)"
    );
    let d = git_repo(&[
        (
            "probe.nix",
            "derivation {\n  name = \"cgroup-probe\";\n  nonce = builtins.getEnv \"CI_JOB_ID\" + builtins.getEnv \"RAVE_RUN_DIR\";\n  system = builtins.currentSystem;\n  builder = \"/bin/sh\";\n  args = [ \"-c\" \"echo cores=$NIX_BUILD_CORES > $out; while read -r l; do echo \\\"$l\\\"; done < /proc/self/cgroup >> $out\" ];\n}\n",
        ),
        (
            ".gitlab-ci.yml",
            ".rave:\n  nix_single_user: true\nnix:\n  variables: {RAVE_CPUS: 2}\n  script:\n    - echo \"remote=$NIX_REMOTE\"\n    - out=$(nix-build --option substituters '' --option sandbox false --no-out-link probe.nix)\n    - cat $out\n",
        ),
    ]);
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(job(&v, "nix")["status"], "success");
    assert!(r.stderr.contains("nix > remote=local"), "{}", r.stderr);
    // NIX_CONFIG from rave sets cores = 2 for a 2-CPU job.
    assert!(r.stderr.contains("nix > cores=2"), "{}", r.stderr);
    let memory_line = r
        .stderr
        .lines()
        .find(|l| l.contains(":memory:") || l.starts_with("nix > 0::"))
        .unwrap_or_default()
        .to_string();
    assert!(
        memory_line.contains("/rave-") && memory_line.ends_with("/000-nix"),
        "builder cgroup: {memory_line}\n{}",
        r.stderr
    );
}

#[test]
fn runtime_variables_expand_when_the_job_starts() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "variables:\n  OUT: $CI_PROJECT_DIR/out\n  PATH: \"$CI_PROJECT_DIR/bin:$PATH\"\n  LITERAL: {value: \"$CI_PROJECT_DIR\", expand: false}\njob:\n  script:\n    - test \"$OUT\" = \"$CI_PROJECT_DIR/out\"\n    - mkdir -p bin && printf '#!/bin/sh\\necho tool-ok\\n' > bin/mytool && chmod +x bin/mytool\n    - mytool\n    - ls > /dev/null\n    - test \"$LITERAL\" = '$CI_PROJECT_DIR'\n",
    )]);
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}\n{v:#}", r.stderr);
    assert!(r.stderr.contains("job > tool-ok"), "{}", r.stderr);
}

#[test]
fn later_commands_show_earlier_runs() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "build: {stage: build, script: [echo built-it]}\n\"test 1\": {script: [echo tested, exit 1]}\n",
    )]);
    rave(d.path(), &["run"]);
    rave(d.path(), &["run", "build"]);
    let r = rave(d.path(), &["runs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines[1].starts_with("2     success"), "{}", r.stdout);
    assert!(lines[2].starts_with("1     failed"), "{}", r.stdout);
    let r = rave(d.path(), &["logs", "test 1", "--run", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("$ echo tested\ntested\n"), "{}", r.stdout);
    let r = rave(d.path(), &["logs", "--run", "1"]);
    assert!(r.stdout.contains("failed    test 1"), "{}", r.stdout);
    let r = rave(d.path(), &["logs", "build"]);
    assert!(r.stdout.contains("built-it"), "{}", r.stdout);
    let r = rave(d.path(), &["logs", "nope"]);
    assert_eq!(r.code, 2);
}

#[test]
fn full_pipe_switches_profiles() {
    let d = git_repo(&[(".gitlab-ci.yml", "job: {script: [true]}\n")]);
    for (env, expect) in [("FULL_PIPE", "full"), ("SAFE", "full")] {
        let val = if env == "SAFE" { "0" } else { "1" };
        let r = rave_env(d.path(), &["graph", "--format", "json"], &[(env, val)]);
        assert_eq!(json(&r.stdout)["budget"]["profile"], expect, "{env}={val}");
    }
    let r = rave(
        d.path(),
        &["graph", "--format", "json", "--profile", "FULL_PIPE"],
    );
    assert_eq!(json(&r.stdout)["budget"]["profile"], "full");
    let r = rave(d.path(), &["graph", "--format", "json"]);
    assert_eq!(json(&r.stdout)["budget"]["profile"], "safe");
}

#[test]
fn jobs_see_the_tree_as_it_was_when_the_pipeline_started() {
    let d = git_repo(&[
        (
            ".gitlab-ci.yml",
            "stages: [one, two]\nfirst:\n  stage: one\n  script: [cat data.txt, sleep 1]\nsecond:\n  stage: two\n  script: ['test \"$(cat data.txt)\" = original']\n",
        ),
        ("data.txt", "original"),
    ]);
    let child = spawn_rave(d.path(), &["run", "--json"]);
    let log = d.path().join(".rave/runs/1/logs/000-first.log");
    wait_until("first never started", 30, || {
        file_contains(&log, "original")
    });
    // Edited while the pipeline runs: the second job must still see the original.
    std::fs::write(d.path().join("data.txt"), "edited").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn later_runs_start_the_job_that_took_longest_last_time() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "a: {needs: [], script: [sleep 0.05]}\nb: {needs: [a], script: [sleep 0.05]}\nc: {needs: [], script: [sleep 0.6]}\n",
    )]);
    let started = |v: &serde_json::Value, n: &str| time(job(v, n), "started_at");
    // First run: no history, so the longer chain (a → b) goes first.
    let (r, v) = run_json(d.path(), &["--jobs", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(started(&v, "a") < started(&v, "c"));
    // Second run: c took longest, so it is the critical path now.
    let (r, v) = run_json(d.path(), &["--jobs", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(started(&v, "c") < started(&v, "a"), "{v:#}");
}

#[test]
fn masked_variables_never_reach_the_logs() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "leak:\n  script:\n    - echo \"token is $API_TOKEN\"\n    - echo \"$RAVE_SIGNING_KEY\"\n    - echo \"short $PIN\"\n",
    )]);
    let r = rave(
        d.path(),
        &[
            "run",
            "--var",
            "API_TOKEN=tok-1234567890",
            "--var",
            "PIN=1234",
            "--var",
            "RAVE_MASKED_VARIABLES=API_TOKEN,PIN",
            "--var",
            "RAVE_SIGNING_KEY=-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU\n-----END OPENSSH PRIVATE KEY-----",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let log = std::fs::read_to_string(d.path().join(".rave/runs/1/logs/000-leak.log")).unwrap();
    for text in [&r.stdout, &log] {
        assert!(text.contains("token is [MASKED]"), "{text}");
        assert!(!text.contains("tok-1234567890"), "{text}");
        assert!(!text.contains("b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"), "{text}");
        // Shorter than 8 characters: not masked, as in GitLab.
        assert!(text.contains("short 1234"), "{text}");
    }
}

/// A job that asks for an image never runs on the host when no Docker engine answers: it fails
/// with `runner_error` and the fix. `--executor local` is the explicit way to run it here.
#[test]
fn image_jobs_never_fall_back_to_the_host_without_docker() {
    let marker = tempfile::tempdir().unwrap();
    let touched = marker.path().join("ran-on-host");
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        &format!(
            "job:\n  image: alpine:3\n  script: [touch {}]\n",
            touched.display()
        ),
    )]);
    let no_engine = [("DOCKER_HOST", "unix:///nonexistent/docker.sock")];
    let r = rave_env(d.path(), &["run", "--json", "--no-cgroups"], &no_engine);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    let job = &v["jobs"][0];
    assert_eq!(job["status"], "failed");
    assert_eq!(job["failure_reason"], "runner_error");
    let note = job["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("no Docker engine answers") && note.contains("--executor local"),
        "{note}"
    );
    assert!(!touched.exists(), "the job ran on the host");

    let r = rave_env(
        d.path(),
        &["run", "--json", "--no-cgroups", "--executor", "local"],
        &no_engine,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(touched.exists(), "--executor local runs the job here");
}

/// The kernel's OOM killer picks jobs first and rave last: jobs run with `oom_score_adj` 1000;
/// rave asks for -900 for itself, which only a kernel that lets it lower its score grants (some
/// sandboxes refuse any negative value), so the test checks that rave ranks below its jobs.
#[test]
fn jobs_are_the_oom_killers_first_choice_and_rave_its_last() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "job:\n  script:\n    - echo \"job=$(cat /proc/self/oom_score_adj)\"\n    - echo \"rave=$(cat /proc/$PPID/oom_score_adj)\" || true\n    - sleep 2\n",
    )]);
    let child = spawn_rave(d.path(), &["run", "--json", "--executor", "local"]);
    let pid = child.id();
    let log = d.path().join(".rave/runs/1/logs/000-job.log");
    wait_until("the job never started", 60, || file_contains(&log, "job="));
    let rave_score = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("job=1000"), "{text}");
    let rave_score: i32 = rave_score.trim().parse().unwrap();
    assert!(rave_score <= 0, "rave's oom_score_adj is {rave_score}");
}

/// The run reports how much of its memory budget its jobs used over its duration.
#[test]
fn the_summary_reports_budget_utilisation() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "a:\n  variables: {RAVE_MEMORY: 1G}\n  script: [sleep 1]\nb:\n  variables: {RAVE_MEMORY: 1G}\n  script: [sleep 1]\n",
    )]);
    let r = rave(
        d.path(),
        &["run", "--json", "--no-cgroups", "--memory", "2G"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r.stdout);
    let u = v["pipeline"]["budget_utilisation"].as_f64().unwrap();
    // Without cgroups no peak is measured: the limits count, two 1 GiB jobs side by side in a
    // 2 GiB budget for about the whole run.
    assert!(u > 0.5 && u <= 1.0, "utilisation {u}");
}

#[test]
fn jobs_without_a_request_are_admitted_with_what_they_measured_before() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "small:\n  script: ['head -c 20000000 /dev/zero | tail > /dev/null']\nsized:\n  variables: {RAVE_MEMORY: 256M}\n  script: [true]\n",
    )]);
    let graph = |extra: &[&str]| {
        let mut args = vec!["graph", "--format", "json"];
        args.extend_from_slice(extra);
        let r = rave(d.path(), &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        json(&r.stdout)
    };
    let first = graph(&[]);
    assert_eq!(job(&first, "small")["memory_source"], "default");
    assert_eq!(job(&first, "small")["memory_bytes"], 512u64 << 20);
    assert_eq!(job(&first, "sized")["memory_source"], "explicit");
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let peak = job(&v, "small")["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak > 0);
    // The next plan and run use the measured peak (with head room), never the explicit one.
    let second = graph(&[]);
    assert_eq!(
        job(&second, "small")["memory_source"],
        "learned from 1 run(s)"
    );
    let learned = job(&second, "small")["memory_bytes"].as_u64().unwrap();
    assert!((32u64 << 20..512 << 20).contains(&learned), "{learned}");
    assert_eq!(job(&second, "sized")["memory_source"], "explicit");
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        job(&v, "small")["memory_limit_bytes"].as_u64().unwrap(),
        learned
    );
    assert_eq!(job(&v, "small")["memory_source"], "learned from 1 run(s)");
    // A third run: the request now comes from the peaks of all three.
    let (r, _) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        job(&graph(&[]), "small")["memory_source"],
        "learned from 3 run(s)"
    );
    // --no-learn: the default again.
    assert_eq!(
        job(&graph(&["--no-learn"]), "small")["memory_source"],
        "default"
    );
}

#[test]
fn a_job_killed_at_its_learned_limit_is_retried_once_with_more() {
    // First run: the job needs ~20 MB, so the next one is admitted with the 32 MiB floor.
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "grow:\n  script: ['head -c \"${SIZE:-20000000}\" /dev/zero | tail > /dev/null']\n",
    )]);
    let (r, _) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Now it needs ~45 MB: killed at the learned limit, retried with twice its peak.
    let (r, v) = run_json(d.path(), &["--var", "SIZE=45000000"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let j = job(&v, "grow");
    assert_eq!(j["status"], "success", "{j:#}");
    assert_eq!(j["attempts"], 2, "{j:#}");
    assert!(
        j["memory_limit_bytes"].as_u64().unwrap() > 32 << 20,
        "{j:#}"
    );
    assert_eq!(
        j["memory_source"],
        "learned from 1 run(s), raised after an OOM kill"
    );
    assert!(r.stderr.contains("oom_killed"), "{}", r.stderr);
    // An explicit limit is not raised: the OOM stands.
    std::fs::write(
        d.path().join(".gitlab-ci.yml"),
        "grow:\n  variables: {RAVE_MEMORY: 32M}\n  script: ['head -c 45000000 /dev/zero | tail > /dev/null']\n",
    )
    .unwrap();
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 1);
    assert_eq!(job(&v, "grow")["failure_reason"], "oom_killed");
    assert_eq!(job(&v, "grow")["attempts"], 1);
}

#[test]
fn an_oom_report_names_the_biggest_process_and_an_outside_kill_is_not_an_oom() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "hog:\n  variables: {RAVE_MEMORY: 64M}\n  script:\n    - (for i in $(seq 1 100); do head -c 2000000 /dev/zero; sleep 0.05; done) | tail > /dev/null\nvictim:\n  script:\n    - echo $$ > \"$OUT/pid\"\n    - sleep 30\n",
    )]);
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().to_str().unwrap().to_string();
    let child = std::process::Command::new(rave_bin())
        .args(["run", "--json"])
        .current_dir(d.path())
        .env("OUT", &out_s)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid_file = out.path().join("pid");
    wait_until("the victim never started", 30, || {
        std::fs::read_to_string(&pid_file).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
    });
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    let v = json(&String::from_utf8_lossy(&o.stdout));
    let hog = job(&v, "hog");
    assert_eq!(hog["failure_reason"], "oom_killed", "{hog:#}");
    let note = hog["note"].as_str().unwrap();
    assert!(note.contains("largest process: tail"), "{note}");
    let victim = job(&v, "victim");
    assert_eq!(victim["failure_reason"], "script_failure", "{victim:#}");
    let note = victim["note"].as_str().unwrap();
    assert!(note.contains("SIGKILL from outside the job"), "{note}");
}

/// An OOM kill that is not the job's own limit, on cgroup v1: rave runs inside a group limited
/// to 192 MiB, the job may use 1 GiB, and grows past 192 MiB. The kernel kills in the job's
/// group for the ancestor's limit; the job's group never reached its own, so rave says the
/// memory ran out outside the job (as it would for the machine), not that the job exceeded
/// its limit. (The v2 path, with a real host OOM, is `cgroup_v2.rs`.)
#[test]
fn an_oom_kill_beyond_the_job_s_own_limit_is_not_reported_as_its_limit() {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let Some(own) = own.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
        ctrl.split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    }) else {
        panic!("this test needs the cgroup v1 memory controller (v2 is covered by cgroup_v2.rs)");
    };
    let outer = Path::new("/sys/fs/cgroup/memory")
        .join(own.trim_start_matches('/'))
        .join(format!("rave-test-outer-{}", std::process::id()));
    std::fs::create_dir(&outer).unwrap();
    std::fs::write(
        outer.join("memory.limit_in_bytes"),
        (192u64 << 20).to_string(),
    )
    .unwrap();
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "grow:\n  variables: {RAVE_MEMORY: 1G}\n  script:\n    - head -c 600M /dev/zero | tail > /dev/null\n",
    )]);
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {} run --json --memory 2G",
            outer.display(),
            rave_bin().display()
        ))
        .current_dir(d.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&outer);
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let grow = job(&v, "grow");
    assert_eq!(grow["failure_reason"], "oom_killed", "{grow:#}");
    let note = grow["note"].as_str().unwrap();
    assert!(
        note.contains("not the job's limit of 1 GiB"),
        "{note}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GitLab's retry inside the pipeline, locally: `rave run --continue N JOB` runs the failed job
/// again (its next attempt) and the job that was skipped because of it; the job before it is
/// not rebuilt (the same artifact and dotenv value reach the jobs after it); a manual job named
/// the same way is played; the pipeline id stays the same.
#[test]
fn continue_retries_a_job_inside_its_pipeline_and_plays_a_manual_one() {
    let flag = tempfile::tempdir().unwrap();
    let pass = flag.path().join("pass");
    let dir = git_repo(&[(
        ".gitlab-ci.yml",
        &format!(
            "build:\n  stage: build\n  script:\n    - echo \"built $RANDOM$RANDOM\" > out.txt\n    - echo \"BUILD_ID=$RANDOM$RANDOM\" > build.env\n  artifacts:\n    paths: [out.txt]\n    reports: {{dotenv: build.env}}\ntest:\n  stage: test\n  script: [test -e {}]\ndeploy:\n  stage: deploy\n  script: [cat out.txt, 'echo \"id=$BUILD_ID\"']\nrelease:\n  stage: deploy\n  when: manual\n  script: [echo released]\n",
            pass.display()
        ),
    )]);
    let first = rave(dir.path(), &["run", "--json"]);
    assert_eq!(first.code, 1, "{}", first.stderr);
    let v = json(&first.stdout);
    assert_eq!(job(&v, "test")["status"], "failed");
    assert_eq!(job(&v, "deploy")["status"], "skipped");
    let id = v["pipeline"]["id"].as_u64().unwrap();
    let build_log = |run: &str| {
        std::fs::read_to_string(
            dir.path()
                .join(format!(".rave/runs/{run}/artifacts/000-build/out.txt")),
        )
        .unwrap_or_default()
    };
    let built = build_log("1");
    assert!(built.starts_with("built "), "{built}");

    std::fs::write(&pass, "").unwrap();
    let again = rave(dir.path(), &["run", "--json", "--continue", "1", "test"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let v = json(&again.stdout);
    assert_eq!(v["pipeline"]["status"], "success", "{v:#}");
    assert_eq!(
        v["pipeline"]["id"].as_u64(),
        Some(id),
        "a retry stays in its pipeline"
    );
    assert_eq!(job(&v, "test")["attempts"], 2, "{v:#}");
    assert_eq!(job(&v, "test")["status"], "success");
    assert_eq!(job(&v, "deploy")["status"], "success");
    assert_eq!(job(&v, "release")["status"], "manual");
    // build kept its result and artifacts: not run again.
    assert!(
        !again.stderr.contains("build  > started"),
        "{}",
        again.stderr
    );
    assert_eq!(build_log("2"), built, "the artifact is the first run's");
    let deploy = std::fs::read_to_string(dir.path().join(".rave/runs/2/logs/002-deploy.log"))
        .unwrap_or_default();
    assert!(deploy.contains(built.trim()), "{deploy}");
    let first_id = std::fs::read_to_string(
        dir.path()
            .join(".rave/runs/1/artifacts/000-build/build.env"),
    )
    .unwrap();
    assert!(
        deploy.contains(&format!(
            "id={}",
            first_id.trim().trim_start_matches("BUILD_ID=")
        )),
        "{deploy}"
    );

    // Play the manual job in the same pipeline.
    let play = rave(dir.path(), &["run", "--json", "--continue", "2", "release"]);
    assert_eq!(play.code, 0, "{}", play.stderr);
    let v = json(&play.stdout);
    assert_eq!(job(&v, "release")["status"], "success", "{v:#}");
    assert_eq!(job(&v, "deploy")["status"], "success");

    // A run that never ended, or a job that was not part of it, is refused with why.
    let bad = rave(dir.path(), &["run", "--continue", "9", "test"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("only a run that ended"),
        "{}",
        bad.stderr
    );
}

/// CPU requests learned from measured CPU time (the job's cgroup accounting): a job that
/// waits gets a quarter CPU next time, a job that keeps a CPU busy keeps its one; a stated
/// `RAVE_CPUS` is never replaced.
#[test]
fn cpu_requests_are_learned_from_measured_cpu_time() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "waits:\n  script: [sleep 1]\nburns:\n  script: ['timeout 1 sh -c \"while :; do :; done\" || true']\nstated:\n  variables: {RAVE_CPUS: '1'}\n  script: [sleep 1]\n",
    )]);
    let (r, v) = run_json(d.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let burned = job(&v, "burns")["cpu_seconds"].as_f64().unwrap();
    let waited = job(&v, "waits")["cpu_seconds"].as_f64().unwrap();
    assert!(burned > 0.5, "a busy loop for 1 s used {burned} s of CPU");
    assert!(waited < 0.2, "sleep used {waited} s of CPU");
    let r = rave(d.path(), &["graph", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let g = json(&r.stdout);
    assert_eq!(job(&g, "waits")["cpu_source"], "learned from 1 run(s)");
    assert_eq!(job(&g, "waits")["cpus"], 0.25);
    assert_eq!(job(&g, "burns")["cpu_source"], "learned from 1 run(s)");
    assert_eq!(job(&g, "burns")["cpus"], 1.0, "never above the default");
    assert_eq!(job(&g, "stated")["cpu_source"], "explicit");
    let r = rave(d.path(), &["graph", "--format", "json", "--no-learn"]);
    assert_eq!(job(&json(&r.stdout), "waits")["cpu_source"], "default");
}
