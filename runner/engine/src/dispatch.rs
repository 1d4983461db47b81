//! Choosing an executor per job. By default a job with `image:` or `services:` runs in
//! Docker and everything else locally; a job that asks for an image never falls back to the
//! host's shell when no engine answers (it fails with `runner_error` and the fix), unless the
//! local executor was chosen explicitly (`--executor local`, which ignores `image:` as GitLab's
//! shell executor does).

use crate::docker::DockerExecutor;
use crate::executor::{Cancel, Executor, JobSpec, LogSink};
use crate::local::LocalExecutor;
use crate::outcome::ExecOutcome;

/// Which executor runs jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Jobs with `image:`/`services:` in Docker, the others locally.
    Auto,
    /// `--executor local`: every job on this machine's shell, `image:` ignored.
    Local,
    /// `--executor docker`: every job in a container (the default image when it names none).
    Docker,
}

pub struct Dispatch {
    pub local: LocalExecutor,
    pub docker: Option<DockerExecutor>,
    pub mode: Mode,
}

impl Executor for Dispatch {
    async fn run(&self, spec: JobSpec, log: LogSink, cancel: Cancel) -> ExecOutcome {
        // Services need containers: a job with services runs in the default image.
        let wants_docker = match self.mode {
            Mode::Local => false,
            Mode::Docker => true,
            Mode::Auto => spec.image.is_some() || !spec.services.is_empty(),
        };
        match (&self.docker, wants_docker) {
            (Some(d), true) => d.run(spec, log, cancel).await,
            (None, true) => ExecOutcome {
                runner_error: Some(if self.mode == Mode::Docker {
                    "the docker executor was chosen but no Docker engine answers; start dockerd or set DOCKER_HOST".into()
                } else if !spec.services.is_empty() {
                    "the job has `services:`, which run in containers, but no Docker engine answers; start dockerd or set DOCKER_HOST".into()
                } else {
                    format!(
                        "the job asks for the image `{}`, but no Docker engine answers, and rave does not run it on this machine instead; start dockerd (or set DOCKER_HOST), or run with `--executor local` to run image jobs in this machine's shell",
                        spec.image.as_deref().unwrap_or_default()
                    )
                }),
                ..ExecOutcome::default()
            },
            _ => self.local.run(spec, log, cancel).await,
        }
    }
}
