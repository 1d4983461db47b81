//! `rave image build` and `rave image test`: VM images of the workspace's service crates,
//! booted in QEMU before a release signs them. See docs/images.md.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use rave_stages::image::{self, BuildOptions, ServiceDef, Variant};
use rave_stages::vmtest::{self, TestOptions};

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build the service crates (release) and pack each variant into a bootable image.
    Build(BuildArgs),
    /// Boot each built variant in QEMU and check its services' health and ports.
    Test(TestArgs),
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The Cargo workspace (default: the current directory).
    #[arg(short = 'C', long = "dir", value_name = "DIR", default_value = ".")]
    pub workspace: PathBuf,
    /// Where the images go, one directory per variant.
    #[arg(long, value_name = "DIR", default_value = "rave-image")]
    pub out: PathBuf,
    /// Directory of the service crates (binary crates) inside the workspace.
    #[arg(long, value_name = "DIR", default_value = "services")]
    pub services_dir: String,
    /// A service with its ports and health path: `NAME=PORT[,PORT…][:/health]`.
    #[arg(long = "service", value_name = "SPEC")]
    pub services: Vec<String>,
    /// One command-line argument for a service, in order: `NAME=ARG` (repeat).
    #[arg(
        long = "service-arg",
        value_name = "NAME=ARG",
        allow_hyphen_values = true
    )]
    pub service_args: Vec<String>,
    /// A variant with the services it holds: `NAME=svc[,svc…]` (default: one variant with all).
    #[arg(long = "variant", value_name = "SPEC")]
    pub variants: Vec<String>,
    /// Build variant NAME as a bootable qcow2 disk (an ext4 root, checked with `qemu-img
    /// check`) booted through a small initramfs, instead of an initramfs alone (repeat).
    #[arg(long = "qcow2", value_name = "NAME")]
    pub qcow2: Vec<String>,
    /// Kernel to boot (default: the newest /boot/vmlinuz-*).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Build with Nix instead: a file for nix-build (gets `--argstr variant NAME`) or a flake
    /// reference for `nix build` (contains `#`).
    #[arg(long, value_name = "FILE|REF")]
    pub nix: Option<String>,
    /// An extra argument for the Nix build (repeat: `--nix-arg=--option --nix-arg=substituters
    /// --nix-arg=`).
    #[arg(long = "nix-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub nix_args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Where `rave image build` put the images.
    #[arg(long, value_name = "DIR", default_value = "rave-image")]
    pub dir: PathBuf,
    /// Only this variant (default: every one under DIR).
    #[arg(long, value_name = "NAME")]
    pub variant: Vec<String>,
    /// How long services get to become healthy after boot.
    #[arg(long, value_name = "DURATION", default_value = "120s")]
    pub timeout: String,
    /// `auto` (KVM when it works, else TCG), `kvm` or `tcg`.
    #[arg(long, value_name = "ACCEL", default_value = "auto")]
    pub accel: String,
}

fn parse_service(s: &str) -> Result<ServiceDef, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("--service `{s}`: write NAME=PORT[,PORT][:/health]"))?;
    let (ports, health) = match rest.split_once(':') {
        Some((p, h)) => (p, Some(h.to_string())),
        None => (rest, None),
    };
    let ports = ports
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("--service `{s}`: `{p}` is not a port"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ServiceDef {
        name: name.to_string(),
        ports,
        health,
        args: Vec::new(),
        sha256: None,
    })
}

pub fn run(c: &ImageCommand) -> anyhow::Result<i32> {
    match c {
        ImageCommand::Build(a) => build(a),
        ImageCommand::Test(a) => test(a),
    }
}

fn build(a: &BuildArgs) -> anyhow::Result<i32> {
    let mut services = Vec::new();
    for s in &a.services {
        match parse_service(s) {
            Ok(d) => services.push(d),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(2);
            }
        }
    }
    for sa in &a.service_args {
        let Some((name, arg)) = sa.split_once('=') else {
            eprintln!("error: --service-arg `{sa}`: write NAME=ARG");
            return Ok(2);
        };
        match services.iter_mut().find(|s| s.name == name) {
            Some(s) => s.args.push(arg.to_string()),
            None => {
                eprintln!("error: --service-arg `{sa}`: no --service {name}=… declared");
                return Ok(2);
            }
        }
    }
    let variants = a
        .variants
        .iter()
        .map(|v| match v.split_once('=') {
            Some((n, list)) => Variant {
                name: n.to_string(),
                services: list
                    .split(',')
                    .map(str::to_string)
                    .filter(|s| !s.is_empty())
                    .collect(),
                format: image::Format::Initramfs,
            },
            None => Variant {
                name: v.clone(),
                services: Vec::new(),
                format: image::Format::Initramfs,
            },
        })
        .collect::<Vec<Variant>>();
    let mut variants = variants;
    for name in &a.qcow2 {
        match variants.iter_mut().find(|v| &v.name == name) {
            Some(v) => v.format = image::Format::Qcow2,
            // The one default variant, as a disk.
            None if a.variants.is_empty() => variants.push(Variant {
                name: name.clone(),
                services: Vec::new(),
                format: image::Format::Qcow2,
            }),
            None => {
                eprintln!("error: --qcow2 {name}: no --variant {name}=… declared");
                return Ok(2);
            }
        }
    }
    let opts = BuildOptions {
        workspace: a.workspace.clone(),
        services_dir: a.services_dir.clone(),
        services,
        variants,
        out: a.out.clone(),
        kernel: a.kernel.clone(),
        nix: a.nix.clone(),
        nix_args: a.nix_args.clone(),
    };
    match image::build(&opts) {
        Ok(metas) => {
            for m in metas {
                let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
                println!(
                    "image {}: {} ({}), kernel {}, initramfs sha256 {}",
                    m.variant,
                    a.out.join(&m.variant).display(),
                    names.join(", "),
                    if m.kernel_version.is_empty() {
                        "from nix"
                    } else {
                        &m.kernel_version
                    },
                    m.files
                        .get("initramfs.cpio")
                        .map(String::as_str)
                        .unwrap_or("-")
                );
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(1)
        }
    }
}

fn test(a: &TestArgs) -> anyhow::Result<i32> {
    let timeout = match humantime::parse_duration(&a.timeout) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --timeout `{}`: {e}", a.timeout);
            return Ok(2);
        }
    };
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&a.dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("image.json").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    if !a.variant.is_empty() {
        dirs.retain(|d| {
            d.file_name()
                .is_some_and(|n| a.variant.iter().any(|v| n == v.as_str()))
        });
    }
    if dirs.is_empty() {
        eprintln!(
            "error: no images under {} (run `rave image build` first)",
            a.dir.display()
        );
        return Ok(2);
    }
    let opts = TestOptions {
        dir: a.dir.clone(),
        timeout,
        accel: a.accel.clone(),
        kvm_grace: Duration::from_secs(10),
    };
    let mut failed = 0;
    for d in &dirs {
        match vmtest::test_variant(&opts, d) {
            Ok(r) => println!(
                "vm test {}: healthy after {:.1}s under {}, listening on {:?} (console: {})",
                r.variant,
                r.boot_to_healthy.as_secs_f64(),
                r.accel,
                r.listening,
                r.console.display()
            ),
            Err(e) => {
                eprintln!("vm test failed: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}
