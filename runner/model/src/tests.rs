//! Keyword-by-keyword tests of the typed model.

use std::time::Duration;

use crate::*;

fn ok(yaml: &str) -> Pipeline {
    let l = load_str(yaml);
    let errs: Vec<&str> = l
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.message.as_str())
        .collect();
    assert!(errs.is_empty(), "{errs:?}");
    l.pipeline.unwrap()
}

fn errors(yaml: &str) -> Vec<String> {
    load_str(yaml)
        .diagnostics
        .into_iter()
        .filter(|d| d.is_error())
        .map(|d| d.message)
        .collect()
}

#[test]
fn script_forms_and_flattening() {
    let p = ok(
        ".s: {script: [a, b]}\nj:\n  before_script: setup\n  script: [!reference [.s, script], c, 42]\n  after_script: [done]\n",
    );
    let j = &p.jobs["j"];
    assert_eq!(j.before_script, ["setup"]);
    assert_eq!(j.script, ["a", "b", "c", "42"]);
    assert_eq!(j.after_script, ["done"]);
}

#[test]
fn default_and_inherit() {
    let p = ok(
        "default:\n  image: alpine\n  timeout: 10m\n  before_script: [init]\na: {script: x}\nb: {script: x, image: debian, inherit: {default: false}}\nc: {script: x, inherit: {default: [timeout]}}\n",
    );
    assert_eq!(p.jobs["a"].image.as_ref().unwrap().name, "alpine");
    assert_eq!(p.jobs["a"].before_script, ["init"]);
    assert_eq!(p.jobs["a"].timeout, Some(Duration::from_secs(600)));
    assert_eq!(p.jobs["b"].image.as_ref().unwrap().name, "debian");
    assert_eq!(p.jobs["b"].timeout, None);
    assert!(p.jobs["c"].image.is_none());
    assert_eq!(p.jobs["c"].timeout, Some(Duration::from_secs(600)));
    assert_eq!(
        errors("default: {stage: x}\nj: {script: x}\n"),
        ["`default:` cannot set `stage`"]
    );
}

#[test]
fn inherit_variables() {
    let p = ok(
        "variables: {A: '1', B: '2'}\nx: {script: s, inherit: {variables: false}}\ny: {script: s, inherit: {variables: [B]}}\n",
    );
    assert_eq!(p.jobs["x"].inherit_variables, InheritVariables::None);
    assert!(p.jobs["y"].inherit_variables.includes("B"));
    assert!(!p.jobs["y"].inherit_variables.includes("A"));
}

#[test]
fn retry_allow_failure_timeout() {
    let p = ok(
        "j:\n  script: x\n  retry: {max: 2, when: [script_failure], exit_codes: [1, 2]}\n  allow_failure: {exit_codes: 3}\n  timeout: 1h 30m\n",
    );
    let j = &p.jobs["j"];
    let r = j.retry.as_ref().unwrap();
    assert_eq!(
        (r.max, r.when.as_slice(), r.exit_codes.as_slice()),
        (2, &["script_failure".to_string()][..], &[1, 2][..])
    );
    assert_eq!(j.allow_failure, Some(AllowFailure::ExitCodes(vec![3])));
    assert_eq!(j.timeout, Some(Duration::from_secs(5400)));
    assert!(errors("j: {script: x, retry: 3}\n")[0].contains("between 0 and 2"));
}

#[test]
fn artifacts_cache_image_services_environment() {
    let p = ok(concat!(
        "j:\n  script: x\n",
        "  artifacts: {paths: [a/], exclude: ['a/*.tmp'], expire_in: 7 days, when: always, reports: {junit: r.xml, dotenv: b.env, sast: s.json}}\n",
        "  cache: [{key: {files: [Cargo.lock]}, paths: [target/], policy: pull}, {key: k, paths: [x]}]\n",
        "  image: {name: 'rust:1', entrypoint: ['']}\n",
        "  services: [postgres, {name: 'redis:7', alias: cache}]\n",
        "  environment: {name: prod, url: 'https://x'}\n",
        "  resource_group: prod\n  interruptible: true\n  tags: [linux]\n",
    ));
    let j = &p.jobs["j"];
    let a = j.artifacts.as_ref().unwrap();
    assert_eq!(a.paths, ["a/"]);
    assert_eq!(a.expire_in, Some(Duration::from_secs(7 * 86400)));
    assert_eq!(a.when, ArtifactsWhen::Always);
    assert_eq!(a.reports.junit, ["r.xml"]);
    assert_eq!(a.reports.dotenv, ["b.env"]);
    assert_eq!(a.reports.other[0].0, "sast");
    assert_eq!(j.cache.len(), 2);
    assert_eq!(j.cache[0].key_files, ["Cargo.lock"]);
    assert_eq!(
        j.image.as_ref().unwrap().entrypoint.as_deref(),
        Some(&["".to_string()][..])
    );
    assert_eq!(j.services[1].alias.as_deref(), Some("cache"));
    assert_eq!(
        j.environment.as_ref().unwrap().url.as_deref(),
        Some("https://x")
    );
    assert_eq!(j.resource_group.as_deref(), Some("prod"));
    assert!(j.interruptible);
    assert!(errors("j: {script: x, cache: {policy: pul}}\n")[0].contains("unknown cache policy"));
}

#[test]
fn needs_forms() {
    let p = ok(
        "a: {stage: build, script: x}\nb: {script: x, needs: [a, {job: a, artifacts: false, optional: true}]}\nc: {script: x, needs: []}\nd: {script: x}\n",
    );
    let n = p.jobs["b"].needs.as_ref().unwrap();
    assert!(n[0].artifacts && !n[0].optional);
    assert!(!n[1].artifacts && n[1].optional);
    assert_eq!(p.jobs["c"].needs.as_deref(), Some(&[][..]));
    assert!(p.jobs["d"].needs.is_none());
    assert!(errors("a: {script: x, needs: [{pipeline: other}]}\n")[0].contains("not supported"));
}

#[test]
fn parallel_limits() {
    let p = ok("a: {script: x, parallel: 5}\n");
    assert_eq!(p.jobs["a"].parallel, Some(Parallel::Count(5)));
    assert!(errors("a: {script: x, parallel: 201}\n")[0].contains("between 1 and 200"));
    let big = "a:\n  script: x\n  parallel:\n    matrix:\n      - A: [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]\n        B: [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]\n";
    assert!(errors(big)[0].contains("makes 225 jobs"));
}

#[test]
fn rave_settings() {
    let p = ok(
        ".rave:\n  profile: big\n  profiles:\n    big: {memory: 8G, cpus: 4, jobs: 3}\n    safe: {memory: 2G}\n  defaults: {memory: 256M, cpus: 0.5}\n  executor: docker\nj: {script: x, resources: {memory: 1G, cpus: 2}}\n",
    );
    assert_eq!(p.rave.profile.as_deref(), Some("big"));
    assert_eq!(p.rave.profiles["big"].memory_bytes, 8 << 30);
    assert_eq!(p.rave.profiles["big"].jobs, 3);
    assert_eq!(p.rave.profiles["safe"].memory_bytes, 2 << 30);
    assert_eq!(p.rave.profiles["safe"].cpus, 2.0);
    assert_eq!(p.rave.default_memory_bytes, 256 << 20);
    assert_eq!(p.jobs["j"].resources.memory_bytes, Some(1 << 30));
    assert!(
        errors(".rave: {profile: nope}\nj: {script: x}\n")[0]
            .contains("profile `nope` is not defined")
    );
    assert!(errors(".rave: {executor: dokcer}\nj: {script: x}\n")[0].contains("unknown executor"));
}

#[test]
fn stages_pre_and_post() {
    let p = ok(
        "stages: [b, a]\nx: {stage: .post, script: s}\ny: {stage: .pre, script: s}\nz: {stage: a, script: s}\n",
    );
    let names: Vec<&str> = p.stages.iter().map(|s| s.value.as_str()).collect();
    assert_eq!(names, [".pre", "b", "a", ".post"]);
    assert!(errors("stages: [a, a]\nj: {stage: a, script: s}\n")[0].contains("listed twice"));
    assert!(errors("stages: [a]\nj: {script: s}\n")[0].contains("default stage `test`"));
}

#[test]
fn structural_errors() {
    assert!(errors("j: echo\n")[0].contains("must be a mapping"));
    assert!(errors("stage: [a]\nj: {script: x}\n")[0].contains("unknown key `stage`"));
    assert!(errors("[1, 2]\n")[0].contains("must be a mapping"));
    assert!(errors(".hidden: {script: x}\n")[0].contains("no jobs"));
    assert!(errors("j: {script: x, trigger: other}\n")[0].contains("trigger"));
    assert!(
        errors("j: {script: x, rules: [{if: $A}], only: [main]}\n")
            .iter()
            .any(|e| e.contains("both `rules`"))
    );
    assert!(
        errors("j: {script: x, variables: {'bad-name': 1}}\n")[0]
            .contains("not a valid variable name")
    );
}

#[test]
fn image_variants_as_disks() {
    let p = ok(
        ".rave:\n  image:\n    services: {api: {port: 8080}}\n    variants: {p1: [api], disk: {services: [api], format: qcow2}}\n",
    );
    let build = p.jobs["rave-image"].script.join(" ");
    assert!(build.contains("--variant disk=api"), "{build}");
    assert!(build.contains("--qcow2 disk"), "{build}");
    assert!(build.contains("--variant p1=api"), "{build}");
    let e = errors(
        ".rave:\n  image:\n    services: {api: {port: 8080}}\n    variants: {disk: {services: [api], format: qcow3}}\n",
    );
    assert!(
        e.iter()
            .any(|m| m.contains("unknown image format `qcow3`: use initramfs or qcow2")),
        "{e:?}"
    );
}
