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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, NetworkCreateRequest, NetworkingConfig,
    SystemInfoCgroupDriverEnum,
};
use bollard::query_parameters::{
    CreateImageOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StatsOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::cgroup::{Cgroups, JobCgroup};
use crate::executor::{Cancel, Executor, JobSpec, LogSink, ServiceSpec, Stream};
use crate::outcome::ExecOutcome;

pub const LABEL: &str = "rave";

/// How long services get to accept connections when the job does not say
/// (`RAVE_SERVICE_WAIT` seconds), as GitLab Runner's `wait_for_services_timeout`.
const SERVICE_WAIT: Duration = Duration::from_secs(30);

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
    /// The job's own network, when it has services.
    network: Option<&'a str>,
    /// The job's cgroup as a Docker cgroup parent.
    cgroup_parent: Option<&'a str>,
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
            if owner_alive(c.labels.as_ref()) {
                continue;
            }
            if let Some(id) = c.id {
                if self.remove(&id).await.is_ok() {
                    n += 1;
                }
            }
        }
        // Networks after containers: a network with containers on it cannot be removed.
        let opts = ListNetworksOptionsBuilder::new().filters(&filters).build();
        for net in self
            .docker
            .list_networks(Some(opts))
            .await
            .unwrap_or_default()
        {
            if owner_alive(net.labels.as_ref()) {
                continue;
            }
            if let Some(name) = net.name {
                let _ = self.docker.remove_network(&name).await;
            }
        }
        n
    }

    /// Labels for everything rave creates for a job.
    fn labels(spec: &JobSpec) -> HashMap<String, String> {
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
    fn env(&self, spec: &JobSpec) -> Vec<String> {
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
}

impl DockerExecutor {
    async fn create(
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
    async fn remove(&self, id: &str) -> Result<(), bollard::errors::Error> {
        let rm = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        self.docker.remove_container(id, Some(rm)).await
    }

    async fn inspect(
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

/// What rave made for one job attempt besides its script containers; removed at the end
/// whatever happened.
#[derive(Default)]
struct JobResources {
    network: Option<String>,
    services: Vec<(String, ServiceSpec)>,
    group: Option<JobCgroup>,
    cgroup_parent: Option<String>,
}

impl DockerExecutor {
    /// The job's cgroup (as the parent of its containers) and, with services, its network.
    async fn prepare(&self, spec: &JobSpec, res: &mut JobResources) -> Result<(), String> {
        if let Some(cg) = &self.cgroups {
            let group = cg
                .create(&spec.slug, spec.memory_bytes, spec.cpus)
                .map_err(|e| format!("cannot create the job's cgroup: {e}"))?;
            res.cgroup_parent = group.docker_parent();
            res.group = Some(group);
        }
        if spec.services.is_empty() {
            return Ok(());
        }
        let name = format!(
            "rave-{}-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed),
            spec.slug
        );
        self.docker
            .create_network(NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".into()),
                labels: Some(Self::labels(spec)),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create the job's network: {}", first_line(&e)))?;
        res.network = Some(name);
        Ok(())
    }

    /// Start every service on the job's network under its aliases.
    async fn start_services(
        &self,
        spec: &JobSpec,
        res: &mut JobResources,
        log: &LogSink,
    ) -> Result<(), String> {
        let Some(network) = res.network.clone() else {
            return Ok(());
        };
        for svc in &spec.services {
            let policy = svc
                .pull_policy
                .as_deref()
                .and_then(PullPolicy::parse)
                .unwrap_or(PullPolicy::IfNotPresent);
            self.ensure_image(&svc.image, policy)
                .await
                .map_err(|e| format!("service {e}"))?;
            log.system(&format!(
                "Starting service {} as {}",
                svc.image,
                svc.aliases.join(", ")
            ))
            .await;
            let mut env = self.env(spec);
            env.extend(svc.variables.iter().map(|(k, v)| format!("{k}={v}")));
            let mut labels = Self::labels(spec);
            labels.insert("rave.service".into(), svc.image.clone());
            let body = ContainerCreateBody {
                image: Some(svc.image.clone()),
                cmd: svc.command.clone(),
                entrypoint: svc
                    .entrypoint
                    .clone()
                    .map(|e| e.into_iter().filter(|x| !x.is_empty()).collect()),
                env: Some(env),
                labels: Some(labels),
                host_config: Some(HostConfig {
                    network_mode: Some(network.clone()),
                    cgroup_parent: res.cgroup_parent.clone(),
                    // Without a job cgroup to share, each service is held to the job's share.
                    memory: res.group.is_none().then_some(spec.memory_bytes as i64),
                    memory_swap: res.group.is_none().then_some(spec.memory_bytes as i64),
                    ..Default::default()
                }),
                networking_config: Some(NetworkingConfig {
                    endpoints_config: Some(HashMap::from([(
                        network.clone(),
                        EndpointSettings {
                            aliases: Some(svc.aliases.clone()),
                            ..Default::default()
                        },
                    )])),
                }),
                ..Default::default()
            };
            let created = self.create(body).await.map_err(|e| {
                format!("cannot create service `{}`: {}", svc.image, first_line(&e))
            })?;
            res.services.push((created.id.clone(), svc.clone()));
            self.docker
                .start_container(
                    &created.id,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await
                .map_err(|e| format!("cannot start service `{}`: {}", svc.image, first_line(&e)))?;
        }
        Ok(())
    }

    /// Wait until every service accepts TCP connections on each port its image exposes
    /// (services that expose none are not waited for, as in GitLab). A service that exits or
    /// stays deaf past the deadline fails the job with its last lines of output.
    async fn wait_for_services(
        &self,
        res: &JobResources,
        wait: Duration,
        cancel: &Cancel,
    ) -> Result<(), String> {
        let Some(network) = &res.network else {
            return Ok(());
        };
        let deadline = Instant::now() + wait;
        for (id, svc) in &res.services {
            let info = self.inspect(id).await.map_err(|e| {
                format!("cannot inspect service `{}`: {}", svc.image, first_line(&e))
            })?;
            let ports: Vec<u16> = info
                .config
                .and_then(|c| c.exposed_ports)
                .unwrap_or_default()
                .iter()
                .filter_map(|p| p.strip_suffix("/tcp").or((!p.contains('/')).then_some(p)))
                .filter_map(|p| p.parse().ok())
                .collect();
            let ip = info
                .network_settings
                .and_then(|n| n.networks)
                .and_then(|mut n| n.remove(network))
                .and_then(|e| e.ip_address)
                .filter(|ip| !ip.is_empty());
            for port in ports {
                let Some(ip) = &ip else {
                    let why = match self.exit_code(id).await {
                        Some(code) => format!(
                            "exited with code {code} before accepting connections on port {port}"
                        ),
                        None => "has no address on the job's network".into(),
                    };
                    return Err(self.service_error(id, svc, &why).await);
                };
                loop {
                    let attempt = tokio::net::TcpStream::connect((ip.as_str(), port));
                    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
                        break;
                    }
                    if let Some(code) = self.exit_code(id).await {
                        let why = format!(
                            "exited with code {code} before accepting connections on port {port}"
                        );
                        return Err(self.service_error(id, svc, &why).await);
                    }
                    if Instant::now() >= deadline {
                        let why = format!(
                            "did not accept connections on port {port} within {}s (set RAVE_SERVICE_WAIT to wait longer)",
                            wait.as_secs()
                        );
                        return Err(self.service_error(id, svc, &why).await);
                    }
                    if cancel.graceful.is_cancelled() || cancel.force.is_cancelled() {
                        return Err("canceled while waiting for services".into());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(())
    }

    /// The exit code of a container that is no longer running.
    async fn exit_code(&self, id: &str) -> Option<i64> {
        let state = self.inspect(id).await.ok()?.state?;
        (state.running == Some(false)).then(|| state.exit_code.unwrap_or(-1))
    }

    /// "service `img` (alias a, b) <why>; its last output: …", the output bounded.
    async fn service_error(&self, id: &str, svc: &ServiceSpec, why: &str) -> String {
        let opts = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail("20")
            .build();
        let mut out = Vec::new();
        let mut logs = self.docker.logs(id, Some(opts));
        while let Some(Ok(chunk)) = logs.next().await {
            out.extend_from_slice(&chunk.into_bytes());
            if out.len() > 4096 {
                break;
            }
        }
        let text = String::from_utf8_lossy(&out);
        let text = text.trim_end();
        let mut msg = format!("service `{}` ({}) {why}", svc.image, svc.aliases.join(", "));
        if text.is_empty() {
            msg.push_str("; it printed nothing");
        } else {
            msg.push_str("; its last output:\n");
            msg.push_str(text);
        }
        msg
    }

    /// Remove the services, the network and the cgroup.
    async fn release(&self, res: JobResources) {
        for (id, _) in &res.services {
            let _ = self.remove(id).await;
        }
        if let Some(net) = &res.network {
            let _ = self.docker.remove_network(net).await;
        }
        if let Some(group) = &res.group {
            group.kill_all().await;
            group.remove().await;
        }
    }
}

fn first_line(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or(&s).to_string()
}

/// Does the rave named in these labels still run?
fn owner_alive(labels: Option<&HashMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get("rave.pid"))
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
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
        match self
            .run_container(&shell, "script.sh", spec.timeout, true)
            .await
        {
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
