//! The executor contract, and the log sink every executor writes to.
//!
//! # Contract
//!
//! [`Executor::run`] runs one attempt of one job, start to end:
//!
//! 1. The working directory (`spec.workdir`) is prepared by the caller (files, artifacts of
//!    dependencies); the executor only runs in it.
//! 2. `spec.script` (before_script + script) runs in one shell with GitLab's semantics: every
//!    command is echoed as `$ command`; the first failing command ends the script (bash
//!    `-eo pipefail`).
//! 3. `spec.after_script`, when not empty, always runs afterwards in a fresh shell, under its
//!    own deadline (`after_script_timeout`), also after a failure, a timeout or a graceful
//!    cancel; never after a forced cancel. Its exit code does not change the outcome.
//! 4. When `run` returns, every process the job started has exited: the executor owns the
//!    whole process tree (process group and cgroup) and kills what is left.
//! 5. A failing script is a normal result (`ExecOutcome` with an exit code), never a panic or
//!    an error; `runner_error` is only for the runner's own failures.
//! 6. Output goes to `log` as it is produced, in complete lines where possible; the executor
//!    never buffers a whole log.
//!
//! Cancellation: `cancel.graceful` asks the job to stop (SIGTERM to the tree, a grace period,
//! then SIGKILL; after_script still runs); `cancel.force` kills at once and skips after_script.
//! Executors may be called concurrently for different jobs.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::outcome::ExecOutcome;

/// How long a job asked to stop (graceful cancel, timeout) gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Everything an executor needs to run one attempt of a job.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// Display name (`build: [linux]`).
    pub name: String,
    /// Name safe for files and cgroups, unique in the run.
    pub slug: String,
    pub workdir: PathBuf,
    /// Where the executor may write its own files (scripts) for this attempt.
    pub scratch_dir: PathBuf,
    /// The job's whole environment. With `clean_env`, a process executor starts the job with
    /// exactly this and nothing of its own environment.
    pub env: Vec<(String, String)>,
    pub clean_env: bool,
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    pub timeout: Duration,
    pub after_script_timeout: Duration,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub image: Option<String>,
    /// The image's `pull_policy` (first entry), for container executors.
    pub pull_policy: Option<String>,
    /// `image: entrypoint` (None: the image's own, as GitLab does; `[""]` clears it).
    pub entrypoint: Option<Vec<String>>,
    /// `services:`: sidecar containers the job talks to by alias (container executors only).
    pub services: Vec<ServiceSpec>,
    /// The object store the job's `.git` borrows (`objects/info/alternates`): a container
    /// gets it read-only at the same path.
    pub git_objects: Option<std::path::PathBuf>,
}

/// One `services:` entry, ready to start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceSpec {
    pub image: String,
    /// Host names the job reaches it by: the ones derived from the image name, then `alias:`.
    pub aliases: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    /// The service's own `variables:` (the job's variables are passed too, as GitLab does).
    pub variables: Vec<(String, String)>,
    pub pull_policy: Option<String>,
}

impl ServiceSpec {
    /// GitLab's host names for a service image: the name without tag or digest, with `/`
    /// replaced by `__` and by `-` (`tutum/wordpress:4` → `tutum__wordpress`, `tutum-wordpress`).
    pub fn derived_aliases(image: &str) -> Vec<String> {
        let name = image.split('@').next().unwrap_or(image);
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let name = match name[last_slash..].find(':') {
            Some(i) => &name[..last_slash + i],
            None => name,
        };
        let mut out = vec![name.replace('/', "__"), name.replace('/', "-")];
        out.dedup();
        out
    }
}

#[derive(Clone, Debug, Default)]
pub struct Cancel {
    /// Stop the job, running after_script.
    pub graceful: CancellationToken,
    /// Stop at once.
    pub force: CancellationToken,
}

pub trait Executor: Send + Sync + 'static {
    fn run(
        &self,
        spec: JobSpec,
        log: LogSink,
        cancel: Cancel,
    ) -> impl Future<Output = ExecOutcome> + Send;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
    /// rave's own messages about the job ("killed: exceeded its memory limit …").
    System,
}

/// A piece of a job's output: whole lines (ending in `\n`) except when a line is longer than
/// the chunk size, which is then split.
#[derive(Debug)]
pub struct LogChunk {
    pub job: usize,
    pub stream: Stream,
    pub data: Vec<u8>,
}

/// Where a job's output goes. Bounded: a job that prints faster than the log can be written
/// waits, so rave's memory does not grow with log volume.
#[derive(Clone, Debug)]
pub struct LogSink {
    job: usize,
    tx: mpsc::Sender<LogChunk>,
}

impl LogSink {
    pub fn new(job: usize, tx: mpsc::Sender<LogChunk>) -> Self {
        LogSink { job, tx }
    }

    pub async fn write(&self, stream: Stream, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let _ = self
            .tx
            .send(LogChunk {
                job: self.job,
                stream,
                data,
            })
            .await;
    }

    /// A message from rave itself, as one line.
    pub async fn system(&self, text: &str) {
        let mut data = text.as_bytes().to_vec();
        data.push(b'\n');
        self.write(Stream::System, data).await;
    }
}
