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
    pub format: Format,
}

/// What a variant is built as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The kernel and an initramfs holding everything.
    #[default]
    Initramfs,
    /// The kernel, a small initramfs that mounts the disk, and a qcow2 disk holding an ext4
    /// root file system with the services.
    Qcow2,
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
    #[serde(default)]
    pub format: Format,
    pub kernel_version: String,
    pub services: Vec<ServiceDef>,
    /// File name → sha256.
    pub files: BTreeMap<String, String>,
    /// File name → size in bytes.
    #[serde(default)]
    pub sizes: BTreeMap<String, u64>,
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
    /// The root disk (qcow2, attached as virtio `/dev/vda`), for a disk variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

impl ImageMeta {
    /// An image's metadata before its files' digests are added.
    fn new(variant: &str, kernel_version: &str, services: Vec<ServiceDef>, built_by: &str) -> Self {
        ImageMeta {
            variant: variant.to_string(),
            format: Format::Initramfs,
            kernel_version: kernel_version.to_string(),
            services,
            files: BTreeMap::new(),
            sizes: BTreeMap::new(),
            boot: Boot {
                kernel: "vmlinuz".into(),
                initrd: "initramfs.cpio".into(),
                append: "console=ttyS0 panic=-1".into(),
                nic: NIC.0.into(),
                disk: None,
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
                format: Format::Initramfs,
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
        let mut meta = ImageMeta::new(&v.name, &kver, chosen.clone(), "rave image build");
        meta.format = v.format;
        let initrd = dir.join("initramfs.cpio");
        let root = RootFs {
            busybox: &bb,
            target: &target,
            services: &chosen,
        };
        match v.format {
            Format::Initramfs => {
                let mut c = cpio_at(&initrd)?;
                root.pack(&mut c, &modules, &meta)
                    .map_err(|e| ImageError(format!("packing {}: {e}", initrd.display())))?;
                c.finish()
                    .map_err(|e| ImageError(format!("packing {}: {e}", initrd.display())))?;
            }
            Format::Qcow2 => {
                // The boot initramfs loads every module (NIC and disk); the root's init
                // loads none.
                let mut wanted: Vec<&str> = NIC.1.to_vec();
                wanted.extend(DISK_MODULES);
                let boot_modules =
                    module_load_order(&Path::new("/lib/modules").join(&kver), &wanted)?;
                meta.boot.disk = Some("disk.qcow2".into());
                meta.boot.append.push_str(" root=/dev/vda");
                let staging = dir.join(".rootfs");
                let _ = std::fs::remove_dir_all(&staging);
                root.pack(&mut DirTree(staging.clone()), &[], &meta)
                    .map_err(|e| ImageError(format!("writing {}: {e}", staging.display())))?;
                let disk = make_disk(&staging, &dir.join("disk.qcow2"));
                let _ = std::fs::remove_dir_all(&staging);
                disk?;
                let mut c = cpio_at(&initrd)?;
                pack_boot(&mut c, &bb, &boot_modules)
                    .map_err(|e| ImageError(format!("packing {}: {e}", initrd.display())))?;
                c.finish()
                    .map_err(|e| ImageError(format!("packing {}: {e}", initrd.display())))?;
            }
        }
        std::fs::copy(&kernel, dir.join("vmlinuz"))
            .map_err(|e| ImageError(format!("cannot read the kernel {}: {e}", kernel.display())))?;
        let mut files = vec!["vmlinuz", "initramfs.cpio"];
        if v.format == Format::Qcow2 {
            files.push("disk.qcow2");
        }
        for f in files {
            let path = dir.join(f);
            meta.files.insert(f.into(), sha256_file(&path)?);
            let size = std::fs::metadata(&path)
                .map_err(|e| ImageError(format!("{}: {e}", path.display())))?
                .len();
            meta.sizes.insert(f.into(), size);
        }
        write_meta(&dir, &meta)?;
        metas.push(meta);
    }
    Ok(metas)
}

/// Modules the boot initramfs of a disk variant loads to mount its root: the virtio disk and
/// ext4 (with the crc32c its metadata checksums need).
const DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

/// Where an image's root file system is written: a cpio archive (an initramfs), or a
/// directory that becomes an ext4 disk.
trait Tree {
    fn dir(&mut self, path: &str) -> std::io::Result<()>;
    fn file(&mut self, path: &str, from: &Path, mode: u32) -> std::io::Result<()>;
    fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()>;
    fn bytes(&mut self, path: &str, data: &[u8], mode: u32) -> std::io::Result<()>;
}

impl<W: std::io::Write> Tree for Cpio<W> {
    fn dir(&mut self, path: &str) -> std::io::Result<()> {
        Cpio::dir(self, path)
    }
    fn file(&mut self, path: &str, from: &Path, mode: u32) -> std::io::Result<()> {
        Cpio::file(self, path, from, mode)
    }
    fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        Cpio::symlink(self, path, target)
    }
    fn bytes(&mut self, path: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
        Cpio::bytes(self, path, data, mode)
    }
}

/// A directory standing for the root (`mkfs.ext4 -d` takes it).
struct DirTree(PathBuf);

impl Tree for DirTree {
    fn dir(&mut self, path: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.0.join(path))
    }
    fn file(&mut self, path: &str, from: &Path, mode: u32) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let to = self.0.join(path);
        std::fs::copy(from, &to)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
    }
    fn symlink(&mut self, path: &str, target: &str) -> std::io::Result<()> {
        std::os::unix::fs::symlink(target, self.0.join(path))
    }
    fn bytes(&mut self, path: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let to = self.0.join(path);
        std::fs::write(&to, data)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
    }
}

fn cpio_at(path: &Path) -> Result<Cpio<std::io::BufWriter<std::fs::File>>, ImageError> {
    let f =
        std::fs::File::create(path).map_err(|e| ImageError(format!("{}: {e}", path.display())))?;
    Ok(Cpio::new(std::io::BufWriter::new(f)))
}

/// What goes in an image's root: busybox, the modules its init loads, the services and the
/// libraries they load, the init and the image's metadata.
struct RootFs<'a> {
    busybox: &'a Path,
    target: &'a Path,
    services: &'a [ServiceDef],
}

impl RootFs<'_> {
    fn pack(&self, t: &mut dyn Tree, modules: &[PathBuf], meta: &ImageMeta) -> std::io::Result<()> {
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
            t.dir(d)?;
        }
        t.file("bin/busybox", self.busybox, 0o755)?;
        for tool in BUSYBOX_TOOLS {
            t.symlink(&format!("bin/{tool}"), "busybox")?;
        }
        let mut mod_names = Vec::new();
        for m in modules {
            let name = m
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("m.ko")
                .to_string();
            t.file(&format!("lib/modules/{name}"), m, 0o644)?;
            mod_names.push(name);
        }
        // Services and the libraries they load, at the paths the loader looks for them.
        let mut dirs_made: HashSet<String> =
            ["lib".to_string(), "bin".into()].into_iter().collect();
        let mut files_put: HashSet<PathBuf> = HashSet::new();
        for d in self.services {
            let bin = self.target.join("release").join(&d.name);
            t.file(&format!("services/{}", d.name), &bin, 0o755)?;
            let libs = library_closure(&bin).map_err(|e| std::io::Error::other(e.0))?;
            for lib in libs {
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
                        t.dir(&acc)?;
                    }
                }
                t.file(&rel, &lib, 0o755)?;
            }
        }
        t.bytes(
            "init",
            init_script(self.services, &mod_names).as_bytes(),
            0o755,
        )?;
        t.bytes(
            "etc/rave-image.json",
            serde_json::to_string_pretty(meta)
                .unwrap_or_default()
                .as_bytes(),
            0o644,
        )
    }
}

/// The boot initramfs of a disk variant: load the modules, mount `/dev/vda` and hand over to
/// the disk's own init.
fn pack_boot(t: &mut dyn Tree, busybox: &Path, modules: &[PathBuf]) -> std::io::Result<()> {
    for d in ["bin", "dev", "proc", "sys", "lib", "lib/modules", "newroot"] {
        t.dir(d)?;
    }
    t.file("bin/busybox", busybox, 0o755)?;
    for tool in [
        "sh",
        "mount",
        "umount",
        "insmod",
        "sleep",
        "echo",
        "mkdir",
        "switch_root",
        "poweroff",
    ] {
        t.symlink(&format!("bin/{tool}"), "busybox")?;
    }
    let mut init = String::from(
        "#!/bin/sh
         # rave image boot: load the disk's drivers, mount it, run its init.
         mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
",
    );
    for m in modules {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("m.ko")
            .to_string();
        t.file(&format!("lib/modules/{name}"), m, 0o644)?;
        init.push_str(&format!(
            "insmod /lib/modules/{name} || echo \"rave-image: cannot load {name}\"\n"
        ));
    }
    init.push_str(
        "i=0
while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 1; i=$((i+1)); done
         mount -t ext4 /dev/vda /newroot || { echo \"rave-image: cannot mount the root disk /dev/vda\"; poweroff -f; }
         echo \"rave-image: root disk mounted\"
         umount /proc /sys /dev
         exec switch_root /newroot /init
",
    );
    t.bytes("init", init.as_bytes(), 0o755)
}

/// An ext4 file system holding `root`, as a qcow2 disk at `out`, checked with `qemu-img
/// check`. Built without root: `mkfs.ext4 -d` fills the file system from the directory.
fn make_disk(root: &Path, out: &Path) -> Result<(), ImageError> {
    let mut bytes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(|e| ImageError(format!("{}: {e}", d.display())))?
            .flatten()
        {
            let m = e
                .path()
                .symlink_metadata()
                .map_err(|e| ImageError(e.to_string()))?;
            if m.is_dir() {
                stack.push(e.path());
            }
            bytes += m.len() + 4096;
        }
    }
    // Room for the file system's own structures and a little to spare, in whole MiB.
    let size_mib = ((bytes + bytes / 4) >> 20) + 16;
    let raw = out.with_extension("raw");
    let _ = std::fs::remove_file(&raw);
    let f =
        std::fs::File::create(&raw).map_err(|e| ImageError(format!("{}: {e}", raw.display())))?;
    f.set_len(size_mib << 20)
        .map_err(|e| ImageError(format!("{}: {e}", raw.display())))?;
    drop(f);
    let steps: [(&str, Vec<String>); 3] = [
        (
            "mkfs.ext4",
            vec![
                "-q".into(),
                "-F".into(),
                "-L".into(),
                "rave-root".into(),
                "-d".into(),
                root.display().to_string(),
                raw.display().to_string(),
            ],
        ),
        (
            "qemu-img",
            vec![
                "convert".into(),
                "-f".into(),
                "raw".into(),
                "-O".into(),
                "qcow2".into(),
                raw.display().to_string(),
                out.display().to_string(),
            ],
        ),
        (
            "qemu-img",
            vec![
                "check".into(),
                "-f".into(),
                "qcow2".into(),
                out.display().to_string(),
            ],
        ),
    ];
    for (tool, args) in steps {
        let o = Command::new(tool).args(&args).output();
        let o = match o {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_file(&raw);
                let pkg = if tool == "qemu-img" {
                    "qemu-utils"
                } else {
                    "e2fsprogs"
                };
                return err(format!(
                    "cannot run {tool}: {e} (Debian: apt-get install {pkg})"
                ));
            }
        };
        if !o.status.success() {
            let _ = std::fs::remove_file(&raw);
            let _ = std::fs::remove_file(out);
            return err(format!(
                "{tool} failed making {} ({}): {}",
                out.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    let _ = std::fs::remove_file(&raw);
    Ok(())
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
        let mut files = vec!["vmlinuz", "initramfs.cpio"];
        // A disk the Nix build made: its initrd is then the boot stage that mounts it.
        if link.join("disk.qcow2").exists() {
            std::fs::copy(link.join("disk.qcow2"), dir.join("disk.qcow2"))
                .map_err(|e| ImageError(e.to_string()))?;
            meta.format = Format::Qcow2;
            meta.boot.disk = Some("disk.qcow2".into());
            meta.boot.append.push_str(" root=/dev/vda");
            files.push("disk.qcow2");
        }
        // The out-link would pin the build in the Nix store forever; the copies are the image.
        let _ = std::fs::remove_file(&link);
        for f in files {
            meta.files.insert(f.into(), sha256_file(&dir.join(f))?);
            if let Ok(m) = std::fs::metadata(dir.join(f)) {
                meta.sizes.insert(f.into(), m.len());
            }
        }
        write_meta(&dir, &meta)?;
        metas.push(meta);
    }
    Ok(metas)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk is an ext4 file system holding the tree, converted to qcow2 and checked; with no
    /// room for it, the build fails naming the cause, and leaves no half disk. (Real
    /// mkfs.ext4 and qemu-img; the full disk is a 2 MiB tmpfs, which needs root, as the
    /// tests run.)
    #[test]
    fn a_disk_holds_the_tree_and_a_full_disk_fails_with_the_cause() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("services")).unwrap();
        std::fs::write(root.join("services/app"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(root.join("init"), "#!/bin/sh\n").unwrap();
        let out = d.path().join("disk.qcow2");
        make_disk(&root, &out).unwrap();
        let head = std::fs::read(&out).unwrap();
        assert_eq!(&head[..4], b"QFI\xfb");
        assert!(!d.path().join("disk.raw").exists(), "the raw file is gone");

        let small = d.path().join("small");
        std::fs::create_dir_all(&small).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&small)
            .status()
            .unwrap();
        assert!(
            mounted.success(),
            "this test mounts a tmpfs: run it as root"
        );
        let e = make_disk(&root, &small.join("disk.qcow2")).unwrap_err();
        let _ = Command::new("umount").arg(&small).status();
        assert!(e.0.contains("No space left on device"), "{e}");
        assert!(
            e.0.starts_with("mkfs.ext4") || e.0.starts_with("qemu-img"),
            "{e}"
        );
    }

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
