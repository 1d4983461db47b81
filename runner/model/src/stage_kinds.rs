//! Stage kinds declared under `.rave:` that expand into ordinary jobs.
//!
//! The engine only runs jobs; a stage kind is sugar for a job whose script calls a `rave`
//! subcommand, the way GitLab's release-cli runs inside a job. The expansion is an ordinary
//! YAML job, so everything (rules, needs, variables, artifacts) works on it as on any other.
//!
//! ```yaml
//! .rave:
//!   scan:
//!     stage: scan                       # default: `scan` if declared, else `test`
//!     name: security-scan               # default: rave-scan
//!     tools: [trivy, npm-audit, secrets] # default: all three
//!     fail_on: HIGH
//!     args: [--offline, --trivy-scanners, secret]
//!     needs: [build]
//!     variables: {RAVE_MEMORY: 1G}
//! ```

//!
//! ```yaml
//! .rave:
//!   image:                              # VM images of the service crates (docs/images.md)
//!     services_dir: services
//!     services: {api: {port: 8080, health: /health}, metrics: {ports: [9100]}}
//!     variants: {p1: [api], p2: [api, metrics]}   # default: one image with every service
//!     # or a bootable qcow2 disk: {disk: {services: [api], format: qcow2}}
//!     boot_timeout: 120s
//!     nix: nix/image.nix                # build with Nix instead of cargo + packing
//! ```

use crate::diag::{Diagnostic, did_you_mean};
use crate::source::Span;
use crate::yaml::{self, Key, Limits, Node, Value};

const SCAN_KEYS: &[&str] = &[
    "stage",
    "name",
    "tools",
    "fail_on",
    "args",
    "needs",
    "variables",
    "rules",
];
const TOOLS: &[&str] = &["trivy", "npm-audit", "secrets"];
const IMAGE_KEYS: &[&str] = &[
    "stage",
    "test_stage",
    "name",
    "test_name",
    "services_dir",
    "services",
    "variants",
    "kernel",
    "nix",
    "nix_args",
    "boot_timeout",
    "accel",
    "needs",
    "variables",
    "test_variables",
    "rules",
];

fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn respan(n: &mut Node, span: Span) {
    n.span = span;
    match &mut n.value {
        Value::Seq(items) => items.iter_mut().for_each(|i| respan(i, span)),
        Value::Map(m) => {
            for (k, v) in m {
                k.span = span;
                respan(v, span);
            }
        }
        _ => {}
    }
}

/// The job a `.rave: scan:` block stands for: (name, job node).
pub fn scan_job(cfg: &Node, stages: &[String], diags: &mut Vec<Diagnostic>) -> Option<(Key, Node)> {
    let Some(m) = cfg.as_map() else {
        diags.push(Diagnostic::error(
            "`.rave: scan` must be a mapping",
            Some(cfg.span),
        ));
        return None;
    };
    for (k, _) in m {
        if !SCAN_KEYS.contains(&k.name.as_str()) {
            diags.push(
                Diagnostic::error(
                    format!("unknown key `{}` in `.rave: scan`", k.name),
                    Some(k.span),
                )
                .with_help_opt(did_you_mean(&k.name, SCAN_KEYS.iter().copied())),
            );
        }
    }
    let text = |k: &str| cfg.get(k).and_then(Node::scalar_string);
    let list = |k: &str| -> Vec<String> {
        cfg.get(k)
            .and_then(Node::as_seq)
            .map(|s| s.iter().filter_map(Node::scalar_string).collect())
            .unwrap_or_default()
    };
    let name = text("name").unwrap_or_else(|| "rave-scan".into());
    let stage = text("stage").unwrap_or_else(|| {
        if stages.iter().any(|s| s == "scan") {
            "scan".into()
        } else {
            "test".into()
        }
    });
    let fail_on = text("fail_on").unwrap_or_else(|| "HIGH".into());
    let mut tools = list("tools");
    if tools.is_empty() {
        tools = TOOLS.iter().map(|t| t.to_string()).collect();
    }
    for t in &tools {
        if !TOOLS.contains(&t.as_str()) {
            diags.push(
                Diagnostic::error(
                    format!("unknown scanner `{t}` in `.rave: scan: tools`"),
                    cfg.get("tools").map(|n| n.span),
                )
                .with_help_opt(did_you_mean(t, TOOLS.iter().copied())),
            );
            return None;
        }
    }
    let extra: Vec<String> = list("args").iter().map(|a| shell_quote(a)).collect();
    let mut y = format!("stage: {}\nscript:\n  - mkdir -p rave-scan\n", q(&stage));
    for t in &tools {
        // npm audit needs a lock file; without one there is nothing to audit.
        let guard = if t == "npm-audit" {
            "[ ! -e package-lock.json ] || "
        } else {
            ""
        };
        let cmd = format!(
            "{guard}rave scan {t} --fail-on {} --sarif rave-scan/{t}.sarif --junit rave-scan/{t}.xml --summary rave-scan/{t}.json {} || rc=$?",
            shell_quote(&fail_on),
            extra.join(" ")
        );
        y.push_str(&format!("  - {}\n", q(cmd.trim_end())));
    }
    // Every scanner runs; the job fails at the end if any gate or scanner did.
    y.push_str("  - exit ${rc:-0}\n");
    y.push_str("artifacts:\n  when: always\n  expire_in: 30 days\n  paths: [rave-scan/]\n  reports:\n    junit: rave-scan/*.xml\n");
    let mut node = match yaml::parse(&y, cfg.span.file, Limits::default()) {
        Ok(n) => n,
        Err(e) => {
            diags.push(Diagnostic::error(
                format!("internal: the scan job did not expand: {}", e.message),
                Some(cfg.span),
            ));
            return None;
        }
    };
    respan(&mut node, cfg.span);
    if let Value::Map(m) = &mut node.value {
        for k in ["needs", "variables", "rules"] {
            if let Some(v) = cfg.get(k) {
                m.push((
                    Key {
                        name: k.into(),
                        span: v.span,
                    },
                    v.clone(),
                ));
            }
        }
    }
    Some((
        Key {
            name,
            span: cfg.span,
        },
        node,
    ))
}

/// The two jobs a `.rave: image:` block stands for: the build (`rave image build`, artifacts
/// kept 7 days) and the boot test (`rave image test`, needs the build, console logs kept).
pub fn image_jobs(cfg: &Node, stages: &[String], diags: &mut Vec<Diagnostic>) -> Vec<(Key, Node)> {
    let Some(m) = cfg.as_map() else {
        diags.push(Diagnostic::error(
            "`.rave: image` must be a mapping",
            Some(cfg.span),
        ));
        return Vec::new();
    };
    for (k, _) in m {
        if !IMAGE_KEYS.contains(&k.name.as_str()) {
            diags.push(
                Diagnostic::error(
                    format!("unknown key `{}` in `.rave: image`", k.name),
                    Some(k.span),
                )
                .with_help_opt(did_you_mean(&k.name, IMAGE_KEYS.iter().copied())),
            );
        }
    }
    let text = |k: &str| cfg.get(k).and_then(Node::scalar_string);
    let pick_stage = |k: &str, want: &str| {
        text(k).unwrap_or_else(|| {
            if stages.iter().any(|s| s == want) {
                want.to_string()
            } else {
                stages.first().cloned().unwrap_or_else(|| want.to_string())
            }
        })
    };
    let name = text("name").unwrap_or_else(|| "rave-image".into());
    let test_name = text("test_name").unwrap_or_else(|| "rave-vm-test".into());
    let mut build = vec!["rave image build --out rave-image".to_string()];
    if let Some(d) = text("services_dir") {
        build.push(format!("--services-dir {}", shell_quote(&d)));
    }
    if let Some(services) = cfg.get("services") {
        let Some(sm) = services.as_map() else {
            diags.push(Diagnostic::error(
                "`.rave: image: services` maps each service to its `port` (or `ports`) and `health`",
                Some(services.span),
            ));
            return Vec::new();
        };
        for (k, v) in sm {
            let mut ports: Vec<String> = v
                .get("ports")
                .and_then(Node::as_seq)
                .map(|s| s.iter().filter_map(Node::scalar_string).collect())
                .unwrap_or_default();
            if let Some(p) = v.get("port").and_then(Node::scalar_string) {
                ports.insert(0, p);
            }
            if ports.is_empty() || ports.iter().any(|p| p.parse::<u16>().is_err()) {
                diags.push(Diagnostic::error(
                    format!(
                        "service `{}` needs `port: N` (or `ports: [N, …]`) with TCP port numbers",
                        k.name
                    ),
                    Some(v.span),
                ));
                return Vec::new();
            }
            let health = v
                .get("health")
                .and_then(Node::scalar_string)
                .map(|h| format!(":{h}"))
                .unwrap_or_default();
            build.push(format!(
                "--service {}",
                shell_quote(&format!("{}={}{health}", k.name, ports.join(",")))
            ));
            for a in v
                .get("args")
                .and_then(Node::as_seq)
                .into_iter()
                .flatten()
                .filter_map(Node::scalar_string)
            {
                build.push(format!(
                    "--service-arg {}",
                    shell_quote(&format!("{}={a}", k.name))
                ));
            }
        }
    }
    if let Some(vs) = cfg.get("variants").and_then(Node::as_map) {
        for (k, v) in vs {
            // `[svc, …]`, or `{services: [svc, …], format: initramfs | qcow2}`.
            let services = if v.as_map().is_some() {
                v.get("services")
            } else {
                Some(v)
            };
            let list: Vec<String> = services
                .and_then(Node::as_seq)
                .map(|s| s.iter().filter_map(Node::scalar_string).collect())
                .unwrap_or_default();
            build.push(format!(
                "--variant {}",
                shell_quote(&format!("{}={}", k.name, list.join(",")))
            ));
            match v.get("format").and_then(Node::scalar_string).as_deref() {
                None | Some("initramfs") => {}
                Some("qcow2") => build.push(format!("--qcow2 {}", shell_quote(&k.name))),
                Some(other) => {
                    diags.push(
                        Diagnostic::error(
                            format!(
                                "variant `{}`: unknown image format `{other}`: use initramfs or qcow2",
                                k.name
                            ),
                            v.get("format").map(|f| f.span),
                        )
                        .with_help_opt(did_you_mean(other, ["initramfs", "qcow2"])),
                    );
                    return Vec::new();
                }
            }
        }
    }
    if let Some(k) = text("kernel") {
        build.push(format!("--kernel {}", shell_quote(&k)));
    }
    if let Some(n) = text("nix") {
        build.push(format!("--nix {}", shell_quote(&n)));
    }
    for a in cfg
        .get("nix_args")
        .and_then(Node::as_seq)
        .into_iter()
        .flatten()
        .filter_map(Node::scalar_string)
    {
        build.push(format!("--nix-arg={}", shell_quote(&a)));
    }
    let mut test = vec!["rave image test --dir rave-image".to_string()];
    if let Some(t) = text("boot_timeout") {
        test.push(format!("--timeout {}", shell_quote(&t)));
    }
    if let Some(a) = text("accel") {
        test.push(format!("--accel {}", shell_quote(&a)));
    }
    let build_y = format!(
        "stage: {}\nscript:\n  - {}\nartifacts:\n  expire_in: 7 days\n  paths: [rave-image/]\n",
        q(&pick_stage("stage", "build")),
        q(&build.join(" "))
    );
    let test_y = format!(
        "stage: {}\nneeds: [{}]\nscript:\n  - {}\nartifacts:\n  when: always\n  expire_in: 7 days\n  paths: [rave-image/*/console.log]\n",
        q(&pick_stage("test_stage", "test")),
        q(&name),
        q(&test.join(" "))
    );
    let mut out = Vec::new();
    for (job_name, y, extra) in [
        (name, build_y, &["needs", "variables", "rules"][..]),
        (test_name, test_y, &["rules"][..]),
    ] {
        let mut node = match yaml::parse(&y, cfg.span.file, Limits::default()) {
            Ok(n) => n,
            Err(e) => {
                diags.push(Diagnostic::error(
                    format!("internal: the image job did not expand: {}", e.message),
                    Some(cfg.span),
                ));
                return Vec::new();
            }
        };
        respan(&mut node, cfg.span);
        if let Value::Map(m) = &mut node.value {
            for k in extra {
                if let Some(v) = cfg.get(k) {
                    m.push((
                        Key {
                            name: (*k).into(),
                            span: v.span,
                        },
                        v.clone(),
                    ));
                }
            }
            if extra.len() == 1
                && let Some(v) = cfg.get("test_variables")
            {
                m.push((
                    Key {
                        name: "variables".into(),
                        span: v.span,
                    },
                    v.clone(),
                ));
            }
        }
        out.push((
            Key {
                name: job_name,
                span: cfg.span,
            },
            node,
        ));
    }
    out
}
