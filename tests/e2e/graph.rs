//! `rave graph`: the planned DAG for a trigger, in JSON, DOT and Mermaid.

use crate::support::*;

fn graph(dir: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["graph", "--format", "json"];
    args.extend_from_slice(extra);
    let r = rave(dir, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    json(&r.stdout)
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn origin_pipeline_for_a_branch_and_a_tag() {
    let dir = fixtures().join("origin");
    let branch = graph(&dir, &["--ref", "main"]);
    assert_eq!(
        branch["stages"],
        serde_json::json!(["lint", "build", "test", "scan", "release"])
    );
    assert!(!names(&branch).contains(&"release".to_string()));
    let tag = graph(&dir, &["--tag", "v1.2.3"]);
    let release = job(&tag, "release");
    assert_eq!(
        release["needs"],
        serde_json::json!(["vm-test", "unit", "trivy", "npm-audit", "secrets"])
    );
    assert_eq!(release["memory_bytes"], 512u64 << 20);
    assert_eq!(release["priority"], 1);
    // Critical path: fmt → build → vm-image → vm-test → release.
    assert_eq!(job(&tag, "fmt")["priority"], 5);
    assert_eq!(job(&tag, "vm-test")["cpus"], 2.0);
    assert_eq!(
        job(&tag, "npm-audit")["allow_failure"],
        serde_json::json!({"exit_codes": [1]})
    );
    // A tag that doesn't look like a version gets no release job.
    assert!(!names(&graph(&dir, &["--tag", "nightly"])).contains(&"release".to_string()));
}

#[test]
fn dot_and_mermaid_show_edges() {
    let dir = fixtures().join("origin");
    let r = rave(&dir, &["graph", "--format", "dot"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("digraph pipeline {"));
    assert!(
        r.stdout.contains("\"build\" -> \"vm-image\";"),
        "{}",
        r.stdout
    );
    let r = rave(&dir, &["graph", "--format", "mermaid"]);
    assert!(r.stdout.starts_with("flowchart LR"));
    assert!(r.stdout.contains(" --> "));
}

#[test]
fn rules_see_variables_and_the_repository() {
    let d = git_repo(&[
        (
            ".gitlab-ci.yml",
            "node:\n  script: npm ci\n  rules:\n    - exists: [package.json]\npy:\n  script: pytest\n  rules:\n    - exists: ['**/*.py']\ndeploy:\n  script: deploy\n  rules:\n    - if: $DEPLOY == \"yes\" && $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH\n      when: manual\ndocs:\n  script: mkdocs\n  rules:\n    - changes: [docs/**/*]\n",
        ),
        ("package.json", "{}"),
        ("docs/index.md", "# hi"),
    ]);
    let v = graph(d.path(), &[]);
    // Without a comparison base, `changes` is true (GitLab's rule for new refs).
    assert_eq!(names(&v), ["node", "docs"]);
    let v = graph(d.path(), &["--var", "DEPLOY=yes"]);
    assert_eq!(job(&v, "deploy")["when"], "manual");
    // Against HEAD nothing changed, so `docs` drops out; a change brings it back.
    let v = graph(d.path(), &["--compare-to", "HEAD"]);
    assert_eq!(names(&v), ["node"]);
    std::fs::write(d.path().join("docs/index.md"), "# changed").unwrap();
    let v = graph(d.path(), &["--compare-to", "HEAD"]);
    assert_eq!(names(&v), ["node", "docs"]);
}

#[test]
fn matrix_instances_use_gitlab_names() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "build:\n  stage: build\n  script: make\n  parallel:\n    matrix:\n      - TARGET: [x86_64, aarch64]\n        PROFILE: release\ntest:\n  needs: ['build']\n  script: make test\n",
    )]);
    let v = graph(d.path(), &[]);
    assert_eq!(
        names(&v),
        [
            "build: [x86_64, release]",
            "build: [aarch64, release]",
            "test"
        ]
    );
    assert_eq!(job(&v, "test")["needs"].as_array().unwrap().len(), 2);
}

#[test]
fn budget_flags_change_what_fits() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "big:\n  script: make\n  variables: {RAVE_MEMORY: 4G}\n",
    )]);
    let r = rave(d.path(), &["graph"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("more than the whole budget of 3 GiB (profile safe)"),
        "{}",
        r.stderr
    );
    let v = graph(d.path(), &["--memory", "6G"]);
    assert_eq!(v["budget"]["memory_bytes"], 6u64 << 30);
    let r = rave_env(d.path(), &["graph", "--format", "json"], &[("SAFE", "0")]);
    assert_eq!(json(&r.stdout)["budget"]["profile"], "full");
}

#[test]
fn realistic_gitlab_pipelines_plan_as_gitlab_would() {
    let node = fixtures().join("gitlab/node");
    let r = rave(&node, &["lint"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = graph(&node, &["--ref", "main"]);
    assert_eq!(
        names(&v),
        [
            "install",
            "eslint",
            "unit 1/3",
            "unit 2/3",
            "unit 3/3",
            "e2e",
            "build",
            "deploy-staging"
        ]
    );
    assert_eq!(
        job(&v, "build")["needs"],
        serde_json::json!(["eslint", "unit 1/3", "unit 2/3", "unit 3/3"])
    );
    assert_eq!(job(&v, "unit 2/3")["memory_bytes"], 1u64 << 30);
    assert_eq!(job(&v, "e2e")["allow_failure"], true);
    // A feature branch with nothing to compare to still gets e2e (`changes` is true);
    // a tag gets the manual production deploy and no staging.
    let v = graph(&node, &["--tag", "v2.0.0"]);
    assert_eq!(job(&v, "deploy-production")["when"], "manual");
    assert_eq!(job(&v, "deploy-production")["allow_failure"], false);
    assert!(!names(&v).contains(&"deploy-staging".to_string()));

    let rust = fixtures().join("gitlab/rust");
    let r = rave(&rust, &["lint", "--tag", "v1.0.0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = graph(&rust, &["--tag", "v1.0.0"]);
    assert_eq!(
        job(&v, "release")["needs"],
        serde_json::json!([
            "build: [x86_64-unknown-linux-gnu]",
            "build: [aarch64-unknown-linux-gnu]"
        ])
    );
    // clippy → test → build → release is the critical path; fmt needs nothing and is needed by none.
    assert_eq!(job(&v, "clippy")["priority"], 4);
    assert_eq!(job(&v, "fmt")["priority"], 1);
}
