//! VM images for real: a small service crate in a test workspace is built by cargo, packed
//! with Debian's kernel (./x test installs linux-image-amd64, qemu-system-x86 and
//! busybox-static) and booted under QEMU, and its health endpoint is reached through the
//! forwarded port. No KVM is needed: where /dev/kvm hangs, the stage falls back to TCG.

use crate::support::*;

const SERVICE: &str = r#"use std::io::{Read, Write};
use std::net::TcpListener;

fn main() {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let l = TcpListener::bind(format!("0.0.0.0:{port}")).expect("bind");
    println!("hello: listening on {port}");
    for s in l.incoming().flatten() {
        let mut s = s;
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap_or(0);
        let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /health ");
        let (code, body) = if ok { ("200 OK", "ok\n") } else { ("404 Not Found", "no\n") };
        let _ = write!(s, "HTTP/1.0 {code}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    }
}
"#;

fn tools_present() {
    for (tool, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("qemu-img", "qemu-utils"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        assert!(
            std::process::Command::new(tool)
                .arg("--help")
                .output()
                .is_ok(),
            "{tool} is required (./x test installs {pkg})"
        );
    }
    assert!(
        std::fs::read_dir("/boot").is_ok_and(|mut d| d
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))),
        "a kernel in /boot is required (./x test installs linux-image-amd64)"
    );
}

fn workspace(rave_cfg: &str) -> tempfile::TempDir {
    workspace_with(rave_cfg, "")
}

fn workspace_with(rave_cfg: &str, jobs: &str) -> tempfile::TempDir {
    git_repo(&[
        (
            "Cargo.toml",
            "[workspace]\nresolver = \"2\"\nmembers = [\"services/hello\"]\n",
        ),
        (
            "services/hello/Cargo.toml",
            "[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
        ),
        ("services/hello/src/main.rs", SERVICE),
        (".gitignore", "target/\n"),
        (
            ".gitlab-ci.yml",
            &format!("stages: [build, test, release]\n{jobs}.rave:\n  image:\n{rave_cfg}"),
        ),
    ])
}

#[test]
fn a_service_crate_becomes_an_image_that_boots_and_answers() {
    tools_present();
    let d = workspace_with(
        "    services: {hello: {port: 8080, health: /health}}\n    variants: {p1: [hello], disk: {services: [hello], format: qcow2}}\n    boot_timeout: 120s\n    test_variables: {RAVE_MEMORY: 1G}\n",
        "release:\n  stage: release\n  needs: [rave-image, rave-vm-test]\n  rules: [{if: $CI_COMMIT_TAG}]\n  script: [mkdir -p release, cp -r rave-image release/, rave release create --dir release]\n  artifacts: {paths: [release/]}\n",
    );
    let keys = tempfile::tempdir().unwrap();
    let k = rave(keys.path(), &["keys", "generate", "--dir", "k"]);
    assert_eq!(k.code, 0, "{}", k.stderr);
    let private = std::fs::read_to_string(keys.path().join("k/rave-release")).unwrap();
    sh(d.path(), "git tag v1.0.0");
    let key_var = format!("RAVE_SIGNING_KEY={private}");
    let r = rave(
        d.path(),
        &["run", "--json", "--tag", "v1.0.0", "--var", &key_var],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = json(&r.stdout);
    assert_eq!(job(&v, "rave-image")["status"], "success");
    assert_eq!(job(&v, "rave-vm-test")["status"], "success");
    assert!(
        r.stderr.contains("vm test p1: healthy after"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("listening on [8080]"), "{}", r.stderr);
    // The image and its metadata are the build job's artifacts, sha256s included.
    let dir = d
        .path()
        .join(".rave/runs/1/artifacts/000-rave-image/rave-image/p1");
    let meta = json(&std::fs::read_to_string(dir.join("image.json")).unwrap());
    assert_eq!(meta["services"][0]["name"], "hello");
    assert_eq!(meta["services"][0]["ports"][0], 8080);
    let initrd = std::fs::read(dir.join("initramfs.cpio")).unwrap();
    use sha2::Digest;
    assert_eq!(
        meta["files"]["initramfs.cpio"],
        hex::encode(sha2::Sha256::digest(&initrd))
    );
    // The tag pipeline's signed manifest lists the image, made by the image job.
    let rel = d.path().join(".rave/runs/1/artifacts/002-release/release");
    let manifest = json(&std::fs::read_to_string(rel.join("release-manifest.json")).unwrap());
    let arts = manifest["artifacts"].as_array().unwrap();
    let initrd_entry = arts
        .iter()
        .find(|a| a["path"] == "rave-image/p1/initramfs.cpio")
        .unwrap_or_else(|| panic!("{manifest:#}"));
    assert_eq!(initrd_entry["sha256"], meta["files"]["initramfs.cpio"]);
    assert_eq!(initrd_entry["job"], "rave-image");
    assert_eq!(
        initrd_entry["media_type"],
        "application/octet-stream; kind=vm-image"
    );
    // The qcow2 variant: a checked disk, booted by the same test, listed in the manifest.
    assert!(
        r.stderr.contains("vm test disk: healthy after"),
        "{}",
        r.stderr
    );
    let disk_dir = dir.parent().unwrap().join("disk");
    let disk_meta = json(&std::fs::read_to_string(disk_dir.join("image.json")).unwrap());
    assert_eq!(disk_meta["format"], "qcow2", "{disk_meta:#}");
    assert_eq!(disk_meta["boot"]["disk"], "disk.qcow2");
    let disk = std::fs::read(disk_dir.join("disk.qcow2")).unwrap();
    assert_eq!(&disk[..4], b"QFI\xfb", "a qcow2 file");
    assert_eq!(
        disk_meta["files"]["disk.qcow2"],
        hex::encode(sha2::Sha256::digest(&disk)),
        "booting it did not change it"
    );
    assert_eq!(disk_meta["sizes"]["disk.qcow2"], disk.len() as u64);
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(disk_dir.join("disk.qcow2"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let disk_entry = arts
        .iter()
        .find(|a| a["path"] == "rave-image/disk/disk.qcow2")
        .unwrap_or_else(|| panic!("{manifest:#}"));
    assert_eq!(disk_entry["sha256"], disk_meta["files"]["disk.qcow2"]);
    assert_eq!(disk_entry["media_type"], "application/x-qemu-disk");
}

#[test]
fn a_service_that_never_gets_healthy_fails_with_the_console_log() {
    tools_present();
    let d = workspace(
        "    services: {hello: {port: 8080, health: /not-there}}\n    boot_timeout: 8s\n    accel: tcg\n    test_variables: {RAVE_MEMORY: 1G}\n",
    );
    let r = rave(d.path(), &["run", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = json(&r.stdout);
    assert_eq!(job(&v, "rave-vm-test")["status"], "failed");
    let log =
        std::fs::read_to_string(d.path().join(".rave/runs/1/logs/001-rave-vm-test.log")).unwrap();
    assert!(
        log.contains("not healthy within 8s: hello (http://guest:8080/not-there)"),
        "{log}"
    );
    // The console tail names what the guest did: the init started the service.
    assert!(log.contains("--- console"), "{log}");
    assert!(log.contains("hello: listening on 8080"), "{log}");
    // And the whole console log is kept as an artifact of the failed job.
    assert!(
        d.path()
            .join(".rave/runs/1/artifacts/001-rave-vm-test/rave-image/default/console.log")
            .exists()
    );
}

#[test]
fn a_nix_expression_builds_the_image_with_the_jobs_caps() {
    let d = git_repo(&[
        (
            "image.nix",
            "{ variant ? \"default\" }:\nderivation {\n  name = \"image-${variant}\";\n  nonce = builtins.getEnv \"RAVE_RUN_DIR\";\n  system = builtins.currentSystem;\n  builder = \"/bin/sh\";\n  args = [ \"-c\" \"/bin/mkdir $out && echo kernel > $out/bzImage && echo cores=$NIX_BUILD_CORES > $out/initrd\" ];\n}\n",
        ),
        (
            ".gitlab-ci.yml",
            ".rave:\n  nix_single_user: true\n  image:\n    nix: image.nix\n    nix_args: [--option, substituters, '', --option, sandbox, 'false']\n    services: {api: {port: 8080}}\n    variables: {RAVE_CPUS: 2}\n",
        ),
    ]);
    let r = rave(d.path(), &["run", "--json", "rave-image"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("--cores 2 --max-jobs 1"), "{}", r.stderr);
    let dir = d
        .path()
        .join(".rave/runs/1/artifacts/000-rave-image/rave-image/default");
    assert_eq!(
        std::fs::read_to_string(dir.join("initramfs.cpio")).unwrap(),
        "cores=2\n"
    );
    let meta = json(&std::fs::read_to_string(dir.join("image.json")).unwrap());
    assert_eq!(meta["built_by"], "nix: image.nix");
    assert_eq!(meta["services"][0]["name"], "api");
}
