//! What happened to a job: the result vocabulary shared by the console, `--json`, the store.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Success,
    Failed,
    Canceled,
    Skipped,
    /// A manual job that nobody started.
    Manual,
    /// Failed, but allowed to.
    Warning,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
            JobStatus::Skipped => "skipped",
            JobStatus::Manual => "manual",
            JobStatus::Warning => "warning",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    ScriptFailure,
    OomKilled,
    Timeout,
    Canceled,
    RunnerError,
    MissingDependency,
    ScanGate,
    /// A `trigger: project` job whose downstream pipeline (`strategy: depend`) did not succeed.
    DownstreamFailed,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ScriptFailure => "script_failure",
            FailureReason::OomKilled => "oom_killed",
            FailureReason::Timeout => "timeout",
            FailureReason::Canceled => "canceled",
            FailureReason::RunnerError => "runner_error",
            FailureReason::MissingDependency => "missing_dependency",
            FailureReason::ScanGate => "scan_gate",
            FailureReason::DownstreamFailed => "downstream_failed",
        }
    }

    /// Does GitLab's `retry: when` list cover this failure?
    pub fn retry_matches(self, when: &[String]) -> bool {
        if when.is_empty() {
            return true;
        }
        when.iter().any(|w| match w.as_str() {
            "always" => true,
            "script_failure" | "unknown_failure" => {
                matches!(
                    self,
                    FailureReason::ScriptFailure | FailureReason::OomKilled
                )
            }
            "job_execution_timeout" | "stuck_or_timeout_failure" => self == FailureReason::Timeout,
            "runner_system_failure" | "runner_unsupported" | "data_integrity_failure" => {
                self == FailureReason::RunnerError
            }
            "oom_killed" => self == FailureReason::OomKilled,
            _ => false,
        })
    }
}

/// What an executor reports for one run of a job's script.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecOutcome {
    /// Exit code of the script shell, if it exited.
    pub exit_code: Option<i32>,
    /// Signal that ended it, if it was killed.
    pub signal: Option<i32>,
    /// The kernel killed something in the job for exceeding its memory limit.
    pub oom_killed: bool,
    pub timed_out: bool,
    pub canceled: bool,
    /// Highest memory use of the job's whole process tree, when measured.
    pub peak_memory_bytes: Option<u64>,
    /// The job's biggest process at the last sample before it ended: (command, RSS).
    pub largest_process: Option<(String, u64)>,
    /// The host's OOM killer (not the job's own limit) killed a process of the job: the
    /// machine ran out of memory.
    pub host_oom_kill: bool,
    /// The runner itself failed (could not start the shell, …): never a script failure.
    pub runner_error: Option<String>,
    /// A `rave scan` in the job reported a failed gate.
    pub scan_gate: bool,
    /// A multi-project trigger's downstream pipeline did not succeed: why.
    pub downstream_failed: Option<String>,
    /// CPU time the job's processes used, from its cgroup, in seconds.
    pub cpu_seconds: Option<f64>,
}

impl ExecOutcome {
    /// `CI_JOB_STATUS` as after_script sees it (GitLab's values).
    pub fn ci_job_status(&self) -> &'static str {
        if self.succeeded() {
            "success"
        } else if self.canceled {
            "canceled"
        } else {
            "failed"
        }
    }

    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
            && !self.oom_killed
            && !self.timed_out
            && !self.canceled
            && self.runner_error.is_none()
            && self.downstream_failed.is_none()
    }

    pub fn failure_reason(&self) -> Option<FailureReason> {
        if self.succeeded() {
            None
        } else if self.canceled {
            Some(FailureReason::Canceled)
        } else if self.runner_error.is_some() {
            Some(FailureReason::RunnerError)
        } else if self.oom_killed || self.host_oom_kill {
            Some(FailureReason::OomKilled)
        } else if self.timed_out {
            Some(FailureReason::Timeout)
        } else if self.scan_gate {
            Some(FailureReason::ScanGate)
        } else if self.downstream_failed.is_some() {
            Some(FailureReason::DownstreamFailed)
        } else {
            Some(FailureReason::ScriptFailure)
        }
    }
}
