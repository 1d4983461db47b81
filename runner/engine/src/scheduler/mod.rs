//! The scheduler: owns the DAG state and the budget, decides what runs next, and turns each
//! executor outcome into a job result.
//!
//! It is event-driven: it sleeps until a job ends, a delayed job's timer fires, or the run is
//! cancelled; then it settles every job whose dependencies are done (run, skip, or hold as
//! manual), admits what fits (see [`crate::admission`]), and sleeps again. Each running job
//! is a task of its own (prepare the working copy → execute → save artifacts) that reports
//! back over a channel; the scheduler never waits on a job directly.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rave_model::units::format_memory;
use rave_model::{Budget, When};
use rave_plan::{JobInstance, Plan};
use tokio::sync::mpsc;

use crate::admission::{Admission, Candidate, Request};
use crate::builds::{CleanFlags, GitStrategy};
use crate::event::{Event, JobRecord};
use crate::executor::{Cancel, Executor, JobSpec, LogChunk, LogSink};
use crate::outcome::{ExecOutcome, FailureReason, JobStatus};
use crate::workspace::{self, Workspace};

mod env;
mod task;

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
    /// The pipeline's trace: each job gets its `TRACEPARENT`.
    pub trace: Option<crate::trace::JobTrace>,
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

/// Everything the scheduler knows of one job instance.
struct JobState {
    phase: State,
    /// The jobs it waits for, among those taking part.
    deps: Vec<usize>,
    /// How it ended (None until then, or when it does not take part).
    record: Option<JobRecord>,
    /// A failed (not allowed) or canceled job at or above this one.
    upstream_failed: bool,
    /// The blocking manual job it waits for, directly or through the jobs it waits for.
    blocked: Option<usize>,
    attempts: u32,
    /// Its dotenv report, for the jobs that get its artifacts.
    dotenv: HashMap<String, String>,
    /// The digest of the artifacts it saved (an input of the jobs that opt into reuse).
    artifacts_digest: Option<String>,
    /// A limit raised after an OOM kill at a learned request.
    memory_raised: Option<u64>,
    /// Stops this job alone (a cancel of one job); a child of the run's own cancel.
    stop: Option<tokio_util::sync::CancellationToken>,
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
    /// Per plan instance, by its index.
    jobs: Vec<JobState>,
    /// Some job opts into reuse (`RAVE_REUSE`): artifact digests are worth computing.
    reuse_wanted: bool,
    admission: Admission,
    /// The shared budget's lease, and the ready set it was last told.
    lease: Option<Arc<crate::lease::Client>>,
    wanted: Vec<crate::lease::Wanted>,
    /// Jobs retried or played in a resumed run: started even when manual.
    named: HashSet<usize>,
    /// `trigger: project` jobs waiting for the server: (started, started at, depend, project).
    downstream: HashMap<usize, (Instant, SystemTime, bool, String)>,
    /// What a downstream job's record says (the pipeline it started).
    downstream_notes: HashMap<usize, String>,
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
    let jobs = (0..n)
        .map(|i| JobState {
            phase: if active[i] {
                State::Waiting
            } else {
                State::Inactive
            },
            deps: effective_deps(plan, &active, i),
            record: None,
            upstream_failed: false,
            blocked: None,
            attempts: 0,
            dotenv: HashMap::new(),
            artifacts_digest: None,
            memory_raised: None,
            stop: None,
        })
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut r = Run {
        plan,
        exec,
        ws,
        admission: Admission::new(cfg.budget),
        lease: cfg.lease.clone(),
        wanted: Vec::new(),
        named: HashSet::new(),
        downstream: HashMap::new(),
        downstream_notes: HashMap::new(),
        cfg,
        events,
        logs,
        cancel,
        tx,
        jobs,
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
        if r.jobs
            .iter()
            .all(|j| matches!(j.phase, State::Done | State::Inactive))
        {
            break;
        }
        let graceful = r.cancel.graceful.clone();
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Finished(f)) => r.finish(*f),
                Some(Msg::DelayOver(id)) => {
                    if matches!(r.jobs[id].phase, State::Delayed) {
                        r.jobs[id].phase = State::Ready { overtaken: 0 };
                    }
                }
                None => break,
            },
            _ = graceful.cancelled(), if !r.canceled => r.cancel_pending(),
            m = async { grants.as_mut()?.recv().await }, if grants.is_some() => match m {
                Some(crate::lease::FromBroker::Grant { job }) => r.granted(job),
                Some(crate::lease::FromBroker::Refuse { job, reason }) => r.refused(job, reason),
                Some(crate::lease::FromBroker::Cancel { job }) => r.cancel_job(job),
                Some(crate::lease::FromBroker::Triggered { job, pipeline, error }) => {
                    r.triggered(job, pipeline, error)
                }
                Some(crate::lease::FromBroker::Downstream { job, pipeline, status }) => {
                    r.downstream_ended(job, pipeline, &status)
                }
                None => {
                    grants = None;
                    eprintln!("rave: the server's budget went away; the pipeline is canceled");
                    r.cancel_pending();
                }
            },
        }
    }
    let blocked = r.jobs.iter().any(|j| j.blocked.is_some())
        || r.jobs
            .iter()
            .map(|j| &j.record)
            .enumerate()
            .any(|(id, rec)| {
                rec.as_ref()
                    .is_some_and(|rec| rec.status == JobStatus::Manual)
                    && !plan.jobs[id].allow_failure.is_allowed_at_all()
            });
    let records: Vec<Option<JobRecord>> = r.jobs.into_iter().map(|j| j.record).collect();
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
        self.jobs[id]
            .memory_raised
            .unwrap_or(self.job(id).memory_bytes)
    }

    fn record(&self, id: usize, status: JobStatus, note: Option<String>) -> JobRecord {
        let j = self.job(id);
        JobRecord {
            memory_limit_bytes: self.memory(id),
            memory_source: Some(match self.jobs[id].memory_raised {
                Some(_) => format!("{}, raised after an OOM kill", j.memory_source),
                None => j.memory_source.to_string(),
            }),
            cpus: j.cpus,
            attempts: self.jobs[id].attempts,
            note,
            ..JobRecord::new(j.name.clone(), j.stage.clone(), status)
        }
    }

    fn done(&mut self, id: usize, record: JobRecord) {
        let failed = matches!(record.status, JobStatus::Failed | JobStatus::Canceled);
        self.jobs[id].upstream_failed = self.jobs[id].upstream_failed || failed;
        self.jobs[id].phase = State::Done;
        self.jobs[id].record = Some(record.clone());
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
                && id < self.jobs.len()
                && !matches!(self.jobs[id].phase, State::Inactive)
            {
                self.jobs[id].upstream_failed =
                    matches!(record.status, JobStatus::Failed | JobStatus::Canceled);
                self.jobs[id].attempts = record.attempts;
                self.jobs[id].record = Some(record);
                self.jobs[id].dotenv = dotenv;
                self.jobs[id].phase = State::Done;
            }
        }
        for (id, n) in resume.attempts.into_iter().enumerate() {
            if id < self.jobs.len() && self.jobs[id].record.is_none() {
                self.jobs[id].attempts = n;
            }
        }
        // Failures and blocks flow down through carried jobs (any order of definition).
        let mut changed = true;
        while changed {
            changed = false;
            for id in 0..self.jobs.len() {
                let Some(status) = self.jobs[id].record.as_ref().map(|r| r.status) else {
                    continue;
                };
                let failed = self.jobs[id]
                    .deps
                    .iter()
                    .any(|&d| self.jobs[d].upstream_failed);
                if failed && !self.jobs[id].upstream_failed {
                    self.jobs[id].upstream_failed = true;
                    changed = true;
                }
                if status == JobStatus::Skipped && self.jobs[id].blocked.is_none() {
                    let b = self.blocked_by(id);
                    if b.is_some() {
                        self.jobs[id].blocked = b;
                        changed = true;
                    }
                }
            }
        }
        self.named = resume.named;
    }

    /// The manual job `id` waits for, if any. A manual job nobody started blocks its
    /// dependents unless it may fail (a job that `needs` it waits either way), and what waits
    /// for a blocked job is blocked too: in GitLab every later stage waits until the manual
    /// job is played.
    fn blocked_by(&self, id: usize) -> Option<usize> {
        let j = self.job(id);
        self.jobs[id]
            .deps
            .iter()
            .copied()
            .find(|&d| {
                self.jobs[d]
                    .record
                    .as_ref()
                    .is_some_and(|r| r.status == JobStatus::Manual)
                    && (j.uses_needs || !self.job(d).allow_failure.is_allowed_at_all())
            })
            .or_else(|| {
                self.jobs[id]
                    .deps
                    .iter()
                    .find_map(|&d| self.jobs[d].blocked)
            })
    }

    /// Decide every waiting job whose dependencies are all done.
    fn settle(&mut self) {
        let mut progress = true;
        while progress {
            progress = false;
            for id in 0..self.jobs.len() {
                if !matches!(self.jobs[id].phase, State::Waiting) {
                    continue;
                }
                if !self.jobs[id]
                    .deps
                    .iter()
                    .all(|&d| matches!(self.jobs[d].phase, State::Done))
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
        let upstream_failed = self.jobs[id]
            .deps
            .iter()
            .any(|&d| self.jobs[d].upstream_failed);
        self.jobs[id].upstream_failed = upstream_failed;
        let blocked_by = self.blocked_by(id);
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
            self.jobs[id].blocked = Some(b);
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
                self.jobs[id].phase = State::Delayed;
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = tx.send(Msg::DelayOver(id));
                });
            }
            _ => self.jobs[id].phase = State::Ready { overtaken: 0 },
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
            .jobs
            .iter()
            .enumerate()
            .filter_map(|(id, s)| match &s.phase {
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
            if let State::Ready { overtaken } = &mut self.jobs[c.id].phase {
                *overtaken = c.overtaken;
            }
        }
        for i in started {
            self.start(ready[i].id);
        }
    }

    fn job_env(&self, id: usize, workdir: &std::path::Path) -> Vec<(String, String)> {
        let j = self.job(id);
        env::job_env(
            &env::EnvInput {
                plan: self.plan,
                job: j,
                cfg: &self.cfg,
                ws: &self.ws,
                upstream_dotenv: j
                    .artifacts_from
                    .iter()
                    .map(|&a| &self.jobs[a].dotenv)
                    .collect(),
                memory: self.memory(id),
                attempt: self.jobs[id].attempts,
            },
            workdir,
        )
    }

    /// A `trigger: project` job: the server starts the downstream pipeline; the job holds no
    /// budget while it waits (a bridge job, as GitLab calls it, runs nothing itself).
    fn start_downstream(&mut self, id: usize, d: rave_model::child::Downstream, depend: bool) {
        self.jobs[id].attempts += 1;
        self.jobs[id].phase = State::Running;
        let attempt = self.jobs[id].attempts;
        let _ = self.events.send(Event::JobStarted {
            id,
            attempt,
            memory_bytes: 0,
            cpus: 0.0,
        });
        self.downstream.insert(
            id,
            (Instant::now(), SystemTime::now(), depend, d.project.clone()),
        );
        let Some(lease) = self.lease.clone() else {
            let why = format!(
                "job `{}` triggers a pipeline of project `{}`: multi-project pipelines run on `rave serve`, where that project is configured; this run has no server",
                self.job(id).name,
                d.project
            );
            self.downstream_done(
                id,
                ExecOutcome {
                    runner_error: Some(why),
                    ..ExecOutcome::default()
                },
            );
            return;
        };
        let j = self.job(id);
        // GitLab forwards the trigger job's YAML variables (its own and the global ones).
        let variables = if d.forward_yaml {
            j.variables
                .iter()
                .filter(|(k, _)| {
                    j.job.variables.0.contains_key(*k) || self.plan.global_variables.contains(k)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            Vec::new()
        };
        lease.send(crate::lease::ToBroker::Trigger {
            job: id,
            project: d.project,
            branch: d.branch,
            variables,
            depend,
        });
        lease.send(crate::lease::ToBroker::Release { job: id });
    }

    fn downstream_done(&mut self, id: usize, outcome: ExecOutcome) {
        let Some((started, started_at, _, _)) = self.downstream.remove(&id) else {
            return;
        };
        let attempt = self.jobs[id].attempts;
        let _ = self.tx.send(Msg::Finished(Box::new(Finished {
            id,
            attempt,
            outcome,
            started_at,
            started,
            dotenv: HashMap::new(),
            setup_ms: None,
            children: Vec::new(),
            artifacts_digest: None,
            reuse: None,
        })));
    }

    fn triggered(&mut self, id: usize, pipeline: Option<i64>, error: Option<String>) {
        let Some(&(_, _, depend, ref project)) = self.downstream.get(&id) else {
            return;
        };
        let project = project.clone();
        match (pipeline, error) {
            (Some(p), None) => {
                self.downstream_notes
                    .insert(id, format!("downstream pipeline #{p} of {project}"));
                if !depend {
                    // Not awaited, as in GitLab: the job succeeds once the pipeline exists.
                    self.downstream_done(
                        id,
                        ExecOutcome {
                            exit_code: Some(0),
                            ..ExecOutcome::default()
                        },
                    );
                }
            }
            (_, e) => self.downstream_done(
                id,
                ExecOutcome {
                    runner_error: Some(
                        e.unwrap_or_else(|| "the downstream pipeline could not be created".into()),
                    ),
                    ..ExecOutcome::default()
                },
            ),
        }
    }

    fn downstream_ended(&mut self, id: usize, pipeline: i64, status: &str) {
        let project = match self.downstream.get(&id) {
            Some((_, _, _, p)) => p.clone(),
            None => return,
        };
        let outcome = if status == "success" {
            ExecOutcome {
                exit_code: Some(0),
                ..ExecOutcome::default()
            }
        } else {
            ExecOutcome {
                downstream_failed: Some(format!(
                    "downstream pipeline #{pipeline} of {project} ended {status}"
                )),
                ..ExecOutcome::default()
            }
        };
        self.downstream_done(id, outcome);
    }

    fn start(&mut self, id: usize) {
        if let Some(t) = &self.job(id).job.trigger
            && let Some(d) = &t.project
        {
            let (d, depend) = (d.clone(), t.depend);
            return self.start_downstream(id, d, depend);
        }
        self.jobs[id].attempts += 1;
        let attempt = self.jobs[id].attempts;
        self.jobs[id].phase = State::Running;
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
            cpus: j.cpu_limit.max(j.cpus),
            image: j.job.image.as_ref().map(|i| i.name.clone()),
            pull_policy: j
                .job
                .image
                .as_ref()
                .and_then(|i| i.pull_policy.first().cloned()),
            entrypoint: j.job.image.as_ref().and_then(|i| i.entrypoint.clone()),
            services: j.job.services.iter().map(task::service_spec).collect(),
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
                    self.jobs[a]
                        .artifacts_digest
                        .clone()
                        .unwrap_or_else(|| "none".into()),
                )
            })
            .collect();
        let task = task::JobTask {
            id,
            attempt,
            job: j,
            slug,
            deps,
            claim,
            git,
            git_vars,
            scratch_dir,
            caches,
            cache_notes,
            spec,
            refused,
            reuse_mode,
            dep_artifacts,
            reuse_wanted: self.reuse_wanted,
            exec: self.exec.clone(),
            ws: self.ws.clone(),
            log: LogSink::new(id, self.logs.clone()),
            cancel: {
                // This job's own stop, under the run's: a cancel of the job or of the run.
                let c = Cancel {
                    graceful: self.cancel.graceful.child_token(),
                    force: self.cancel.force.child_token(),
                };
                self.jobs[id].stop = Some(c.graceful.clone());
                c
            },
            tx: self.tx.clone(),
            keep: self.cfg.keep_workdirs,
            memory: self.memory(id),
        };
        tokio::spawn(task.run());
    }

    /// The shared budget granted a job room: start it, unless it is no longer waiting.
    fn granted(&mut self, id: usize) {
        if id < self.jobs.len()
            && matches!(self.jobs[id].phase, State::Ready { .. })
            && !self.canceled
        {
            self.start(id);
        } else if let Some(lease) = &self.lease {
            lease.send(crate::lease::ToBroker::Release { job: id });
        }
    }

    /// Stop one job: a running one as with Ctrl-C (after_script runs), a waiting one at once;
    /// what needs it is then skipped, as in GitLab.
    fn cancel_job(&mut self, id: usize) {
        let Some(j) = self.jobs.get(id) else {
            return;
        };
        match j.phase {
            State::Running if self.downstream.contains_key(&id) => {
                self.downstream_done(
                    id,
                    ExecOutcome {
                        canceled: true,
                        ..ExecOutcome::default()
                    },
                );
            }
            State::Running => {
                if let Some(stop) = &j.stop {
                    stop.cancel();
                }
            }
            State::Waiting | State::Ready { .. } | State::Delayed => {
                let r = self.record(id, JobStatus::Canceled, Some("canceled".into()));
                self.done(id, r);
            }
            State::Done | State::Inactive => {}
        }
    }

    /// The shared budget can never hold this job.
    fn refused(&mut self, id: usize, reason: String) {
        if id >= self.jobs.len() || !matches!(self.jobs[id].phase, State::Ready { .. }) {
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
            self.jobs[id].phase = State::Ready { overtaken: 0 };
            return;
        }
        // Killed at a learned limit (its runs so far needed less): once, with twice its peak
        // (within the budget), as GitLab retries, and the learned value rises with the peak.
        if reason == Some(FailureReason::OomKilled)
            && matches!(j.memory_source, rave_plan::RequestSource::Learned { .. })
            && self.jobs[id].memory_raised.is_none()
            && !self.canceled
        {
            let peak = f.outcome.peak_memory_bytes.unwrap_or(j.memory_bytes);
            let raised = (peak.max(j.memory_bytes) * 2).min(self.cfg.budget.memory_bytes);
            if raised > j.memory_bytes {
                self.jobs[id].memory_raised = Some(raised);
                let _ = self.events.send(Event::JobRetrying {
                    id,
                    attempt: f.attempt + 1,
                    reason: FailureReason::OomKilled,
                });
                self.jobs[id].phase = State::Ready { overtaken: 0 };
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
            Some(FailureReason::DownstreamFailed) => f.outcome.downstream_failed.clone(),
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
            self.jobs[id].dotenv = f.dotenv;
        }
        let finished_at = SystemTime::now();
        let note = note.or_else(|| self.downstream_notes.remove(&id));
        let mut record = self.record(id, status, note);
        record.children = std::mem::take(&mut f.children);
        record.failure_reason = reason;
        record.exit_code = f.outcome.exit_code;
        record.started_at = Some(f.started_at);
        record.finished_at = Some(finished_at);
        record.duration_ms = Some(f.started.elapsed().as_millis() as u64);
        record.peak_memory_bytes = f.outcome.peak_memory_bytes;
        record.cpu_seconds = f.outcome.cpu_seconds;
        record.setup_ms = f.setup_ms;
        self.jobs[id].artifacts_digest = f.artifacts_digest.take();
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
        // Jobs waiting for a downstream pipeline end now (the downstream goes on, as in
        // GitLab when its upstream is canceled).
        let waiting: Vec<usize> = self.downstream.keys().copied().collect();
        for id in waiting {
            self.downstream_done(
                id,
                ExecOutcome {
                    canceled: true,
                    ..ExecOutcome::default()
                },
            );
        }
        if let Some(lease) = &self.lease {
            lease.send(crate::lease::ToBroker::Want { jobs: Vec::new() });
            self.wanted.clear();
        }
        for id in 0..self.jobs.len() {
            if matches!(
                self.jobs[id].phase,
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
