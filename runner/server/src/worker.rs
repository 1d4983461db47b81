//! The queue: up to `max_pipelines` pipelines at once, each in a checkout of exactly its
//! commit, run by a child `rave run --events` whose event lines become job rows as they come.
//! Their jobs share one host budget: each child asks the server's budget socket for room
//! before it starts a job (see [`crate::budget`]).
//!
//! The child runs in its own process group: a server crash does not stop it at once, and the
//! restart kills it and sweeps what its jobs left (cgroups, containers) before anything else.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rave_engine::event::RunEvent;
use tracing::{error, info, warn};

use crate::State;
use crate::db::{Job, Pipeline};

pub async fn run_queue(state: Arc<State>) {
    let max = state.cfg.server.max_pipelines.max(1) as usize;
    let mut running = tokio::task::JoinSet::new();
    loop {
        if state.stopping.is_cancelled() {
            break;
        }
        while running.try_join_next().is_some() {}
        if running.len() < max {
            match state.store.claim_next() {
                Ok(Some(p)) => {
                    running.spawn(run_one(state.clone(), p));
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    error!("cannot read the queue: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            _ = state.stopping.cancelled() => {}
            _ = state.wake.notified() => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    // Stopping: the running pipelines were asked to cancel; their ends are still recorded.
    while running.join_next().await.is_some() {}
}

/// Run one claimed pipeline to its end and record it.
async fn run_one(state: Arc<State>, p: Pipeline) {
    let id = p.id;
    info!(pipeline = id, project = %p.project, sha = %p.sha, "pipeline started");
    let _ = state.events.send(crate::events::ServerEvent {
        kind: crate::events::EventKind::Pipeline,
        pipeline_id: id,
        project: p.project.clone(),
        job_id: None,
        job: None,
        status: "running".into(),
    });
    let project = p.project.clone();
    // One trace per pipeline (a retry inside it adds to the same trace).
    let trace = state.otlp.as_ref().map(|_| {
        let ctx = p
            .trace_id
            .as_deref()
            .and_then(rave_traces::TraceContext::in_trace)
            .unwrap_or_default();
        if let Err(e) = state.store.set_trace(id, &ctx.trace_hex()) {
            warn!(pipeline = id, "cannot record the trace id: {e}");
        }
        ctx
    });
    let claimed = std::time::SystemTime::now();
    let (ref_name, sha) = (p.ref_name.clone(), p.sha.clone());
    let mut spans = Vec::new();
    let (status, err) = run_pipeline(&state, p, trace.as_ref(), &mut spans).await;
    record_end(&state, id, &project, &status, err.as_deref()).await;
    if let (Some(ctx), Some(endpoint)) = (trace, state.otlp.clone()) {
        let mut root = rave_traces::SpanData::new(format!("pipeline {project} #{id}"), None)
            .attr("rave.project", project.as_str())
            .attr("rave.pipeline.id", id)
            .attr("rave.ref", ref_name.as_str())
            .attr("rave.sha", sha.as_str())
            .attr("rave.status", status.as_str());
        root.span_id = ctx.span_id;
        root.start = claimed;
        root.end = std::time::SystemTime::now();
        if status == "failed" {
            root.error = Some(err.clone().unwrap_or_else(|| "the pipeline failed".into()));
        }
        let intake = state
            .intakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some((start, end, what)) = intake {
            let mut s = rave_traces::SpanData::new("intake", Some(ctx.span_id))
                .attr("rave.source", what.as_str());
            s.start = start;
            s.end = end;
            root.start = root.start.min(start);
            spans.push(s);
        }
        spans.insert(0, root);
        // Off the async workers: the export waits for the collector (3 s at most).
        let sent = tokio::task::spawn_blocking(move || {
            rave_traces::export(&endpoint, &ctx.trace_id, &spans, Duration::from_secs(3))
        })
        .await;
        if let Ok(Err(e)) = sent {
            state.metrics.trace_dropped();
            warn!(pipeline = id, "traces not sent: {e}");
        }
    }
    state
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    info!(pipeline = id, %status, error = err.as_deref().unwrap_or(""), "pipeline finished");
}

/// Record a pipeline's end. A store that cannot write (a full disk) is tried again, a bounded
/// number of times, so a pipeline reaches a terminal state as soon as there is room; the
/// pipeline's own partial files were already removed so the failure can be written.
async fn record_end(state: &Arc<State>, id: i64, project: &str, status: &str, err: Option<&str>) {
    for attempt in 0..30u32 {
        match state.store.finish_pipeline(id, status, err) {
            Ok(()) => {
                let _ = state.events.send(crate::events::ServerEvent {
                    kind: crate::events::EventKind::Pipeline,
                    pipeline_id: id,
                    project: project.to_string(),
                    job_id: None,
                    job: None,
                    status: status.to_string(),
                });
                return;
            }
            Err(e) => {
                error!(
                    pipeline = id,
                    attempt, "cannot record the end of the pipeline: {e}"
                );
                tokio::select! {
                    _ = state.stopping.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

fn mirror_dir(state: &State, project: &str) -> PathBuf {
    let safe: String = project
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state.data_dir.join("mirrors").join(format!("{safe}.git"))
}

/// Fetch the project into its mirror; returns the mirror's path.
pub async fn fetch(state: &State, project: &str) -> Result<PathBuf, String> {
    let proj = state
        .cfg
        .project(project)
        .ok_or_else(|| format!("project `{project}` is not in the server's config"))?
        .clone();
    let mirror = mirror_dir(state, project);
    let lock = state.fetch_lock.clone();
    tokio::task::spawn_blocking(move || {
        let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let creds = proj.credentials()?;
        std::fs::create_dir_all(&mirror).map_err(|e| format!("{}: {e}", mirror.display()))?;
        rave_repo::fetch_mirror(&proj.clone_url, &creds, &mirror)
            .map_err(|e| format!("cannot fetch {}: {e}", proj.clone_url))?;
        Ok(mirror)
    })
    .await
    .map_err(|e| format!("fetch task: {e}"))?
}

async fn run_pipeline(
    state: &Arc<State>,
    p: Pipeline,
    trace: Option<&rave_traces::TraceContext>,
    spans: &mut Vec<rave_traces::SpanData>,
) -> (String, Option<String>) {
    let Some(project) = state.cfg.project(&p.project).cloned() else {
        return (
            "failed".into(),
            Some(format!(
                "project `{}` is not in the server's config",
                p.project
            )),
        );
    };
    let dir = state.data_dir.join("pipelines").join(p.id.to_string());
    let src = dir.join("src");
    // A retry or play inside the pipeline goes on with its last run: keep `.rave` (runs,
    // logs, artifacts) aside while the commit is checked out again. A requeued pipeline
    // starts over from a fresh checkout.
    let kept = dir.join("rave-kept");
    let mut previous_run = None;
    if p.resume.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        let _ = std::fs::remove_dir_all(&kept);
        if std::fs::rename(src.join(".rave"), &kept).is_ok() {
            previous_run = last_run(&kept.join("runs"));
        }
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_file(dir.join("events.jsonl"));
        if previous_run.is_none() {
            return (
                "failed".into(),
                Some(format!(
                    "pipeline {} has no finished run to go on with; start a new pipeline instead",
                    p.id
                )),
            );
        }
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return (
            "failed".into(),
            Some(format!("cannot create {}: {e}", dir.display())),
        );
    }
    let checkout_started = std::time::SystemTime::now();
    let mirror = match fetch(state, &p.project).await {
        Ok(m) => m,
        Err(e) => return ("failed".into(), Some(e)),
    };
    let (sha, branch, m2, src2) = (
        p.sha.clone(),
        p.tag.is_none().then(|| p.ref_name.clone()),
        mirror.clone(),
        src.clone(),
    );
    let checkout = tokio::task::spawn_blocking(move || {
        rave_repo::mirror_has(&m2, &sha).map_err(|e| e.to_string())?;
        rave_repo::checkout_commit(&m2, &sha, &src2, branch.as_deref())
            .map_err(|e| format!("cannot check out {sha}: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(format!("checkout task: {e}")));
    if let Err(e) = checkout {
        // A partial checkout is of no use, and on a full disk it holds the space the store
        // needs to record the failure.
        let _ = std::fs::remove_dir_all(&src);
        if kept.exists() {
            let _ = std::fs::create_dir_all(&src);
            let _ = std::fs::rename(&kept, src.join(".rave"));
        }
        return ("failed".into(), Some(e));
    }
    // Jobs see the project's URL as `origin` (relative submodule URLs resolve against it),
    // not the server's mirror.
    if let Err(e) = rave_repo::set_origin(&src, &project.clone_url) {
        warn!(pipeline = p.id, "cannot set the checkout's origin: {e}");
    }
    if let Some(ctx) = trace {
        let mut s = rave_traces::SpanData::new("checkout", Some(ctx.span_id))
            .attr("rave.sha", p.sha.as_str());
        s.start = checkout_started;
        s.end = std::time::SystemTime::now();
        spans.push(s);
    }
    if kept.exists() {
        let _ = std::fs::remove_dir_all(src.join(".rave"));
        if let Err(e) = std::fs::rename(&kept, src.join(".rave")) {
            return (
                "failed".into(),
                Some(format!("cannot restore the pipeline's earlier runs: {e}")),
            );
        }
    }
    let events = dir.join("events.jsonl");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--json".into(),
        "--events".into(),
        events.to_string_lossy().into_owned(),
    ];
    args.push("--source".into());
    args.push(p.source.clone());
    args.push(format!("--budget-socket={}", state.broker.socket.display()));
    // `--ref=NAME`: a ref that starts with `-` is a value, never a flag.
    match &p.tag {
        Some(t) => args.push(format!("--tag={t}")),
        None => args.push(format!("--ref={}", p.ref_name)),
    }
    // Jobs see a clean environment: nothing of the server's (its tokens, webhook secrets, the
    // `*_env` values of rave.toml), only the allowlist, `pass_env` and the project's
    // variables, handed over in a private file rather than on the command line.
    args.push("--clean-env".into());
    for name in &state.cfg.server.pass_env {
        args.push(format!("--pass-env={name}"));
    }
    let secrets = dir.join("secrets");
    let vars = match write_variables(&project, &p, &secrets) {
        Ok(v) => v,
        Err(e) => return ("failed".into(), Some(e)),
    };
    args.push(format!("--variables-file={}", vars.display()));
    // Includes from elsewhere: fetched from the project's forge with its token, kept per
    // project under the data dir.
    let server_url = project
        .server_url
        .clone()
        .or_else(|| rave_includes::server_url_of(&project.clone_url));
    if let Some(u) = &server_url {
        args.push(format!("--server-url={u}"));
    }
    args.push(format!(
        "--include-cache={}",
        state
            .data_dir
            .join("includes")
            .join(
                mirror_dir(state, &p.project)
                    .file_name()
                    .unwrap_or_default()
            )
            .display()
    ));
    // The snapshot mirror, the jobs' build directories and `cache:` archives outlive one
    // pipeline: kept per project, so a push re-copies only what changed and tools' caches
    // see the same paths.
    args.push(format!(
        "--state-dir={}",
        state
            .data_dir
            .join("workspaces")
            .join(
                mirror_dir(state, &p.project)
                    .file_name()
                    .unwrap_or_default()
            )
            .display()
    ));
    // Jobs see the project's configured path (the checkout's origin is a local mirror).
    args.push(format!("--project-path={}", p.project));
    if let Some(u) = &state.cfg.server.push_metrics {
        args.push(format!("--push-metrics={u}"));
    }
    if let (Some(u), Some(_)) = (&state.otlp, trace) {
        args.push(format!("--otlp-endpoint={u}"));
    }
    if let Some(d) = &state.cfg.server.templates_dir {
        args.push(format!("--templates-dir={}", d.display()));
    } else if let Some(t) = &state.cfg.server.templates_project {
        args.push(format!("--templates-project={t}"));
    }
    // The token (or SSH key) reaches the `rave run` that fetches includes, never its jobs
    // (their environment is the clean allowlist).
    let mut include_env: Vec<(&str, String)> = Vec::new();
    match project.credentials() {
        Ok(rave_repo::Credentials::Token(t)) => include_env.push(("RAVE_INCLUDE_TOKEN", t)),
        Ok(rave_repo::Credentials::SshKey { key, known_hosts }) => {
            include_env.push(("RAVE_INCLUDE_SSH_KEY", key.display().to_string()));
            if let Some(k) = known_hosts {
                include_env.push(("RAVE_INCLUDE_SSH_KNOWN_HOSTS", k.display().to_string()));
            }
        }
        _ => {}
    }
    if let Some(b) = &project.include_base {
        args.push(format!("--include-base={b}"));
    }
    if let Some(f) = &project.pipeline_file {
        args.extend(["--file".into(), f.clone()]);
    }
    let s = &state.cfg.server;
    for (flag, v) in [
        ("--memory", &s.memory),
        ("--cpus", &s.cpus),
        ("--profile", &s.profile),
        ("--executor", &s.executor),
    ] {
        if let Some(v) = v {
            args.extend([flag.to_string(), v.clone()]);
        }
    }
    for (k, v) in &p.inputs {
        args.push(format!("--input={k}={v}"));
    }
    if let Some(run) = &previous_run {
        // The run directory's path inside the new checkout (same place, moved back).
        let run = src.join(".rave").join("runs").join(run);
        args.push(format!("--continue={}", run.display()));
        args.push("--".into());
        args.extend(p.resume.iter().cloned());
    } else if !p.jobs_filter.is_empty() {
        // Job names come from the API: after `--`, none can be taken for a flag.
        args.push("--needs".into());
        args.push("--".into());
        args.extend(p.jobs_filter.iter().cloned());
    }
    let (Ok(out), Ok(err)) = (
        std::fs::File::create(dir.join("summary.json")),
        std::fs::File::create(dir.join("console.log")),
    ) else {
        return (
            "failed".into(),
            Some(format!("cannot write in {}", dir.display())),
        );
    };
    // Canceled while fetching, or the server is stopping: do not start it.
    if state
        .cancel_requested
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&p.id)
    {
        return ("canceled".into(), None);
    }
    if state.stopping.is_cancelled() {
        return (
            "canceled".into(),
            Some("rave serve stopped before the pipeline started".into()),
        );
    }
    let host_env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            rave_engine::scheduler::HostEnv::ALLOWED.contains(&k.as_str())
                || state.cfg.server.pass_env.contains(k)
        })
        .collect();
    let mut child = match tokio::process::Command::new(&state.rave_exe)
        .args(&args)
        .current_dir(&src)
        .env_clear()
        .envs(host_env)
        .envs(include_env)
        .env("NO_COLOR", "1")
        .env("RAVE_SERVER_PIPELINE_ID", p.id.to_string())
        .envs(trace.map(|t| ("TRACEPARENT", t.traceparent())))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return (
                "failed".into(),
                Some(format!("cannot start {}: {e}", state.rave_exe.display())),
            );
        }
    };
    let pid = child.id();
    if let Some(pid) = pid {
        let mut running = state.running.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(p.id, pid);
        // A cancel that came between the check above and now found no pid: deliver it.
        let late = state
            .cancel_requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&p.id);
        drop(running);
        if late && let Some(pg) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pg, rustix::process::Signal::INT);
        }
    }
    if let Err(e) =
        state
            .store
            .set_pipeline_process(p.id, &dir.to_string_lossy(), pid.map(i64::from))
    {
        error!(pipeline = p.id, "cannot record the pipeline's process: {e}");
    }
    let mut tail = Tail::new(events, p.id, p.project.clone());
    tail.trace = trace.map(|t| t.trace_hex());
    let code = loop {
        tail.read(state);
        tokio::select! {
            st = child.wait() => break st.ok().and_then(|s| {
                use std::os::unix::process::ExitStatusExt;
                // A cancel that reached `rave run` before it could handle Ctrl-C ended it by
                // the signal itself: still a cancel, as exit code 130 is.
                if s.signal() == Some(rustix::process::Signal::INT.as_raw()) {
                    Some(130)
                } else {
                    s.code()
                }
            }),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    tail.read(state);
    // The run's summary (its stdout): how well it used the budget.
    if let Ok(summary) = rave_engine::event::RunSummary::read(&dir.join("summary.json"))
        && let Some(u) = summary.pipeline.budget_utilisation
    {
        state.metrics.pipeline_utilisation(u);
    }
    prune_checkout(&src);
    let _ = std::fs::remove_dir_all(&secrets);
    match (tail.finished, code) {
        (Some(status), _) => (status, None),
        (None, Some(130)) => ("canceled".into(), None),
        (None, _) => {
            // The cause: from the first error rave printed (a pipeline file that does not
            // load), else the last lines of its output.
            let text = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let why = match lines.iter().position(|l| l.starts_with("error")) {
                Some(i) => lines[i..lines.len().min(i + 8)].join("\n"),
                None => {
                    let from = lines.len().saturating_sub(5);
                    lines[from..].join("\n")
                }
            };
            warn!(pipeline = p.id, "rave run ended without a result: {why}");
            (
                "failed".into(),
                Some(if why.is_empty() {
                    format!("rave run exited with {code:?}")
                } else {
                    why
                }),
            )
        }
    }
}

/// The newest run under `runs` that ended (wrote its summary): its directory's name.
fn last_run(runs: &Path) -> Option<String> {
    std::fs::read_dir(runs)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n: u64 = e.file_name().to_str()?.parse().ok()?;
            e.path().join("summary.json").is_file().then_some(n)
        })
        .max()
        .map(|n| n.to_string())
}

/// Write the project's CI/CD variables for this pipeline into `secrets/` (owner-only): the
/// list `rave run --variables-file` reads, and one file per `file` variable, whose path the
/// variable then holds. Protected variables only reach pipelines of protected refs.
fn write_variables(
    project: &crate::config::Project,
    p: &Pipeline,
    secrets: &Path,
) -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let private = |path: &Path, text: &str| -> Result<(), String> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        f.write_all(text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    let _ = std::fs::remove_dir_all(secrets);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(secrets)
        .map_err(|e| format!("cannot create {}: {e}", secrets.display()))?;
    let ref_name = p.tag.as_deref().unwrap_or(&p.ref_name);
    let mut out = rave_plan::RunVariables {
        ref_protected: project.is_protected(ref_name, p.tag.is_some()),
        ..rave_plan::RunVariables::default()
    };
    for (v, value) in project.variables_for(ref_name, p.tag.is_some())? {
        let value = if v.file {
            let path = secrets.join(format!("file-{}", v.name));
            private(&path, &value)?;
            if v.masked {
                out.mask.push(value);
            }
            path.to_string_lossy().into_owned()
        } else {
            value
        };
        out.variables.push(rave_plan::RunVariable {
            name: v.name.clone(),
            value,
            masked: v.masked,
            raw: v.raw,
        });
    }
    // Pipeline variables last: above the project's, as in GitLab; taken literally.
    for (name, value) in &p.variables {
        out.variables.push(rave_plan::RunVariable {
            name: name.clone(),
            value: value.clone(),
            masked: false,
            raw: true,
        });
    }
    let path = secrets.join("variables.json");
    let text = serde_json::to_string(&out).map_err(|e| e.to_string())?;
    private(&path, &text)?;
    Ok(path)
}

/// After a run, keep what the API serves (logs, artifacts, summary) and drop the rest: the
/// checked-out files, the run's snapshot of them, per-checkout caches. A server's disk then
/// grows with logs and artifacts, not with one copy of the repository per pipeline; a rerun
/// checks the commit out again from the mirror.
fn prune_checkout(src: &Path) {
    let Ok(entries) = std::fs::read_dir(src) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name() == ".rave" {
            continue;
        }
        let p = e.path();
        let _ = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
    let rave = src.join(".rave");
    let _ = std::fs::remove_dir_all(rave.join("cache"));
    if let Ok(runs) = std::fs::read_dir(rave.join("runs")) {
        for run in runs.flatten() {
            for sub in ["src", "jobs"] {
                let _ = std::fs::remove_dir_all(run.path().join(sub));
            }
        }
    }
}

/// Follows the child's events file.
struct Tail {
    path: PathBuf,
    pipeline: i64,
    project: String,
    /// Opened once the child has made the file; reads go on where the last one stopped.
    reader: Option<std::io::BufReader<std::fs::File>>,
    partial: String,
    jobs: Vec<Job>,
    finished: Option<String>,
    /// The pipeline's trace, recorded on its job rows.
    trace: Option<String>,
}

impl Tail {
    fn new(path: PathBuf, pipeline: i64, project: String) -> Self {
        Tail {
            path,
            pipeline,
            project,
            reader: None,
            partial: String::new(),
            jobs: Vec::new(),
            finished: None,
            trace: None,
        }
    }

    fn read(&mut self, state: &State) {
        if self.reader.is_none() {
            let Ok(f) = std::fs::File::open(&self.path) else {
                return;
            };
            self.reader = Some(std::io::BufReader::new(f));
        }
        loop {
            let mut line = String::new();
            let Some(r) = self.reader.as_mut() else {
                return;
            };
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with('\n') {
                        // Half a line: keep it for the next read.
                        self.partial.push_str(&line);
                        continue;
                    }
                    let whole = std::mem::take(&mut self.partial) + &line;
                    match serde_json::from_str::<RunEvent>(&whole) {
                        Ok(e) => self.apply(state, e),
                        Err(e) => warn!(pipeline = self.pipeline, "ignored an event line ({e})"),
                    }
                }
            }
        }
    }

    fn apply(&mut self, state: &State, e: RunEvent) {
        let at = |t: Option<std::time::SystemTime>| t.map(rave_engine::event::rfc3339_millis);
        let int = |n: Option<u64>| n.and_then(|n| i64::try_from(n).ok());
        match e {
            RunEvent::Pipeline { jobs, .. } => {
                let mut carried = Vec::new();
                for j in jobs {
                    carried.push(j.carried);
                    self.jobs.push(Job {
                        pipeline_id: self.pipeline,
                        index: j.index as i64,
                        name: j.name,
                        stage: j.stage,
                        status: if j.selected { "created" } else { "skipped" }.into(),
                        log_path: Some(j.log.to_string_lossy().into_owned()),
                        artifacts_dir: Some(j.artifacts.to_string_lossy().into_owned()),
                        needs: j.needs.into_iter().map(|n| n as i64).collect(),
                        ..Job::default()
                    });
                }
                // Jobs carried over from the run this one goes on with keep their rows.
                for (j, carried) in self.jobs.iter().zip(carried) {
                    if !carried {
                        self.save(state, j);
                    }
                }
            }
            RunEvent::JobStarted {
                index,
                attempt,
                memory_limit_bytes,
                at: started,
                ..
            } => {
                if let Some(j) = self.jobs.get_mut(index) {
                    j.status = "running".into();
                    j.started_at = Some(started);
                    j.finished_at = None;
                    j.memory_limit_bytes = int(Some(memory_limit_bytes));
                    j.attempts = Some(i64::from(attempt));
                    let j = j.clone();
                    info!(pipeline = self.pipeline, job = %j.name, "job started");
                    self.save(state, &j);
                }
            }
            RunEvent::JobRetrying { .. } => {}
            RunEvent::JobFinished { index, record: r } => {
                if let Some(j) = self.jobs.get_mut(index) {
                    j.status = r.status.as_str().into();
                    j.started_at = at(r.started_at).or(j.started_at.take());
                    j.finished_at = at(r.finished_at);
                    j.duration_ms = int(r.duration_ms);
                    j.exit_code = r.exit_code.map(i64::from);
                    j.failure_reason = r.failure_reason.map(|f| f.as_str().to_string());
                    j.peak_memory_bytes = int(r.peak_memory_bytes);
                    j.memory_limit_bytes = int(Some(r.memory_limit_bytes)).or(j.memory_limit_bytes);
                    j.attempts = Some(i64::from(r.attempts));
                    j.note = r.note.clone();
                    let j = j.clone();
                    if j.started_at.is_some() {
                        state.metrics.job_finished(
                            j.duration_ms,
                            r.failure_reason == Some(rave_engine::FailureReason::OomKilled),
                        );
                    }
                    info!(pipeline = self.pipeline, job = %j.name, status = %j.status, "job finished");
                    self.save(state, &j);
                    // A trigger job's child pipeline: its jobs as rows named `trigger » job`,
                    // numbered after every job of the parent.
                    for (k, c) in r.children.into_iter().enumerate() {
                        let row = Job {
                            pipeline_id: self.pipeline,
                            index: 100_000 * (index as i64 + 1) + k as i64,
                            name: format!("{} » {}", j.name, c.name),
                            stage: c.stage,
                            status: c.status,
                            duration_ms: int(c.duration_ms),
                            exit_code: c.exit_code.map(i64::from),
                            failure_reason: c.failure_reason,
                            finished_at: j.finished_at.clone(),
                            ..Job::default()
                        };
                        self.save(state, &row);
                    }
                }
            }
            RunEvent::PipelineFinished { status, .. } => {
                use rave_engine::scheduler::PipelineStatus as S;
                self.finished = Some(
                    match status {
                        // Nothing to run is a success on the server, as in GitLab.
                        S::Success | S::Skipped => "success",
                        S::Failed => "failed",
                        S::Canceled => "canceled",
                        S::Manual => "manual",
                    }
                    .into(),
                );
            }
        }
    }

    fn save(&self, state: &State, j: &Job) {
        let row;
        let j = if self.trace.is_some() && j.trace_id.is_none() {
            row = Job {
                trace_id: self.trace.clone(),
                ..j.clone()
            };
            &row
        } else {
            j
        };
        let job_id = match state.store.upsert_job(j) {
            Ok(id) => id,
            Err(e) => {
                error!(pipeline = self.pipeline, job = %j.name, "cannot record the job: {e}");
                return;
            }
        };
        // Told once recorded: a subscriber that then asks the API sees the same state.
        let _ = state.events.send(crate::events::ServerEvent {
            kind: crate::events::EventKind::Job,
            pipeline_id: self.pipeline,
            project: self.project.clone(),
            job_id: Some(job_id),
            job: Some(j.name.clone()),
            status: j.status.clone(),
        });
    }
}

/// After a crash: stop what the interrupted pipelines' `rave run`s left running, then sweep
/// their jobs' cgroups and containers.
pub async fn clean_up_after_crash(interrupted: &[Pipeline]) {
    for p in interrupted {
        let Some(pid) = p.pid else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        // The pid may have been reused: kill only a rave.
        if !String::from_utf8_lossy(&cmdline).contains("rave") {
            continue;
        }
        if let Some(pg) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
        }
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        warn!(
            pipeline = p.id,
            pid, "killed the rave run a crash left behind"
        );
    }
    let killed = rave_engine::cgroup::sweep_dead_raves();
    if killed > 0 {
        warn!(killed, "killed job processes whose rave was gone");
    }
    if rave_engine::docker::available().await
        && let Ok(d) = rave_engine::docker::DockerExecutor::connect(String::new(), None, None).await
    {
        let n = d.sweep().await;
        if n > 0 {
            warn!(containers = n, "removed containers whose rave was gone");
        }
    }
}

/// `trigger: project` jobs of running pipelines: each starts a pipeline of the named project
/// (configured on this server) at its branch, with the job's forwarded variables; with
/// `strategy: depend` the job hears how it ended.
pub async fn downstream_triggers(
    state: Arc<State>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::budget::TriggerRequest>,
) {
    while let Some(req) = rx.recv().await {
        tokio::spawn(downstream_pipeline(state.clone(), req));
    }
}

async fn downstream_pipeline(state: Arc<State>, req: crate::budget::TriggerRequest) {
    use rave_engine::lease::FromBroker;
    let job = req.job;
    let fail = |why: String| {
        warn!(pipeline = req.upstream_pipeline, project = %req.project, "downstream pipeline refused: {why}");
        state.broker.send(
            req.key,
            FromBroker::Triggered {
                job,
                pipeline: None,
                error: Some(why),
            },
        );
    };
    let Some(downstream) = state.cfg.project(&req.project) else {
        return fail(format!(
            "project `{}` is not configured on this rave serve: add it to rave.toml ([[projects]]) to trigger its pipelines",
            req.project
        ));
    };
    if !downstream.accepts_trigger_from(&req.upstream_project) {
        return fail(format!(
            "project `{}` does not accept pipelines triggered by `{}`: add `triggered_by = [\"{}\"]` to its [[projects]] entry in rave.toml",
            req.project, req.upstream_project, req.upstream_project
        ));
    }
    if req.depend && state.cfg.server.max_pipelines <= 1 {
        return fail(
            "`strategy: depend` waits for the downstream pipeline, which cannot start while this one holds the only pipeline slot: set [server] max_pipelines to 2 or more".into(),
        );
    }
    let mirror = match fetch(&state, &req.project).await {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    // `branch:`, else the project's default branch (main, then master), as GitLab does.
    let names: Vec<String> = match &req.branch {
        Some(b) => vec![b.clone()],
        None => vec!["main".into(), "master".into()],
    };
    let Some((branch, sha)) = names.iter().find_map(|n| {
        rave_repo::resolve_in_mirror(&mirror, n, false)
            .ok()
            .map(|sha| (n.clone(), sha))
    }) else {
        return fail(format!(
            "project `{}` has no branch {}",
            req.project,
            names.join(" or ")
        ));
    };
    // Subscribed before the pipeline exists, so its end cannot be missed.
    let mut events = state.events.subscribe();
    let created = state.store.create_pipeline(&crate::db::NewPipeline {
        project: req.project.clone(),
        ref_name: branch,
        sha,
        tag: None,
        source: "pipeline".into(),
        variables: req.variables.iter().cloned().collect(),
        ..crate::db::NewPipeline::default()
    });
    let id = match created {
        Ok(id) => id,
        Err(e) => return fail(format!("cannot store the downstream pipeline: {e}")),
    };
    state.wake.notify_one();
    info!(
        pipeline = id,
        upstream = req.upstream_pipeline,
        upstream_project = %req.upstream_project,
        project = %req.project,
        "downstream pipeline queued"
    );
    state.broker.send(
        req.key,
        FromBroker::Triggered {
            job,
            pipeline: Some(id),
            error: None,
        },
    );
    if !req.depend {
        return;
    }
    let terminal = |s: &str| !matches!(s, "queued" | "running");
    loop {
        // An event, or a look at the store now and then (a slow reader may lose events).
        let status = tokio::select! {
            e = events.recv() => match e {
                Ok(e) if e.pipeline_id == id && e.kind == crate::events::EventKind::Pipeline => Some(e.status),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                state.store.pipeline(id).ok().flatten().map(|p| p.status)
            }
        };
        if let Some(status) = status.filter(|s| terminal(s)) {
            state.broker.send(
                req.key,
                FromBroker::Downstream {
                    job,
                    pipeline: id,
                    status,
                },
            );
            return;
        }
    }
}
