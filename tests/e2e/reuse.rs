//! Reuse of unchanged jobs (`RAVE_REUSE`) through the real binary: a hit hands on the earlier
//! run's artifacts and dotenv, a miss names the input that changed, and deployments are never
//! reused.

use crate::support::*;

const PIPELINE: &str = r#"
stages: [build, test]
build:
  stage: build
  variables: {RAVE_REUSE: "1", RAVE_INPUTS: "src/**"}
  script:
    - echo ran >> "$OUT/build"
    - mkdir -p out && cat src/a.txt > out/a && echo "V=$(cat src/a.txt)" > build.env
  artifacts: {paths: [out/], reports: {dotenv: build.env}}
docs:
  stage: build
  variables: {RAVE_REUSE: "1", RAVE_INPUTS: "docs/**"}
  script: ['echo ran >> "$OUT/docs"']
test:
  stage: test
  variables: {RAVE_REUSE: "1", RAVE_INPUTS: "tests/**"}
  script: ['echo "ran $V $(cat out/a)" >> "$OUT/test"']
consume:
  stage: test
  script: ['echo "$V $(cat out/a)" >> "$OUT/consume"']
deploy:
  stage: test
  variables: {RAVE_REUSE: "1"}
  environment: production
  script: ['echo ran >> "$OUT/deploy"']
"#;

#[test]
fn unchanged_jobs_are_reused_and_a_miss_names_what_changed() {
    let d = git_repo(&[
        (".gitlab-ci.yml", PIPELINE),
        ("src/a.txt", "one"),
        ("docs/index.md", "doc"),
        ("tests/t.sh", "true"),
    ]);
    let out = tempfile::tempdir().unwrap();
    let out_s = out.path().to_str().unwrap().to_string();
    let env = [("OUT", out_s.as_str())];
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--json"];
        args.extend_from_slice(extra);
        let r = rave_env(d.path(), &args, &env);
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        (json(&r.stdout), r.stderr)
    };
    let (first, _) = run(&[]);
    assert!(job(&first, "build").get("reused_from").is_none());
    let why = job(&first, "build")["reuse"]["changed"][0]
        .as_str()
        .unwrap();
    assert!(why.contains("no earlier successful run"), "{why}");

    // Nothing changed: build, docs and test are reused; the deployment runs again.
    let (second, _) = run(&[]);
    for name in ["build", "docs", "test"] {
        assert_eq!(job(&second, name)["status"], "success", "{name}");
        assert_eq!(job(&second, name)["reused_from"], 1, "{name}: {second:#}");
    }
    assert!(job(&second, "deploy").get("reused_from").is_none());
    let never = job(&second, "deploy")["reuse"]["changed"][0]
        .as_str()
        .unwrap();
    assert!(never.contains("deploys to an environment"), "{never}");
    assert_eq!(lines(&out.path().join("build")), ["ran"]);
    assert_eq!(lines(&out.path().join("test")), ["ran one one"]);
    assert_eq!(lines(&out.path().join("deploy")), ["ran", "ran"]);
    // A job that is not reused gets the reused job's artifacts and dotenv.
    assert_eq!(lines(&out.path().join("consume")), ["one one", "one one"]);

    // An edit (uncommitted) to what build reads: build runs, and so does test, whose input
    // (build's artifacts) changed with it; docs is still reused.
    std::fs::write(d.path().join("src/a.txt"), "two").unwrap();
    let (third, stderr) = run(&[
        "--explain",
        "build",
        "--explain",
        "test",
        "--explain",
        "docs",
    ]);
    assert!(job(&third, "build").get("reused_from").is_none());
    assert!(job(&third, "test").get("reused_from").is_none());
    assert_eq!(job(&third, "docs")["reused_from"], 1);
    assert!(stderr.contains("file src/a.txt changed"), "{stderr}");
    assert!(stderr.contains("artifacts of build changed"), "{stderr}");
    assert!(stderr.contains("docs reused pipeline 1"), "{stderr}");
    assert_eq!(
        lines(&out.path().join("test")),
        ["ran one one", "ran two two"]
    );
    assert_eq!(
        lines(&out.path().join("consume")).last().unwrap(),
        "two two"
    );

    // The artifacts a record points at are gone: the job runs, and says why.
    std::fs::remove_dir_all(d.path().join(".rave/runs/3/artifacts")).unwrap();
    let (fourth, stderr) = run(&["--explain", "build"]);
    assert!(job(&fourth, "build").get("reused_from").is_none());
    assert!(
        stderr.contains("artifacts of pipeline 3 are gone"),
        "{stderr}"
    );
}
