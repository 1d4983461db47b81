//! The VM test stage: boot an image built by `rave image build` headless in QEMU, wait for
//! each service's health endpoint through a forwarded port, check that the guest listens on
//! exactly the declared ports, and fail with the console log when something does not come up.
//!
//! KVM is used when `/dev/kvm` opens, but a KVM guest that prints nothing on its console in
//! the first seconds is taken for hung (seen on nested virtualisation): it is killed and the
//! boot retried under TCG. `QEMU_RAM_MB` / `QEMU_CPUS` (set by rave from the job's share) size
//! the guest.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::image::{ImageError, ImageMeta};

#[derive(Clone, Debug)]
pub struct TestOptions {
    pub dir: PathBuf,
    pub timeout: Duration,
    /// `auto` (KVM, falling back to TCG), `kvm` or `tcg`.
    pub accel: String,
    /// How long a KVM guest may stay silent before it counts as hung.
    pub kvm_grace: Duration,
}

#[derive(Debug)]
pub struct TestReport {
    pub variant: String,
    pub accel: String,
    pub boot_to_healthy: Duration,
    pub listening: Vec<u16>,
    pub console: PathBuf,
}

fn free_port() -> Result<u16, ImageError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ImageError(format!("no free local port: {e}")))
}

/// The listening TCP ports in the last complete RAVE-LISTEN block of the console.
pub fn listening_ports(console: &str) -> Option<BTreeSet<u16>> {
    let end = console.rfind("RAVE-LISTEN-END")?;
    let begin = console[..end].rfind("RAVE-LISTEN-BEGIN")?;
    let mut ports = BTreeSet::new();
    for line in console[begin..end].lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st ...; st 0A = LISTEN
        if f.len() > 3 && f[3] == "0A" {
            if let Some(port) = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    Some(ports)
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1)?.parse().ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let keep: Vec<&str> = all
        .iter()
        .rev()
        .filter(|l| {
            !l.starts_with("  ")
                && !l.contains(": 0")
                && !l.starts_with("RAVE-LISTEN")
                && !l.trim_start().starts_with("sl ")
        })
        .take(lines)
        .copied()
        .collect();
    keep.into_iter().rev().collect::<Vec<_>>().join("\n")
}

struct Guest {
    child: Child,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu() -> Result<&'static str, ImageError> {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok("qemu-system-x86_64")
    } else {
        Err(ImageError(
            "qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)".into(),
        ))
    }
}

fn boot(
    dir: &Path,
    meta: &ImageMeta,
    forwards: &[(u16, u16)],
    accel: &str,
    console: &Path,
) -> Result<Guest, ImageError> {
    let ram = std::env::var("QEMU_RAM_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(512);
    let cpus = std::env::var("QEMU_CPUS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        .max(1);
    let mut netdev = String::from("user,id=n0");
    for (host, guest) in forwards {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    let _ = std::fs::remove_file(console);
    let mut cmd = Command::new(qemu()?);
    cmd.arg("-kernel")
        .arg(dir.join(&meta.boot.kernel))
        .arg("-initrd")
        .arg(dir.join(&meta.boot.initrd))
        .args(["-append", &meta.boot.append])
        .args(["-m", &ram.to_string(), "-smp", &cpus.to_string()])
        .args(["-accel", accel])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args([
            "-netdev",
            &netdev,
            "-device",
            &format!("{},netdev=n0", meta.boot.nic),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(disk) = &meta.boot.disk {
        // The guest writes to a throwaway overlay: the image stays the one its sha256 names.
        cmd.arg("-drive").arg(format!(
            "file={},if=virtio,format=qcow2,snapshot=on",
            dir.join(disk).display()
        ));
    }
    let child = cmd
        .spawn()
        .map_err(|e| ImageError(format!("cannot start QEMU: {e}")))?;
    Ok(Guest { child })
}

/// Where the verdict "KVM guests hang on this host" is kept: the job's cache dir, else the
/// user's. It holds the host kernel's release, so it is forgotten when the host changes.
fn kvm_verdict_file() -> Option<PathBuf> {
    let dir = std::env::var_os("RAVE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("rave")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rave")))?;
    Some(dir.join("kvm-hangs"))
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Did a KVM guest hang on this host (same kernel) before?
pub fn kvm_known_to_hang(verdict: &Path) -> bool {
    std::fs::read_to_string(verdict).is_ok_and(|t| t.trim() == host_kernel())
}

fn remember_kvm_hangs(verdict: &Path) {
    if let Some(d) = verdict.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let _ = std::fs::write(verdict, host_kernel() + "\n");
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Boot one variant and check it. `Err` carries the console log's tail.
pub fn test_variant(opts: &TestOptions, variant_dir: &Path) -> Result<TestReport, ImageError> {
    let text = std::fs::read_to_string(variant_dir.join("image.json")).map_err(|e| {
        ImageError(format!(
            "{}/image.json: {e} (build the image first: rave image build)",
            variant_dir.display()
        ))
    })?;
    let meta: ImageMeta =
        serde_json::from_str(&text).map_err(|e| ImageError(format!("image.json: {e}")))?;
    let declared: BTreeSet<u16> = meta
        .services
        .iter()
        .flat_map(|s| s.ports.iter().copied())
        .collect();
    let mut forwards = Vec::new();
    for p in &declared {
        forwards.push((free_port()?, *p));
    }
    let host_port = |guest: u16| forwards.iter().find(|(_, g)| *g == guest).map(|(h, _)| *h);
    let console = variant_dir.join("console.log");
    let verdict = kvm_verdict_file();
    let hung_before = verdict.as_deref().is_some_and(kvm_known_to_hang);
    let mut accel = match opts.accel.as_str() {
        "auto" if kvm_usable() && !hung_before => "kvm".to_string(),
        "auto" => {
            if hung_before && let Some(v) = &verdict {
                eprintln!(
                    "rave image test: a KVM guest hung on this host before; booting under TCG (delete {} to try KVM again)",
                    v.display()
                );
            }
            "tcg".to_string()
        }
        other => other.to_string(),
    };
    let t0 = Instant::now();
    let mut guest = boot(variant_dir, &meta, &forwards, &accel, &console)?;
    if accel == "kvm" && opts.accel == "auto" {
        let silent = loop {
            if std::fs::metadata(&console).is_ok_and(|m| m.len() > 0) {
                break false;
            }
            if t0.elapsed() > opts.kvm_grace {
                break true;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if silent {
            eprintln!(
                "rave image test: the KVM guest printed nothing in {}s; retrying under TCG",
                opts.kvm_grace.as_secs()
            );
            drop(guest);
            if let Some(v) = &verdict {
                remember_kvm_hangs(v);
            }
            accel = "tcg".into();
            guest = boot(variant_dir, &meta, &forwards, &accel, &console)?;
        }
    }
    let started = Instant::now();
    let fail = |why: String| -> ImageError {
        ImageError(format!(
            "variant `{}`: {why}\n--- console ({}) ---\n{}",
            meta.variant,
            console.display(),
            tail(&console, 40)
        ))
    };
    // Every service's health endpoint answers 200.
    let mut pending: Vec<(String, u16, String)> = meta
        .services
        .iter()
        .filter_map(|s| Some((s.name.clone(), *s.ports.first()?, s.health.clone()?)))
        .collect();
    while !pending.is_empty() {
        if let Ok(Some(st)) = guest.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = guest.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(fail(format!(
                "QEMU exited ({st}) before the services came up: {}",
                err.trim()
            )));
        }
        pending.retain(|(_, port, path)| {
            host_port(*port).and_then(|h| http_status(h, path)) != Some(200)
        });
        if pending.is_empty() {
            break;
        }
        if started.elapsed() > opts.timeout {
            let names: Vec<String> = pending
                .iter()
                .map(|(n, p, h)| format!("{n} (http://guest:{p}{h})"))
                .collect();
            return Err(fail(format!(
                "not healthy within {}s: {}",
                opts.timeout.as_secs(),
                names.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let healthy = t0.elapsed();
    // Only the declared ports: wait for a socket listing made after the services answered.
    let seen_before = std::fs::read_to_string(&console)
        .map(|t| t.matches("RAVE-LISTEN-END").count())
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let listening = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.matches("RAVE-LISTEN-END").count() > seen_before {
            break listening_ports(&text).unwrap_or_default();
        }
        if Instant::now() > deadline {
            return Err(fail("the guest never listed its listening sockets".into()));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let extra: Vec<u16> = listening.difference(&declared).copied().collect();
    let missing: Vec<u16> = declared.difference(&listening).copied().collect();
    if !extra.is_empty() {
        return Err(fail(format!(
            "the guest listens on ports nobody declared: {extra:?} (declared: {declared:?})"
        )));
    }
    if !missing.is_empty() {
        return Err(fail(format!(
            "declared ports nothing listens on: {missing:?}"
        )));
    }
    drop(guest);
    Ok(TestReport {
        variant: meta.variant,
        accel,
        boot_to_healthy: healthy,
        listening: listening.into_iter().collect(),
        console,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kvm_hang_is_remembered_for_this_host_kernel_only() {
        let d = tempfile::tempdir().unwrap();
        let v = d.path().join("rave/kvm-hangs");
        assert!(!kvm_known_to_hang(&v));
        remember_kvm_hangs(&v);
        assert!(kvm_known_to_hang(&v));
        std::fs::write(&v, "another-kernel\n").unwrap();
        assert!(
            !kvm_known_to_hang(&v),
            "a new host kernel gets KVM tried again"
        );
    }

    #[test]
    fn listening_ports_come_from_the_last_complete_listing() {
        let console = "boot\nRAVE-LISTEN-BEGIN\n  sl  local_address rem_address   st\n   0: 00000000:1F90 00000000:0000 0A 0\nRAVE-LISTEN-END\n\
                       RAVE-LISTEN-BEGIN\n   0: 00000000:1F90 00000000:0000 0A 0\n   1: 0100007F:0016 00000000:0000 0A 0\n   2: 0F02000A:1F90 0202000A:D3A2 01 0\nRAVE-LISTEN-END\nRAVE-LISTEN-BEGIN\n   0: 0000";
        let ports = listening_ports(console).unwrap();
        // 0x1F90 = 8080 and 0x16 = 22 listen; the established connection does not count.
        assert_eq!(ports.into_iter().collect::<Vec<_>>(), vec![22, 8080]);
    }
}
