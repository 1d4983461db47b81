//! Choosing an executor per job: a job with `image:` runs in Docker (when an engine answers),
//! everything else locally, unless Docker is the default executor.

use crate::docker::DockerExecutor;
use crate::executor::{Cancel, Executor, JobSpec, LogSink};
use crate::local::LocalExecutor;
use crate::outcome::ExecOutcome;

pub struct Dispatch {
    pub local: LocalExecutor,
    pub docker: Option<DockerExecutor>,
    /// `--executor docker` / `.rave: executor: docker`: jobs without an image use the default
    /// image in a container too.
    pub docker_by_default: bool,
}

impl Executor for Dispatch {
    async fn run(&self, spec: JobSpec, log: LogSink, cancel: Cancel) -> ExecOutcome {
        // Services need containers: a job with services runs in the default image.
        let wants_docker =
            self.docker_by_default || spec.image.is_some() || !spec.services.is_empty();
        match (&self.docker, wants_docker) {
            (Some(d), true) => d.run(spec, log, cancel).await,
            (None, true) if self.docker_by_default || !spec.services.is_empty() => ExecOutcome {
                runner_error: Some(if self.docker_by_default {
                    "the docker executor was chosen but no Docker engine answers; start dockerd or set DOCKER_HOST".into()
                } else {
                    "the job has `services:`, which run in containers, but no Docker engine answers; start dockerd or set DOCKER_HOST".into()
                }),
                ..ExecOutcome::default()
            },
            _ => self.local.run(spec, log, cancel).await,
        }
    }
}
