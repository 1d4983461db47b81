//! The run's event stream: the engine emits, subscribers (console, `--json`, store) read.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::outcome::{FailureReason, JobStatus};

/// The recorded result of one job instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub name: String,
    pub stage: String,
    pub status: JobStatus,
    pub failure_reason: Option<FailureReason>,
    pub exit_code: Option<i32>,
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time", default)]
    pub started_at: Option<SystemTime>,
    #[serde(serialize_with = "ser_time", deserialize_with = "de_time", default)]
    pub finished_at: Option<SystemTime>,
    pub duration_ms: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    /// Time spent preparing the job's working directory (snapshot → build dir, artifacts in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_ms: Option<u64>,
    pub memory_limit_bytes: u64,
    /// Where the memory request came from: `explicit`, `default`, `learned from N run(s)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_source: Option<String>,
    pub cpus: f64,
    /// CPU time the job used (its cgroup's accounting), in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    pub attempts: u32,
    /// Why a job was skipped, or a one-line explanation of its failure.
    pub note: Option<String>,
    /// The pipeline whose result this job reused instead of running (`RAVE_REUSE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<u64>,
    /// For a job that opts into reuse: its input digest, and why it was not reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse: Option<crate::reuse::Decision>,
    /// For a `trigger:` job: the jobs of the child pipeline it ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ChildJob>,
}

impl JobRecord {
    /// A job's record before anything is known of its run: no times, exit code or peak, one
    /// attempt (callers fill in what they know with `..JobRecord::new(..)`).
    pub fn new(name: impl Into<String>, stage: impl Into<String>, status: JobStatus) -> Self {
        JobRecord {
            name: name.into(),
            stage: stage.into(),
            status,
            failure_reason: None,
            exit_code: None,
            started_at: None,
            finished_at: None,
            duration_ms: None,
            peak_memory_bytes: None,
            setup_ms: None,
            memory_limit_bytes: 0,
            memory_source: None,
            cpus: 1.0,
            cpu_seconds: None,
            attempts: 1,
            note: None,
            reused_from: None,
            reuse: None,
            children: Vec::new(),
        }
    }
}

/// One line of `rave run --events FILE`: what `rave serve` (and any dashboard) follows.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEvent {
    /// The first line: the run's jobs and where their logs and artifacts go.
    Pipeline {
        id: u64,
        run_dir: std::path::PathBuf,
        jobs: Vec<EventJob>,
    },
    JobStarted {
        index: usize,
        attempt: u32,
        memory_limit_bytes: u64,
        cpus: f64,
        /// RFC 3339 with milliseconds.
        at: String,
    },
    JobRetrying {
        index: usize,
        attempt: u32,
        reason: FailureReason,
    },
    JobFinished {
        index: usize,
        record: Box<JobRecord>,
    },
    PipelineFinished {
        status: crate::scheduler::PipelineStatus,
        duration_ms: u64,
    },
}

/// A job as the run's first event lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventJob {
    pub index: usize,
    pub name: String,
    pub stage: String,
    /// Taking part in this run (else skipped: not named, or not needed by what was).
    pub selected: bool,
    /// Carried over, result and all, from the run this one goes on with (`--continue`).
    #[serde(default)]
    pub carried: bool,
    pub log: std::path::PathBuf,
    pub artifacts: std::path::PathBuf,
    /// Indices of the jobs it `needs:` (empty for a job ordered by stages).
    #[serde(default)]
    pub needs: Vec<usize>,
}

/// What `rave run --json` prints and keeps as `summary.json` in the run directory: read back
/// by `rave run --continue`, `rave history` and the server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub pipeline: PipelineSummary,
    pub jobs: Vec<JobRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PipelineSummary {
    pub id: u64,
    pub status: crate::scheduler::PipelineStatus,
    pub duration_ms: u64,
    #[serde(rename = "ref")]
    pub ref_name: String,
    pub sha: String,
    pub profile: String,
    pub budget: BudgetSummary,
    pub budget_utilisation: Option<f64>,
    /// The OpenTelemetry trace the run's spans went to (`--otlp-endpoint`, `TRACEPARENT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct BudgetSummary {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub jobs: u32,
}

impl RunSummary {
    pub fn read(path: &std::path::Path) -> Result<RunSummary, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A job of a child pipeline, as its own run reported it (`rave run --json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChildJob {
    pub name: String,
    pub stage: String,
    pub status: String,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

/// The jobs of a child pipeline from its `rave run --json` summary (empty when there is none).
pub fn read_child_jobs(path: &std::path::Path) -> Vec<ChildJob> {
    #[derive(Deserialize)]
    struct Summary {
        #[serde(default)]
        jobs: Vec<ChildJob>,
    }
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Summary>(&t).ok())
        .map(|s| s.jobs)
        .unwrap_or_default()
}

/// What `rave run --json` prints when no pipeline runs, so a script always reads one JSON
/// object: `{"pipeline": null, "reason": "...", "message": "..."}`.
#[derive(Clone, Debug, Serialize)]
pub struct NoPipeline {
    /// Always null: there is no pipeline.
    pub pipeline: Option<()>,
    pub reason: NoPipelineReason,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoPipelineReason {
    /// `workflow: rules` create no pipeline for this trigger.
    WorkflowRules,
    /// The pipeline file has errors (printed on stderr; `rave lint --json` lists them).
    InvalidPipeline,
}

fn ser_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339_millis(*t)),
        None => s.serialize_none(),
    }
}

fn de_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    match Option::<String>::deserialize(d)? {
        Some(s) => humantime::parse_rfc3339(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
        None => Ok(None),
    }
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Clone, Debug)]
pub enum Event {
    JobStarted {
        id: usize,
        attempt: u32,
        memory_bytes: u64,
        cpus: f64,
    },
    JobRetrying {
        id: usize,
        attempt: u32,
        reason: FailureReason,
    },
    JobFinished {
        id: usize,
        record: Box<JobRecord>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `rave run` writes, the server and `rave run --continue` read back: every field
    /// survives the round trip, times to the millisecond.
    #[test]
    fn events_and_records_read_back_as_written() {
        let t = humantime::parse_rfc3339("2026-11-30T07:00:00.123Z").unwrap();
        let record = JobRecord {
            name: "test 1/2".into(),
            stage: "test".into(),
            status: JobStatus::Failed,
            failure_reason: Some(FailureReason::OomKilled),
            exit_code: None,
            started_at: Some(t),
            finished_at: Some(t),
            duration_ms: Some(12),
            peak_memory_bytes: Some(1 << 20),
            setup_ms: Some(3),
            memory_limit_bytes: 1 << 20,
            memory_source: Some("explicit".into()),
            cpus: 1.5,
            cpu_seconds: Some(0.5),
            attempts: 2,
            note: Some("killed".into()),
            reused_from: None,
            reuse: None,
            children: vec![],
        };
        let line = serde_json::to_string(&RunEvent::JobFinished {
            index: 4,
            record: Box::new(record.clone()),
        })
        .unwrap();
        assert!(
            line.starts_with(r#"{"event":"job_finished","index":4,"#),
            "{line}"
        );
        let RunEvent::JobFinished {
            index,
            record: back,
        } = serde_json::from_str(&line).unwrap()
        else {
            panic!("not a job_finished: {line}");
        };
        assert_eq!(index, 4);
        assert_eq!(
            serde_json::to_value(&*back).unwrap(),
            serde_json::to_value(&record).unwrap()
        );
        assert_eq!(back.started_at, Some(t));
        assert_eq!(back.status, JobStatus::Failed);
    }
}
