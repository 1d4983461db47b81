//! Keys, signed release manifests and their verification, checked with OpenSSH's own
//! `ssh-keygen -Y verify` so nothing depends on trusting rave.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::*;

fn ssh_keygen_verify(dir: &Path, file: &str) -> (bool, String) {
    let input = std::fs::File::open(dir.join(file)).unwrap();
    let out = Command::new("ssh-keygen")
        .args([
            "-Y",
            "verify",
            "-f",
            "allowed_signers",
            "-I",
            "rave-release",
            "-n",
            "rave-release",
            "-s",
        ])
        .arg(format!("{file}.sig"))
        .current_dir(dir)
        .stdin(Stdio::from(input))
        .output()
        .expect("ssh-keygen is required (openssh-client)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Debian's `minisign -V` on `dir/file` with its `.minisig`.
fn minisign_verify(dir: &Path, file: &str, pubkey: &Path) -> (bool, String) {
    let out = Command::new("minisign")
        .arg("-Vm")
        .arg(file)
        .arg("-p")
        .arg(pubkey)
        .current_dir(dir)
        .output()
        .expect("minisign is required (./x test installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn keys_generate_list_rotate() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("keys");
    let r = rave(
        d.path(),
        &["keys", "generate", "--dir", dir.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("SHA256:"), "{}", r.stdout);
    let mode = std::fs::metadata(dir.join("rave-release"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let r = rave(
        d.path(),
        &["keys", "generate", "--dir", dir.to_str().unwrap()],
    );
    assert_eq!(r.code, 2, "a second generate must not overwrite the key");
    let r = rave(
        d.path(),
        &["keys", "rotate", "--dir", dir.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = rave(d.path(), &["keys", "list", "--dir", dir.to_str().unwrap()]);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert!(
        lines[0].contains("current") && lines[1].contains("retired"),
        "{}",
        r.stdout
    );
}

#[test]
fn tag_pipeline_publishes_a_signed_release_anyone_can_verify() {
    let keys = tempfile::tempdir().unwrap();
    let r = rave(keys.path(), &["keys", "generate", "--dir", "k"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let key_file = keys.path().join("k/rave-release");
    let private = std::fs::read_to_string(&key_file).unwrap();
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "stages: [build, release]\nbuild:\n  stage: build\n  script:\n    - mkdir -p dist && printf 'app v1' > dist/app && printf 'image' > dist/vm.qcow2\n  artifacts: {paths: [dist/]}\nrelease:\n  stage: release\n  rules: [{if: $CI_COMMIT_TAG}]\n  script:\n    - mkdir -p release && cp dist/* release/\n    - rave release create --dir release --created-at 2026-11-22T00:00:00Z\n  artifacts: {paths: [release/]}\n",
    )]);
    sh(d.path(), "git tag v1.0.0");
    let key_var = format!("RAVE_SIGNING_KEY={private}");
    let r = rave(
        d.path(),
        &["run", "--json", "--tag", "v1.0.0", "--var", &key_var],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The key never reaches the log.
    assert!(!r.stderr.contains("OPENSSH PRIVATE KEY"), "{}", r.stderr);
    let logs = std::fs::read_to_string(d.path().join(".rave/runs/1/logs/001-release.log")).unwrap();
    assert!(!logs.contains("OPENSSH PRIVATE KEY"));
    let rel = d.path().join(".rave/runs/1/artifacts/001-release/release");
    let manifest = json(&std::fs::read_to_string(rel.join("release-manifest.json")).unwrap());
    assert_eq!(manifest["tag"], "v1.0.0");
    assert_eq!(manifest["pipeline"], "1");
    let arts = manifest["artifacts"].as_array().unwrap();
    assert_eq!(arts.len(), 2);
    assert_eq!(arts[0]["path"], "app");
    assert_eq!(arts[0]["size"], 6);
    // sha256 of "app v1", computed independently.
    let expected = String::from_utf8(
        Command::new("sha256sum")
            .arg(
                d.path()
                    .join(".rave/runs/1/artifacts/001-release/release/app"),
            )
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(
        arts[0]["sha256"].as_str().unwrap(),
        expected.split_whitespace().next().unwrap()
    );
    assert_eq!(arts[1]["media_type"], "application/x-qemu-disk");
    // The job that made each file, found through the store's index by digest.
    assert_eq!(arts[0]["job"], "build");
    // OpenSSH verifies both signatures.
    for f in ["release-manifest.json", "provenance.intoto.json"] {
        let (ok, out) = ssh_keygen_verify(&rel, f);
        assert!(
            ok && out.contains("Good \"rave-release\" signature"),
            "{f}: {out}"
        );
    }
    // So does the minisign tool (Debian's), with the minisign form of the same key, which
    // `rave keys generate` wrote next to it; and rave's verify accepts that key too.
    let minisign_pub = keys.path().join("k/rave-release.minisign.pub");
    for f in ["release-manifest.json", "provenance.intoto.json"] {
        let (ok, out) = minisign_verify(&rel, f, &minisign_pub);
        assert!(
            ok && out.contains("Signature and comment signature verified"),
            "{f}: {out}"
        );
        assert!(
            out.contains("rave release v1.0.0"),
            "trusted comment: {out}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(rel.join("minisign.pub")).unwrap(),
        std::fs::read_to_string(&minisign_pub).unwrap()
    );
    let r = rave(
        d.path(),
        &[
            "release",
            "verify",
            rel.join("release-manifest.json").to_str().unwrap(),
            "--pubkey",
            minisign_pub.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("signature by minisign:"), "{}", r.stdout);
    let prov = json(&std::fs::read_to_string(rel.join("provenance.intoto.json")).unwrap());
    assert_eq!(prov["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(prov["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(prov["subject"][0]["digest"]["sha256"], arts[0]["sha256"]);
    // rave's own verify, trusting the public key we hold.
    let pubkey = keys.path().join("k/rave-release.pub");
    // The release was published into the project's store: listed, and downloadable (verified)
    // for a rollback, while the run directory is gone.
    let r = rave(d.path(), &["release", "list"]);
    assert!(r.stdout.starts_with("v1.0.0 "), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("2 artifact(s)"), "{}", r.stdout);
    std::fs::remove_dir_all(d.path().join(".rave/runs")).unwrap();
    let r = rave(d.path(), &["gc"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = rave(
        d.path(),
        &[
            "release",
            "download",
            "v1.0.0",
            "--to",
            "rollback",
            "--pubkey",
            pubkey.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(
        std::fs::read_to_string(d.path().join("rollback/app")).unwrap(),
        "app v1"
    );
    let r = rave(
        d.path(),
        &[
            "release",
            "download",
            "v9",
            "--to",
            "x",
            "--pubkey",
            pubkey.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no release `v9`"), "{}", r.stderr);
    // Put the run's copy back for the checks below.
    std::fs::create_dir_all(&rel).unwrap();
    for f in [
        "app",
        "vm.qcow2",
        "release-manifest.json",
        "release-manifest.json.sig",
        "provenance.intoto.json",
        "provenance.intoto.json.sig",
        "allowed_signers",
    ] {
        std::fs::copy(d.path().join("rollback").join(f), rel.join(f)).unwrap();
    }
    let m = rel.join("release-manifest.json");
    let r = rave(
        d.path(),
        &[
            "release",
            "verify",
            m.to_str().unwrap(),
            "--pubkey",
            pubkey.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("OK: "), "{}", r.stdout);
    // One flipped byte in one artifact: named.
    let mut bytes = std::fs::read(rel.join("vm.qcow2")).unwrap();
    bytes[0] ^= 1;
    std::fs::write(rel.join("vm.qcow2"), &bytes).unwrap();
    let r = rave(
        d.path(),
        &[
            "release",
            "verify",
            m.to_str().unwrap(),
            "--pubkey",
            pubkey.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("vm.qcow2: sha256"), "{}", r.stderr);
    bytes[0] ^= 1;
    std::fs::write(rel.join("vm.qcow2"), &bytes).unwrap();
    // An edited manifest: the signature fails (in rave and in OpenSSH).
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("v1.0.0", "v9.9.9");
    std::fs::write(&m, text).unwrap();
    let r = rave(
        d.path(),
        &[
            "release",
            "verify",
            m.to_str().unwrap(),
            "--pubkey",
            pubkey.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("signature"), "{}", r.stderr);
    assert!(!ssh_keygen_verify(&rel, "release-manifest.json").0);
}

#[test]
fn an_edited_manifest_fails_minisign_in_rave_and_in_the_minisign_tool() {
    let d = tempfile::tempdir().unwrap();
    rave(d.path(), &["keys", "generate", "--dir", "k"]);
    std::fs::create_dir_all(d.path().join("release")).unwrap();
    std::fs::write(d.path().join("release/app"), "x").unwrap();
    let r = rave(
        d.path(),
        &[
            "release",
            "create",
            "--tag",
            "v2",
            "--key",
            "k/rave-release",
            "--dir",
            "release",
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let rel = d.path().join("release");
    let pubkey = d.path().join("k/rave-release.minisign.pub");
    assert!(minisign_verify(&rel, "release-manifest.json", &pubkey).0);
    let m = rel.join("release-manifest.json");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("\"v2\"", "\"v3\"");
    std::fs::write(&m, text).unwrap();
    let (ok, out) = minisign_verify(&rel, "release-manifest.json", &pubkey);
    assert!(!ok, "{out}");
    let r = rave(
        d.path(),
        &[
            "release",
            "verify",
            m.to_str().unwrap(),
            "--pubkey",
            pubkey.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("minisign signature does not match"),
        "{}",
        r.stderr
    );
}

#[test]
fn key_files_must_be_private_and_tags_present() {
    let d = tempfile::tempdir().unwrap();
    rave(d.path(), &["keys", "generate", "--dir", "k"]);
    let key = d.path().join("k/rave-release");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir_all(d.path().join("release")).unwrap();
    std::fs::write(d.path().join("release/app"), "x").unwrap();
    let r = rave(
        d.path(),
        &[
            "release",
            "create",
            "--tag",
            "v1",
            "--key",
            key.to_str().unwrap(),
        ],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
    let r = rave(
        d.path(),
        &["release", "create", "--key", key.to_str().unwrap()],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a tag pipeline"), "{}", r.stderr);
}

#[test]
fn expired_artifacts_are_collected() {
    let d = git_repo(&[(
        ".gitlab-ci.yml",
        "short:\n  script: [echo short-lived > a.txt]\n  artifacts: {paths: [a.txt], expire_in: 1 second}\nlong:\n  script: [echo kept > b.txt]\n  artifacts: {paths: [b.txt]}\n",
    )]);
    let r = rave(d.path(), &["run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = rave(d.path(), &["gc"]);
    assert!(r.stdout.starts_with("0 expired"), "{}", r.stdout);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = rave(d.path(), &["gc"]);
    assert!(
        r.stdout
            .starts_with("1 expired artifact entry dropped, 1 blob(s) deleted"),
        "{}",
        r.stdout
    );
    let index = std::fs::read_to_string(d.path().join(".rave/index/1/001-long.json")).unwrap();
    assert!(index.contains("b.txt"), "{index}");
    assert!(!d.path().join(".rave/index/1/000-short.json").exists());
}

/// A signed release directory, as `rave release create` makes it.
fn release_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    rave(d.path(), &["keys", "generate", "--dir", "k"]);
    std::fs::create_dir_all(d.path().join("release")).unwrap();
    std::fs::write(d.path().join("release/app"), "app").unwrap();
    let key = d.path().join("k/rave-release");
    let r = rave(
        d.path(),
        &[
            "release",
            "create",
            "--tag",
            "v1.0.0",
            "--key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dir = d.path().join("release");
    (d, dir)
}

#[test]
fn publishing_to_gitea_retries_5xx_and_is_idempotent() {
    use std::sync::{Arc, Mutex};
    let state = Arc::new(Mutex::new((0u32, false, Vec::<String>::new())));
    let s = state.clone();
    let server = RecordingServer::start(Box::new(move |r| {
        let mut st = s.lock().unwrap();
        let p = r.path.as_str();
        match (r.method.as_str(), p) {
            ("POST", "/api/v1/repos/team/app/releases") => {
                st.0 += 1;
                if st.0 == 1 {
                    (502, "{\"message\":\"bad gateway\"}".into())
                } else if st.1 {
                    (409, "{\"message\":\"release exists\"}".into())
                } else {
                    st.1 = true;
                    (201, "{\"id\":7}".into())
                }
            }
            ("GET", "/api/v1/repos/team/app/releases/tags/v1.0.0") => (200, "{\"id\":7}".into()),
            ("PATCH", "/api/v1/repos/team/app/releases/7") => (200, "{\"id\":7}".into()),
            ("GET", "/api/v1/repos/team/app/releases/7/assets") => {
                let names: Vec<String> =
                    st.2.iter()
                        .map(|n| format!("{{\"name\":\"{n}\"}}"))
                        .collect();
                (200, format!("[{}]", names.join(",")))
            }
            ("POST", _) if p.starts_with("/api/v1/repos/team/app/releases/7/assets?name=") => {
                st.2.push(p.rsplit('=').next().unwrap().to_string());
                (201, "{}".into())
            }
            _ => (404, "{}".into()),
        }
    }));
    let (d, dir) = release_dir();
    let api = format!("{}/api/v1", server.url);
    let args = [
        "release",
        "publish",
        "--dir",
        dir.to_str().unwrap(),
        "--forge",
        "forgejo",
        "--api",
        &api,
        "--project",
        "team/app",
        "--backoff-ms",
        "10",
    ];
    let r = rave_env(d.path(), &args, &[("RAVE_FORGE_TOKEN", "sekret-token")]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .starts_with("created release v1.0.0: 9 asset(s) uploaded, 0 already there"),
        "{}",
        r.stdout
    );
    let first = server.seen();
    assert_eq!(
        &first[..2],
        [
            "POST /api/v1/repos/team/app/releases",
            "POST /api/v1/repos/team/app/releases"
        ],
        "the 502 was retried"
    );
    let reqs = server.requests.lock().unwrap().clone();
    assert!(reqs.iter().all(|q| {
        q.headers
            .iter()
            .any(|(k, v)| k == "authorization" && v == "token sekret-token")
    }));
    let upload = reqs.iter().find(|q| q.path.ends_with("name=app")).unwrap();
    assert!(
        String::from_utf8_lossy(&upload.body).contains("name=\"attachment\""),
        "multipart field"
    );
    // The same tag's pipeline again: the release is updated, nothing uploaded twice.
    let r = rave_env(d.path(), &args, &[("RAVE_FORGE_TOKEN", "sekret-token")]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .starts_with("updated release v1.0.0: 0 asset(s) uploaded, 9 already there"),
        "{}",
        r.stdout
    );
    let all = server.seen();
    assert_eq!(
        &all[first.len()..],
        [
            "POST /api/v1/repos/team/app/releases",
            "GET /api/v1/repos/team/app/releases/tags/v1.0.0",
            "PATCH /api/v1/repos/team/app/releases/7",
            "GET /api/v1/repos/team/app/releases/7/assets",
        ]
    );
    assert!(!r.stdout.contains("sekret") && !r.stderr.contains("sekret"));
}

#[test]
fn publishing_to_gitlab_links_packages_and_updates_on_rerun() {
    use std::sync::{Arc, Mutex};
    let exists = Arc::new(Mutex::new(false));
    let e = exists.clone();
    let server = RecordingServer::start(Box::new(move |r| {
        let mut ex = e.lock().unwrap();
        match (r.method.as_str(), r.path.as_str()) {
            ("PUT", p)
                if p.starts_with(
                    "/api/v4/projects/group%2Fapp/packages/generic/release/v1.0.0/",
                ) =>
            {
                (201, "{}".into())
            }
            ("POST", "/api/v4/projects/group%2Fapp/releases") if *ex => {
                (409, "{\"message\":\"Release already exists\"}".into())
            }
            ("POST", "/api/v4/projects/group%2Fapp/releases") => {
                *ex = true;
                (201, "{}".into())
            }
            ("PUT", "/api/v4/projects/group%2Fapp/releases/v1.0.0") => (200, "{}".into()),
            _ => (404, "{}".into()),
        }
    }));
    let (d, dir) = release_dir();
    let api = format!("{}/api/v4", server.url);
    let args = [
        "release",
        "publish",
        "--dir",
        dir.to_str().unwrap(),
        "--forge",
        "gitlab",
        "--api",
        &api,
        "--project",
        "group/app",
    ];
    let r = rave_env(d.path(), &args, &[("RAVE_FORGE_TOKEN", "glpat-x")]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let create = server
        .requests
        .lock()
        .unwrap()
        .iter()
        .find(|q| q.method == "POST")
        .cloned()
        .unwrap();
    let body = json(&String::from_utf8_lossy(&create.body));
    assert_eq!(body["tag_name"], "v1.0.0");
    assert_eq!(body["assets"]["links"].as_array().unwrap().len(), 9);
    assert!(
        create
            .headers
            .iter()
            .any(|(k, v)| k == "private-token" && v == "glpat-x")
    );
    let r = rave_env(d.path(), &args, &[("RAVE_FORGE_TOKEN", "glpat-x")]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("updated release v1.0.0"),
        "{}",
        r.stdout
    );
    assert_eq!(
        server.seen().last().unwrap(),
        "PUT /api/v4/projects/group%2Fapp/releases/v1.0.0"
    );
    // A client error is not retried and comes back with the forge's words.
    let r = rave_env(
        d.path(),
        &[
            "release",
            "publish",
            "--dir",
            dir.to_str().unwrap(),
            "--forge",
            "gitlab",
            "--api",
            &api,
            "--project",
            "other/app",
        ],
        &[("RAVE_FORGE_TOKEN", "glpat-x")],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("404"), "{}", r.stderr);
}

/// A tag pipeline builds the tag's commit, whatever the working tree holds, and a published
/// release is not replaced by a second run of the same tag unless asked to (and then it is
/// recorded).
#[test]
fn a_published_release_is_not_replaced_from_a_dirty_tree() {
    let keys = tempfile::tempdir().unwrap();
    let r = rave(keys.path(), &["keys", "generate", "--dir", "k"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let private = std::fs::read_to_string(keys.path().join("k/rave-release")).unwrap();
    let d = git_repo(&[
        ("app.txt", "committed v1\n"),
        (
            ".gitlab-ci.yml",
            "release:\n  rules: [{if: $CI_COMMIT_TAG}]\n  script:\n    - mkdir -p release && cp app.txt release/\n    - rave release create --dir release\n  artifacts: {paths: [release/]}\n",
        ),
    ]);
    sh(d.path(), "git tag v0.1.0");
    let key_var = format!("RAVE_SIGNING_KEY={private}");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--json", "--tag", "v0.1.0", "--var", &key_var];
        args.extend_from_slice(extra);
        rave(d.path(), &args)
    };
    let r = run(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Uncommitted edits: the tag pipeline still builds the tag's commit.
    std::fs::write(d.path().join("app.txt"), "dirty edit\n").unwrap();
    let r = run(&[]);
    assert_eq!(
        r.code, 1,
        "the second publish must be refused:\n{}",
        r.stderr
    );
    let v = json(&r.stdout);
    assert_eq!(v["jobs"][0]["status"], "failed");
    let log = std::fs::read_to_string(d.path().join(".rave/runs/2/logs/000-release.log")).unwrap();
    assert!(
        log.contains("already published") && log.contains("--replace"),
        "{log}"
    );
    // Replacing on purpose works and is recorded.
    let r = run(&["--var", "RAVE_RELEASE_REPLACE=1", "--keep"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rel = d.path().join(".rave/runs/3/artifacts/000-release/release");
    assert_eq!(
        std::fs::read_to_string(rel.join("app.txt")).unwrap(),
        "committed v1\n",
        "the tag's commit is built, not the working tree"
    );
    let r = rave(d.path(), &["release", "list"]);
    assert!(r.stdout.contains("v0.1.0"), "{}", r.stdout);
    let replaced = walk_find(&d.path().join(".rave"), "replaced.log");
    let log = std::fs::read_to_string(replaced.expect("replaced.log")).unwrap();
    assert!(log.contains("replaced manifest sha256"), "{log}");
}

fn walk_find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir()
            && let Some(f) = walk_find(&p, name)
        {
            return Some(f);
        }
    }
    None
}
