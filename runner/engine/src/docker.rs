//! The `docker` executor: the job's script in a container of its `image:`, through bollard,
//! held to the same memory and CPU share as a local job.
//!
//! GitLab's container contract: the working copy is mounted at `/builds/<namespace>/<project>`
//! (`CI_PROJECT_DIR`), the script runs in bash when the image has it and `sh` otherwise, and
//! after_script runs in a fresh container on the same mount. Limits: memory with swap equal to
//! memory (so swapping cannot hide an OOM), CPUs as nano-CPUs. An OOM is read from the
//! container state (`OOMKilled`) and the peak from its stats, and reported like a local OOM.
//! Everything rave creates carries the label `rave=1`, so a restart sweeps what a crash left.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateImageOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::executor::{Cancel, Executor, JobSpec, LogSink, Stream};
use crate::outcome::ExecOutcome;

pub const LABEL: &str = "rave";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    IfNotPresent,
    Never,
    Always,
}

impl PullPolicy {
    pub fn parse(s: &str) -> Option<PullPolicy> {
        Some(match s {
            "if-not-present" => PullPolicy::IfNotPresent,
            "never" => PullPolicy::Never,
            "always" => PullPolicy::Always,
            _ => return None,
        })
    }
    fn as_str(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
            PullPolicy::Always => "always",
        }
    }
}

/// What every container of one job attempt shares.
struct Shell<'a> {
    spec: &'a JobSpec,
    image: &'a str,
    cancel: &'a Cancel,
    log: &'a LogSink,
}

/// How one container ended.
struct Ended {
    exit_code: Option<i64>,
    oom_killed: bool,
    peak: Option<u64>,
    timed_out: bool,
    canceled: bool,
}

pub struct DockerExecutor {
    docker: Docker,
    /// Image for jobs without `image:` when docker is the default executor.
    pub default_image: Option<String>,
    /// `/builds/<namespace>/<project>`.
    pub builds_path: String,
}

impl DockerExecutor {
    /// Connect (DOCKER_HOST or the local socket) and agree on an API version.
    pub async fn connect(
        builds_path: String,
        default_image: Option<String>,
    ) -> Result<DockerExecutor, String> {
        let docker = Docker::connect_with_local_defaults().map_err(|e| {
            format!("cannot reach the Docker engine: {e}; start dockerd or set DOCKER_HOST")
        })?;
        let docker = docker.negotiate_version().await.map_err(|e| {
            format!("cannot reach the Docker engine: {e}; start dockerd or set DOCKER_HOST")
        })?;
        Ok(DockerExecutor {
            docker,
            default_image,
            builds_path,
        })
    }

    /// Remove the containers an earlier rave left behind (it crashed or was killed): labelled
    /// `rave`, made by a rave process that no longer runs. Other raves' containers are kept.
    pub async fn sweep(&self) -> usize {
        let filters: HashMap<&str, Vec<&str>> = HashMap::from([("label", vec![LABEL])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .unwrap_or_default();
        let mut n = 0;
        for c in list {
            let owner_alive = c
                .labels
                .as_ref()
                .and_then(|l| l.get("rave.pid"))
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
            if owner_alive {
                continue;
            }
            if let Some(id) = c.id {
                let rm = RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .v(true)
                    .build();
                if self.docker.remove_container(&id, Some(rm)).await.is_ok() {
                    n += 1;
                }
            }
        }
        n
    }

    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), String> {
        let present = self.docker.inspect_image(image).await.is_ok();
        if present && policy != PullPolicy::Always {
            return Ok(());
        }
        if policy == PullPolicy::Never {
            return Err(format!(
                "image `{image}` is not on this machine and its pull_policy is `never`; build or load it first (docker load / docker import), or allow pulling"
            ));
        }
        let opts = CreateImageOptionsBuilder::new().from_image(image).build();
        let mut pull = self.docker.create_image(Some(opts), None, None);
        while let Some(step) = pull.next().await {
            if let Err(e) = step {
                if present {
                    // `always` but the registry is unreachable: the local copy will do.
                    return Ok(());
                }
                let why = e.to_string();
                let short = why.lines().next().unwrap_or(&why);
                return Err(format!(
                    "image `{image}` is not on this machine and cannot be pulled (pull_policy `{}`): {short}",
                    policy.as_str()
                ));
            }
        }
        Ok(())
    }

    /// Run one shell in a new container; returns (exit code, OOM killed, peak memory, timed out,
    /// canceled).
    async fn run_container(
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
        } = *run;
        let env: Vec<String> = spec
            .env
            .iter()
            .filter(|(k, _)| k != "PATH" && k != "HOME")
            .map(|(k, v)| {
                let v = if k == "CI_PROJECT_DIR" {
                    self.builds_path.clone()
                } else {
                    v.clone()
                };
                format!("{k}={v}")
            })
            .collect();
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
            labels: Some(HashMap::from([
                (LABEL.to_string(), "1".to_string()),
                ("rave.job".into(), spec.slug.clone()),
                // Which rave made it: a later rave sweeps only containers whose rave is gone.
                ("rave.pid".into(), std::process::id().to_string()),
                (
                    "rave.run".into(),
                    spec.scratch_dir
                        .parent()
                        .and_then(|p| p.parent())
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                ),
            ])),
            host_config: Some(HostConfig {
                binds: Some(vec![
                    format!("{}:{}", spec.workdir.display(), self.builds_path),
                    format!("{}:/rave/scratch:ro", spec.scratch_dir.display()),
                ]),
                memory: Some(spec.memory_bytes as i64),
                memory_swap: Some(spec.memory_bytes as i64),
                nano_cpus: Some((spec.cpus * 1e9) as i64),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
            .map_err(|e| format!("cannot create the container: {e}"))?;
        let id = created.id;
        let result = self.drive(&id, limit, cancel, graceful_stops, log).await;
        let rm = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        let _ = self.docker.remove_container(&id, Some(rm)).await;
        result
    }

    async fn drive(
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
            let kill = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
            let _ = self.docker.kill_container(id, Some(kill)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), logs).await;
        let info = self
            .docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
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
}

impl Executor for DockerExecutor {
    async fn run(&self, spec: JobSpec, log: LogSink, cancel: Cancel) -> ExecOutcome {
        let mut outcome = ExecOutcome::default();
        let Some(image) = spec.image.clone().or_else(|| self.default_image.clone()) else {
            outcome.runner_error = Some("the job has no `image:` and no default image is configured (`.rave: default_image`)".into());
            return outcome;
        };
        let policy = spec
            .pull_policy
            .as_deref()
            .and_then(PullPolicy::parse)
            .unwrap_or(PullPolicy::IfNotPresent);
        if let Err(e) = self.ensure_image(&image, policy).await {
            outcome.runner_error = Some(e);
            return outcome;
        }
        if let Err(e) = std::fs::create_dir_all(&spec.scratch_dir) {
            outcome.runner_error =
                Some(format!("cannot create {}: {e}", spec.scratch_dir.display()));
            return outcome;
        }
        let write = |name: &str, lines: &[String]| {
            std::fs::write(
                spec.scratch_dir.join(name),
                crate::local::script_text(lines, true),
            )
        };
        if let Err(e) = write("script.sh", &spec.script) {
            outcome.runner_error = Some(format!("cannot write the script: {e}"));
            return outcome;
        }
        log.system(&format!("Running in a container of {image}"))
            .await;
        let shell = Shell {
            spec: &spec,
            image: &image,
            cancel: &cancel,
            log: &log,
        };
        match self
            .run_container(&shell, "script.sh", spec.timeout, true)
            .await
        {
            Ok(e) => {
                outcome.exit_code = e.exit_code.map(|c| c as i32);
                outcome.oom_killed = e.oom_killed;
                // An OOM kill means the group reached its limit, whatever the last sample said.
                outcome.peak_memory_bytes = if e.oom_killed {
                    Some(e.peak.unwrap_or(0).max(spec.memory_bytes))
                } else {
                    e.peak
                };
                outcome.timed_out = e.timed_out;
                outcome.canceled = e.canceled;
            }
            Err(e) => outcome.runner_error = Some(e),
        }
        if !spec.after_script.is_empty() && !cancel.force.is_cancelled() {
            let status = if outcome.succeeded() {
                "success"
            } else if outcome.canceled {
                "canceled"
            } else {
                "failed"
            };
            if write("after_script.sh", &spec.after_script).is_ok() {
                log.system("Running after_script").await;
                let never = Cancel::default();
                let mut after_spec = spec.clone();
                after_spec.env.push(("CI_JOB_STATUS".into(), status.into()));
                let after = Shell {
                    spec: &after_spec,
                    cancel: &never,
                    ..shell
                };
                let _ = self
                    .run_container(&after, "after_script.sh", spec.after_script_timeout, false)
                    .await;
            }
        }
        outcome
    }
}

/// Is a Docker engine answering? (For choosing executors and for clear errors.)
pub async fn available() -> bool {
    match Docker::connect_with_local_defaults() {
        Ok(d) => d.ping().await.is_ok(),
        Err(_) => false,
    }
}
