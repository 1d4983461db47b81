//! `rave scan`: run scanners, apply the gate, write reports. Callable from any job's script.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use rave_scanners::gate::{self, AllowEntry};
use rave_scanners::{Finding, ScanError, Severity, Tool, npm, report, sarif, secrets, trivy};

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum Which {
    Trivy,
    NpmAudit,
    Secrets,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum Unavailable {
    /// A scanner that cannot run fails the scan (default).
    Fail,
    /// A scanner that cannot run is reported as a warning; the others still gate.
    Warn,
}

#[derive(Args, Debug)]
pub struct ScanArgs {
    /// Which scanner to run; `all` runs Trivy, npm audit (when there is a lock file) and secrets.
    #[arg(value_enum)]
    pub which: Which,
    /// Directory to scan (default: the current directory, i.e. the job's CI_PROJECT_DIR).
    #[arg(short = 'C', long = "dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Fail when a finding is at or above this severity: CRITICAL, HIGH, MEDIUM, LOW, UNKNOWN.
    #[arg(long, value_name = "SEVERITY", default_value = "HIGH")]
    pub fail_on: String,
    /// Allowlist file (default: .rave/scan-allow.yml when it exists).
    #[arg(long, value_name = "FILE")]
    pub allowlist: Option<PathBuf>,
    /// Write a SARIF 2.1.0 log here.
    #[arg(long, value_name = "FILE")]
    pub sarif: Option<PathBuf>,
    /// Write a JUnit XML report here (blocking findings as failed test cases).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Write the JSON summary here (what a release manifest embeds).
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Trivy scanners to run, comma separated (vuln,secret,misconfig,license).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub trivy_scanners: Vec<String>,
    /// Trivy cache directory (holds the vulnerability DB).
    #[arg(long, value_name = "DIR")]
    pub trivy_cache_dir: Option<String>,
    /// Never download the vulnerability DB (--skip-db-update --offline-scan).
    #[arg(long)]
    pub offline: bool,
    /// Scan this container image with `trivy image` instead of the directory.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Registry npm audit asks for advisories.
    #[arg(long, value_name = "URL")]
    pub npm_registry: Option<String>,
    /// A variable whose value must appear in no file (repeatable; also RAVE_MASKED_VARIABLES).
    #[arg(long = "masked", value_name = "NAME")]
    pub masked: Vec<String>,
    /// What to do when a scanner cannot run.
    #[arg(long, value_enum, default_value = "fail")]
    pub unavailable: Unavailable,
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

pub fn run(args: &ScanArgs) -> anyhow::Result<i32> {
    let dir = crate::project::project_root(args.dir.as_deref())?;
    let fail_on = Severity::parse(&args.fail_on).ok_or_else(|| {
        anyhow::anyhow!(
            "--fail-on `{}`: use CRITICAL, HIGH, MEDIUM, LOW or UNKNOWN",
            args.fail_on
        )
    })?;
    let allow_path = args
        .allowlist
        .clone()
        .or_else(|| Some(dir.join(".rave/scan-allow.yml")).filter(|p| p.exists()));
    let allow: Vec<AllowEntry> = match &allow_path {
        Some(p) => match gate::read_allowlist(p) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(2);
            }
        },
        None => Vec::new(),
    };

    let mut tools: Vec<Tool> = match args.which {
        Which::Trivy => vec![Tool::Trivy],
        Which::NpmAudit => vec![Tool::NpmAudit],
        Which::Secrets => vec![Tool::Secrets],
        Which::All => vec![Tool::Trivy, Tool::NpmAudit, Tool::Secrets],
    };
    // npm audit runs in every directory with a lock file (a monorepo's packages too).
    let npm_dirs = if args.which == Which::NpmAudit {
        vec![dir.clone()]
    } else {
        npm::lock_dirs(&dir)
    };
    if args.which == Which::All && npm_dirs.is_empty() {
        eprintln!("rave scan: no package-lock.json, skipping npm audit");
        tools.retain(|t| *t != Tool::NpmAudit);
    }
    let mut findings: Vec<Finding> = Vec::new();
    let mut ran: Vec<Tool> = Vec::new();
    let mut broken = false;
    for tool in tools {
        let result: Result<Vec<Finding>, ScanError> = match tool {
            Tool::Trivy => trivy::run(
                &dir,
                &trivy::TrivyOptions {
                    scanners: args.trivy_scanners.clone(),
                    cache_dir: args.trivy_cache_dir.clone(),
                    offline: args.offline,
                    image: args.image.clone(),
                },
            ),
            Tool::NpmAudit => npm_dirs
                .iter()
                .map(|d| {
                    // Findings name their place from the scanned root (`web/node_modules/x`).
                    let rel = d
                        .strip_prefix(&dir)
                        .unwrap_or(d)
                        .to_string_lossy()
                        .to_string();
                    npm::run(d, args.npm_registry.as_deref()).map(|found| {
                        found
                            .into_iter()
                            .map(|mut f| {
                                if !rel.is_empty() {
                                    f.target = f.target.map(|t| format!("{rel}/{t}"));
                                }
                                f
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect::<Result<Vec<Vec<Finding>>, ScanError>>()
                .map(|all| all.into_iter().flatten().collect()),
            Tool::Secrets => {
                let mut names = args.masked.clone();
                if let Ok(list) = std::env::var("RAVE_MASKED_VARIABLES") {
                    names.extend(
                        list.split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty()),
                    );
                }
                let masked: Vec<(String, String)> = names
                    .iter()
                    .filter_map(|n| std::env::var(n).ok().map(|v| (n.clone(), v)))
                    .collect();
                for n in names.iter().filter(|n| std::env::var(n).is_err()) {
                    eprintln!("rave scan: masked variable {n} is not set; nothing to look for");
                }
                Ok(secrets::scan(&dir, &masked))
            }
        };
        match result {
            Ok(f) => {
                ran.push(tool);
                findings.extend(f);
            }
            Err(e) => {
                eprintln!(
                    "{}: {e}",
                    if args.unavailable == Unavailable::Warn {
                        "warning"
                    } else {
                        "error"
                    }
                );
                broken = true;
            }
        }
    }
    let today = gate::today();
    let result = gate::evaluate(&findings, fail_on, &allow, &today);
    print!(
        "{}",
        report::table(&ran, &findings, &result, fail_on, !broken)
    );
    let version = env!("CARGO_PKG_VERSION");
    if let Some(p) = &args.sarif {
        write(
            p,
            &serde_json::to_string_pretty(&sarif::to_sarif(&ran, &findings, version))?,
        )?;
    }
    if let Some(p) = &args.junit {
        write(p, &report::junit(&ran, &result, &findings))?;
    }
    if let Some(p) = &args.summary {
        let mut s = report::summary(&ran, &findings, &result, fail_on);
        s["complete"] = serde_json::json!(!broken);
        write(p, &serde_json::to_string_pretty(&s)?)?;
    }
    if broken && args.unavailable == Unavailable::Fail {
        return Ok(2);
    }
    if !result.passed() {
        // Tell the runner this job failed its gate (failure_reason: scan_gate).
        if let Ok(d) = std::env::var("RAVE_JOB_REPORT_DIR") {
            // Created on first use: most jobs never report anything.
            let _ = std::fs::create_dir_all(&d);
            let _ = std::fs::write(Path::new(&d).join("scan_gate"), "");
        }
        return Ok(1);
    }
    Ok(0)
}
