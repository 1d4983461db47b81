//! `rave runs` and `rave logs`: what earlier `rave run`s left under `.rave/runs/`.

use std::path::{Path, PathBuf};

use clap::Args;
use rave_engine::event::RunSummary;

use crate::console;
use crate::project::PipelineArgs;

#[derive(Args, Debug)]
pub struct RunsArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Print the runs as JSON (each run's summary.json, newest first).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Pipeline file (default: pipeline.yml, else .gitlab-ci.yml). No `-f` here: that is
    /// `--follow`, as in `tail -f`.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Project directory (default: the repository containing the current directory).
    #[arg(short = 'C', long = "dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Job whose log to print (instance name such as `test 1/2`, or job name); without it,
    /// the run's jobs are listed.
    #[arg(value_name = "JOB")]
    pub job: Option<String>,
    /// Run number (default: the latest).
    #[arg(long, value_name = "N")]
    pub run: Option<u64>,
    /// Read from a `rave serve` at this URL instead; JOB is then a job id.
    #[arg(long, env = "RAVE_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// API token for --server.
    #[arg(long, env = "RAVE_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With --server: keep printing what the job writes until it ends.
    #[arg(short, long)]
    pub follow: bool,
}

fn runs_dir(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(crate::project::project_root(dir)?
        .join(".rave")
        .join("runs"))
}

/// (id, summary) of every run, newest first. Runs without a summary (still running, or
/// interrupted hard) have none.
pub fn runs(dir: &Path) -> Vec<(u64, Option<RunSummary>)> {
    let mut out: Vec<(u64, Option<RunSummary>)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let id: u64 = e.file_name().to_str()?.parse().ok()?;
                    Some((id, RunSummary::read(&e.path().join("summary.json")).ok()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
    out
}

pub fn list(args: &RunsArgs) -> anyhow::Result<i32> {
    let dir = runs_dir(args.pipeline.dir.as_deref())?;
    let all = runs(&dir);
    if args.json {
        // Runs without a summary are left out: nothing is known of them.
        let docs: Vec<&RunSummary> = all.iter().filter_map(|(_, v)| v.as_ref()).collect();
        println!("{}", serde_json::to_string_pretty(&docs)?);
        return Ok(0);
    }
    if all.is_empty() {
        eprintln!(
            "no runs yet in {}; start one with `rave run`",
            dir.display()
        );
        return Ok(0);
    }
    println!(
        "{:<5} {:<9} {:>9} {:>5}  {:<20} COMMIT",
        "RUN", "STATUS", "DURATION", "JOBS", "REF"
    );
    for (id, v) in &all {
        match v {
            Some(v) => {
                let p = &v.pipeline;
                let status = p.status.as_str();
                println!(
                    "{:<5} {:<9} {:>9} {:>5}  {:<20} {}",
                    id,
                    status,
                    console::duration(Some(p.duration_ms)),
                    v.jobs.len(),
                    p.ref_name,
                    &p.sha[..p.sha.len().min(8)],
                );
            }
            None => println!("{id:<5} {:<9} {:>9} {:>5}", "unknown", "-", "-"),
        }
    }
    Ok(0)
}

pub fn logs(args: &LogsArgs) -> anyhow::Result<i32> {
    if let Some(server) = &args.server {
        let Some(job) = &args.job else {
            anyhow::bail!("with --server, give the job id to print (see `rave pipelines ID`)");
        };
        let s = crate::client::ServerArgs {
            server: server.clone(),
            token: args.token.clone().unwrap_or_default(),
        };
        return crate::client::logs(&s, job, args.follow);
    }
    if args.follow {
        anyhow::bail!("--follow reads from a server: add --server URL (or set RAVE_SERVER)");
    }
    let dir = runs_dir(args.dir.as_deref())?;
    let all = runs(&dir);
    let Some((id, summary)) = (match args.run {
        Some(n) => all.iter().find(|(id, _)| *id == n),
        None => all.first(),
    }) else {
        eprintln!(
            "error: {} in {}",
            args.run
                .map_or("no runs yet".to_string(), |n| format!("no run {n}")),
            dir.display()
        );
        return Ok(2);
    };
    let logs_dir = dir.join(id.to_string()).join("logs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&logs_dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let Some(job) = &args.job else {
        for j in summary.iter().flat_map(|s| &s.jobs) {
            println!("{:<9} {}", j.status.as_str(), j.name);
        }
        return Ok(0);
    };
    // Log files are named `<nnn>-<slug>.log`; match through the slug of the name given.
    let wanted = rave_engine::workspace::slug(0, job);
    let wanted = wanted.trim_start_matches("000-");
    let hit = files.iter().find(|f| {
        f.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.split_once('-'))
            .is_some_and(|(_, rest)| rest == wanted)
    });
    match hit {
        Some(f) => {
            let mut file = std::fs::File::open(f)?;
            std::io::copy(&mut file, &mut std::io::stdout().lock())?;
            Ok(0)
        }
        None => {
            eprintln!(
                "error: run {id} has no log for `{job}`; `rave logs --run {id}` lists its jobs"
            );
            Ok(2)
        }
    }
}

/// How long each job took when it last ran (from the newest runs first), in milliseconds.
pub fn last_durations(root: &Path) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    for (_, v) in runs(&root.join(".rave").join("runs")).into_iter().take(10) {
        for j in v.into_iter().flat_map(|s| s.jobs) {
            if let Some(ms) = j.duration_ms {
                out.entry(j.name).or_insert(ms);
            }
        }
    }
    out
}
