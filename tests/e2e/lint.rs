//! `rave lint`: exit codes, compiler-style messages (snapshotted), bad input.

use std::time::Instant;

use crate::support::*;

fn lint_error(name: &str) -> String {
    let dir = fixtures().join("errors");
    let r = rave(&dir, &["lint", "-C", dir.to_str().unwrap(), "--file", name]);
    assert_eq!(r.code, 2, "{name} should fail lint:\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r.stderr
}

macro_rules! snapshot_error {
    ($($name:ident => $file:literal),* $(,)?) => {$(
        #[test]
        fn $name() {
            insta::assert_snapshot!(lint_error($file));
        }
    )*};
}

snapshot_error! {
    unknown_keyword => "unknown-keyword.yml",
    unknown_stage => "unknown-stage.yml",
    unknown_need => "unknown-need.yml",
    cycle => "cycle.yml",
    bad_yaml => "bad-yaml.yml",
    extends_unknown => "extends-unknown.yml",
    bad_if => "bad-if.yml",
    over_budget => "over-budget.yml",
    needs_excluded => "needs-excluded.yml",
    wrong_type => "wrong-type.yml",
    extends_loop => "extends-loop.yml",
    include_loop => "include-loop.yml",
    include_missing => "include-missing.yml",
    bad_reference => "bad-reference.yml",
}

#[test]
fn origin_pipeline_is_valid() {
    let r = rave(&fixtures().join("origin"), &["lint"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(".gitlab-ci.yml is valid: 9 jobs planned"),
        "{}",
        r.stderr
    );
}

#[test]
fn json_output_lists_diagnostics_with_positions() {
    let dir = fixtures().join("errors");
    let r = rave(
        &dir,
        &[
            "lint",
            "--json",
            "-C",
            dir.to_str().unwrap(),
            "-f",
            "unknown-stage.yml",
        ],
    );
    assert_eq!(r.code, 2);
    let v = json(&r.stdout);
    assert_eq!(v["valid"], false);
    let d = &v["diagnostics"][0];
    assert_eq!(d["severity"], "error");
    assert_eq!(d["file"], "unknown-stage.yml");
    assert_eq!(d["line"], 4);
    assert_eq!(d["col"], 10);
    assert_eq!(d["help"], "did you mean `test`?");
}

#[test]
fn warnings_do_not_fail() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        ".unused:\n  script: x\nold:\n  script: echo\n  only: [main]\n",
    )]);
    let r = rave(d.path(), &["lint"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("warning: `only` is deprecated"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("warning: hidden job `.unused` is never used"),
        "{}",
        r.stderr
    );
}

#[test]
fn pipeline_yml_is_preferred_over_gitlab_ci() {
    let d = git_repo(&[
        ("pipeline.yml", "a: {script: x}\nb: {script: y}\n"),
        (".gitlab-ci.yml", "a: {script: x}\n"),
    ]);
    let r = rave(d.path(), &["lint"]);
    assert!(
        r.stderr.contains("pipeline.yml is valid: 2 jobs"),
        "{}",
        r.stderr
    );
    let r = rave(d.path(), &["lint", "--file", ".gitlab-ci.yml"]);
    assert!(
        r.stderr.contains(".gitlab-ci.yml is valid: 1 job planned"),
        "{}",
        r.stderr
    );
}

#[test]
fn missing_pipeline_file_names_what_was_looked_for() {
    let d = tempfile::tempdir().unwrap();
    let r = rave(d.path(), &["lint"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("looked for pipeline.yml and .gitlab-ci.yml"),
        "{}",
        r.stderr
    );
}

#[test]
fn includes_with_globs_merge_under_the_main_file() {
    let d = git_repo(&[
        (
            ".gitlab-ci.yml",
            "include:\n  - local: ci/*.yml\n  - /ci/extra/last.yml\nvariables: {WHO: main}\nbuild: {stage: build, script: make}\n",
        ),
        (
            "ci/a.yml",
            "variables: {WHO: a, A: '1'}\ntest-a: {script: a, needs: [build]}\n",
        ),
        ("ci/b.yml", "test-b: {script: b}\n"),
        (
            "ci/extra/last.yml",
            ".tmpl: {script: t}\nlast: {extends: .tmpl}\n",
        ),
    ]);
    let r = rave(d.path(), &["graph", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r.stdout);
    let names: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["build", "test-a", "test-b", "last"]);
}

#[test]
fn hostile_input_fails_fast_with_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (prev, c) in ('a'..'i').zip('b'..='i') {
        laughs.push_str(&format!(
            "{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
    }
    laughs.push_str("job: {script: *i}\n");
    std::fs::write(d.path().join("laughs.yml"), laughs).unwrap();
    std::fs::write(
        d.path().join("deep.yml"),
        format!("job: {}{}", "[".repeat(50_000), "]".repeat(50_000)),
    )
    .unwrap();
    let big = "x: {script: echo}\n".repeat(300_000);
    std::fs::write(d.path().join("big.yml"), big).unwrap();
    std::fs::write(d.path().join("binary.yml"), [0xffu8, 0xfe, 0x00, 0x01]).unwrap();
    for (file, expect) in [
        ("laughs.yml", "expands to more than"),
        ("deep.yml", "recursion limit"),
        ("big.yml", "more than the limit of"),
        ("binary.yml", "cannot read"),
    ] {
        let t = Instant::now();
        let r = rave(d.path(), &["lint", "-f", file]);
        assert_eq!(r.code, 2, "{file}: {}", r.stderr);
        assert!(r.stderr.contains(expect), "{file}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{file}: {}", r.stderr);
        // Not a timing assertion on speed, only a guard against a hang.
        assert!(t.elapsed().as_secs() < 60, "{file} took {:?}", t.elapsed());
    }
}

#[test]
fn every_subcommand_has_help() {
    let d = tempfile::tempdir().unwrap();
    for sub in ["lint", "graph", "run", "runs", "logs", "completions"] {
        let r = rave(d.path(), &[sub, "--help"]);
        assert_eq!(r.code, 0, "{sub}");
        assert!(r.stdout.contains("Usage: rave"), "{sub}: {}", r.stdout);
    }
    let r = rave(d.path(), &["completions", "bash"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.contains("complete -F _rave"),
        "{}",
        &r.stdout[..200.min(r.stdout.len())]
    );
}
