//! The cgroup v2 path, for real: this machine runs cgroup v1, so the test boots Debian's
//! kernel in QEMU with a small initramfs (static busybox, bash, and this rave with their
//! shared libraries), mounts cgroup2 in the guest and runs a pipeline there as root: the
//! job's limit is applied, an OOM is named with its peak, CPU time is measured, and nothing
//! is left behind in the hierarchy.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

fn tool(name: &str, pkg: &str) {
    assert!(
        Command::new(name).arg("--help").output().is_ok(),
        "{name} is required (./x test installs {pkg})"
    );
}

fn kernel() -> PathBuf {
    let mut ks: Vec<PathBuf> = std::fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    ks.sort();
    ks.pop()
        .expect("a kernel in /boot (./x test installs linux-image-amd64)")
}

/// The shared libraries `bin` loads, as `ldd` lists them.
fn libraries(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

fn put(root: &Path, file: &Path, at: &str) {
    let to = root.join(at.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(file, &to).unwrap();
}

#[test]
fn the_cgroup_v2_path_limits_names_the_oom_and_cleans_up_in_a_guest() {
    tool("qemu-system-x86_64", "qemu-system-x86");
    tool("busybox", "busybox-static");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    for dir in [
        "bin", "proc", "sys", "dev", "tmp", "root", "work", "etc", "home",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap();
    put(&root, &busybox, "/bin/busybox");
    for t in [
        "sh", "mount", "mkdir", "cat", "echo", "poweroff", "sleep", "head", "tail", "ls", "grep",
        "true", "timeout", "env", "rm", "mv", "cp", "ln", "chmod", "find", "chown", "su",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(t)).unwrap();
    }
    // rave (without its debug sections: the guest holds the whole initramfs in memory) and
    // bash, with their libraries at the paths the loader looks for.
    let rave = d.path().join("rave");
    std::fs::copy(rave_bin(), &rave).unwrap();
    let st = Command::new("strip").arg(&rave).status().unwrap();
    assert!(st.success());
    put(&root, &rave, "/bin/rave");
    put(&root, Path::new("/bin/bash"), "/bin/bash");
    for bin in [rave.as_path(), Path::new("/bin/bash")] {
        for lib in libraries(bin) {
            put(&root, &lib, &lib.to_string_lossy());
        }
    }
    let pipeline = "hog:\n  variables: {RAVE_MEMORY: 64M}\n  script: ['head -c 400000000 /dev/zero | tail']\nsmall:\n  variables: {RAVE_MEMORY: 64M}\n  script: ['timeout 1 sh -c \"while :; do :; done\" || true', echo fine]\n";
    // As root, one more job: a limit above what the guest has, and more than that used,
    // so the guest kernel's own OOM killer acts (a real host OOM, safely inside the guest).
    std::fs::write(
        root.join("work/.gitlab-ci.yml"),
        format!("{pipeline}host-hog:\n  variables: {{RAVE_MEMORY: 2G}}\n  script: ['head -c 600000000 /dev/zero | tail']\n"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("work2")).unwrap();
    std::fs::write(root.join("work2/.gitlab-ci.yml"), pipeline).unwrap();
    // A user with no delegated group: two jobs of 300 MiB under 512 MiB.
    std::fs::create_dir_all(root.join("work3")).unwrap();
    std::fs::write(
        root.join("work3/.gitlab-ci.yml"),
        "a:\n  variables: {RAVE_MEMORY: 300M}\n  script: [sleep 1]\nb:\n  variables: {RAVE_MEMORY: 300M}\n  script: [sleep 1]\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nbuilder:x:1000:\n").unwrap();
    std::fs::write(
        root.join("init"),
        "#!/bin/sh\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\nmount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         export PATH=/bin HOME=/root TMPDIR=/tmp\n\
         echo \"controllers: $(cat /sys/fs/cgroup/cgroup.controllers)\"\n\
         cd /work\n\
         rave run --json --jobs 3 --cpus 3 --memory 3G --force-budget > /tmp/out.json 2> /tmp/err.txt\n\
         echo \"RAVE-EXIT $?\"\n\
         echo RAVE-ERR-BEGIN; cat /tmp/err.txt; echo RAVE-ERR-END\n\
         echo RAVE-JSON-BEGIN; cat /tmp/out.json; echo RAVE-JSON-END\n\
         echo RAVE-LEFT-BEGIN; find /sys/fs/cgroup -maxdepth 3 -type d -name 'rave-*'; echo RAVE-LEFT-END\n\
         # An unprivileged user with a delegated subtree, as systemd's user@.service gets it:\n\
         # the subtree is the user's, the user's shell sits in a leaf of it.\n\
         echo '+memory +cpu' > /sys/fs/cgroup/cgroup.subtree_control\n\
         mkdir -p /sys/fs/cgroup/user.slice/shell /home/builder\n\
         cd /sys/fs/cgroup/user.slice && chown 1000:1000 . cgroup.procs cgroup.subtree_control cgroup.threads\n\
         chown -R 1000:1000 /sys/fs/cgroup/user.slice/shell /home/builder /work2\n\
         echo $$ > /sys/fs/cgroup/user.slice/shell/cgroup.procs\n\
         cd /work2\n\
         su builder -s /bin/sh -c 'cd /work2 && HOME=/home/builder PATH=/bin TMPDIR=/tmp rave run --json --jobs 2 --cpus 2 --memory 512M --force-budget > /tmp/out2.json 2> /tmp/err2.txt'\n\
         echo \"RAVE-EXIT2 $?\"\n\
         echo RAVE-ERR2-BEGIN; cat /tmp/err2.txt; echo RAVE-ERR2-END\n\
         echo RAVE-JSON2-BEGIN; cat /tmp/out2.json; echo RAVE-JSON2-END\n\
         echo RAVE-LEFT2-BEGIN; find /sys/fs/cgroup/user.slice -maxdepth 3 -type d -name 'rave-*'; echo RAVE-LEFT2-END\n\
         # The same user in a group nobody delegated: no job groups can be made.\n\
         mkdir -p /sys/fs/cgroup/other && echo $$ > /sys/fs/cgroup/other/cgroup.procs\n\
         chown -R 1000:1000 /work3\n\
         su builder -s /bin/sh -c 'cd /work3 && HOME=/home/builder PATH=/bin TMPDIR=/tmp rave run --json --jobs 2 --cpus 2 --memory 512M --force-budget > /tmp/out3.json 2> /tmp/err3.txt'\n\
         echo RAVE-ERR3-BEGIN; cat /tmp/err3.txt; echo RAVE-ERR3-END\n\
         echo RAVE-JSON3-BEGIN; cat /tmp/out3.json; echo RAVE-JSON3-END\n\
         poweroff -f\n",
    )
    .unwrap();
    let mut perm = std::fs::metadata(root.join("init")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(root.join("init"), perm).unwrap();
    let initrd = d.path().join("initrd.cpio");
    sh(
        &root,
        &format!(
            "find . | busybox cpio -o -H newc > {} 2>/dev/null",
            initrd.display()
        ),
    );
    let console = d.path().join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .arg("-kernel")
        .arg(kernel())
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet",
            "-m",
            "384",
            "-smp",
            "2",
            "-accel",
            "tcg",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if qemu.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(240) {
            let _ = qemu.kill();
            let _ = qemu.wait();
            panic!(
                "the guest did not finish in 240 s:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let section = |name: &str| -> String {
        let begin = format!("RAVE-{name}-BEGIN");
        let end = format!("RAVE-{name}-END");
        let b = log
            .find(&begin)
            .unwrap_or_else(|| panic!("no {begin} in:\n{log}"));
        let e = log[b..]
            .find(&end)
            .unwrap_or_else(|| panic!("no {end} in:\n{log}"))
            + b;
        log[b + begin.len()..e].replace('\r', "")
    };
    assert!(
        log.contains("controllers:") && log.contains("memory"),
        "{log}"
    );
    let err = section("ERR");
    assert!(
        !err.contains("no per-job cgroups"),
        "rave found no usable cgroup v2 in the guest:\n{err}"
    );
    let v = json(section("JSON").trim());
    let hog = job(&v, "hog");
    assert_eq!(hog["status"], "failed", "{v:#}\n{err}");
    assert_eq!(hog["failure_reason"], "oom_killed", "{v:#}\n{err}");
    assert_eq!(hog["memory_limit_bytes"], 64u64 << 20);
    let peak = hog["peak_memory_bytes"].as_u64().unwrap_or(0);
    assert!(peak > 32 << 20, "the peak near the limit: {peak}");
    assert!(
        hog["note"].as_str().unwrap_or_default().contains("64 MiB"),
        "{v:#}"
    );
    let host = job(&v, "host-hog");
    assert_eq!(host["failure_reason"], "oom_killed", "{v:#}\n{err}");
    assert!(
        host["note"]
            .as_str()
            .unwrap_or_default()
            .contains("host's OOM killer"),
        "a host OOM is named as one: {v:#}"
    );
    let small = job(&v, "small");
    assert_eq!(small["status"], "success", "{v:#}\n{err}");
    assert!(
        small["cpu_seconds"].as_f64().unwrap_or(0.0) > 0.3,
        "CPU time from cpu.stat: {v:#}"
    );
    assert!(log.contains("RAVE-EXIT 1"), "{log}");
    assert_eq!(
        section("LEFT").trim(),
        "",
        "groups left behind in the guest"
    );

    // The same pipeline as an unprivileged user in a delegated subtree: the job groups go
    // under the delegated group (the user's own leaf holds processes and cannot have any).
    let err = section("ERR2");
    assert!(
        !err.contains("no per-job cgroups"),
        "rave found no usable delegated cgroup:\n{err}"
    );
    let v = json(section("JSON2").trim());
    let hog = job(&v, "hog");
    assert_eq!(hog["failure_reason"], "oom_killed", "{v:#}\n{err}");
    assert!(
        hog["peak_memory_bytes"].as_u64().unwrap_or(0) > 32 << 20,
        "{v:#}"
    );
    assert_eq!(job(&v, "small")["status"], "success", "{v:#}\n{err}");
    assert!(log.contains("RAVE-EXIT2 1"), "{log}");
    assert_eq!(section("LEFT2").trim(), "", "groups left behind");

    // No delegated group: rave says so once, and admission still keeps the two 300 MiB jobs
    // of a 512 MiB budget apart.
    let err = section("ERR3");
    assert_eq!(err.matches("no per-job cgroups").count(), 1, "{err}");
    let v = json(section("JSON3").trim());
    let (a, b) = (job(&v, "a"), job(&v, "b"));
    assert_eq!(a["status"], "success", "{v:#}");
    assert_eq!(b["status"], "success", "{v:#}");
    let t =
        |j: &serde_json::Value, k: &str| humantime::parse_rfc3339(j[k].as_str().unwrap()).unwrap();
    let (first, second) = if t(a, "started_at") <= t(b, "started_at") {
        (a, b)
    } else {
        (b, a)
    };
    assert!(
        t(second, "started_at") >= t(first, "finished_at"),
        "they overlapped: {v:#}"
    );
}
