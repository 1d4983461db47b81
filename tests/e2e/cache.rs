//! GitLab's `cache:` through the real binary: keys (variables, `files`, `prefix`, the
//! protection suffix), `fallback_keys` and `CACHE_FALLBACK_KEY`, `paths`, `untracked`,
//! `when`, `policy`, `unprotect`, concurrent saves of one key, a damaged archive, and
//! `rave cache list|clear`.

use crate::support::*;

const PIPELINE: &str = r#"
stages: [first, second]
variables:
  CACHE_FALLBACK_KEY: global-non_protected
install:
  stage: first
  cache:
    key: deps-$CI_COMMIT_REF_SLUG
    paths: [vendor/]
  script:
    - if [ -f vendor/marker ]; then echo hit >> "$OUT/install"; else echo miss >> "$OUT/install"; fi
    - mkdir -p vendor && echo "$CI_PIPELINE_ID" > vendor/marker
lockfile:
  stage: first
  cache:
    key: {files: [deps.lock], prefix: lock}
    paths: [.lockcache/]
  script:
    - if [ -f .lockcache/x ]; then echo hit >> "$OUT/lockfile"; else echo miss >> "$OUT/lockfile"; fi
    - mkdir -p .lockcache && touch .lockcache/x
untracked:
  stage: first
  cache: {key: untracked, untracked: true}
  script:
    - if [ -f build.out ]; then echo hit >> "$OUT/untracked"; else echo miss >> "$OUT/untracked"; fi
    - touch build.out
    - echo changed > tracked.txt
failing:
  stage: first
  allow_failure: true
  cache: {key: failing, paths: [f/], when: on_failure}
  script:
    - if [ -f f/x ]; then echo hit >> "$OUT/failing"; else echo miss >> "$OUT/failing"; fi
    - mkdir -p f && touch f/x
    - exit 1
reader:
  stage: second
  cache:
    key: feature-only
    fallback_keys: [nothing-here, deps-$CI_COMMIT_REF_SLUG]
    paths: [vendor/]
    policy: pull
  script:
    - cat vendor/marker >> "$OUT/reader"
    - echo scribbled > vendor/marker
pusher:
  stage: second
  cache: {key: pushed, paths: [p/], policy: push}
  script:
    - if [ -d p ]; then echo restored >> "$OUT/pusher"; else echo fresh >> "$OUT/pusher"; fi
    - mkdir -p p && touch p/x
global:
  stage: second
  cache: {key: none-yet, paths: [g/]}
  script:
    - if [ -f g/from-global ]; then echo hit >> "$OUT/global"; else echo miss >> "$OUT/global"; fi
outside:
  stage: second
  cache: {key: outside, paths: [../escape/]}
  script: [true]
"#;

#[test]
fn every_cache_keyword_behaves_as_gitlab_defines_it() {
    let d = git_repo(&[
        (".gitlab-ci.yml", PIPELINE),
        ("deps.lock", "v1"),
        ("tracked.txt", "original"),
    ]);
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().to_str().unwrap().to_string();
    let env = [("OUT", out_s.as_str())];
    let run = || {
        let r = rave_env(d.path(), &["run", "--jobs", "2", "--json"], &env);
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        json(&r.stdout)
    };
    let first = run();
    // The pull job got the install cache through its second fallback key.
    assert_eq!(lines(&out.path().join("reader")), ["1"]);
    let list = rave(d.path(), &["cache", "list", "--json"]);
    let keys: Vec<String> = json(&list.stdout)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect();
    for k in [
        "deps-main-non_protected",
        "untracked-non_protected",
        "failing-non_protected",
        "pushed-non_protected",
    ] {
        assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
    }
    assert!(keys.iter().any(|k| k.starts_with("lock-")), "{keys:?}");
    assert!(
        !keys.iter().any(|k| k.starts_with("feature-only")),
        "policy: pull never saves: {keys:?}"
    );
    assert!(!keys.iter().any(|k| k.starts_with("outside")), "{keys:?}");
    let outside_log = rave(d.path(), &["logs", "--run", "1", "outside"]).stdout;
    assert!(
        outside_log.contains("leaves the project directory"),
        "{outside_log}"
    );
    assert_eq!(job(&first, "outside")["status"], "success");
    // Give the global fallback key an archive, as a job on another branch would have left.
    let caches = d.path().join(".rave/caches");
    std::fs::create_dir_all(out.path().join("g")).unwrap();
    std::fs::write(out.path().join("g/from-global"), "").unwrap();
    let mk = std::process::Command::new("tar")
        .arg("czf")
        .arg(caches.join("global-non_protected.tar.gz"))
        .args(["-C", out.path().to_str().unwrap(), "g"])
        .status()
        .unwrap();
    assert!(mk.success());

    // Second run: caches hit; the lock file changes the `files` key.
    std::fs::write(d.path().join("deps.lock"), "v2").unwrap();
    run();
    assert_eq!(lines(&out.path().join("install")), ["miss", "hit"]);
    assert_eq!(lines(&out.path().join("lockfile")), ["miss", "miss"]);
    assert_eq!(lines(&out.path().join("untracked")), ["miss", "hit"]);
    // when: on_failure saved the failed job's cache.
    assert_eq!(lines(&out.path().join("failing")), ["miss", "hit"]);
    // policy: push never restores; policy: pull never saved the scribble.
    assert_eq!(lines(&out.path().join("pusher")), ["fresh", "fresh"]);
    assert_eq!(lines(&out.path().join("reader")), ["1", "2"]);
    assert_eq!(lines(&out.path().join("global")), ["miss", "hit"]);
    // untracked: true cached the new file, not the tracked file the job changed.
    let archive = caches.join("untracked-non_protected.tar.gz");
    let listing = std::process::Command::new("tar")
        .arg("tzf")
        .arg(&archive)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("build.out"), "{listing}");
    assert!(!listing.contains("tracked.txt"), "{listing}");

    // Third run with a lock file seen before: its archive is still there.
    std::fs::write(d.path().join("deps.lock"), "v1").unwrap();
    run();
    assert_eq!(lines(&out.path().join("lockfile")), ["miss", "miss", "hit"]);

    let r = rave(d.path(), &["cache", "clear", "deps-main"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("removed 1"), "{}", r.stdout);
    let r = rave(d.path(), &["cache", "clear", "deps-main"]);
    assert_eq!(r.code, 1);
    let r = rave(d.path(), &["cache", "clear"]);
    assert_eq!(r.code, 0);
    assert_eq!(
        rave(d.path(), &["cache", "list"]).stdout.trim(),
        "no cache archives"
    );
}

#[test]
fn unprotect_shares_a_cache_between_protected_and_unprotected_refs() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "shared:\n  cache: {key: s, paths: [c/], unprotect: true}\n  script: [mkdir -p c, touch c/x]\napart:\n  cache: {key: a, paths: [c/]}\n  script: [mkdir -p c, touch c/x]\n",
    )]);
    let r = rave(d.path(), &["run", "--var", "CI_COMMIT_REF_PROTECTED=true"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let keys = rave(d.path(), &["cache", "list"]).stdout;
    assert!(keys.contains("s-non_protected"), "{keys}");
    assert!(keys.contains("a-protected"), "{keys}");
}

#[test]
fn concurrent_saves_of_one_key_leave_one_whole_archive() {
    // Four jobs at once write 8 MB each under one key; the archive that stays is one of
    // them, whole, and restores.
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        r#"
stages: [write, read]
writer:
  stage: write
  parallel: 4
  cache: {key: one, paths: [blob/]}
  script:
    - mkdir -p blob && head -c 8000000 /dev/urandom > blob/data && echo "$CI_NODE_INDEX" > blob/who
    - sha256sum blob/data | cut -d' ' -f1 > blob/sum
reader:
  stage: read
  cache: {key: one, paths: [blob/], policy: pull}
  script:
    - test "$(sha256sum blob/data | cut -d' ' -f1)" = "$(cat blob/sum)"
    - cat blob/who
"#,
    )]);
    let r = rave(d.path(), &["run", "--jobs", "4", "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(job(&json(&r.stdout), "reader")["status"], "success");
    let leftovers: Vec<_> = std::fs::read_dir(d.path().join(".rave/caches"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        leftovers,
        ["one-non_protected.tar.gz"],
        "no temporary file left"
    );
}

#[test]
fn a_damaged_archive_is_dropped_with_a_warning_and_the_job_still_runs() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "job:\n  cache: {key: k, paths: [c/]}\n  script:\n    - test ! -e c/partial\n    - mkdir -p c && head -c 100000 /dev/urandom > c/partial\n",
    )]);
    let r = rave(d.path(), &["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let archive = d.path().join(".rave/caches/k-non_protected.tar.gz");
    let len = std::fs::metadata(&archive).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&archive)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // The job asserts c/partial is absent: a half extraction would fail it.
    std::fs::write(
        d.path().join(".gitlab-ci.yml"),
        "job:\n  cache: {key: k, paths: [c/]}\n  script:\n    - test ! -e c/partial\n",
    )
    .unwrap();
    let r = rave(d.path(), &["run"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("damaged and was dropped"), "{}", r.stdout);
}
