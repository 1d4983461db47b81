//! The `docker` executor: the job's script in a container of its `image:`, through bollard,
//! held to the same memory and CPU share as a local job.
//!
//! GitLab's container contract: the working copy is mounted at `/builds/<namespace>/<project>`
//! (`CI_PROJECT_DIR`), the script runs in bash when the image has it and `sh` otherwise, and
//! after_script runs in a fresh container on the same mount. Limits: memory with swap equal to
//! memory (so swapping cannot hide an OOM), CPUs as nano-CPUs. An OOM is read from the
//! container state (`OOMKilled`) and the peak from its stats, and reported like a local OOM.
//!
//! `services:` start first, on a network of the job's own, reachable by their aliases; the
//! job's container starts once every service accepts connections on its exposed TCP ports.
//! With the cgroupfs driver (and rave's cgroups), every container of a job lives under the
//! job's own cgroup, so the job and its services share the job's memory and CPU share, and
//! peak and OOM are read from that group even for a container that lived a few milliseconds.
//!
//! Everything rave creates (containers, networks) carries the label `rave=1` and the pid of
//! the rave that made it, so a later rave sweeps what a crashed one left.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bollard::Docker;
use bollard::models::SystemInfoCgroupDriverEnum;

use crate::cgroup::Cgroups;
use crate::executor::{Cancel, Executor, JobSpec, LogSink};
use crate::outcome::ExecOutcome;

mod container;
mod image;
mod services;
mod sweep;

use container::Shell;
pub use image::PullPolicy;
use services::{JobResources, SERVICE_WAIT};

pub const LABEL: &str = "rave";

pub struct DockerExecutor {
    docker: Docker,
    /// Image for jobs without `image:` when docker is the default executor.
    pub default_image: Option<String>,
    /// `/builds/<namespace>/<project>`.
    pub builds_path: String,
    /// rave's cgroups, used as the parent of a job's containers when the engine's cgroup
    /// driver is cgroupfs (the systemd driver wants slices, not paths).
    cgroups: Option<Arc<Cgroups>>,
    /// Makes network names unique within this rave.
    seq: AtomicU64,
}

impl DockerExecutor {
    /// Connect (DOCKER_HOST or the local socket) and agree on an API version.
    pub async fn connect(
        builds_path: String,
        default_image: Option<String>,
        cgroups: Option<Arc<Cgroups>>,
    ) -> Result<DockerExecutor, String> {
        let docker = Docker::connect_with_local_defaults().map_err(|e| {
            format!("cannot reach the Docker engine: {e}; start dockerd or set DOCKER_HOST")
        })?;
        let docker = docker.negotiate_version().await.map_err(|e| {
            format!("cannot reach the Docker engine: {e}; start dockerd or set DOCKER_HOST")
        })?;
        let cgroupfs = match docker.info().await {
            Ok(info) => info.cgroup_driver == Some(SystemInfoCgroupDriverEnum::CGROUPFS),
            Err(_) => false,
        };
        Ok(DockerExecutor {
            docker,
            default_image,
            builds_path,
            cgroups: cgroups.filter(|_| cgroupfs),
            seq: AtomicU64::new(0),
        })
    }

    /// Labels for everything rave creates for a job.
    pub(super) fn labels(spec: &JobSpec) -> HashMap<String, String> {
        HashMap::from([
            (LABEL.to_string(), "1".to_string()),
            ("rave.job".into(), spec.slug.clone()),
            // Which rave made it: a later rave sweeps only what belongs to a rave that is gone.
            ("rave.pid".into(), std::process::id().to_string()),
            (
                "rave.run".into(),
                spec.scratch_dir
                    .parent()
                    .and_then(|p| p.parent())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        ])
    }

    /// The job's variables as container environment (`CI_PROJECT_DIR` is the mount point;
    /// PATH and HOME stay the image's).
    pub(super) fn env(&self, spec: &JobSpec) -> Vec<String> {
        spec.env
            .iter()
            .filter(|(k, _)| k != "PATH" && k != "HOME")
            .map(|(k, v)| {
                let v = if k == "CI_PROJECT_DIR" {
                    self.builds_path.as_str()
                } else {
                    v.as_str()
                };
                format!("{k}={v}")
            })
            .collect()
    }
}

pub(super) fn first_line(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or(&s).to_string()
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
        let mut res = JobResources::default();
        let ready = async {
            self.prepare(&spec, &mut res).await?;
            self.start_services(&spec, &mut res, &log).await?;
            let wait = spec
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == "RAVE_SERVICE_WAIT")
                .and_then(|(_, v)| v.trim().parse().ok())
                .map_or(SERVICE_WAIT, Duration::from_secs);
            self.wait_for_services(&res, wait, &cancel).await
        }
        .await;
        if let Err(e) = ready {
            if cancel.graceful.is_cancelled() || cancel.force.is_cancelled() {
                outcome.canceled = true;
            } else {
                outcome.runner_error = Some(e);
            }
            self.release(res).await;
            return outcome;
        }
        log.system(&format!("Running in a container of {image}"))
            .await;
        let shell = Shell {
            spec: &spec,
            image: &image,
            cancel: &cancel,
            log: &log,
            network: res.network.as_deref(),
            cgroup_parent: res.cgroup_parent.as_deref(),
        };
        // OOM forensics as for a local job: the biggest process of the job's containers (they
        // sit in groups under the job's), sampled twice a second.
        let (sampler, largest) = match res
            .group
            .as_ref()
            .map(|g| crate::cgroup::sample_largest(g.procs_dir()))
        {
            Some((task, cell)) => (Some(task), Some(cell)),
            None => (None, None),
        };
        let ran = self
            .run_container(&shell, "script.sh", spec.timeout, true)
            .await;
        if let Some(s) = sampler {
            s.abort();
        }
        outcome.largest_process =
            largest.and_then(|l| l.lock().unwrap_or_else(|p| p.into_inner()).take());
        match ran {
            Ok(e) => {
                outcome.exit_code = e.exit_code.map(|c| c as i32);
                // A service killed for memory fails the job only if the job failed too.
                let group_oom = res.group.as_ref().is_some_and(|g| g.oom_killed());
                outcome.oom_killed = e.oom_killed || (group_oom && e.exit_code != Some(0));
                // The group's high-water mark covers the whole life of every container in it;
                // the stats stream can miss a container that lives for milliseconds.
                let peak = res.group.as_ref().and_then(|g| g.peak_memory()).or(e.peak);
                // An OOM kill means the group reached its limit, whatever the last sample said.
                outcome.peak_memory_bytes = if outcome.oom_killed {
                    Some(peak.unwrap_or(0).max(spec.memory_bytes))
                } else {
                    peak
                };
                outcome.timed_out = e.timed_out;
                outcome.canceled = e.canceled;
            }
            Err(e) => outcome.runner_error = Some(e),
        }
        if !spec.after_script.is_empty() && !cancel.force.is_cancelled() {
            let status = outcome.ci_job_status();
            if write("after_script.sh", &spec.after_script).is_ok() {
                log.system("Running after_script").await;
                // A graceful cancel has already happened and must not stop after_script; a
                // forced one stops it, as with the local executor.
                let only_force = Cancel {
                    graceful: tokio_util::sync::CancellationToken::new(),
                    force: cancel.force.clone(),
                };
                let mut after_spec = spec.clone();
                after_spec.env.push(("CI_JOB_STATUS".into(), status.into()));
                let after = Shell {
                    spec: &after_spec,
                    cancel: &only_force,
                    ..shell
                };
                let _ = self
                    .run_container(&after, "after_script.sh", spec.after_script_timeout, false)
                    .await;
            }
        }
        self.release(res).await;
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
