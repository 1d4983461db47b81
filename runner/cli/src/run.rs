//! `rave run`: plan the pipeline of this repository and run it here, under the budget.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use rave_engine::cgroup::Cgroups;
use rave_engine::dispatch::{Dispatch, Mode};
use rave_engine::docker::DockerExecutor;
use rave_engine::event::{NoPipeline, NoPipelineReason};
use rave_engine::local::LocalExecutor;
use rave_engine::logs::LogFiles;
use rave_engine::scheduler::{
    self, AFTER_SCRIPT_TIMEOUT, DEFAULT_TIMEOUT, HostEnv, PipelineStatus, RunConfig,
};
use rave_engine::workspace::{self, Workspace};
use rave_engine::{Cancel, JobRecord};
use rave_model::diag::did_you_mean;
use rave_plan::Plan;

use crate::console::{self, Console};
use crate::project::{BudgetArgs, PipelineArgs, Planned, TriggerArgs, plan_project, report};

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub trigger: TriggerArgs,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Jobs to run (instance names like `test 1/2` or job names); default: the whole pipeline.
    #[arg(value_name = "JOB", id = "job_names")]
    pub job_names: Vec<String>,
    /// With JOB names: also run what they need, transitively.
    #[arg(long)]
    pub needs: bool,
    /// Print one JSON document with the results on stdout (live output goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Append one JSON line per job state change to FILE as the run goes (first line: the
    /// run's jobs and where their logs and artifacts are).
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Do not use cgroups even where available (admission-only budgeting).
    #[arg(long)]
    pub no_cgroups: bool,
    /// Keep each job's working directory (.rave/builds/<job>) mounted after it ends, for a
    /// look inside; the job's next run takes it down.
    #[arg(long)]
    pub keep: bool,
    /// After the run, push its job metrics (durations, peaks, limits, statuses, OOM kills) to
    /// this Prometheus Pushgateway, grouped by project and pipeline.
    #[arg(long, value_name = "URL", env = "RAVE_PUSH_METRICS")]
    pub push_metrics: Option<String>,
    /// After the run, send its spans (the run and each job: status, peak memory, failure
    /// reason) to this OpenTelemetry collector over OTLP/HTTP (`http://host:4318`).
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// After the run, say why JOB was or was not reused (`RAVE_REUSE`): the input that
    /// changed since its last successful run (repeatable).
    #[arg(long, value_name = "JOB")]
    pub explain: Vec<String>,
    /// Jobs see none of rave's own environment except PATH, HOME, LANG, LC_ALL, LC_CTYPE, TZ,
    /// TMPDIR, USER, LOGNAME, TERM and the names given with --pass-env (`rave serve` always
    /// runs pipelines this way).
    #[arg(long)]
    pub clean_env: bool,
    /// With --clean-env: also pass this variable of rave's environment to jobs (repeatable).
    #[arg(long, value_name = "NAME", requires = "clean_env")]
    pub pass_env: Vec<String>,
    /// Executor for jobs: `local`, or `docker` (jobs without `image:` use `.rave:
    /// default_image`). Default: `.rave: executor`, else local, with jobs that name an image
    /// run in Docker when an engine answers.
    #[arg(long, value_name = "NAME")]
    pub executor: Option<String>,
    /// Share a host budget with other runs: start jobs when the budget server on this Unix
    /// socket grants them (`rave serve` runs every pipeline this way).
    #[arg(long, value_name = "SOCKET", hide = true)]
    pub budget_socket: Option<PathBuf>,
    /// Go on with an earlier run of this pipeline (its number, or its directory) as GitLab
    /// retries a job inside its pipeline: the JOBs named run again, and so does what did not
    /// run because of them; every other job keeps its result and artifacts. A manual JOB named
    /// here is played.
    #[arg(long = "continue", value_name = "RUN", requires = "job_names")]
    pub continue_run: Option<String>,
}

/// `--explain JOB`: the reuse decision of each instance of JOB, on stderr.
fn explain(name: &str, records: &[&JobRecord], plan: &Plan) {
    let hits: Vec<&JobRecord> = records
        .iter()
        .filter(|r| {
            r.name == name
                || plan
                    .jobs
                    .iter()
                    .any(|j| j.name == r.name && j.job_name == name)
        })
        .copied()
        .collect();
    if hits.is_empty() {
        eprintln!("explain: no job `{name}` ran in this pipeline");
    }
    for r in hits {
        match &r.reuse {
            None => eprintln!(
                "explain: {} does not opt into reuse (set RAVE_REUSE: \"1\" in its variables)",
                r.name
            ),
            Some(d) => match d.reused_from {
                Some(p) => eprintln!(
                    "explain: {} reused pipeline {p}'s result: every input is unchanged (digest {})",
                    r.name, d.digest
                ),
                None => {
                    eprintln!("explain: {} ran (input digest {}):", r.name, d.digest);
                    for c in &d.changed {
                        eprintln!("  - {c}");
                    }
                }
            },
        }
    }
}

/// Choose the instances to run from the names on the command line.
fn select(plan: &Plan, names: &[String], needs: bool) -> Result<Option<HashSet<usize>>, String> {
    if names.is_empty() {
        return Ok(None);
    }
    let mut set = HashSet::new();
    for n in names {
        let hits: Vec<usize> = plan
            .jobs
            .iter()
            .filter(|j| j.name == *n || j.job_name == *n)
            .map(|j| j.id)
            .collect();
        if hits.is_empty() {
            let help = did_you_mean(n, plan.jobs.iter().map(|j| j.name.as_str()))
                .map(|h| format!("; {h}"))
                .unwrap_or_default();
            return Err(format!("no job `{n}` in this pipeline{help}"));
        }
        set.extend(hits);
    }
    if needs {
        let mut stack: Vec<usize> = set.iter().copied().collect();
        while let Some(i) = stack.pop() {
            for &d in &plan.jobs[i].deps {
                if set.insert(d) {
                    stack.push(d);
                }
            }
        }
    }
    Ok(Some(set))
}

/// `.rave/runs/<n>` with the next free number.
fn next_run_dir(root: &Path) -> std::io::Result<(u64, PathBuf)> {
    let runs = root.join(".rave").join("runs");
    std::fs::create_dir_all(&runs)?;
    let last = std::fs::read_dir(&runs)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    for id in last + 1.. {
        let dir = runs.join(id.to_string());
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            // Another `rave run` took this number a moment ago.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("run ids are unbounded")
}

/// Keep `.rave/` out of git without editing the user's `.gitignore`.
fn ignore_rave_dir(root: &Path) {
    let git = root.join(".git");
    if !git.is_dir() {
        return;
    }
    let exclude = git.join("info").join("exclude");
    let current = std::fs::read_to_string(&exclude).unwrap_or_default();
    if current
        .lines()
        .any(|l| l.trim() == "/.rave/" || l.trim() == ".rave/")
    {
        return;
    }
    let _ = std::fs::create_dir_all(git.join("info"));
    let mut text = current;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# rave's runs, logs and artifacts\n/.rave/\n");
    let _ = std::fs::write(&exclude, text);
}

/// How much of the memory budget the run used: the sum over jobs of peak memory (the limit when
/// no peak was measured) times duration, over the budget times the run's duration. None for a
/// run too short to tell.
fn budget_utilisation(
    records: &[&JobRecord],
    budget_bytes: u64,
    run: std::time::Duration,
) -> Option<f64> {
    let run_ms = run.as_millis() as f64;
    if run_ms < 1.0 || budget_bytes == 0 {
        return None;
    }
    let used: f64 = records
        .iter()
        .filter_map(|r| {
            let ms = r.duration_ms? as f64;
            Some(r.peak_memory_bytes.unwrap_or(r.memory_limit_bytes) as f64 * ms)
        })
        .sum();
    Some((used / (budget_bytes as f64 * run_ms)).min(1.0))
}

fn print_no_pipeline(reason: NoPipelineReason, message: String) -> anyhow::Result<()> {
    let doc = NoPipeline {
        pipeline: None,
        reason,
        message,
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

pub fn run(args: &RunArgs) -> anyhow::Result<i32> {
    let load_started = std::time::SystemTime::now();
    let Planned {
        project,
        trigger,
        mut plan,
        warnings,
    } = match plan_project(&args.pipeline, &args.trigger, &args.budget)? {
        Ok(p) => p,
        Err(code) => {
            if args.json {
                print_no_pipeline(
                    NoPipelineReason::InvalidPipeline,
                    "the pipeline has errors (listed on stderr; `rave lint --json` gives them as JSON)".into(),
                )?;
            }
            return Ok(code);
        }
    };
    report(&project.loaded.sources, &warnings);
    let load_ended = std::time::SystemTime::now();
    // Earlier runs say how long jobs take: weight the critical path by that, so the scheduler
    // starts the job the pipeline is really waiting on. Unknown jobs count as the average.
    let known = crate::history::last_durations(&project.root);
    if !known.is_empty() {
        let avg = known.values().sum::<u64>() / known.len() as u64;
        let weight = |j: &rave_plan::JobInstance| known.get(&j.name).copied().unwrap_or(avg);
        // The plan is acyclic by now, so this cannot fail.
        let _ = rave_plan::dag::weighted_priorities(&mut plan.jobs, &weight);
    }
    let Some(pipeline) = project.pipeline() else {
        return Ok(2);
    };
    if plan.skipped_by_workflow {
        let message = format!(
            "workflow: rules create no pipeline for {} ({})",
            trigger.ref_name,
            trigger.source.ci_value()
        );
        eprintln!("{message}");
        if args.json {
            print_no_pipeline(NoPipelineReason::WorkflowRules, message)?;
        }
        return Ok(0);
    }
    let selected = match select(&plan, &args.job_names, args.needs) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    let (local_id, run_dir) = next_run_dir(&project.root)?;
    let trace = crate::otel::RunTrace::from_env(args.otlp_endpoint.is_some());
    let mut selected = selected;
    let mut continued: Option<(PathBuf, rave_engine::resume::Continuation)> = None;
    if let Some(prev) = &args.continue_run {
        let prev_dir = if prev.bytes().all(|b| b.is_ascii_digit()) {
            project.root.join(".rave").join("runs").join(prev)
        } else {
            PathBuf::from(prev)
        };
        let named = selected.clone().unwrap_or_default();
        match rave_engine::resume::continue_run(&plan, &prev_dir, &named, &run_dir) {
            Ok(c) => {
                eprintln!(
                    "rave: going on with run {}: {} run again, the other jobs keep their results",
                    prev_dir.display(),
                    c.again.join(", ")
                );
                selected = Some(c.active.clone());
                continued = Some((prev_dir, c));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&run_dir);
                eprintln!("error: {e}");
                return Ok(2);
            }
        }
    }
    // Under `rave serve` every pipeline is a fresh checkout whose first run is 1 locally: jobs
    // see the server's pipeline id, unique as GitLab's `CI_PIPELINE_ID` is. A continued run
    // stays in its pipeline.
    let pipeline_id = std::env::var("RAVE_SERVER_PIPELINE_ID")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .or(continued.as_ref().map(|(_, c)| c.pipeline_id))
        .unwrap_or(local_id);
    // What was included from outside the repository, pinned: the release's provenance lists it.
    let _ = std::fs::write(
        run_dir.join("includes.json"),
        serde_json::to_string_pretty(&project.loaded.external)?,
    );
    ignore_rave_dir(&project.root);
    let cgroups = if args.no_cgroups {
        None
    } else {
        match Cgroups::detect() {
            Ok(c) => Some(Arc::new(c)),
            Err(why) => {
                eprintln!(
                    "rave: no per-job cgroups ({why}); memory is budgeted at admission only, and OOM kills cannot be told apart"
                );
                None
            }
        }
    };
    let files: Vec<String> = trigger
        .files
        .iter()
        // rave's own output is not part of the working copy; committed settings under
        // .rave/ (the scan allowlist) are.
        .filter(|f| {
            ![
                ".rave/runs/",
                ".rave/cache/",
                ".rave/builds/",
                ".rave/snapshot/",
                ".rave/caches/",
            ]
            .iter()
            .any(|p| f.starts_with(p))
        })
        .cloned()
        .collect();
    let data_dir = project.root.join(".rave");
    // A tag pipeline runs on the tag's commit, not on what the working tree holds.
    let (source_root, files) = match &project.tag_source {
        Some(ts) => (ts.dir.clone(), ts.files.clone()),
        None => (project.root.clone(), files),
    };
    let state_dir = crate::project::state_dir(&project, &args.budget);
    let ignore: Box<dyn rave_engine::builds::IgnoreCheck> =
        match rave_repo::Repo::discover(&project.root) {
            Ok(r) => Box::new(workspace::RepoIgnores::new(r)),
            Err(_) => Box::new(rave_engine::builds::NoIgnores),
        };
    let mut ws = Workspace::new(source_root, files, run_dir.clone(), &state_dir, ignore);
    ws.store = Some(rave_store::Store::open(&data_dir));
    ws.pipeline_id = pipeline_id;
    if project.tag_source.is_none() {
        ws.blob_ids = project.blob_ids.get().cloned().unwrap_or_default();
    }
    // Jobs get a `.git` at the pipeline's commit when the project is a whole repository (a
    // subdirectory's jobs would see paths that do not match the index).
    if let Ok(repo) = rave_repo::Repo::discover(&project.root)
        && repo.root().canonicalize().ok() == project.root.canonicalize().ok()
        && trigger.sha.len() == 40
        && trigger.sha.bytes().any(|b| b != b'0')
    {
        let branch = trigger.tag.is_none().then_some(trigger.ref_name.as_str());
        match workspace::JobGit::new(repo, &state_dir, &trigger.sha, branch) {
            Ok(g) => ws.git = Some(g),
            Err(e) => eprintln!("rave: jobs get no .git directory ({e})"),
        }
    }
    if let Err(e) = ws.snapshot() {
        eprintln!("error: cannot snapshot the working tree: {e}");
        return Ok(2);
    }
    let ws = Arc::new(ws);
    let names: Vec<String> = plan.jobs.iter().map(|j| j.name.clone()).collect();
    let log_paths = plan
        .jobs
        .iter()
        .map(|j| ws.log_path(&workspace::slug(j.id, &j.name)))
        .collect();
    let to_stderr = args.json;
    let color = if to_stderr {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    } && std::env::var_os("NO_COLOR").is_none();
    let width = names
        .iter()
        .enumerate()
        .filter(|(i, _)| selected.as_ref().is_none_or(|s| s.contains(i)))
        .map(|(_, n)| n.chars().count())
        .max()
        .unwrap_or(4)
        .min(32);
    let cache_dir = project.root.join(".rave").join("cache");
    let mut runner_env: Vec<(String, String)> = Vec::new();
    if let Some(warning) = nix_daemon_warning(pipeline.rave.nix_single_user) {
        eprintln!("{warning}");
    }
    if pipeline.rave.nix_single_user {
        runner_env.push(("NIX_REMOTE".into(), "local".into()));
    }
    if args.clean_env {
        // Tells `rave release` inside the job not to look for the operator's own key.
        runner_env.push(("RAVE_CLEAN_ENV".into(), "1".into()));
    }
    // Jobs call `rave scan`, `rave release`, …: the same rave, first on PATH.
    if let Ok(exe) = std::env::current_exe() {
        let bin = run_dir.join("bin");
        if std::fs::create_dir_all(&bin).is_ok()
            && std::os::unix::fs::symlink(&exe, bin.join("rave")).is_ok()
        {
            let path = std::env::var("PATH").unwrap_or_default();
            runner_env.push(("PATH".into(), format!("{}:{path}", bin.display())));
            runner_env.push(("RAVE_BIN".into(), exe.to_string_lossy().into_owned()));
        }
    }
    let cfg = RunConfig {
        budget: plan.budget,
        selected,
        pipeline_id,
        default_timeout: DEFAULT_TIMEOUT,
        after_script_timeout: AFTER_SCRIPT_TIMEOUT,
        env: [
            ("RAVE_CACHE_DIR", cache_dir.to_string_lossy().into_owned()),
            ("RAVE_RUN_DIR", run_dir.to_string_lossy().into_owned()),
            // Where `rave release create` publishes (the store of this project).
            ("RAVE_DATA_DIR", data_dir.to_string_lossy().into_owned()),
            ("CI_SERVER_NAME", "rave".to_string()),
            ("CI_RUNNER_DESCRIPTION", "rave local".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(runner_env)
        .collect(),
        host_env: if args.clean_env {
            HostEnv::clean(&args.pass_env)
        } else {
            HostEnv::Inherit
        },
        keep_workdirs: args.keep,
        lease: None,
        resume: continued.as_ref().map(|(_, c)| c.resume.clone()),
        trace: trace.as_ref().map(|t| rave_engine::trace::JobTrace {
            trace_id: t.ctx.trace_id,
            endpoint: args.otlp_endpoint.clone(),
        }),
    };
    // Masked variables, as GitLab masks them in job logs: the ones RAVE_MASKED_VARIABLES names
    // (from `--var` or the environment), and always the release signing key.
    let mut masked_names: Vec<String> = vec!["RAVE_SIGNING_KEY".into()];
    let listed = trigger
        .variables
        .get("RAVE_MASKED_VARIABLES")
        .cloned()
        .or_else(|| std::env::var("RAVE_MASKED_VARIABLES").ok())
        .unwrap_or_default();
    masked_names.extend(
        listed
            .split(',')
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty()),
    );
    let masked_values: Vec<String> = masked_names
        .iter()
        .filter_map(|n| {
            trigger
                .variables
                .get(n)
                .cloned()
                .or_else(|| std::env::var(n).ok())
        })
        .chain(trigger.masked_values.iter().cloned())
        .collect();
    let masker = rave_engine::mask::Masker::new(&rave_engine::mask::mask_values(
        masked_values.iter().map(String::as_str),
    ));
    let executor = args
        .executor
        .clone()
        .or_else(|| pipeline.rave.executor.clone());
    let mode = match executor.as_deref() {
        None => Mode::Auto,
        Some("docker") => Mode::Docker,
        Some("local") => Mode::Local,
        Some(other) => {
            eprintln!("error: unknown --executor `{other}`: use local or docker");
            return Ok(2);
        }
    };
    let docker_default = mode == Mode::Docker;
    let events = match &args.events {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
            let jobs: Vec<rave_engine::event::EventJob> = plan
                .jobs
                .iter()
                .map(|j| {
                    let slug = workspace::slug(j.id, &j.name);
                    rave_engine::event::EventJob {
                        index: j.id,
                        name: j.name.clone(),
                        stage: j.job.stage.value.clone(),
                        selected: cfg.selected.as_ref().is_none_or(|s| s.contains(&j.id)),
                        // A job carried over from the run this one goes on with keeps its row.
                        carried: continued
                            .as_ref()
                            .is_some_and(|(_, c)| c.resume.carried[j.id].is_some()),
                        log: ws.log_path(&slug),
                        artifacts: ws.artifacts_dir(&slug),
                        needs: if j.uses_needs {
                            j.deps.clone()
                        } else {
                            Vec::new()
                        },
                    }
                })
                .collect();
            let head = serde_json::to_string(&rave_engine::event::RunEvent::Pipeline {
                id: pipeline_id,
                run_dir: run_dir.clone(),
                jobs,
            })?;
            let mut f = f;
            use std::io::Write;
            f.write_all(format!("{head}\n").as_bytes())?;
            Some(f)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut cfg = cfg;
    if let Some(socket) = &args.budget_socket {
        let hello = rave_engine::lease::ToBroker::Hello {
            pipeline: pipeline_id,
            project: format!("{}/{}", trigger.project_namespace, trigger.project_name),
            cap: rave_engine::lease::Cap {
                memory_bytes: plan.budget.memory_bytes,
                cpus: plan.budget.cpus,
                jobs: plan.budget.jobs,
            },
        };
        match rt.block_on(rave_engine::lease::Client::connect(socket, hello)) {
            Ok(c) => cfg.lease = Some(Arc::new(c)),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(2);
            }
        }
    }
    let result = rt.block_on(async {
        let (ev_tx, ev_rx) = tokio::sync::mpsc::unbounded_channel();
        let (log_tx, log_rx) = tokio::sync::mpsc::channel(256);
        let console = Console {
            names,
            color,
            to_stderr,
            width,
            masker,
            pending: Default::default(),
            events,
        };
        let printer = tokio::spawn(console.run(ev_rx, log_rx, LogFiles::new(log_paths)));
        let cancel = Cancel::default();
        let signals = tokio::spawn(watch_signals(cancel.clone()));
        let wants_docker = docker_default
            || (mode == Mode::Auto
                && plan
                    .jobs
                    .iter()
                    .any(|j| j.job.image.is_some() || !j.job.services.is_empty()));
        let docker = if wants_docker {
            let builds = format!(
                "/builds/{}/{}",
                trigger.project_namespace, trigger.project_name
            );
            match DockerExecutor::connect(
                builds,
                pipeline.rave.default_image.clone(),
                cgroups.clone(),
            )
            .await
            {
                Ok(d) => {
                    let swept = d.sweep().await;
                    if swept > 0 {
                        eprintln!("rave: removed {swept} container(s) an earlier rave left behind");
                    }
                    Some(d)
                }
                Err(e) if docker_default => {
                    eprintln!("error: {e}");
                    None
                }
                Err(e) => {
                    eprintln!(
                        "rave: {e}; jobs with `image:` will fail (run with `--executor local` to run them in this machine's shell)"
                    );
                    None
                }
            }
        } else {
            None
        };
        let exec = Arc::new(Dispatch {
            local: LocalExecutor::new(cgroups.clone()),
            docker,
            mode,
        });
        let result = scheduler::run(&plan, exec, ws, cfg, ev_tx, log_tx, cancel).await;
        signals.abort();
        let _ = printer.await;
        result
    });
    if let Some(c) = &cgroups {
        c.remove();
    }
    if !args.keep {
        // The snapshot is links into the mirror: cheap, but nothing needs it any more.
        let _ = std::fs::remove_dir_all(run_dir.join("src"));
    }
    let records: Vec<&JobRecord> = result.records.iter().flatten().collect();
    // What the jobs measured is what later runs admit them with (`--no-learn` only stops the
    // use, not the measuring).
    if let Err(e) = rave_engine::learn::Peaks::load(&state_dir).record(&records) {
        eprintln!("rave: WARNING: measured peaks not kept: {e}");
    }
    for name in &args.explain {
        explain(name, &records, &plan);
    }
    let utilisation = budget_utilisation(&records, plan.budget.memory_bytes, result.duration);
    let doc = rave_engine::event::RunSummary {
        pipeline: rave_engine::event::PipelineSummary {
            id: pipeline_id,
            status: result.status,
            duration_ms: result.duration.as_millis() as u64,
            ref_name: trigger.ref_name.clone(),
            sha: trigger.sha.clone(),
            profile: plan.profile.clone(),
            budget: rave_engine::event::BudgetSummary {
                memory_bytes: plan.budget.memory_bytes,
                cpus: plan.budget.cpus,
                jobs: plan.budget.jobs,
            },
            budget_utilisation: utilisation,
            trace_id: trace.as_ref().map(|t| t.ctx.trace_hex()),
        },
        jobs: records.iter().map(|r| (*r).clone()).collect(),
    };
    let text = serde_json::to_string_pretty(&doc)?;
    let _ = std::fs::write(run_dir.join("summary.json"), &text);
    if let Some(path) = &args.events {
        let line = serde_json::to_string(&rave_engine::event::RunEvent::PipelineFinished {
            status: result.status,
            duration_ms: result.duration.as_millis() as u64,
        })?;
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
            use std::io::Write;
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
    if let (Some(endpoint), Some(t)) = (&args.otlp_endpoint, &trace) {
        let project_path = format!("{}/{}", trigger.project_namespace, trigger.project_name);
        let mut spans = t.spans(
            &project_path,
            pipeline_id,
            result.status.as_str(),
            load_started,
            &records,
        );
        // Loading the pipeline file: where `include:`s from elsewhere were fetched.
        let mut load = rave_traces::SpanData::new("load pipeline", Some(spans[0].span_id))
            .attr("rave.includes", project.loaded.external.len() as i64);
        if !project.loaded.external.is_empty() {
            let list: Vec<String> = project
                .loaded
                .external
                .iter()
                .map(|f| format!("{} {} @ {}", f.kind, f.location, f.resolved))
                .collect();
            load = load.attr("rave.include.files", list.join("; "));
        }
        load.start = load_started;
        load.end = load_ended;
        spans.push(load);
        t.export(endpoint, &spans);
    }
    if let Some(base) = &args.push_metrics {
        let project = format!("{}/{}", trigger.project_namespace, trigger.project_name);
        let body = crate::push::body(&records, result.status.as_str(), result.duration);
        if let Err(e) = crate::push::push(base, &project, pipeline_id, body) {
            eprintln!("rave: WARNING: metrics not pushed: {e}");
        }
    }
    if args.json {
        println!("{text}");
    } else {
        println!();
        print!("{}", console::summary(&records, color));
        println!(
            "pipeline #{pipeline_id} {} in {} ({} profile: {}, {} CPUs, {} slots) — logs in {}",
            match result.status {
                PipelineStatus::Success => "passed",
                PipelineStatus::Failed => "failed",
                PipelineStatus::Canceled => "canceled",
                PipelineStatus::Skipped => "had nothing to run",
                PipelineStatus::Manual => "is blocked on a manual job",
            },
            console::duration(Some(result.duration.as_millis() as u64)),
            plan.profile,
            rave_model::units::format_memory(plan.budget.memory_bytes),
            rave_engine::caps::format_cpus(plan.budget.cpus),
            plan.budget.jobs,
            run_dir
                .join("logs")
                .strip_prefix(&project.root)
                .unwrap_or(&run_dir)
                .display(),
        );
        if let Some(u) = utilisation {
            println!(
                "memory budget used: {:.0}% (job peaks × their durations ÷ budget × the run's duration)",
                u * 100.0
            );
        }
    }
    Ok(match result.status {
        PipelineStatus::Success | PipelineStatus::Skipped | PipelineStatus::Manual => 0,
        PipelineStatus::Failed => 1,
        PipelineStatus::Canceled => 130,
    })
}

/// A Nix daemon builds in its own cgroup, outside the job's memory limit. Say so once.
fn nix_daemon_warning(single_user: bool) -> Option<String> {
    let daemon = Path::new("/nix/var/nix/daemon-socket/socket").exists()
        || std::env::var("NIX_REMOTE").is_ok_and(|v| v == "daemon");
    (daemon && !single_user).then(|| {
        "rave: a Nix daemon is running: `nix build` in a job builds inside the daemon, outside the job's cgroup and memory limit; \
         set `.rave: {nix_single_user: true}` to build in the job (NIX_REMOTE=local)"
            .to_string()
    })
}

/// Ctrl-C once: stop gracefully (after_script runs). Twice: kill now. Three times: exit.
async fn watch_signals(cancel: Cancel) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut count = 0;
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        count += 1;
        match count {
            1 => {
                eprintln!("\nrave: canceling the pipeline (Ctrl-C again to kill jobs at once)");
                cancel.graceful.cancel();
            }
            2 => {
                eprintln!("\nrave: killing jobs now (Ctrl-C again to exit at once)");
                cancel.force.cancel();
            }
            _ => std::process::exit(130),
        }
    }
}
