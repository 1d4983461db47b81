//! The `image` build stage: a Cargo workspace's service crates, built in release mode under the
//! job's caps, packed into a bootable VM image: the host's kernel plus an initramfs holding
//! the services, their shared-library closure, the NIC driver modules and a small init that
//! brings the network up and starts them. A repository that carries Nix expressions for its
//! image builds it with `nix-build` / `nix build` instead, with `--cores` / `--max-jobs` from
//! the job's share.
//!
//! Output, per variant: `<out>/<variant>/{vmlinuz, initramfs.cpio, image.json}`; image.json
//! lists the services with their ports and health paths and every file's sha256.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpio::Cpio;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ImageError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ImageError> {
    Err(ImageError(msg.into()))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceDef {
    pub name: String,
    pub ports: Vec<u16>,
    /// HTTP path answering 200 once the service is up, on its first port.
    pub health: Option<String>,
    /// Command-line arguments the init starts it with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[derive(Clone, Debug)]
pub struct Variant {
    pub name: String,
    /// Empty: every service.
    pub services: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub workspace: PathBuf,
    pub services_dir: String,
    pub services: Vec<ServiceDef>,
    pub variants: Vec<Variant>,
    pub out: PathBuf,
    pub kernel: Option<PathBuf>,
    /// A Nix file (`nix-build`) or flake reference (`nix build`) that builds the image.
    pub nix: Option<String>,
    /// Extra arguments for the Nix build (`--option substituters ''` offline, …).
    pub nix_args: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageMeta {
    pub variant: String,
    pub kernel_version: String,
    pub services: Vec<ServiceDef>,
    /// File name → sha256.
    pub files: BTreeMap<String, String>,
    pub boot: Boot,
    pub built_by: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Boot {
    pub kernel: String,
    pub initrd: String,
    pub append: String,
    /// QEMU's NIC model the init's drivers are for.
    pub nic: String,
}

impl ImageMeta {
    /// An image's metadata before its files' digests are added.
    fn new(variant: &str, kernel_version: &str, services: Vec<ServiceDef>, built_by: &str) -> Self {
        ImageMeta {
            variant: variant.to_string(),
            kernel_version: kernel_version.to_string(),
            services,
            files: BTreeMap::new(),
            boot: Boot {
                kernel: "vmlinuz".into(),
                initrd: "initramfs.cpio".into(),
                append: "console=ttyS0 panic=-1".into(),
                nic: NIC.0.into(),
            },
            built_by: built_by.to_string(),
        }
    }
}

pub fn sha256_file(p: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(p).map_err(|e| ImageError(format!("{}: {e}", p.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| ImageError(format!("{}: {e}", p.display())))?;
    Ok(hex::encode(h.finalize()))
}

/// Binary crates under `services_dir`: (package name, crate dir).
pub fn discover_services(workspace: &Path, services_dir: &str) -> Result<Vec<String>, ImageError> {
    let dir = workspace.join(services_dir);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return err(format!(
            "no {} directory with service crates; put them there, name another with `--services-dir DIR` (in a pipeline: `.rave: image: services_dir`), or name the crates with `--service NAME=PORT`",
            dir.display()
        ));
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let manifest = e.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let is_bin = e.path().join("src/main.rs").exists() || text.contains("[[bin]]");
        if !is_bin {
            continue;
        }
        let name = text.lines().find_map(|l| {
            let l = l.trim();
            let v = l
                .strip_prefix("name")?
                .trim_start()
                .strip_prefix('=')?
                .trim();
            Some(v.trim_matches('"').to_string())
        });
        if let Some(n) = name {
            out.push(n);
        }
    }
    out.sort();
    Ok(out)
}

/// The newest `/boot/vmlinuz-*`.
pub fn find_kernel() -> Result<PathBuf, ImageError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vmlinuz-"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.pop() {
        Some(k) => Ok(k),
        None => err(
            "no kernel in /boot (vmlinuz-*): install one (Debian: apt-get install linux-image-amd64) or set `.rave: image: kernel`",
        ),
    }
}

/// `modules.dep` order: each module after the modules it needs.
pub fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>, ImageError> {
    let dep = std::fs::read_to_string(modules_dir.join("modules.dep")).map_err(|e| {
        ImageError(format!(
            "{}/modules.dep: {e} (the kernel's modules are not installed)",
            modules_dir.display()
        ))
    })?;
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for line in dep.lines() {
        let Some((m, rest)) = line.split_once(':') else {
            continue;
        };
        let base = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.split(".ko").next().unwrap_or(n).replace('-', "_"))
            .unwrap_or_default();
        by_name.insert(base, m.to_string());
        deps.insert(
            m.to_string(),
            rest.split_whitespace().map(str::to_string).collect(),
        );
    }
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        // modules.dep lists a module's needs so that the last is loaded first.
        for d in deps.get(m).into_iter().flatten().rev() {
            visit(d, deps, seen, out);
        }
        out.push(m.to_string());
    }
    let (mut seen, mut order) = (HashSet::new(), Vec::new());
    for w in wanted {
        let Some(path) = by_name.get(&w.replace('-', "_")) else {
            // Built into the kernel: nothing to load.
            continue;
        };
        visit(path, &deps, &mut seen, &mut order);
    }
    Ok(order.into_iter().map(|m| modules_dir.join(m)).collect())
}

/// The shared libraries a binary loads (from `ldd`), the dynamic loader included.
pub fn library_closure(bin: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| ImageError(format!("cannot run ldd: {e} (install libc-bin)")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            return err(format!(
                "{}: a library it needs is missing: {line}",
                bin.display()
            ));
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn busybox() -> Result<PathBuf, ImageError> {
    for p in ["/usr/bin/busybox", "/bin/busybox"] {
        let p = PathBuf::from(p);
        if p.exists() {
            let libs = library_closure(&p)?;
            if libs.is_empty() {
                return Ok(p);
            }
        }
    }
    err(
        "the image's init needs a static busybox: install it (Debian: apt-get install busybox-static)",
    )
}

const BUSYBOX_TOOLS: &[&str] = &[
    "sh", "mount", "insmod", "ip", "sleep", "cat", "echo", "mkdir", "poweroff", "ls", "env",
];

/// Which kernel modules the NIC needs, and QEMU's device for it.
const NIC: (&str, &[&str]) = ("virtio-net-pci", &["virtio_pci", "virtio_net"]);

fn init_script(services: &[ServiceDef], modules: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # rave image init: bring up the network, start the services, report listening sockets.\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev 2>/dev/null\n\
         mkdir -p /tmp /run\n",
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /lib/modules/{m} || echo \"rave-image: cannot load {m}\"\n"
        ));
    }
    s.push_str(
        "ip link set lo up\nip link set eth0 up\nip addr add 10.0.2.15/24 dev eth0\nip route add default via 10.0.2.2\n",
    );
    for svc in services {
        let port = svc.ports.first().copied().unwrap_or(0);
        let args: String = svc
            .args
            .iter()
            .map(|a| format!(" {}", sh_quote(a)))
            .collect();
        s.push_str(&format!(
            "echo \"rave-image: starting {n}\"\nPORT={port} /services/{n}{args} > /dev/console 2>&1 &\n",
            n = svc.name
        ));
    }
    s.push_str(
        "echo \"rave-image: services started\"\n\
         while true; do\n  echo RAVE-LISTEN-BEGIN\n  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null\n  echo RAVE-LISTEN-END\n  sleep 2\ndone\n",
    );
    s
}

fn run(cmd: &mut Command, what: &str) -> Result<(), ImageError> {
    let st = cmd
        .status()
        .map_err(|e| ImageError(format!("cannot run {what}: {e}")))?;
    if !st.success() {
        return err(format!("{what} failed ({st})"));
    }
    Ok(())
}

impl BuildOptions {
    /// The variants to build: one `default` with every service unless some are configured.
    fn variants_or_default(&self) -> Vec<Variant> {
        if self.variants.is_empty() {
            vec![Variant {
                name: "default".into(),
                services: Vec::new(),
            }]
        } else {
            self.variants.clone()
        }
    }
}

/// Build every variant; returns their metadata (also written as image.json).
pub fn build(opts: &BuildOptions) -> Result<Vec<ImageMeta>, ImageError> {
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| ImageError(format!("{}: {e}", opts.out.display())))?;
    if let Some(nix) = &opts.nix {
        return build_with_nix(opts, nix);
    }
    let mut names: Vec<String> = opts.services.iter().map(|s| s.name.clone()).collect();
    if names.is_empty() {
        names = discover_services(&opts.workspace, &opts.services_dir)?;
    }
    if names.is_empty() {
        return err(format!(
            "no service crates (binary crates under {}/): nothing to put in an image",
            opts.services_dir
        ));
    }
    let defs: Vec<ServiceDef> = names
        .iter()
        .map(|n| {
            opts.services.iter().find(|s| &s.name == n).cloned().ok_or_else(|| {
                ImageError(format!(
                    "service `{n}` has no port: add `.rave: image: services: {{{n}: {{port: 8080, health: /health}}}}`"
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    for d in &defs {
        if d.ports.is_empty() {
            return err(format!("service `{}` declares no port", d.name));
        }
    }
    // One cargo invocation: the workspace's build graph is shared; CARGO_BUILD_JOBS comes from
    // the job's CPU share (rave sets it).
    let mut cargo = Command::new("cargo");
    cargo
        .arg("build")
        .arg("--release")
        .current_dir(&opts.workspace);
    for n in &names {
        cargo.arg("-p").arg(n);
    }
    run(&mut cargo, "cargo build --release")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| opts.workspace.join("target"));
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => find_kernel()?,
    };
    let kver = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_string)
        .ok_or_else(|| {
            ImageError(format!(
                "{}: cannot tell the kernel version from its name (vmlinuz-<version>)",
                kernel.display()
            ))
        })?;
    let modules = module_load_order(&Path::new("/lib/modules").join(&kver), NIC.1)?;
    let bb = busybox()?;
    let variants = opts.variants_or_default();
    let mut metas = Vec::new();
    for v in &variants {
        let mut chosen: Vec<ServiceDef> = Vec::new();
        for d in &defs {
            if v.services.is_empty() || v.services.contains(&d.name) {
                let bin = target.join("release").join(&d.name);
                let mut d = d.clone();
                d.sha256 = Some(sha256_file(&bin)?);
                chosen.push(d);
            }
        }
        for s in &v.services {
            if !defs.iter().any(|d| &d.name == s) {
                return err(format!(
                    "variant `{}` names service `{s}`, which is not a service crate",
                    v.name
                ));
            }
        }
        let dir = opts.out.join(&v.name);
        std::fs::create_dir_all(&dir).map_err(|e| ImageError(format!("{}: {e}", dir.display())))?;
        let initrd = dir.join("initramfs.cpio");
        let f = std::fs::File::create(&initrd)
            .map_err(|e| ImageError(format!("{}: {e}", initrd.display())))?;
        let mut c = Cpio::new(std::io::BufWriter::new(f));
        let io = |e: std::io::Error| ImageError(format!("packing {}: {e}", initrd.display()));
        for d in [
            "bin",
            "sbin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "run",
            "etc",
            "lib",
            "lib/modules",
            "services",
        ] {
            c.dir(d).map_err(io)?;
        }
        c.file("bin/busybox", &bb, 0o755).map_err(io)?;
        for t in BUSYBOX_TOOLS {
            c.symlink(&format!("bin/{t}"), "busybox").map_err(io)?;
        }
        let mut mod_names = Vec::new();
        for m in &modules {
            let name = m
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("m.ko")
                .to_string();
            c.file(&format!("lib/modules/{name}"), m, 0o644)
                .map_err(io)?;
            mod_names.push(name);
        }
        // Services and the libraries they load, at the paths the loader looks for them.
        let mut dirs_made: HashSet<String> =
            ["lib".to_string(), "bin".into()].into_iter().collect();
        let mut files_put: HashSet<PathBuf> = HashSet::new();
        for d in &chosen {
            let bin = target.join("release").join(&d.name);
            c.file(&format!("services/{}", d.name), &bin, 0o755)
                .map_err(io)?;
            for lib in library_closure(&bin)? {
                if !files_put.insert(lib.clone()) {
                    continue;
                }
                let rel = lib.to_string_lossy().trim_start_matches('/').to_string();
                let mut acc = String::new();
                for part in Path::new(&rel).parent().into_iter().flat_map(|p| p.iter()) {
                    if !acc.is_empty() {
                        acc.push('/');
                    }
                    acc.push_str(&part.to_string_lossy());
                    if dirs_made.insert(acc.clone()) {
                        c.dir(&acc).map_err(io)?;
                    }
                }
                c.file(&rel, &lib, 0o755).map_err(io)?;
            }
        }
        c.bytes("init", init_script(&chosen, &mod_names).as_bytes(), 0o755)
            .map_err(io)?;
        let mut meta = ImageMeta::new(&v.name, &kver, chosen.clone(), "rave image build");
        c.bytes(
            "etc/rave-image.json",
            serde_json::to_string_pretty(&meta)
                .unwrap_or_default()
                .as_bytes(),
            0o644,
        )
        .map_err(io)?;
        c.finish().map_err(io)?;
        std::fs::copy(&kernel, dir.join("vmlinuz"))
            .map_err(|e| ImageError(format!("cannot read the kernel {}: {e}", kernel.display())))?;
        for f in ["vmlinuz", "initramfs.cpio"] {
            meta.files.insert(f.into(), sha256_file(&dir.join(f))?);
        }
        write_meta(&dir, &meta)?;
        metas.push(meta);
    }
    Ok(metas)
}

fn write_meta(dir: &Path, meta: &ImageMeta) -> Result<(), ImageError> {
    let text = serde_json::to_string_pretty(meta).map_err(|e| ImageError(e.to_string()))?;
    std::fs::write(dir.join("image.json"), text + "\n")
        .map_err(|e| ImageError(format!("{}: {e}", dir.display())))
}

/// `nix-build FILE` or `nix build REF` with the job's caps; the result must hold a kernel
/// (`vmlinuz` or `bzImage`) and an initrd (`initramfs.cpio`, `initrd`), and may hold its own
/// `image.json`.
fn build_with_nix(opts: &BuildOptions, nix: &str) -> Result<Vec<ImageMeta>, ImageError> {
    let cores = std::env::var("NIX_BUILD_CORES").unwrap_or_else(|_| "1".into());
    let jobs = std::env::var("NIX_MAX_JOBS").unwrap_or_else(|_| "1".into());
    let variants = opts.variants_or_default();
    let mut metas = Vec::new();
    for v in &variants {
        let dir = opts.out.join(&v.name);
        std::fs::create_dir_all(&dir).map_err(|e| ImageError(format!("{}: {e}", dir.display())))?;
        let link = dir.join("result");
        let mut cmd = if nix.contains('#') {
            let mut c = Command::new("nix");
            c.args(["build", nix]);
            c
        } else {
            let mut c = Command::new("nix-build");
            c.arg(nix).args(["--argstr", "variant", &v.name]);
            c
        };
        cmd.current_dir(&opts.workspace)
            .args(["--cores", &cores, "--max-jobs", &jobs])
            .args(&opts.nix_args)
            .arg("--out-link")
            .arg(&link);
        eprintln!(
            "rave image: nix build of {nix} (variant {}) with --cores {cores} --max-jobs {jobs}",
            v.name
        );
        run(&mut cmd, &format!("nix build of {nix}"))?;
        let pick = |names: &[&str]| names.iter().map(|n| link.join(n)).find(|p| p.exists());
        let (Some(k), Some(i)) = (
            pick(&["vmlinuz", "bzImage", "kernel"]),
            pick(&["initramfs.cpio", "initrd"]),
        ) else {
            return err(format!(
                "{nix}: the build's result has no kernel (vmlinuz/bzImage) and initrd (initramfs.cpio/initrd)"
            ));
        };
        std::fs::copy(&k, dir.join("vmlinuz")).map_err(|e| ImageError(e.to_string()))?;
        std::fs::copy(&i, dir.join("initramfs.cpio")).map_err(|e| ImageError(e.to_string()))?;
        let services = match std::fs::read_to_string(link.join("image.json")) {
            Ok(t) => serde_json::from_str::<ImageMeta>(&t)
                .map(|m| m.services)
                .unwrap_or_default(),
            Err(_) => opts
                .services
                .iter()
                .filter(|s| v.services.is_empty() || v.services.contains(&s.name))
                .cloned()
                .collect(),
        };
        let mut meta = ImageMeta::new(&v.name, "", services, &format!("nix: {nix}"));
        // The out-link would pin the build in the Nix store forever; the copies are the image.
        let _ = std::fs::remove_file(&link);
        for f in ["vmlinuz", "initramfs.cpio"] {
            meta.files.insert(f.into(), sha256_file(&dir.join(f))?);
        }
        write_meta(&dir, &meta)?;
        metas.push(meta);
    }
    Ok(metas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_what_they_need() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("modules.dep"),
            "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/net/core/failover.ko:\n\
             kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n",
        )
        .unwrap();
        let order: Vec<String> =
            module_load_order(d.path(), &["virtio_pci", "virtio_net", "e1000"])
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
        let pos = |m: &str| order.iter().position(|x| x == m).unwrap();
        assert!(pos("virtio_ring.ko") < pos("virtio.ko"));
        assert!(pos("virtio.ko") < pos("virtio_pci.ko"));
        assert!(pos("failover.ko") < pos("net_failover.ko"));
        assert!(pos("net_failover.ko") < pos("virtio_net.ko"));
        assert_eq!(order.len(), 7, "{order:?}");
    }
}
