//! Includes from outside the repository, fetched for real: a forge served by git's own
//! smart-HTTP backend (behind a token, as the serve tests do) holding a templates project and
//! a component project with tagged versions, and a plain HTTP server for `include: remote`
//! (no other host is reachable from the tests, so both run on loopback).

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::support::*;

const TOKEN: &str = "include-token-123";

struct Servers {
    forge: Child,
    files: Child,
    forge_url: String,
    files_url: String,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in [&mut self.forge, &mut self.files] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn port_line(child: &mut Child) -> String {
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_string()
}

/// One commit of a test project: its files, and the tag put on it.
type Commit<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);

/// A bare repository `root/<path>.git` with these commits, in order.
fn forge_project(root: &Path, path: &str, commits: &[Commit<'_>]) {
    let work = tempfile::tempdir().unwrap();
    sh(work.path(), "git init -q -b main .");
    for (files, tag) in commits {
        for (p, c) in *files {
            let f = work.path().join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, c).unwrap();
        }
        sh(work.path(), "git add -A && git commit -qm c");
        if let Some(t) = tag {
            sh(work.path(), &format!("git tag {t}"));
        }
    }
    let bare = root.join(format!("{path}.git"));
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    sh(
        work.path(),
        &format!(
            "git clone -q --bare . {} && git -C {} update-server-info",
            bare.display(),
            bare.display()
        ),
    );
    sh(
        work.path(),
        &format!("git push -q --tags {} main", bare.display()),
    );
}

fn servers(root: &Path, files: &Path) -> Servers {
    let mut forge = Command::new("python3")
        .arg(fixtures().join("servers/git_http.py"))
        .arg(root)
        .arg(TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let forge_port = port_line(&mut forge);
    let mut files_srv = Command::new("python3")
        .args(["-u", "-c", "import http.server, socketserver, functools, sys\nh = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\nh.log_message = lambda *a: None\ns = socketserver.TCPServer(('127.0.0.1', 0), h)\nprint(s.server_address[1], flush=True)\ns.serve_forever()"])
        .arg(files)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let files_port = port_line(&mut files_srv);
    Servers {
        forge,
        files: files_srv,
        forge_url: format!("http://127.0.0.1:{forge_port}"),
        files_url: format!("http://127.0.0.1:{files_port}"),
    }
}

fn sha256_b64(text: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg("openssl dgst -sha256 -binary | base64")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn names(v: &serde_json::Value) -> Vec<String> {
    let mut n: Vec<String> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

#[test]
fn project_component_remote_and_template_includes_plan_run_and_work_offline() {
    let forge = tempfile::tempdir().unwrap();
    forge_project(
        forge.path(),
        "ci/templates",
        &[(
            &[
                (
                    "build.yml",
                    "tpl-build:\n  stage: build\n  script: [echo built-from-template]\ninclude:\n  - local: more.yml\n",
                ),
                (
                    "more.yml",
                    "tpl-more:\n  stage: build\n  script: [echo more]\n",
                ),
                (
                    "Jobs/Check.gitlab-ci.yml",
                    "template-check:\n  script: [echo template]\n",
                ),
            ],
            None,
        )],
    );
    let lint_v = |v: &str| {
        format!(
            "spec:\n  inputs:\n    name: {{default: lint}}\n    strict: {{type: boolean, default: false}}\n---\n'$[[ inputs.name ]]':\n  script:\n    - echo lint {v} strict=$[[ inputs.strict ]]\n"
        )
    };
    let (v100, v110, v200rc) = (lint_v("1.0.0"), lint_v("1.1.0"), lint_v("2.0.0-rc1"));
    forge_project(
        forge.path(),
        "ci/components",
        &[
            (&[("templates/lint.yml", &v100)], Some("1.0.0")),
            (&[("templates/lint.yml", &v110)], Some("1.1.0")),
            (&[("templates/lint.yml", &v200rc)], Some("2.0.0-rc1")),
        ],
    );
    let files = tempfile::tempdir().unwrap();
    let remote_text = "remote-job:\n  script: [echo from-remote]\n";
    std::fs::write(files.path().join("remote.yml"), remote_text).unwrap();
    let s = servers(forge.path(), files.path());
    let host = s.forge_url.trim_start_matches("http://").to_string();
    let ci = format!(
        "include:\n  - project: ci/templates\n    ref: main\n    file: /build.yml\n  - component: {host}/ci/components/lint@~latest\n    inputs:\n      name: eslint\n      strict: true\n  - remote: {}/remote.yml\n    integrity: sha256-{}\n  - template: Jobs/Check.gitlab-ci.yml\n  - local: extra.yml\n    rules:\n      - if: $CI_COMMIT_BRANCH == \"nope\"\nstages: [build, test]\nown:\n  script: [echo own]\n",
        s.files_url,
        sha256_b64(remote_text)
    );
    let d = git_repo(&[
        (".gitlab-ci.yml", &ci),
        ("extra.yml", "extra:\n  script: [echo extra]\n"),
    ]);
    let env = [("RAVE_INCLUDE_TOKEN", TOKEN)];
    let forge_url = s.forge_url.clone();
    let base = [
        "--server-url",
        &forge_url,
        "--templates-project",
        "ci/templates",
    ];
    let args = |cmd: &[&'static str]| -> Vec<String> {
        cmd.iter()
            .map(|x| x.to_string())
            .chain(base.iter().map(|x| x.to_string()))
            .collect()
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        rave_env(d.path(), &refs, &env)
    };
    let g = run(args(&["graph", "--format", "json"]));
    assert_eq!(g.code, 0, "{}", g.stderr);
    let v = json(&g.stdout);
    // ~latest is 1.1.0 (the release candidate is not a release); the include rule leaves
    // extra.yml out; the project's file includes its own more.yml at the same commit.
    assert_eq!(
        names(&v),
        [
            "eslint",
            "own",
            "remote-job",
            "template-check",
            "tpl-build",
            "tpl-more"
        ],
        "{}",
        g.stdout
    );
    // Where each job came from, and what each include resolved to.
    let tpl = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "tpl-build")
        .unwrap();
    assert!(
        tpl["source"]["file"]
            .as_str()
            .unwrap()
            .starts_with("ci/templates@"),
        "{tpl}"
    );
    let includes = v["includes"].as_array().unwrap();
    let kinds: Vec<&str> = includes
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["project", "project", "component", "remote", "template"],
        "{}",
        g.stdout
    );
    assert!(
        includes[3]["resolved"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(includes[2]["resolved"].as_str().unwrap().len(), 40);
    let r = run(args(&["run", "--json", "--no-cgroups"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The run keeps the pinned list for the release's provenance.
    let pinned =
        json(&std::fs::read_to_string(d.path().join(".rave/runs/1/includes.json")).unwrap());
    assert_eq!(pinned.as_array().unwrap().len(), 5);
    let log =
        std::fs::read_to_string(walk_log(&d.path().join(".rave/runs/1/logs"), "eslint")).unwrap();
    assert!(log.contains("lint 1.1.0 strict=true"), "{log}");

    // Offline: the cache answers, with the servers gone.
    drop(s);
    let g = run(args(&["graph", "--format", "json", "--offline"]));
    assert_eq!(g.code, 0, "{}", g.stderr);
    assert_eq!(names(&json(&g.stdout)).len(), 6);
    // Offline with nothing cached: the missing include is named, nothing runs.
    let empty = tempfile::tempdir().unwrap();
    let mut a = args(&["run", "--offline"]);
    a.push(format!("--include-cache={}", empty.path().display()));
    let r = run(a);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("ci/templates") && r.stderr.contains("without --offline"),
        "{}",
        r.stderr
    );
    assert!(!d.path().join(".rave/runs/2").exists(), "nothing ran");
}

fn walk_log(dir: &Path, job: &str) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .ends_with(&format!("-{job}.log"))
        })
        .unwrap_or_else(|| panic!("no log for {job} in {}", dir.display()))
}

#[test]
fn bad_includes_are_clear_errors_and_nothing_runs() {
    let forge = tempfile::tempdir().unwrap();
    let spec = "spec:\n  inputs:\n    n: {type: number}\n---\nlint:\n  parallel: $[[ inputs.n ]]\n  script: [echo]\n";
    forge_project(
        forge.path(),
        "ci/components",
        &[(&[("templates/lint.yml", spec)], Some("1.0.0"))],
    );
    // Two projects that include each other.
    forge_project(
        forge.path(),
        "ci/ping",
        &[(
            &[(
                "ping.yml",
                "include:\n  - project: ci/pong\n    file: pong.yml\nping:\n  script: [echo]\n",
            )],
            None,
        )],
    );
    forge_project(
        forge.path(),
        "ci/pong",
        &[(
            &[(
                "pong.yml",
                "include:\n  - project: ci/ping\n    file: ping.yml\npong:\n  script: [echo]\n",
            )],
            None,
        )],
    );
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("remote.yml"), "r:\n  script: [echo]\n").unwrap();
    let s = servers(forge.path(), files.path());
    let host = s.forge_url.trim_start_matches("http://").to_string();
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "include:\n  - remote: {}/remote.yml\n    integrity: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
                s.files_url
            ),
            "does not match its `integrity`",
        ),
        (
            format!("include:\n  - remote: {}/missing.yml\n", s.files_url),
            "404",
        ),
        (
            format!("include:\n  - component: {host}/ci/components/lint@9\n    inputs: {{n: 2}}\n"),
            "no release tag matches version 9",
        ),
        (
            format!(
                "include:\n  - component: {host}/ci/components/lint@1.0.0\n    inputs: {{n: two}}\n"
            ),
            "input `n` must be number",
        ),
        (
            "include:\n  - project: ci/nope\n    file: x.yml\n".to_string(),
            "cannot fetch",
        ),
        (
            "include:\n  - template: Nope.gitlab-ci.yml\n".to_string(),
            "no templates source is configured",
        ),
        (
            "include:\n  - project: ci/ping\n    file: ping.yml\n".to_string(),
            "include loop: ci/ping@",
        ),
    ];
    for (ci, want) in cases {
        let d = git_repo(&[(
            ".gitlab-ci.yml",
            &format!("{ci}own:\n  script: [echo own]\n"),
        )]);
        let r = rave_env(
            d.path(),
            &["run", "--server-url", &s.forge_url],
            &[("RAVE_INCLUDE_TOKEN", TOKEN)],
        );
        assert_eq!(r.code, 2, "{ci}\n{}", r.stderr);
        assert!(
            r.stderr.contains(want),
            "expected `{want}` for\n{ci}\n{}",
            r.stderr
        );
        assert!(
            // In the pipeline file, or (a loop) in the file that closes it.
            r.stderr.contains(".gitlab-ci.yml:") || r.stderr.contains("pong.yml:"),
            "the include's place is named:\n{}",
            r.stderr
        );
        assert!(!d.path().join(".rave/runs/1").exists(), "nothing ran");
    }
    // The wrong token: refused, and the token is never printed.
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "include:\n  - project: ci/components\n    file: templates/lint.yml\n    inputs: {n: 1}\nown:\n  script: [echo]\n",
    )]);
    let r = rave_env(
        d.path(),
        &["lint", "--server-url", &s.forge_url],
        &[("RAVE_INCLUDE_TOKEN", "wrong-token-xyz")],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(!r.stderr.contains("wrong-token-xyz"), "{}", r.stderr);
}

/// A forge that accepts the connection and never answers: the include is given up on after
/// the fetch timeout, with the URL named, and nothing runs.
#[test]
fn a_forge_that_hangs_times_out_with_the_url_named() {
    // Accepts connections (the kernel's backlog) but never reads or answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "include:\n  - project: ci/slow\n    file: x.yml\nown:\n  script: [echo]\n",
    )]);
    let started = std::time::Instant::now();
    let r = rave_env(
        d.path(),
        &["run", "--server-url", &url],
        &[("RAVE_INCLUDE_FETCH_TIMEOUT", "2")],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("did not finish within 2 s")
            && r.stderr.contains(&format!("{url}/ci/slow.git")),
        "{}",
        r.stderr
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert!(!d.path().join(".rave/runs/1").exists());
    drop(listener);
}
