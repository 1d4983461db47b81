//! Clients of a `rave serve`: `rave pipelines`, `rave rerun`, `rave artifacts download`, and
//! `rave logs --server … -f`. The server and token come from flags or `RAVE_SERVER` /
//! `RAVE_TOKEN`.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use rave_server::body;

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server's URL, e.g. http://ci.example.com:8080.
    #[arg(long, env = "RAVE_SERVER", value_name = "URL")]
    pub server: String,
    /// An API token (`read` for looking, `admin` for reruns).
    #[arg(long, env = "RAVE_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PipelinesArgs {
    #[command(subcommand)]
    pub new: Option<PipelinesCommand>,
    #[command(flatten)]
    pub server: Option<ServerArgs>,
    /// Show one pipeline with its jobs.
    #[arg(value_name = "ID")]
    pub id: Option<i64>,
    /// Only this project's pipelines.
    #[arg(long, value_name = "NAME")]
    pub project: Option<String>,
    /// How many (newest first).
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    /// Print the server's JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum PipelinesCommand {
    /// Start a pipeline for a ref (or a tag) of a project, now.
    New(NewPipelineArgs),
}

#[derive(Args, Debug)]
pub struct NewPipelineArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The project, as the server's config names it.
    #[arg(long, value_name = "NAME")]
    pub project: String,
    /// The branch to run (resolved to its commit now).
    #[arg(long = "ref", value_name = "BRANCH", conflicts_with = "tag")]
    pub ref_name: Option<String>,
    /// The tag to run (a release pipeline).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// A value for the pipeline file's `spec: inputs` (repeatable).
    #[arg(long = "input", value_name = "NAME=VALUE")]
    pub inputs: Vec<String>,
    /// A pipeline variable, above the project's variables, taken literally (repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RerunArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The pipeline to run again (same commit).
    #[arg(value_name = "ID")]
    pub id: i64,
    /// Only its failed and canceled jobs, inside the pipeline (what was skipped because of
    /// them runs too).
    #[arg(long, conflicts_with = "job")]
    pub failed: bool,
    /// Only this job, inside the pipeline.
    #[arg(long, value_name = "NAME")]
    pub job: Option<String>,
}

#[derive(Args, Debug)]
pub struct RetryArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The pipeline whose failed (or canceled) jobs to run again inside it, as GitLab retries:
    /// each job's next attempt, and what was skipped because of it; the rest keep their results.
    #[arg(value_name = "PIPELINE_ID")]
    pub id: i64,
    /// Only this job instead.
    #[arg(long, value_name = "NAME")]
    pub job: Option<String>,
}

#[derive(Args, Debug)]
pub struct JobIdArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The manual job to play (its id, see `rave pipelines ID`).
    #[arg(value_name = "JOB_ID")]
    pub id: i64,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The pipeline to cancel (queued: at once; running: as with Ctrl-C, after_script runs).
    #[arg(value_name = "PIPELINE_ID")]
    pub id: i64,
    /// ID is a job's: cancel that job alone (what needs it is skipped).
    #[arg(long)]
    pub job: bool,
}

#[derive(Subcommand, Debug)]
pub enum ArtifactsCommand {
    /// Download a job's artifacts: all of them as a tar, or one file.
    Download(DownloadArgs),
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The job's id (see `rave pipelines ID`).
    #[arg(value_name = "JOB_ID")]
    pub job: i64,
    /// One file inside the artifacts (default: all, as a tar).
    #[arg(value_name = "PATH")]
    pub path: Option<String>,
    /// Where to write (default: the file's name, or job-<id>-artifacts.tar). A partial file
    /// there is resumed with a Range request.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

fn client() -> anyhow::Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder()
        .timeout(None)
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()?)
}

/// Send, and turn an error answer into the server's own message.
fn send(req: reqwest::blocking::RequestBuilder) -> anyhow::Result<reqwest::blocking::Response> {
    let r = req
        .send()
        .map_err(|e| anyhow::anyhow!("cannot reach the server: {e}"))?;
    if r.status().is_success() {
        return Ok(r);
    }
    let code = r.status();
    let msg = r
        .json::<body::ApiError>()
        .map_or_else(|_| "no details".to_string(), |b| b.error);
    anyhow::bail!("the server answered {code}: {msg}")
}

fn url(s: &ServerArgs, path: &str) -> String {
    format!("{}{path}", s.server.trim_end_matches('/'))
}

pub fn pipelines(a: &PipelinesArgs) -> anyhow::Result<i32> {
    if let Some(PipelinesCommand::New(n)) = &a.new {
        return new_pipeline(n);
    }
    let server = a.server.as_ref().ok_or_else(|| {
        anyhow::anyhow!("say which server: --server URL --token TOKEN (or RAVE_SERVER, RAVE_TOKEN)")
    })?;
    let c = client()?;
    let path = match a.id {
        Some(id) => format!("/api/pipelines/{id}"),
        None => {
            let mut p = format!("/api/pipelines?limit={}", a.limit);
            if let Some(proj) = &a.project {
                p.push_str(&format!("&project={proj}"));
            }
            p
        }
    };
    let r = send(c.get(url(server, &path)).bearer_auth(&server.token))?;
    match a.id {
        Some(_) => {
            let v: body::PipelineDetail = r.json()?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let p = &v.pipeline;
            println!(
                "pipeline #{} {} {} {} ({}){}",
                p.id,
                p.project,
                p.ref_name,
                &p.sha[..p.sha.len().min(12)],
                p.status,
                p.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
            println!(
                "{:>6}  {:<24} {:<10} {:<10} {:>8}  NOTE",
                "JOB", "NAME", "STAGE", "STATUS", "EXIT"
            );
            for j in &v.jobs {
                println!(
                    "{:>6}  {:<24} {:<10} {:<10} {:>8}  {}",
                    j.id,
                    j.name,
                    j.stage,
                    j.status,
                    j.exit_code.map_or("-".into(), |c| c.to_string()),
                    j.failure_reason
                        .as_deref()
                        .or(j.note.as_deref())
                        .unwrap_or("")
                );
            }
        }
        None => {
            let v: body::PipelineList = r.json()?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            println!(
                "{:>6}  {:<20} {:<20} {:<12} {:<9} CREATED",
                "ID", "PROJECT", "REF", "SHA", "STATUS"
            );
            for p in &v.pipelines {
                println!(
                    "{:>6}  {:<20} {:<20} {:<12} {:<9} {}",
                    p.id,
                    p.project,
                    p.ref_name,
                    &p.sha[..p.sha.len().min(12)],
                    p.status,
                    p.created_at
                );
            }
        }
    }
    Ok(0)
}

pub fn rerun(a: &RerunArgs) -> anyhow::Result<i32> {
    let mut path = format!("/api/pipelines/{}/rerun", a.id);
    if a.failed {
        path.push_str("?failed=1");
    } else if let Some(j) = &a.job {
        path.push_str(&format!("?job={}", encode(j)));
    }
    let v: body::Rerun = send(
        client()?
            .post(url(&a.server, &path))
            .bearer_auth(&a.server.token),
    )?
    .json()?;
    if v.pipeline_id == a.id {
        println!(
            "pipeline #{} queued again to run {} inside it",
            v.pipeline_id,
            v.jobs.join(", ")
        );
    } else {
        println!("pipeline #{} queued (rerun of #{})", v.pipeline_id, a.id);
    }
    Ok(0)
}

/// `rave pipelines new`: a pipeline for a ref or tag, with inputs.
pub fn new_pipeline(a: &NewPipelineArgs) -> anyhow::Result<i32> {
    let mut req = body::CreatePipeline {
        project: a.project.clone(),
        ..body::CreatePipeline::default()
    };
    for kv in &a.inputs {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--input `{kv}` must look like NAME=VALUE"))?;
        req.inputs.insert(k.to_string(), v.to_string());
    }
    for kv in &a.vars {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--var `{kv}` must look like KEY=VALUE"))?;
        req.variables.insert(k.to_string(), v.to_string());
    }
    match (&a.ref_name, &a.tag) {
        (_, Some(t)) => req.tag = Some(t.clone()),
        (Some(r), None) => req.ref_name = Some(r.clone()),
        (None, None) => anyhow::bail!("say what to run: --ref BRANCH or --tag TAG"),
    }
    let v: body::Queued = send(
        client()?
            .post(url(&a.server, "/api/pipelines"))
            .bearer_auth(&a.server.token)
            .json(&req),
    )?
    .json()?;
    match v.pipeline_id {
        Some(id) => println!("pipeline #{id} queued"),
        None => println!("no pipeline: {}", v.message.unwrap_or_default()),
    }
    Ok(0)
}

/// `rave retry`: the failed jobs of a pipeline (or one job) again, inside the pipeline.
pub fn retry(a: &RetryArgs) -> anyhow::Result<i32> {
    rerun(&RerunArgs {
        server: a.server.clone(),
        id: a.id,
        failed: a.job.is_none(),
        job: a.job.clone(),
    })
}

/// `rave play`: run a manual job inside its pipeline (then what waited for it).
pub fn play(a: &JobIdArgs) -> anyhow::Result<i32> {
    let v: body::Rerun = send(
        client()?
            .post(url(&a.server, &format!("/api/jobs/{}/play", a.id)))
            .bearer_auth(&a.server.token),
    )?
    .json()?;
    println!(
        "pipeline #{} queued again to play job {} ({}) inside it",
        v.pipeline_id,
        a.id,
        v.jobs.join(", ")
    );
    Ok(0)
}

/// `rave cancel`: stop a pipeline.
pub fn cancel(a: &CancelArgs) -> anyhow::Result<i32> {
    let v: body::Cancel = send(
        client()?
            .post(url(
                &a.server,
                &if a.job {
                    format!("/api/jobs/{}/cancel", a.id)
                } else {
                    format!("/api/pipelines/{}/cancel", a.id)
                },
            ))
            .bearer_auth(&a.server.token),
    )?
    .json()?;
    println!("pipeline #{}: {}", v.pipeline_id, v.status);
    Ok(0)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn artifacts(c: &ArtifactsCommand) -> anyhow::Result<i32> {
    let ArtifactsCommand::Download(a) = c;
    let (path, default_name) = match &a.path {
        Some(p) => (
            format!(
                "/api/jobs/{}/artifacts/{}",
                a.job,
                p.split('/').map(encode).collect::<Vec<_>>().join("/")
            ),
            p.rsplit('/').next().unwrap_or(p).to_string(),
        ),
        None => (
            format!("/api/jobs/{}/artifacts", a.job),
            format!("job-{}-artifacts.tar", a.job),
        ),
    };
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(default_name));
    // Resume a partial single-file download; an archive is made anew each time.
    let have = if a.path.is_some() {
        std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0)
    } else {
        0
    };
    let mut req = client()?
        .get(url(&a.server, &path))
        .bearer_auth(&a.server.token);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
    }
    let r = req
        .send()
        .map_err(|e| anyhow::anyhow!("cannot reach the server: {e}"))?;
    if r.status() == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        eprintln!("{} is complete already", out.display());
        return Ok(0);
    }
    let r = if r.status().is_success() {
        r
    } else {
        let code = r.status();
        let msg = r
            .json::<body::ApiError>()
            .map_or_else(|_| "no details".to_string(), |b| b.error);
        anyhow::bail!("the server answered {code}: {msg}");
    };
    let append = r.status() == reqwest::StatusCode::PARTIAL_CONTENT;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&out)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    // Streamed to disk in 64 KiB pieces: an artifact is never held in memory.
    let mut r = r;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
        total += n as u64;
    }
    eprintln!(
        "wrote {} ({} bytes{})",
        out.display(),
        total,
        if append { ", resumed" } else { "" }
    );
    Ok(0)
}

/// `rave logs --server URL JOB_ID [-f]`.
pub fn logs(server: &ServerArgs, job: &str, follow: bool) -> anyhow::Result<i32> {
    let id: i64 = job.parse().map_err(|_| {
        anyhow::anyhow!("with --server, JOB is a job id (see `rave pipelines ID`), not `{job}`")
    })?;
    let path = format!(
        "/api/jobs/{id}/log{}",
        if follow { "?follow=1" } else { "" }
    );
    let mut r = send(client()?.get(url(server, &path)).bearer_auth(&server.token))?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    Ok(0)
}
