//! The scheduler: owns the DAG state and the budget, decides what runs next, and turns each
//! executor outcome into a job result.
//!
//! It is event-driven: it sleeps until a job ends, a delayed job's timer fires, or the run is
//! cancelled; then it settles every job whose dependencies are done (run, skip, or hold as
//! manual), admits what fits (see [`crate::admission`]), and sleeps again. Each running job
//! is a task of its own (prepare the working copy → execute → save artifacts) that reports
//! back over a channel; the scheduler never waits on a job directly.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rave_model::units::format_memory;
use rave_model::{ArtifactsWhen, Budget, When};
use rave_plan::{JobInstance, Plan};
use tokio::sync::mpsc;

use crate::admission::{Admission, Candidate, Request};
use crate::builds::{CleanFlags, GitStrategy};
use crate::caps;
use crate::event::{Event, JobRecord};
use crate::executor::{Cancel, Executor, JobSpec, LogChunk, LogSink};
use crate::outcome::{ExecOutcome, FailureReason, JobStatus};
use crate::workspace::{self, Workspace};

/// GitLab's default job timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// GitLab's after_script timeout.
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub budget: Budget,
    /// Instances to run; None runs the whole plan. Manual jobs named here are started.
    pub selected: Option<HashSet<usize>>,
    pub pipeline_id: u64,
    pub default_timeout: Duration,
    pub after_script_timeout: Duration,
    /// Variables every job gets (runner-level), below job variables.
    pub env: Vec<(String, String)>,
    /// What jobs see of rave's own environment.
    pub host_env: HostEnv,
    /// Keep job working copies after they end (for debugging).
    pub keep_workdirs: bool,
    /// A budget shared with other runs (`rave serve`): jobs start when the server grants
    /// them, not when this run's own admission says so.
    pub lease: Option<Arc<crate::lease::Client>>,
    /// Go on with an earlier run of this pipeline instead of starting afresh.
    pub resume: Option<Resume>,
}

/// Going on with an earlier run of the same pipeline, as GitLab retries a job or plays a
/// manual one inside its pipeline: the jobs carried over keep their result (and dotenv; their
/// artifacts are in place), the named jobs run again, and so does what waited on them.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    /// Per plan instance: the earlier record of a job that keeps it, with its dotenv report.
    pub carried: Vec<Option<(JobRecord, HashMap<String, String>)>>,
    /// Jobs to start even when manual: the ones retried or played.
    pub named: HashSet<usize>,
    /// Per plan instance: attempts made before (a retry is the next attempt).
    pub attempts: Vec<u32>,
}

/// What of rave's own environment reaches jobs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HostEnv {
    /// All of it (`rave run` on the developer's own machine, as gitlab-ci-local does).
    #[default]
    Inherit,
    /// Only these variables (`rave run --clean-env`, and every run of `rave serve`): nothing
    /// of the server's environment, tokens or secrets reaches a job.
    Only(Vec<(String, String)>),
}

impl HostEnv {
    /// The host variables a clean environment keeps: what tools need to work, nothing that
    /// usually holds a secret. `extra` names more (proxies, when an operator configures them).
    pub const ALLOWED: &'static [&'static str] = &[
        "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "TERM",
    ];

    /// A clean environment taken from this process's environment.
    pub fn clean(extra: &[String]) -> HostEnv {
        HostEnv::Only(
            std::env::vars()
                .filter(|(k, _)| Self::ALLOWED.contains(&k.as_str()) || extra.contains(k))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<String> {
        match self {
            HostEnv::Inherit => std::env::var(name).ok(),
            HostEnv::Only(vars) => vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineStatus {
    Success,
    Failed,
    Canceled,
    Skipped,
    /// Waiting on a manual job that blocks (GitLab's "blocked" pipeline): nothing failed, but
    /// the jobs after it have not run.
    Manual,
}

impl PipelineStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineStatus::Success => "success",
            PipelineStatus::Failed => "failed",
            PipelineStatus::Canceled => "canceled",
            PipelineStatus::Skipped => "skipped",
            PipelineStatus::Manual => "manual",
        }
    }
}

#[derive(Debug)]
pub struct RunResult {
    pub status: PipelineStatus,
    pub duration: Duration,
    /// One record per plan instance that took part (None for instances not selected).
    pub records: Vec<Option<JobRecord>>,
}

enum State {
    /// Not part of this run.
    Inactive,
    Waiting,
    Delayed,
    Ready {
        overtaken: u32,
    },
    Running,
    Done,
}

struct Finished {
    id: usize,
    attempt: u32,
    outcome: ExecOutcome,
    started_at: SystemTime,
    started: Instant,
    dotenv: HashMap<String, String>,
    setup_ms: Option<u64>,
    /// A trigger job's child pipeline jobs.
    children: Vec<crate::event::ChildJob>,
    /// The digest of the artifacts it saved (when some job of the run opts into reuse).
    artifacts_digest: Option<String>,
    reuse: Option<crate::reuse::Decision>,
}

enum Msg {
    Finished(Box<Finished>),
    DelayOver(usize),
}

struct Run<'p, E: Executor> {
    plan: &'p Plan,
    exec: Arc<E>,
    ws: Arc<Workspace>,
    cfg: RunConfig,
    events: mpsc::UnboundedSender<Event>,
    logs: mpsc::Sender<LogChunk>,
    cancel: Cancel,
    tx: mpsc::UnboundedSender<Msg>,
    state: Vec<State>,
    deps: Vec<Vec<usize>>,
    records: Vec<Option<JobRecord>>,
    /// A failed (not allowed) or canceled job at or above this one.
    upstream_failed: Vec<bool>,
    /// The blocking manual job a job waits for, directly or through the jobs it waits for.
    blocked: Vec<Option<usize>>,
    attempts: Vec<u32>,
    dotenv: Vec<HashMap<String, String>>,
    /// Digests of the artifacts each job saved (inputs of the jobs that opt into reuse).
    artifacts_digest: Vec<Option<String>>,
    /// Some job opts into reuse (`RAVE_REUSE`): artifact digests are worth computing.
    reuse_wanted: bool,
    /// A limit raised after an OOM kill at a learned request.
    memory_raised: Vec<Option<u64>>,
    admission: Admission,
    /// The shared budget's lease, and the ready set it was last told.
    lease: Option<Arc<crate::lease::Client>>,
    wanted: Vec<crate::lease::Wanted>,
    /// Jobs retried or played in a resumed run: started even when manual.
    named: HashSet<usize>,
    canceled: bool,
}

/// Run a plan to the end (or until cancelled).
pub async fn run<E: Executor>(
    plan: &Plan,
    exec: Arc<E>,
    ws: Arc<Workspace>,
    cfg: RunConfig,
    events: mpsc::UnboundedSender<Event>,
    logs: mpsc::Sender<LogChunk>,
    cancel: Cancel,
) -> RunResult {
    let started = Instant::now();
    let n = plan.jobs.len();
    let active: Vec<bool> = (0..n)
        .map(|i| cfg.selected.as_ref().is_none_or(|s| s.contains(&i)))
        .collect();
    let deps = (0..n).map(|i| effective_deps(plan, &active, i)).collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut r = Run {
        plan,
        exec,
        ws,
        admission: Admission::new(cfg.budget),
        lease: cfg.lease.clone(),
        wanted: Vec::new(),
        named: HashSet::new(),
        cfg,
        events,
        logs,
        cancel,
        tx,
        state: active
            .iter()
            .map(|a| if *a { State::Waiting } else { State::Inactive })
            .collect(),
        deps,
        records: vec![None; n],
        upstream_failed: vec![false; n],
        blocked: vec![None; n],
        attempts: vec![0; n],
        dotenv: vec![HashMap::new(); n],
        artifacts_digest: vec![None; n],
        memory_raised: vec![None; n],
        reuse_wanted: plan
            .jobs
            .iter()
            .any(|j| crate::reuse::mode(&j.variables) != crate::reuse::Mode::Off),
        canceled: false,
    };
    if let Some(resume) = r.cfg.resume.clone() {
        r.carry(resume);
    }
    let mut grants = r.lease.as_ref().and_then(|l| l.take_incoming());
    loop {
        r.settle();
        if !r.canceled {
            r.admit();
        }
        if r.state
            .iter()
            .all(|s| matches!(s, State::Done | State::Inactive))
        {
            break;
        }
        let graceful = r.cancel.graceful.clone();
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Finished(f)) => r.finish(*f),
                Some(Msg::DelayOver(id)) => {
                    if matches!(r.state[id], State::Delayed) {
                        r.state[id] = State::Ready { overtaken: 0 };
                    }
                }
                None => break,
            },
            _ = graceful.cancelled(), if !r.canceled => r.cancel_pending(),
            m = async { grants.as_mut()?.recv().await }, if grants.is_some() => match m {
                Some(crate::lease::FromBroker::Grant { job }) => r.granted(job),
                Some(crate::lease::FromBroker::Refuse { job, reason }) => r.refused(job, reason),
                None => {
                    grants = None;
                    eprintln!("rave: the server's budget went away; the pipeline is canceled");
                    r.cancel_pending();
                }
            },
        }
    }
    let blocked = r.blocked.iter().any(Option::is_some)
        || r.records.iter().enumerate().any(|(id, rec)| {
            rec.as_ref()
                .is_some_and(|rec| rec.status == JobStatus::Manual)
                && !plan.jobs[id].allow_failure.is_allowed_at_all()
        });
    let records = r.records;
    let status = pipeline_status(&records, r.canceled, blocked);
    RunResult {
        status,
        duration: started.elapsed(),
        records,
    }
}

fn pipeline_status(records: &[Option<JobRecord>], canceled: bool, blocked: bool) -> PipelineStatus {
    let done: Vec<&JobRecord> = records.iter().flatten().collect();
    if canceled || done.iter().any(|r| r.status == JobStatus::Canceled) {
        PipelineStatus::Canceled
    } else if done.iter().any(|r| r.status == JobStatus::Failed) {
        PipelineStatus::Failed
    } else if blocked {
        PipelineStatus::Manual
    } else if done
        .iter()
        .all(|r| matches!(r.status, JobStatus::Skipped | JobStatus::Manual))
    {
        PipelineStatus::Skipped
    } else {
        PipelineStatus::Success
    }
}

/// Dependencies among the jobs taking part: an inactive dependency is looked through to the
/// active jobs it waits for, so ordering holds when only some jobs run.
fn effective_deps(plan: &Plan, active: &[bool], id: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<usize> = plan.jobs[id].deps.clone();
    while let Some(d) = stack.pop() {
        if !seen.insert(d) {
            continue;
        }
        if active[d] {
            out.push(d);
        } else {
            stack.extend(plan.jobs[d].deps.iter().copied());
        }
    }
    out.sort_unstable();
    out
}

impl<'p, E: Executor> Run<'p, E> {
    fn job(&self, id: usize) -> &'p JobInstance {
        &self.plan.jobs[id]
    }

    /// The job's memory limit now: its request, or more after an OOM kill at a learned one.
    fn memory(&self, id: usize) -> u64 {
        self.memory_raised[id].unwrap_or(self.job(id).memory_bytes)
    }

    fn record(&self, id: usize, status: JobStatus, note: Option<String>) -> JobRecord {
        let j = self.job(id);
        JobRecord {
            name: j.name.clone(),
            stage: j.stage.clone(),
            status,
            failure_reason: None,
            exit_code: None,
            started_at: None,
            finished_at: None,
            duration_ms: None,
            peak_memory_bytes: None,
            setup_ms: None,
            reused_from: None,
            reuse: None,
            memory_limit_bytes: self.memory(id),
            memory_source: Some(match self.memory_raised[id] {
                Some(_) => format!("{}, raised after an OOM kill", j.memory_source),
                None => j.memory_source.to_string(),
            }),
            cpus: j.cpus,
            attempts: self.attempts[id],
            note,
            children: Vec::new(),
        }
    }

    fn done(&mut self, id: usize, record: JobRecord) {
        let failed = matches!(record.status, JobStatus::Failed | JobStatus::Canceled);
        self.upstream_failed[id] = self.upstream_failed[id] || failed;
        self.state[id] = State::Done;
        self.records[id] = Some(record.clone());
        let _ = self.events.send(Event::JobFinished {
            id,
            record: Box::new(record),
        });
    }

    /// Take over the results of an earlier run: carried jobs are done (without new events:
    /// they were told when they ended), failures and manual blocks propagate as they did.
    fn carry(&mut self, resume: Resume) {
        for (id, c) in resume.carried.into_iter().enumerate() {
            if let Some((record, dotenv)) = c
                && id < self.state.len()
                && !matches!(self.state[id], State::Inactive)
            {
                self.upstream_failed[id] =
                    matches!(record.status, JobStatus::Failed | JobStatus::Canceled);
                self.attempts[id] = record.attempts;
                self.records[id] = Some(record);
                self.dotenv[id] = dotenv;
                self.state[id] = State::Done;
            }
        }
        for (id, n) in resume.attempts.into_iter().enumerate() {
            if id < self.attempts.len() && self.records[id].is_none() {
                self.attempts[id] = n;
            }
        }
        // Failures and blocks flow down through carried jobs (any order of definition).
        let mut changed = true;
        while changed {
            changed = false;
            for id in 0..self.state.len() {
                let Some(rec) = &self.records[id] else {
                    continue;
                };
                let failed = self.deps[id].iter().any(|&d| self.upstream_failed[d]);
                if failed && !self.upstream_failed[id] {
                    self.upstream_failed[id] = true;
                    changed = true;
                }
                if rec.status == JobStatus::Skipped && self.blocked[id].is_none() {
                    let j = self.job(id);
                    let b = self.deps[id]
                        .iter()
                        .copied()
                        .find(|&d| {
                            self.records[d]
                                .as_ref()
                                .is_some_and(|r| r.status == JobStatus::Manual)
                                && (j.uses_needs || !self.job(d).allow_failure.is_allowed_at_all())
                        })
                        .or_else(|| self.deps[id].iter().find_map(|&d| self.blocked[d]));
                    if b.is_some() {
                        self.blocked[id] = b;
                        changed = true;
                    }
                }
            }
        }
        self.named = resume.named;
    }

    /// Decide every waiting job whose dependencies are all done.
    fn settle(&mut self) {
        let mut progress = true;
        while progress {
            progress = false;
            for id in 0..self.state.len() {
                if !matches!(self.state[id], State::Waiting) {
                    continue;
                }
                if !self.deps[id]
                    .iter()
                    .all(|&d| matches!(self.state[d], State::Done))
                {
                    continue;
                }
                progress = true;
                self.decide(id);
            }
        }
    }

    fn decide(&mut self, id: usize) {
        let j = self.job(id);
        let upstream_failed = self.deps[id].iter().any(|&d| self.upstream_failed[d]);
        self.upstream_failed[id] = upstream_failed;
        // A manual job nobody started blocks its dependents unless it may fail (a job that
        // `needs` it waits either way), and what waits for a blocked job is blocked too: in
        // GitLab every later stage waits until the manual job is played.
        let blocked_by = self.deps[id]
            .iter()
            .copied()
            .find(|&d| {
                self.records[d]
                    .as_ref()
                    .is_some_and(|r| r.status == JobStatus::Manual)
                    && (j.uses_needs || !self.job(d).allow_failure.is_allowed_at_all())
            })
            .or_else(|| self.deps[id].iter().find_map(|&d| self.blocked[d]));
        // Named on the command line; in a resumed run `selected` is every job taking part, and
        // only the retried or played ones count as named.
        let named = if self.cfg.resume.is_some() {
            self.named.contains(&id)
        } else {
            self.cfg.selected.as_ref().is_some_and(|s| s.contains(&id))
        };
        if self.canceled {
            let r = self.record(
                id,
                JobStatus::Canceled,
                Some("the pipeline was canceled".into()),
            );
            return self.done(id, r);
        }
        if let Some(b) = blocked_by {
            self.blocked[id] = Some(b);
            let note = format!(
                "waits for manual job `{}`; run it with `rave run \"{}\"`",
                self.job(b).name,
                self.job(b).name
            );
            let r = self.record(id, JobStatus::Skipped, Some(note));
            return self.done(id, r);
        }
        let run = match j.when {
            When::OnSuccess | When::Delayed => !upstream_failed,
            When::OnFailure => upstream_failed,
            When::Always => true,
            When::Manual => named && !upstream_failed,
            When::Never => false,
        };
        if !run {
            let (status, note) = match j.when {
                When::Manual if !upstream_failed => (
                    JobStatus::Manual,
                    Some(format!("manual: start it with `rave run \"{}\"`", j.name)),
                ),
                When::OnFailure => (
                    JobStatus::Skipped,
                    Some("when: on_failure, and nothing failed".into()),
                ),
                _ => (JobStatus::Skipped, Some("an earlier job failed".into())),
            };
            let r = self.record(id, status, note);
            return self.done(id, r);
        }
        match (j.when, j.start_in) {
            (When::Delayed, Some(d)) => {
                self.state[id] = State::Delayed;
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = tx.send(Msg::DelayOver(id));
                });
            }
            _ => self.state[id] = State::Ready { overtaken: 0 },
        }
    }

    fn request(&self, id: usize) -> Request {
        let j = self.job(id);
        Request {
            memory_bytes: self.memory(id),
            cpus: j.cpus,
        }
    }

    fn admit(&mut self) {
        let mut ready: Vec<Candidate> = self
            .state
            .iter()
            .enumerate()
            .filter_map(|(id, s)| match s {
                State::Ready { overtaken } => Some(Candidate {
                    id,
                    request: self.request(id),
                    overtaken: *overtaken,
                    resource_group: self.job(id).job.resource_group.clone(),
                }),
                _ => None,
            })
            .collect();
        ready.sort_by_key(|c| (std::cmp::Reverse(self.job(c.id).priority), c.id));
        if let Some(lease) = &self.lease {
            // The server decides; tell it what is ready whenever that changes.
            let wanted: Vec<crate::lease::Wanted> = ready
                .iter()
                .map(|c| crate::lease::Wanted {
                    job: c.id,
                    name: self.job(c.id).name.clone(),
                    memory_bytes: c.request.memory_bytes,
                    cpus: c.request.cpus,
                    priority: self.job(c.id).priority,
                    resource_group: c.resource_group.clone(),
                })
                .collect();
            if wanted != self.wanted {
                lease.send(crate::lease::ToBroker::Want {
                    jobs: wanted.clone(),
                });
                self.wanted = wanted;
            }
            return;
        }
        if ready.is_empty() {
            return;
        }
        let started = self.admission.select(&mut ready);
        for c in &ready {
            if let State::Ready { overtaken } = &mut self.state[c.id] {
                *overtaken = c.overtaken;
            }
        }
        for i in started {
            self.start(ready[i].id);
        }
    }

    fn job_env(&self, id: usize, workdir: &std::path::Path) -> Vec<(String, String)> {
        let j = self.job(id);
        // Lowest first: the host variables a clean environment keeps, then runner-level ones.
        let mut env: Vec<(String, String)> = match &self.cfg.host_env {
            HostEnv::Inherit => Vec::new(),
            HostEnv::Only(vars) => vars.clone(),
        };
        env.extend(self.cfg.env.iter().cloned());
        let mut vars = j.variables.clone();
        // dotenv reports of the jobs whose artifacts this job gets, below its own variables.
        for &a in &j.artifacts_from {
            for (k, v) in &self.dotenv[a] {
                if !j.job.variables.0.contains_key(k) {
                    vars.insert(k.clone(), v.clone());
                }
            }
        }
        let dir = workdir.to_string_lossy().to_string();
        vars.insert("CI_PROJECT_DIR".into(), dir.clone());
        vars.insert(
            "CI_BUILDS_DIR".into(),
            self.ws.run_dir.join("jobs").to_string_lossy().to_string(),
        );
        vars.insert("CI_PIPELINE_ID".into(), self.cfg.pipeline_id.to_string());
        vars.insert("CI_PIPELINE_IID".into(), self.cfg.pipeline_id.to_string());
        vars.insert(
            "CI_JOB_ID".into(),
            (self.cfg.pipeline_id * 10_000 + id as u64 + 1).to_string(),
        );
        vars.insert(
            "CI_JOB_STARTED_AT".into(),
            crate::event::rfc3339_millis(SystemTime::now()),
        );
        vars.insert(
            "CI_RUNNER_EXECUTABLE_ARCH".into(),
            format!("linux/{}", std::env::consts::ARCH),
        );
        vars.insert(
            "CI_RETRY_ATTEMPT".into(),
            self.attempts[id].saturating_sub(1).to_string(),
        );
        // Last expansion pass, now that runtime variables exist. A name the job does not
        // define (or its own name, as in `PATH: "/opt/bin:$PATH"`) comes from rave's
        // environment, which the local shell inherits anyway.
        let finals: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| {
                if j.raw_variables.contains(k) || !v.contains('$') {
                    return (k.clone(), v.clone());
                }
                let lookup = |n: &str| {
                    let own = if n == k { None } else { vars.get(n).cloned() };
                    own.or_else(|| {
                        self.cfg
                            .env
                            .iter()
                            .find(|(e, _)| e == n)
                            .map(|(_, v)| v.clone())
                    })
                    .or_else(|| self.cfg.host_env.get(n))
                };
                (k.clone(), rave_model::vars::expand(v, &lookup))
            })
            .collect();
        if j.job.trigger.is_some() {
            // What `forward: pipeline_variables` passes on to the child pipeline.
            env.push((
                "RAVE_PIPELINE_VARIABLES".into(),
                self.plan.pipeline_variables.join(" "),
            ));
            // The child pipeline's jobs work, cache and reuse in the project's state, beside
            // the parent's (its own run directory stays in the trigger job's directory).
            env.push((
                "RAVE_STATE_DIR".into(),
                self.ws.state_dir.to_string_lossy().into_owned(),
            ));
        }
        let lookup = |k: &str| finals.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let caps = caps::env(self.memory(id), j.cpus, &self.cfg.budget, &lookup);
        env.extend(finals.iter().cloned());
        env.extend(caps);
        env
    }

    fn start(&mut self, id: usize) {
        self.attempts[id] += 1;
        let attempt = self.attempts[id];
        self.state[id] = State::Running;
        let j = self.job(id).clone();
        let slug = workspace::slug(id, &j.name);
        let deps: Vec<String> = j
            .artifacts_from
            .iter()
            .map(|&a| workspace::slug(a, &self.job(a).name))
            .collect();
        // The job's stable directory, held until it ends.
        let claim = self.ws.claim(&j.name);
        let workdir = match &claim {
            Ok(c) => c.dir.clone(),
            Err(_) => self.ws.run_dir.join("unclaimed"),
        };
        let git = (
            GitStrategy::parse(j.variables.get("GIT_STRATEGY").map(String::as_str)),
            CleanFlags::parse(j.variables.get("GIT_CLEAN_FLAGS").map(String::as_str)),
        );
        let git_vars = workspace::GitVars {
            depth: j.variables.get("GIT_DEPTH").cloned(),
            submodules: j.variables.get("GIT_SUBMODULE_STRATEGY").cloned(),
        };
        let scratch_dir = self.ws.scratch_dir(&slug, attempt);
        let mut env = self.job_env(id, &workdir);
        // Tools rave provides (`rave scan`) leave their verdicts here.
        env.push((
            "RAVE_JOB_REPORT_DIR".into(),
            scratch_dir.to_string_lossy().into_owned(),
        ));
        // `cache:` entries, keys resolved with the job's variables; a bad one is a warning.
        let mut cache_notes = Vec::new();
        let caches: Vec<crate::cache::JobCache> = {
            let lookup = |k: &str| {
                env.iter()
                    .rev()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
            };
            let protected = lookup("CI_COMMIT_REF_PROTECTED").as_deref() == Some("true");
            j.job
                .cache
                .iter()
                .filter_map(|c| {
                    crate::cache::resolve(c, &lookup, &self.ws.source_root, protected)
                        .map_err(|e| cache_notes.push(format!("WARNING: {e}; cache skipped")))
                        .ok()
                })
                .collect()
        };
        let mut script = j.job.before_script.clone();
        script.extend(j.job.script.iter().cloned());
        let spec = JobSpec {
            name: j.name.clone(),
            slug: slug.clone(),
            workdir: workdir.clone(),
            scratch_dir: scratch_dir.clone(),
            env,
            clean_env: self.cfg.host_env != HostEnv::Inherit,
            script,
            after_script: j.job.after_script.clone(),
            timeout: j.job.timeout.unwrap_or(self.cfg.default_timeout),
            after_script_timeout: self.cfg.after_script_timeout,
            memory_bytes: self.memory(id),
            cpus: j.cpus,
            image: j.job.image.as_ref().map(|i| i.name.clone()),
            pull_policy: j
                .job
                .image
                .as_ref()
                .and_then(|i| i.pull_policy.first().cloned()),
            entrypoint: j.job.image.as_ref().and_then(|i| i.entrypoint.clone()),
            services: j.job.services.iter().map(service_spec).collect(),
            git_objects: self.ws.git.as_ref().map(|g| g.objects.clone()),
        };
        let _ = self.events.send(Event::JobStarted {
            id,
            attempt,
            memory_bytes: self.memory(id),
            cpus: j.cpus,
        });
        // Reuse (opt-in): the inputs are gathered in the job's task; what its artifacts
        // depend on is known now.
        let reuse_mode = crate::reuse::mode(&j.variables);
        let refused = match (reuse_mode, crate::reuse::refusal(&j)) {
            (crate::reuse::Mode::On, Some(why)) => Some(why),
            _ => None,
        };
        let dep_artifacts: Vec<(String, String)> = j
            .artifacts_from
            .iter()
            .map(|&a| {
                (
                    self.job(a).name.clone(),
                    self.artifacts_digest[a]
                        .clone()
                        .unwrap_or_else(|| "none".into()),
                )
            })
            .collect();
        let reuse_wanted = self.reuse_wanted;
        let exec = self.exec.clone();
        let ws = self.ws.clone();
        let log = LogSink::new(id, self.logs.clone());
        let cancel = self.cancel.clone();
        let tx = self.tx.clone();
        let keep = self.cfg.keep_workdirs;
        let (j_memory, spec_name) = (self.memory(id), j.name.clone());
        tokio::spawn(async move {
            let started_at = SystemTime::now();
            let started = Instant::now();
            let setup = Instant::now();
            // Reuse: decide before anything is prepared.
            let mut reuse: Option<(crate::reuse::Decision, Option<crate::reuse::Inputs>)> = None;
            if let Some(why) = refused {
                let d = crate::reuse::Decision {
                    changed: vec![format!(
                        "never reused: {why} (RAVE_REUSE: always reuses it anyway)"
                    )],
                    ..Default::default()
                };
                reuse = Some((d, None));
            } else if reuse_mode != crate::reuse::Mode::Off {
                let (ws2, j2, slug2) = (ws.clone(), j.clone(), slug.clone());
                let looked = tokio::task::spawn_blocking(move || {
                    let inputs = crate::reuse::inputs(&crate::reuse::Sources {
                        job: &j2,
                        snapshot: &ws2.source_root,
                        files: &ws2.files,
                        blob_ids: &ws2.blob_ids,
                        artifacts: dep_artifacts,
                    })?;
                    let last = ws2.reuse.load(&j2.name);
                    let d = crate::reuse::decide(&inputs, last.as_ref());
                    let reused = match (&d.reused_from, last) {
                        (Some(_), Some(rec)) => Some(reuse_outputs(&ws2, &j2, &slug2, &rec)),
                        _ => None,
                    };
                    Ok::<_, String>((d, inputs, reused))
                })
                .await
                .unwrap_or_else(|e| Err(format!("reuse check panicked: {e}")));
                match looked {
                    Ok((d, _, Some(Ok((dotenv, artifacts_digest, notes))))) => {
                        log.system(&format!(
                            "Reused: every input is unchanged since pipeline {} (input digest {})",
                            d.reused_from.unwrap_or_default(),
                            &d.digest[..12]
                        ))
                        .await;
                        for n in notes {
                            log.system(&n).await;
                        }
                        let _ = tx.send(Msg::Finished(Box::new(Finished {
                            id,
                            attempt,
                            outcome: ExecOutcome {
                                exit_code: Some(0),
                                ..ExecOutcome::default()
                            },
                            started_at,
                            started,
                            dotenv,
                            setup_ms: None,
                            children: Vec::new(),
                            artifacts_digest: Some(artifacts_digest),
                            reuse: Some(d),
                        })));
                        return;
                    }
                    Ok((mut d, inputs, reused)) => {
                        if let Some(Err(e)) = reused {
                            d.reused_from = None;
                            d.changed = vec![e];
                        }
                        log.system(&format!("Not reused: {}", d.changed.join("; ")))
                            .await;
                        reuse = Some((d, Some(inputs)));
                    }
                    Err(e) => {
                        log.system(&format!("WARNING: reuse check failed ({e}); the job runs"))
                            .await;
                    }
                }
            }
            let (claim, prep) = match (claim, git) {
                (Ok(mut claim), (Ok(strategy), Ok(clean))) => {
                    let ws = ws.clone();
                    let caches = caches.clone();
                    tokio::task::spawn_blocking(move || {
                        let r = ws
                            .prepare(&mut claim, &deps, strategy, &clean, &git_vars)
                            .map(|mut notes| {
                                notes.extend(cache_notes);
                                for c in &caches {
                                    notes.extend(ws.caches.restore(c, &claim.dir));
                                }
                                notes
                            });
                        (Some(claim), r)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        (
                            None,
                            Err(format!("preparing the working directory panicked: {e}")),
                        )
                    })
                }
                (Err(e), _) | (_, (Err(e), _)) | (_, (_, Err(e))) => (None, Err(e)),
            };
            let setup_ms = Some(setup.elapsed().as_millis() as u64);
            let mut outcome = match prep {
                Ok(notes) => {
                    for n in notes {
                        log.system(&n).await;
                    }
                    exec.run(spec, log.clone(), cancel).await
                }
                Err(e) => ExecOutcome {
                    runner_error: Some(e),
                    ..ExecOutcome::default()
                },
            };
            let (dotenv, notes) = {
                let ws = ws.clone();
                let outcome = outcome.clone();
                let slug = slug.clone();
                tokio::task::spawn_blocking(move || {
                    let mut claim = claim;
                    let out = match &claim {
                        Some(c) => {
                            let (dotenv, mut notes) =
                                save_outputs(&ws, &j, &slug, &c.dir, &outcome);
                            // After the script and after_script, as GitLab saves caches.
                            for cache in &caches {
                                notes.extend(ws.caches.save(
                                    cache,
                                    &c.dir,
                                    ws.tracked(),
                                    outcome.succeeded(),
                                ));
                            }
                            (dotenv, notes)
                        }
                        None => Default::default(),
                    };
                    if let Some(c) = claim.as_mut() {
                        ws.release(c, keep);
                    }
                    out
                })
                .await
                .unwrap_or_default()
            };
            let artifacts_digest = if reuse_wanted {
                let dir = ws.artifacts_dir(&slug);
                tokio::task::spawn_blocking(move || crate::reuse::artifacts_digest(&dir))
                    .await
                    .ok()
            } else {
                None
            };
            // A successful run of a job that opts in is what later runs may reuse.
            if outcome.succeeded()
                && let Some((d, Some(inputs))) = &reuse
            {
                let rec = crate::reuse::Record {
                    digest: d.digest.clone(),
                    inputs: inputs.clone(),
                    pipeline_id: ws.pipeline_id,
                    artifacts: artifacts_digest
                        .as_deref()
                        .filter(|a| *a != "none")
                        .map(|_| ws.artifacts_dir(&slug)),
                    artifacts_digest: artifacts_digest.clone().unwrap_or_else(|| "none".into()),
                    dotenv: dotenv.clone(),
                };
                if let Err(e) = ws.reuse.save(&spec_name, &rec) {
                    log.system(&format!("WARNING: cannot record the run for reuse: {e}"))
                        .await;
                }
            }
            outcome.scan_gate = !outcome.succeeded() && scratch_dir.join("scan_gate").exists();
            let children = crate::event::read_child_jobs(&scratch_dir.join("child.json"));
            if outcome.failure_reason() == Some(FailureReason::OomKilled) {
                let msg = oom_message(j_memory, &outcome);
                log.system(&format!("{}: {msg}", spec_name)).await;
            }
            for n in notes {
                log.system(&n).await;
            }
            let _ = tx.send(Msg::Finished(Box::new(Finished {
                id,
                attempt,
                outcome,
                started_at,
                started,
                dotenv,
                setup_ms,
                children,
                artifacts_digest,
                reuse: reuse.map(|(d, _)| d),
            })));
        });
    }

    /// The shared budget granted a job room: start it, unless it is no longer waiting.
    fn granted(&mut self, id: usize) {
        if id < self.state.len() && matches!(self.state[id], State::Ready { .. }) && !self.canceled
        {
            self.start(id);
        } else if let Some(lease) = &self.lease {
            lease.send(crate::lease::ToBroker::Release { job: id });
        }
    }

    /// The shared budget can never hold this job.
    fn refused(&mut self, id: usize, reason: String) {
        if id >= self.state.len() || !matches!(self.state[id], State::Ready { .. }) {
            return;
        }
        let mut r = self.record(id, JobStatus::Failed, Some(reason));
        r.failure_reason = Some(FailureReason::RunnerError);
        self.done(id, r);
    }

    fn finish(&mut self, mut f: Finished) {
        let id = f.id;
        match &self.lease {
            Some(lease) => lease.send(crate::lease::ToBroker::Release { job: id }),
            None => self
                .admission
                .give_back(self.request(id), self.job(id).job.resource_group.as_deref()),
        }
        let j = self.job(id);
        let reason = f.outcome.failure_reason();
        // Retry as GitLab does: up to `max` more attempts, for the listed failure kinds.
        if let (Some(reason), Some(retry)) = (reason, &j.job.retry)
            && reason != FailureReason::Canceled
            && !self.canceled
            && f.attempt <= retry.max
            && reason.retry_matches(&retry.when)
            && (retry.exit_codes.is_empty()
                || f.outcome
                    .exit_code
                    .is_some_and(|c| retry.exit_codes.contains(&c)))
        {
            let _ = self.events.send(Event::JobRetrying {
                id,
                attempt: f.attempt + 1,
                reason,
            });
            self.state[id] = State::Ready { overtaken: 0 };
            return;
        }
        // Killed at a learned limit (its runs so far needed less): once, with twice its peak
        // (within the budget), as GitLab retries, and the learned value rises with the peak.
        if reason == Some(FailureReason::OomKilled)
            && matches!(j.memory_source, rave_plan::RequestSource::Learned { .. })
            && self.memory_raised[id].is_none()
            && !self.canceled
        {
            let peak = f.outcome.peak_memory_bytes.unwrap_or(j.memory_bytes);
            let raised = (peak.max(j.memory_bytes) * 2).min(self.cfg.budget.memory_bytes);
            if raised > j.memory_bytes {
                self.memory_raised[id] = Some(raised);
                let _ = self.events.send(Event::JobRetrying {
                    id,
                    attempt: f.attempt + 1,
                    reason: FailureReason::OomKilled,
                });
                self.state[id] = State::Ready { overtaken: 0 };
                return;
            }
        }
        let status = match reason {
            None => JobStatus::Success,
            Some(FailureReason::Canceled) => JobStatus::Canceled,
            Some(_) if j.allow_failure.allows(f.outcome.exit_code) => JobStatus::Warning,
            Some(_) => JobStatus::Failed,
        };
        let note = match reason {
            Some(FailureReason::OomKilled) => {
                Some(oom_message(self.memory(id), &f.outcome))
            }
            Some(FailureReason::Timeout) => Some(format!(
                "exceeded its timeout of {}",
                humantime::format_duration(j.job.timeout.unwrap_or(self.cfg.default_timeout))
            )),
            Some(FailureReason::RunnerError) => f.outcome.runner_error.clone(),
            Some(FailureReason::ScriptFailure) => match (f.outcome.exit_code, f.outcome.signal) {
                (Some(c), _) => Some(format!("script exited with code {c}")),
                // SIGKILL with no OOM kill recorded, by the job's cgroup or the host: someone
                // (or something) killed it from outside.
                (None, Some(9)) => Some(
                    "script killed by SIGKILL from outside the job (no OOM kill was recorded, neither at its limit nor by the host)".into(),
                ),
                (None, Some(s)) => Some(format!("script killed by signal {s}")),
                _ => None,
            },
            _ => None,
        };
        if status == JobStatus::Success || status == JobStatus::Warning {
            self.dotenv[id] = f.dotenv;
        }
        let finished_at = SystemTime::now();
        let mut record = self.record(id, status, note);
        record.children = std::mem::take(&mut f.children);
        record.failure_reason = reason;
        record.exit_code = f.outcome.exit_code;
        record.started_at = Some(f.started_at);
        record.finished_at = Some(finished_at);
        record.duration_ms = Some(f.started.elapsed().as_millis() as u64);
        record.peak_memory_bytes = f.outcome.peak_memory_bytes;
        record.setup_ms = f.setup_ms;
        self.artifacts_digest[id] = f.artifacts_digest.take();
        if let Some(d) = f.reuse.take() {
            if let Some(p) = d.reused_from {
                record.reused_from = Some(p);
                record.note = Some(format!("reused: inputs unchanged since pipeline {p}"));
            }
            record.reuse = Some(d);
        }
        self.done(id, record);
    }

    fn cancel_pending(&mut self) {
        self.canceled = true;
        if let Some(lease) = &self.lease {
            lease.send(crate::lease::ToBroker::Want { jobs: Vec::new() });
            self.wanted.clear();
        }
        for id in 0..self.state.len() {
            if matches!(
                self.state[id],
                State::Waiting | State::Ready { .. } | State::Delayed
            ) {
                let r = self.record(
                    id,
                    JobStatus::Canceled,
                    Some("the pipeline was canceled".into()),
                );
                self.done(id, r);
            }
        }
    }
}

/// The message for an OOM kill, in the log and the summary: whose limit was hit, the peak,
/// and the job's biggest process at the last sample.
pub fn oom_message(limit: u64, o: &ExecOutcome) -> String {
    let peak = o
        .peak_memory_bytes
        .map_or("unknown".to_string(), format_memory);
    // A sample taken before the job grew (it died within half a second) would name the
    // wrong process: only one that held a good part of the peak is named.
    let largest = o
        .largest_process
        .as_ref()
        .filter(|(_, rss)| {
            o.peak_memory_bytes
                .is_none_or(|p| rss.saturating_mul(4) >= p)
        })
        .map(|(comm, rss)| format!("; largest process: {comm} {}", format_memory(*rss)))
        .unwrap_or_default();
    if o.host_oom_kill && !o.oom_killed {
        return format!(
            "killed by the host's OOM killer: the machine ran out of memory, not the job's limit of {} (peak {peak}{largest}); lower the memory budget to what the host can give",
            format_memory(limit)
        );
    }
    format!(
        "killed: exceeded its memory limit of {} (peak {peak}{largest}); raise RAVE_MEMORY or lower its parallelism",
        format_memory(limit)
    )
}

/// After a job: save its artifacts and read its dotenv report. Returns the dotenv variables
/// and lines for the job log.
fn save_outputs(
    ws: &Workspace,
    j: &JobInstance,
    slug: &str,
    workdir: &Path,
    outcome: &ExecOutcome,
) -> (HashMap<String, String>, Vec<String>) {
    let mut notes = Vec::new();
    let mut dotenv = HashMap::new();
    if let Some(a) = &j.job.artifacts {
        let ok = outcome.succeeded();
        let wanted = match a.when {
            ArtifactsWhen::OnSuccess => ok,
            ArtifactsWhen::OnFailure => !ok,
            ArtifactsWhen::Always => true,
        };
        if wanted && workdir.is_dir() {
            let project_dir = workdir.to_string_lossy().to_string();
            let expand = |p: &String| {
                rave_model::vars::expand(p, &|k| {
                    if k == "CI_PROJECT_DIR" {
                        Some(project_dir.clone())
                    } else {
                        j.variables.get(k).cloned()
                    }
                })
            };
            let mut paths: Vec<String> = a.paths.iter().map(expand).collect();
            paths.extend(a.reports.junit.iter().map(expand));
            paths.extend(a.reports.dotenv.iter().map(expand));
            for (_, files) in &a.reports.other {
                paths.extend(files.iter().map(expand));
            }
            let exclude: Vec<String> = a.exclude.iter().map(expand).collect();
            let c =
                workspace::collect_artifacts(workdir, &paths, &exclude, &ws.artifacts_dir(slug));
            for w in c.warnings {
                notes.push(format!("WARNING: {w}"));
            }
            notes.push(format!(
                "Saved {} artifact file(s), {}",
                c.files,
                format_memory(c.bytes)
            ));
            if c.files > 0 {
                ingest_artifacts(ws, a, slug, &mut notes);
            }
            if ok {
                for f in &a.reports.dotenv {
                    match workspace::read_dotenv(&workdir.join(expand(f))) {
                        Ok(v) => dotenv.extend(v),
                        Err(e) => notes.push(format!("WARNING: {e}")),
                    }
                }
            }
        }
    }
    (dotenv, notes)
}

/// Keep a job's saved artifacts in the store (content-addressed, with their expiry).
fn ingest_artifacts(
    ws: &Workspace,
    a: &rave_model::Artifacts,
    slug: &str,
    notes: &mut Vec<String>,
) {
    let Some(store) = &ws.store else { return };
    let now = rave_store::now_secs();
    let expire = |path: &str| {
        let secs = match a.expire_in {
            Some(d) => d.as_secs(),
            None => rave_store::default_expiry_days(path) * 86_400,
        };
        Some(now + secs)
    };
    let stored = store.ingest_dir(
        &ws.pipeline_id.to_string(),
        slug,
        &ws.artifacts_dir(slug),
        &expire,
    );
    if let Err(e) = stored {
        notes.push(format!("WARNING: artifacts not kept in the store: {e}"));
    }
}

/// What a reused job hands on: its dotenv, its artifacts' digest, lines for its log.
type Reused = (HashMap<String, String>, String, Vec<String>);

/// A reused job's outputs: the recorded run's artifacts (checked against their digest)
/// copied into this run, and its dotenv.
fn reuse_outputs(
    ws: &Workspace,
    j: &JobInstance,
    slug: &str,
    rec: &crate::reuse::Record,
) -> Result<Reused, String> {
    let mut notes = Vec::new();
    if let Some(src) = &rec.artifacts {
        let now = crate::reuse::artifacts_digest(src);
        if now != rec.artifacts_digest {
            return Err(format!(
                "the artifacts of pipeline {} changed on disk since",
                rec.pipeline_id
            ));
        }
        let dest = ws.artifacts_dir(slug);
        std::fs::create_dir_all(&dest)
            .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
        workspace::copy_dir(src, &dest, true).map_err(|e| {
            format!(
                "cannot copy the artifacts of pipeline {}: {e}",
                rec.pipeline_id
            )
        })?;
        notes.push(format!(
            "Artifacts taken from pipeline {} ({})",
            rec.pipeline_id,
            src.display()
        ));
        if let Some(a) = &j.job.artifacts {
            ingest_artifacts(ws, a, slug, &mut notes);
        }
    }
    Ok((rec.dotenv.clone(), rec.artifacts_digest.clone(), notes))
}

fn service_spec(s: &rave_model::pipeline::Service) -> crate::executor::ServiceSpec {
    let mut aliases = crate::executor::ServiceSpec::derived_aliases(&s.name);
    // GitLab accepts several aliases in one `alias:`, separated by commas or spaces.
    for a in s
        .alias
        .iter()
        .flat_map(|a| a.split([',', ' ']))
        .filter(|a| !a.is_empty())
    {
        if !aliases.iter().any(|x| x == a) {
            aliases.push(a.to_string());
        }
    }
    crate::executor::ServiceSpec {
        image: s.name.clone(),
        aliases,
        entrypoint: s.entrypoint.clone(),
        command: s.command.clone(),
        variables: s
            .variables
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect(),
        pull_policy: s.pull_policy.first().cloned(),
    }
}
