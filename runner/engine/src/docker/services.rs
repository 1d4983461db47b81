//! `services:`: a network of the job's own, sidecar containers reachable by their aliases, a
//! wait until each accepts connections, and everything removed when the job ends.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::LogsOptionsBuilder;
use futures_util::StreamExt;

use crate::cgroup::JobCgroup;
use crate::executor::{Cancel, JobSpec, LogSink, ServiceSpec};

use super::{DockerExecutor, PullPolicy, first_line};

/// How long services get to accept connections when the job does not say
/// (`RAVE_SERVICE_WAIT` seconds), as GitLab Runner's `wait_for_services_timeout`.
pub(super) const SERVICE_WAIT: Duration = Duration::from_secs(30);

/// What rave made for one job attempt besides its script containers; removed at the end
/// whatever happened.
#[derive(Default)]
pub(super) struct JobResources {
    pub(super) network: Option<String>,
    pub(super) services: Vec<(String, ServiceSpec)>,
    pub(super) group: Option<JobCgroup>,
    pub(super) cgroup_parent: Option<String>,
}

impl DockerExecutor {
    /// The job's cgroup (as the parent of its containers) and, with services, its network.
    pub(super) async fn prepare(
        &self,
        spec: &JobSpec,
        res: &mut JobResources,
    ) -> Result<(), String> {
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
    pub(super) async fn start_services(
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
    pub(super) async fn wait_for_services(
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
    pub(super) async fn exit_code(&self, id: &str) -> Option<i64> {
        let state = self.inspect(id).await.ok()?.state?;
        (state.running == Some(false)).then(|| state.exit_code.unwrap_or(-1))
    }

    /// "service `img` (alias a, b) <why>; its last output: …", the output bounded.
    pub(super) async fn service_error(&self, id: &str, svc: &ServiceSpec, why: &str) -> String {
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
    pub(super) async fn release(&self, res: JobResources) {
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
