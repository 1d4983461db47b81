//! One container of a job: created on the job's mount, network and cgroup, its output
//! streamed to the log, its end (exit code, OOM, peak, timeout, cancel) read and the container
//! removed.

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    KillContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StatsOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::executor::{Cancel, JobSpec, LogSink, Stream};

use super::DockerExecutor;

/// What every container of one job attempt shares.
pub(super) struct Shell<'a> {
    pub(super) spec: &'a JobSpec,
    pub(super) image: &'a str,
    pub(super) cancel: &'a Cancel,
    pub(super) log: &'a LogSink,
    /// The job's own network, when it has services.
    pub(super) network: Option<&'a str>,
    /// The job's cgroup as a Docker cgroup parent.
    pub(super) cgroup_parent: Option<&'a str>,
}

/// How one container ended.
pub(super) struct Ended {
    pub(super) exit_code: Option<i64>,
    pub(super) oom_killed: bool,
    pub(super) peak: Option<u64>,
    pub(super) timed_out: bool,
    pub(super) canceled: bool,
}

impl DockerExecutor {
    /// Run one shell in a new container; returns (exit code, OOM killed, peak memory, timed out,
    /// canceled).
    pub(super) async fn run_container(
        &self,
        run: &Shell<'_>,
        script_name: &str,
        limit: Duration,
        graceful_stops: bool,
    ) -> Result<Ended, String> {
        let Shell {
            spec,
            image,
            cancel,
            log,
            ..
        } = *run;
        let env = self.env(spec);
        let script = format!("/rave/scratch/{script_name}");
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "if command -v bash >/dev/null 2>&1; then exec bash {script}; else exec sh {script}; fi"
                ),
            ]),
            // GitLab keeps the image's entrypoint unless `image: entrypoint` says otherwise;
            // `[""]` (or `[]`) clears it.
            entrypoint: spec
                .entrypoint
                .clone()
                .map(|e| e.into_iter().filter(|x| !x.is_empty()).collect()),
            env: Some(env),
            working_dir: Some(self.builds_path.clone()),
            labels: Some(Self::labels(spec)),
            host_config: Some(HostConfig {
                binds: Some(
                    [
                        format!("{}:{}", spec.workdir.display(), self.builds_path),
                        format!("{}:/rave/scratch:ro", spec.scratch_dir.display()),
                    ]
                    .into_iter()
                    .chain(
                        spec.git_objects
                            .iter()
                            .map(|o| format!("{0}:{0}:ro", o.display())),
                    )
                    .collect(),
                ),
                memory: Some(spec.memory_bytes as i64),
                memory_swap: Some(spec.memory_bytes as i64),
                nano_cpus: Some((spec.cpus * 1e9) as i64),
                network_mode: run.network.map(str::to_string),
                cgroup_parent: run.cgroup_parent.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .create(body)
            .await
            .map_err(|e| format!("cannot create the container: {e}"))?;
        let id = created.id;
        let result = self.drive(&id, limit, cancel, graceful_stops, log).await;
        let _ = self.remove(&id).await;
        result
    }

    pub(super) async fn drive(
        &self,
        id: &str,
        limit: Duration,
        cancel: &Cancel,
        graceful_stops: bool,
        log: &LogSink,
    ) -> Result<Ended, String> {
        self.docker
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .map_err(|e| format!("cannot start the container: {e}"))?;
        // Peak memory: the engine keeps max_usage while the container lives; sample it.
        let docker = self.docker.clone();
        let sid = id.to_string();
        let peak = tokio::spawn(async move {
            let mut stats =
                docker.stats(&sid, Some(StatsOptionsBuilder::new().stream(true).build()));
            let mut peak = 0u64;
            while let Some(Ok(s)) = stats.next().await {
                if let Some(m) = s.memory_stats {
                    peak = peak.max(m.max_usage.unwrap_or(0)).max(m.usage.unwrap_or(0));
                }
            }
            peak
        });
        let docker = self.docker.clone();
        let lid = id.to_string();
        let log2 = log.clone();
        let logs = tokio::spawn(async move {
            let opts = LogsOptionsBuilder::new()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .build();
            let mut s = docker.logs(&lid, Some(opts));
            while let Some(Ok(chunk)) = s.next().await {
                match chunk {
                    LogOutput::StdErr { message } => {
                        log2.write(Stream::Stderr, message.to_vec()).await
                    }
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        log2.write(Stream::Stdout, message.to_vec()).await
                    }
                    LogOutput::StdIn { .. } => {}
                }
            }
        });
        let graceful = async {
            if graceful_stops {
                cancel.graceful.cancelled().await
            } else {
                std::future::pending().await
            }
        };
        let mut wait = self
            .docker
            .wait_container(id, Some(WaitContainerOptionsBuilder::new().build()));
        let (mut timed_out, mut canceled) = (false, false);
        tokio::select! {
            _ = wait.next() => {}
            _ = tokio::time::sleep(limit) => timed_out = true,
            _ = graceful => canceled = true,
            _ = cancel.force.cancelled() => canceled = true,
        }
        if timed_out || canceled {
            // Ask nicely (SIGTERM to the script), then insist after the grace period, as the
            // local executor does; a forced cancel skips the grace period.
            if !cancel.force.is_cancelled() {
                let term = KillContainerOptionsBuilder::new().signal("SIGTERM").build();
                let _ = self.docker.kill_container(id, Some(term)).await;
                tokio::select! {
                    _ = wait.next() => {}
                    _ = tokio::time::sleep(crate::executor::STOP_GRACE) => {}
                    _ = cancel.force.cancelled() => {}
                }
            }
            let kill = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
            let _ = self.docker.kill_container(id, Some(kill)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), logs).await;
        let info = self
            .inspect(id)
            .await
            .map_err(|e| format!("cannot inspect the container: {e}"))?;
        peak.abort();
        let peak = peak.await.ok().filter(|p| *p > 0);
        let state = info.state.unwrap_or_default();
        Ok(Ended {
            exit_code: state.exit_code,
            oom_killed: state.oom_killed.unwrap_or(false),
            peak,
            timed_out,
            canceled,
        })
    }

    pub(super) async fn create(
        &self,
        body: ContainerCreateBody,
    ) -> Result<bollard::models::ContainerCreateResponse, bollard::errors::Error> {
        self.docker
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
    }

    /// Remove a container and its anonymous volumes, running or not.
    pub(super) async fn remove(&self, id: &str) -> Result<(), bollard::errors::Error> {
        let rm = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        self.docker.remove_container(id, Some(rm)).await
    }

    pub(super) async fn inspect(
        &self,
        id: &str,
    ) -> Result<bollard::models::ContainerInspectResponse, bollard::errors::Error> {
        self.docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
    }
}
