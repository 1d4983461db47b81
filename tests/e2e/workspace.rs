//! Job working directories through the real binary: stable per job, reset from the run's
//! snapshot as GitLab Runner's `GIT_STRATEGY: fetch` resets its build directory, by an overlay
//! mount (root) and by the incremental copy used where mounting is not allowed.

use crate::support::*;

const PIPELINE: &str = r#"
keep-target:
  variables: {GIT_CLEAN_FLAGS: "-ffdx -e target/"}
  script:
    - echo "$CI_PROJECT_DIR" >> "$OUT/keep-dirs"
    - test "$(cat tracked.txt)" = "$(cat "$OUT/expected")"
    - if [ -e target/stamp ]; then echo kept >> "$OUT/keep-seen"; else echo none >> "$OUT/keep-seen"; fi
    - mkdir -p target && echo built > target/stamp
    - echo scribble > tracked.txt
    - rm other.txt
fresh:
  script:
    - test ! -e junk
    - test -e other.txt
    - test "$(cat tracked.txt)" = "$(cat "$OUT/expected")"
    - touch junk
untouched:
  variables: {GIT_STRATEGY: none}
  script:
    - test ! -e tracked.txt
    - if [ -e left ]; then echo left >> "$OUT/none-seen"; else echo empty >> "$OUT/none-seen"; fi
    - touch left
fresh-clone:
  variables: {GIT_STRATEGY: clone, GIT_CLEAN_FLAGS: none}
  script:
    - test ! -e leftover
    - test "$(cat tracked.txt)" = "$(cat "$OUT/expected")"
    - touch leftover
kept:
  variables: {GIT_CLEAN_FLAGS: none}
  script:
    - if [ -e leftover ]; then echo kept >> "$OUT/kept"; else echo none >> "$OUT/kept"; fi
    - touch leftover
par:
  parallel: 2
  script:
    - echo "$CI_PROJECT_DIR" >> "$OUT/par"
"#;

fn workspaces_behave_like_gitlab_build_directories(mode: Option<&str>) {
    let d = git_repo(&[
        (".gitlab-ci.yml", PIPELINE),
        ("tracked.txt", "original"),
        ("other.txt", "o"),
    ]);
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().to_str().unwrap().to_string();
    let mut env = vec![("OUT", out_s.as_str())];
    if let Some(m) = mode {
        env.push(("RAVE_WORKSPACE", m));
    }
    std::fs::write(out.path().join("expected"), "original").unwrap();
    let r = rave_env(d.path(), &["run", "--jobs", "2"], &env);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    // An uncommitted edit reaches the next run (and nothing else of the first run stays).
    std::fs::write(d.path().join("tracked.txt"), "edited").unwrap();
    std::fs::write(out.path().join("expected"), "edited").unwrap();
    let r = rave_env(d.path(), &["run", "--jobs", "2"], &env);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);

    let dirs = lines(&out.path().join("keep-dirs"));
    assert_eq!(dirs.len(), 2);
    assert_eq!(
        dirs[0], dirs[1],
        "the job's directory is the same run after run"
    );
    assert!(
        dirs[0].ends_with("/.rave/builds/keep-target"),
        "{}",
        dirs[0]
    );
    // GIT_CLEAN_FLAGS kept target/ (and only that: tracked files were reset, checked above).
    assert_eq!(lines(&out.path().join("keep-seen")), ["none", "kept"]);
    // GIT_CLEAN_FLAGS: none keeps what the job left; GIT_STRATEGY: clone never does (its
    // script fails on a leftover).
    assert_eq!(lines(&out.path().join("kept")), ["none", "kept"]);
    // GIT_STRATEGY: none leaves the directory as the job left it, without the repository.
    assert_eq!(lines(&out.path().join("none-seen")), ["empty", "left"]);
    let par = lines(&out.path().join("par"));
    assert_eq!(par.len(), 4);
    let distinct: std::collections::HashSet<_> = par.iter().collect();
    assert_eq!(
        distinct.len(),
        2,
        "parallel instances never share a directory: {par:?}"
    );
    // The working tree itself was never touched by a job.
    assert_eq!(
        std::fs::read_to_string(d.path().join("tracked.txt")).unwrap(),
        "edited"
    );
    assert!(d.path().join("other.txt").exists());
}

#[test]
fn overlay_workspaces_are_stable_and_reset_like_gitlab_fetch() {
    workspaces_behave_like_gitlab_build_directories(Some("overlay"));
}

/// A small tree gets copies by default (cheaper than a mount per job), a big one overlays.
#[test]
fn small_trees_get_copies_by_default() {
    workspaces_behave_like_gitlab_build_directories(None);
}

#[test]
fn copied_workspaces_are_stable_and_reset_like_gitlab_fetch() {
    workspaces_behave_like_gitlab_build_directories(Some("copy"));
}

#[test]
fn a_bad_git_strategy_fails_the_job_with_the_cause() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "job:\n  variables: {GIT_STRATEGY: shallow}\n  script: [true]\n",
    )]);
    let r = rave(d.path(), &["run", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    let j = job(&v, "job");
    assert_eq!(j["failure_reason"], "runner_error");
    let note = j["note"].as_str().unwrap_or_default();
    assert!(note.contains("GIT_STRATEGY `shallow`"), "{j:#}");
}

fn jobs_get_a_git_directory(mode: Option<&str>) {
    let d = git_repo(&[
        (
            ".gitlab-ci.yml",
            r#"
history:
  script:
    - test "$(git rev-parse HEAD)" = "$CI_COMMIT_SHA"
    - git describe --tags > "$OUT/describe"
    - git log --oneline | wc -l > "$OUT/count"
    - git status --porcelain > "$OUT/status"
    - git show HEAD:a.txt > "$OUT/show"
shallow:
  variables: {GIT_DEPTH: "1"}
  script:
    - git log --oneline | wc -l > "$OUT/shallow"
"#,
        ),
        ("a.txt", "one"),
    ]);
    sh(
        d.path(),
        "git tag v1.0 && echo two > a.txt && git commit -qam two && echo three > a.txt && git commit -qam three",
    );
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().to_str().unwrap().to_string();
    let mut env = vec![("OUT", out_s.as_str())];
    if let Some(m) = mode {
        env.push(("RAVE_WORKSPACE", m));
    }
    let r = rave_env(d.path(), &["run"], &env);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let read = |f: &str| std::fs::read_to_string(out.path().join(f)).unwrap();
    assert!(
        read("describe").starts_with("v1.0-2-g"),
        "{}",
        read("describe")
    );
    assert_eq!(read("count").trim(), "3");
    assert_eq!(
        read("status").trim(),
        "",
        "the working directory matches its index"
    );
    assert_eq!(read("show").trim(), "three");
    assert_eq!(read("shallow").trim(), "1", "GIT_DEPTH: 1 shows one commit");
    // The project's own repository is untouched: same HEAD, no new refs, clean.
    let st = std::process::Command::new("git")
        .args(["status", "--porcelain"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&st.stdout).trim(), "");
}

#[test]
fn jobs_get_a_git_directory_at_the_pipeline_commit_over_an_overlay() {
    jobs_get_a_git_directory(Some("overlay"));
}

#[test]
fn jobs_get_a_git_directory_at_the_pipeline_commit_in_a_copy() {
    jobs_get_a_git_directory(Some("copy"));
}

#[test]
fn gc_prunes_unused_build_directories_and_cached_includes() {
    let d = git_repo(&[(".gitlab-ci.yml", "fresh:\n  script: [true]\n")]);
    let r = rave(d.path(), &["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    sh(
        d.path(),
        "mkdir -p .rave/builds/stale .rave/includes/remote .rave/includes/projects/old.git .rave/includes/projects/new.git \
         && touch .rave/builds/stale/leftover .rave/includes/remote/old .rave/includes/remote/new \
         && touch -d '40 days ago' .rave/builds/stale .rave/includes/remote/old .rave/includes/projects/old.git",
    );
    let r = rave(d.path(), &["gc"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("1 build directory unused"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("2 cached include(s) unused"),
        "{}",
        r.stdout
    );
    let rave_dir = d.path().join(".rave");
    assert!(!rave_dir.join("builds/stale").exists());
    assert!(rave_dir.join("builds/fresh").exists(), "used today: kept");
    assert!(!rave_dir.join("includes/remote/old").exists());
    assert!(rave_dir.join("includes/remote/new").exists());
    assert!(!rave_dir.join("includes/projects/old.git").exists());
    assert!(rave_dir.join("includes/projects/new.git").exists());
}

/// `GIT_SUBMODULE_STRATEGY`, as GitLab Runner reads it: `none` leaves the submodule's
/// directory empty, `normal` checks it out at the commit the superproject records (from the
/// project's own checkout when it has it, else fetched from its URL, relative URLs against
/// `origin`), `recursive` also its submodules; anything else fails the job with the cause.
#[test]
fn submodules_are_checked_out_as_gitlab_runner_does() {
    let d = tempfile::tempdir().unwrap();
    sh(
        d.path(),
        "git init -q --bare lib.git && git -C lib.git symbolic-ref HEAD refs/heads/main \
         && git init -q -b main libwork && cd libwork && echo 'from the submodule' > lib.txt \
         && git add -A && git -c user.name=t -c user.email=t@t commit -qm lib && git push -q ../lib.git main \
         && cd .. && git init -q --bare app.git && git init -q -b main app && cd app \
         && git remote add origin ../app.git \
         && git -c protocol.file.allow=always submodule add -q ../lib.git vendor/lib \
         && printf 'with:\\n  variables: {GIT_SUBMODULE_STRATEGY: normal}\\n  script: [cat vendor/lib/lib.txt]\\nwithout:\\n  script: [test -d vendor/lib, test -z \"$(ls -A vendor/lib)\"]\\nbad:\\n  variables: {GIT_SUBMODULE_STRATEGY: sometimes}\\n  script: [true]\\n' > .gitlab-ci.yml \
         && git add -A && git -c user.name=t -c user.email=t@t commit -qm app && git push -q origin main",
    );
    let check = |dir: &std::path::Path| {
        let r = rave(dir, &["run", "--json"]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        let v = json(&r.stdout);
        assert_eq!(job(&v, "with")["status"], "success", "{}", r.stderr);
        assert!(
            r.stderr.contains("with    > from the submodule"),
            "{}",
            r.stderr
        );
        assert_eq!(job(&v, "without")["status"], "success", "{}", r.stderr);
        let bad = job(&v, "bad");
        assert_eq!(bad["failure_reason"], "runner_error");
        assert!(
            bad["note"]
                .as_str()
                .unwrap_or_default()
                .contains("GIT_SUBMODULE_STRATEGY `sometimes` is not none, normal or recursive"),
            "{v:#}"
        );
    };
    // The developer's tree, with the submodule checked out there.
    check(&d.path().join("app"));
    // A clone that never checked it out (as a server's checkout): fetched from `../lib.git`,
    // relative to the clone's origin.
    sh(d.path(), "git clone -q -b main app.git fresh");
    assert!(!d.path().join("fresh/vendor/lib/lib.txt").exists());
    check(&d.path().join("fresh"));
    assert!(
        d.path().join("fresh/.rave/submodules").is_dir(),
        "fetched into a mirror kept in the project's state"
    );
}
