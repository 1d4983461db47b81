//! A fake executor and the scheduler's decisions checked against it: which jobs start, in
//! what order, under what budget, and how each ends. The jobs do nothing but wait and return
//! the outcome their script names, so these tests are about the scheduler alone; the real
//! executors are tested end to end elsewhere.
//!
//! A job's script is read as `<milliseconds> <outcome>[; <outcome of the next attempt> …]`,
//! outcome one of `ok`, `exit N`, `oom`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::executor::{Cancel, Executor, JobSpec, LogSink};
use crate::outcome::ExecOutcome;
use crate::scheduler::{self, HostEnv, Resume, RunConfig, RunResult};
use crate::workspace::Workspace;
use crate::{Event, JobRecord};

#[derive(Default)]
pub struct Fake {
    attempts: Mutex<HashMap<String, usize>>,
}

impl Executor for Fake {
    async fn run(&self, spec: JobSpec, _log: LogSink, cancel: Cancel) -> ExecOutcome {
        let line = spec.script.join(" ");
        let (ms, outcomes) = line.split_once(' ').unwrap_or((&line, "ok"));
        let attempt = {
            let mut a = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            let n = a.entry(spec.name.clone()).or_default();
            *n += 1;
            *n
        };
        let outcomes: Vec<&str> = outcomes.split(';').map(str::trim).collect();
        let outcome = outcomes
            .get(attempt - 1)
            .or(outcomes.last())
            .copied()
            .unwrap_or("ok");
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = cancel.graceful.cancelled() => {
                return ExecOutcome { canceled: true, ..ExecOutcome::default() };
            }
        }
        match outcome.split_once(' ') {
            Some(("exit", code)) => ExecOutcome {
                exit_code: code.parse().ok(),
                ..ExecOutcome::default()
            },
            _ if outcome == "oom" => ExecOutcome {
                oom_killed: true,
                signal: Some(9),
                peak_memory_bytes: Some(spec.memory_bytes),
                ..ExecOutcome::default()
            },
            _ => ExecOutcome {
                exit_code: Some(0),
                ..ExecOutcome::default()
            },
        }
    }
}

/// Plan `yaml` (every job's memory and CPUs as it says) and run it under `memory` MiB,
/// `cpus`, `jobs` slots; returns the trace (`start job`, `end job status`, in order) and the
/// result.
pub async fn trace(
    yaml: &str,
    budget: (u64, f64, u32),
    learned: HashMap<String, (u64, usize)>,
    resume: Option<Resume>,
    dir: &Path,
) -> (Vec<String>, RunResult) {
    let loaded = rave_model::load_str(yaml);
    let errors: Vec<String> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.message.clone())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let pipeline = loaded.pipeline.expect("a pipeline");
    let mut budget_ = rave_model::Budget::SAFE;
    budget_.memory_bytes = budget.0 << 20;
    budget_.cpus = budget.1;
    budget_.jobs = budget.2;
    let opts = rave_plan::PlanOptions {
        budget: budget_,
        learned,
        ..rave_plan::PlanOptions::default()
    };
    let (plan, diags) = rave_plan::plan(&pipeline, &rave_plan::Trigger::default(), &opts);
    let plan = plan.unwrap_or_else(|| panic!("no plan: {diags:?}"));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let mut ws = Workspace::new(
        dir.join("src"),
        Vec::new(),
        dir.join("run"),
        &dir.join("state"),
        Box::new(crate::builds::NoIgnores),
    );
    ws.snapshot().unwrap();
    let cfg = RunConfig {
        budget: plan.budget,
        selected: resume.as_ref().map(|r| {
            r.carried
                .iter()
                .enumerate()
                .map(|(i, _)| i)
                .collect::<std::collections::HashSet<_>>()
        }),
        pipeline_id: 1,
        default_timeout: Duration::from_secs(60),
        after_script_timeout: Duration::from_secs(5),
        env: Vec::new(),
        host_env: HostEnv::Only(Vec::new()),
        keep_workdirs: false,
        lease: None,
        resume,
        trace: None,
    };
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (log_tx, mut log_rx) = mpsc::channel(256);
    let drain = tokio::spawn(async move { while log_rx.recv().await.is_some() {} });
    let names: Vec<String> = plan.jobs.iter().map(|j| j.name.clone()).collect();
    let result = scheduler::run(
        &plan,
        Arc::new(Fake::default()),
        Arc::new(ws),
        cfg,
        ev_tx,
        log_tx,
        Cancel::default(),
    )
    .await;
    drain.abort();
    let mut out = Vec::new();
    while let Ok(e) = ev_rx.try_recv() {
        out.push(match e {
            Event::JobStarted { id, attempt, .. } if attempt > 1 => {
                format!("start {} (attempt {attempt})", names[id])
            }
            Event::JobStarted { id, .. } => format!("start {}", names[id]),
            Event::JobRetrying { id, reason, .. } => {
                format!("retry {} after {}", names[id], reason.as_str())
            }
            Event::JobFinished { id, record } => end(&names[id], &record),
        });
    }
    (out, result)
}

fn end(name: &str, r: &JobRecord) -> String {
    let mut s = format!("end {name} {}", r.status.as_str());
    if let Some(f) = r.failure_reason {
        s.push_str(&format!(" ({})", f.as_str()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::JobStatus;
    use crate::scheduler::PipelineStatus;

    async fn run(yaml: &str, budget: (u64, f64, u32)) -> (Vec<String>, RunResult) {
        let d = tempfile::tempdir().unwrap();
        trace(yaml, budget, HashMap::new(), None, d.path()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admits_by_memory_and_lets_small_jobs_pass() {
        // 1 GiB: a (600M) and b (600M) cannot run together; c (300M) fits beside a.
        let (t, r) = run(
            "a: {variables: {RAVE_MEMORY: 600M}, script: [300 ok]}\n\
             b: {variables: {RAVE_MEMORY: 600M}, script: [100 ok]}\n\
             c: {variables: {RAVE_MEMORY: 300M}, script: [100 ok]}\n",
            (1024, 4.0, 4),
        )
        .await;
        assert_eq!(
            t,
            [
                "start a",
                "start c",
                "end c success",
                "end a success",
                "start b",
                "end b success"
            ],
            "{t:#?}"
        );
        assert_eq!(r.status, PipelineStatus::Success);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_skips_what_follows_and_runs_on_failure_jobs() {
        let (t, r) = run(
            "stages: [build, test, cleanup]\n\
             build: {stage: build, script: [50 exit 2]}\n\
             test: {stage: test, script: [50 ok]}\n\
             lint: {stage: test, allow_failure: true, needs: [], script: [50 exit 1]}\n\
             report: {stage: cleanup, when: on_failure, script: [50 ok]}\n",
            (4096, 4.0, 1),
        )
        .await;
        assert_eq!(
            t,
            [
                "start build",
                "end build failed (script_failure)",
                "end test skipped",
                "start lint",
                "end lint warning (script_failure)",
                "start report",
                "end report success"
            ],
            "{t:#?}"
        );
        assert_eq!(r.status, PipelineStatus::Failed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_as_gitlab_says_and_a_manual_job_blocks_later_stages() {
        let (t, r) = run(
            "stages: [test, deploy, verify]\n\
             flaky: {stage: test, retry: 2, script: [20 exit 1; exit 1; ok]}\n\
             deploy: {stage: deploy, when: manual, allow_failure: false, script: [20 ok]}\n\
             verify: {stage: verify, script: [20 ok]}\n",
            (4096, 4.0, 2),
        )
        .await;
        assert_eq!(
            t,
            [
                "start flaky",
                "retry flaky after script_failure",
                "start flaky (attempt 2)",
                "retry flaky after script_failure",
                "start flaky (attempt 3)",
                "end flaky success",
                "end deploy manual",
                "end verify skipped"
            ],
            "{t:#?}"
        );
        assert_eq!(r.status, PipelineStatus::Manual);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_run_carries_results_and_reruns_what_was_skipped() {
        let yaml = "stages: [build, test, deploy]\n\
             build: {stage: build, script: [20 ok]}\n\
             test: {stage: test, script: [20 ok]}\n\
             deploy: {stage: deploy, script: [20 ok]}\n";
        let d = tempfile::tempdir().unwrap();
        let record = |name: &str, stage: &str, status| JobRecord::new(name, stage, status);
        // build passed, test failed, deploy was skipped: retry test.
        let resume = Resume {
            carried: vec![
                Some((record("build", "build", JobStatus::Success), HashMap::new())),
                None,
                None,
            ],
            named: [1].into_iter().collect(),
            attempts: vec![0, 1, 0],
        };
        let (t, r) = trace(yaml, (4096, 4.0, 2), HashMap::new(), Some(resume), d.path()).await;
        assert_eq!(
            t,
            [
                "start test (attempt 2)",
                "end test success",
                "start deploy",
                "end deploy success"
            ],
            "{t:#?}"
        );
        assert_eq!(r.status, PipelineStatus::Success);
        assert_eq!(
            r.records[0].as_ref().map(|r| r.status),
            Some(JobStatus::Success)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oom_kill_at_a_learned_limit_retries_once_with_more() {
        let d = tempfile::tempdir().unwrap();
        // Earlier runs peaked at 40 MiB; this time the job needs more and is killed there.
        let learned = [("big".to_string(), (40u64 << 20, 3usize))].into();
        let (t, r) = trace(
            "big: {script: [20 oom; ok]}\nfixed: {variables: {RAVE_MEMORY: 64M}, script: [20 oom; ok]}\n",
            (4096, 4.0, 1),
            learned,
            None,
            d.path(),
        )
        .await;
        assert_eq!(
            t,
            [
                "start big",
                "retry big after oom_killed",
                "start big (attempt 2)",
                "end big success",
                "start fixed",
                "end fixed failed (oom_killed)"
            ],
            "{t:#?}"
        );
        let big = r.records[0].as_ref().unwrap();
        assert_eq!(big.memory_limit_bytes, 80 << 20, "twice the peak");
        assert_eq!(r.status, PipelineStatus::Failed);
    }
}
