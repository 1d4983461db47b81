//! The host budget every running pipeline's jobs share: a Unix socket in the data dir that
//! each pipeline's `rave run --budget-socket` asks for room (see `rave_engine::lease`), and
//! the one [`Share`] that decides who gets it.
//!
//! A run's holdings live as long as its connection: a `rave run` that ends, crashes or is
//! killed frees what it held, and nothing else can (the socket is the server's, mode 0600).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rave_engine::lease::{FromBroker, ToBroker};
use rave_engine::share::{RunKey, Share, ShareView};
use rave_model::Budget;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::ServerConfig;

/// A run's `trigger: project` job asking for a downstream pipeline.
#[derive(Debug)]
pub struct TriggerRequest {
    /// The asking run's connection (the answers go there).
    pub key: RunKey,
    pub upstream_pipeline: u64,
    pub upstream_project: String,
    pub job: usize,
    pub project: String,
    pub branch: Option<String>,
    pub variables: Vec<(String, String)>,
    pub depend: bool,
}

pub struct Broker {
    /// Where `trigger: project` requests go (set once the server's state exists).
    triggers: Mutex<Option<mpsc::UnboundedSender<TriggerRequest>>>,
    share: Mutex<Share>,
    conns: Mutex<HashMap<RunKey, mpsc::UnboundedSender<FromBroker>>>,
    next: AtomicU64,
    pub socket: PathBuf,
    /// Told when what the budget holds changes (the UI's budget line).
    pub changed: tokio::sync::watch::Sender<u64>,
}

/// The host budget from `[server]`: `memory`/`cpus`/`jobs` over `profile` (`full` is the
/// machine less 1 GiB; `safe`, the default, is what `rave run` uses by default).
pub fn host_budget(s: &ServerConfig) -> Result<Budget, String> {
    let defaults = rave_model::RaveConfig::default();
    let base = match defaults.profile_budget(s.profile.as_deref().unwrap_or("safe")) {
        Ok((_, b)) => b,
        // A project's own profile: each pipeline keeps to it; together they share the machine.
        Err(_) => rave_model::RaveConfig::full_default(),
    };
    base.with_overrides(s.memory.as_deref(), s.cpus.as_deref(), s.jobs, |k| {
        format!("[server] {k}")
    })
}

impl Broker {
    pub fn new(budget: Budget, socket: PathBuf) -> Arc<Broker> {
        Arc::new(Broker {
            triggers: Mutex::new(None),
            share: Mutex::new(Share::new(budget.memory_bytes, budget.cpus, budget.jobs)),
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            socket,
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    /// Hand `trigger: project` requests to `tx` (the server's downstream task).
    pub fn on_trigger(&self, tx: mpsc::UnboundedSender<TriggerRequest>) {
        *self.triggers.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    pub fn view(&self) -> ShareView {
        self.share.lock().unwrap_or_else(|p| p.into_inner()).view()
    }

    /// Bind the socket (a stale one from a crash is replaced) and answer runs until the
    /// server stops.
    pub async fn listen(self: Arc<Self>) -> Result<tokio::task::JoinHandle<()>, String> {
        let path = &self.socket;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| {
            format!(
                "cannot create the budget socket {}: {e} (a Unix socket path must be shorter than 108 bytes: use a shorter data_dir)",
                path.display()
            )
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot protect {}: {e}", path.display()))?;
        }
        let v = self.view();
        info!(
            memory = %rave_model::units::format_memory(v.memory_bytes),
            cpus = v.cpus,
            jobs = v.jobs,
            "host budget shared by all pipelines"
        );
        Ok(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(self.clone().serve_run(stream));
                    }
                    Err(e) => {
                        warn!("budget socket: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }))
    }

    async fn serve_run(self: Arc<Self>, stream: UnixStream) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (read, mut write) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<FromBroker>();
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, tx);
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let Ok(mut line) = serde_json::to_vec(&m) else {
                    continue;
                };
                line.push(b'\n');
                if write.write_all(&line).await.is_err() {
                    break;
                }
            }
        });
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let msg = match serde_json::from_str::<ToBroker>(&line) {
                Ok(m) => m,
                Err(e) => {
                    warn!("budget socket: ignored a message ({e})");
                    continue;
                }
            };
            let refused = {
                let mut share = self.share.lock().unwrap_or_else(|p| p.into_inner());
                match msg {
                    ToBroker::Hello {
                        pipeline,
                        project,
                        cap,
                    } => {
                        share.join(key, pipeline, project, cap);
                        Vec::new()
                    }
                    ToBroker::Want { jobs } => share.want(key, jobs),
                    ToBroker::Release { job } => {
                        share.release(key, job);
                        Vec::new()
                    }
                    ToBroker::Trigger {
                        job,
                        project,
                        branch,
                        variables,
                        depend,
                    } => {
                        let (upstream_pipeline, upstream_project) =
                            share.pipeline_of(key).unwrap_or_default();
                        let req = TriggerRequest {
                            key,
                            upstream_pipeline,
                            upstream_project,
                            job,
                            project,
                            branch,
                            variables,
                            depend,
                        };
                        let sent = self
                            .triggers
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .is_some_and(|tx| tx.send(req).is_ok());
                        if !sent {
                            self.send(
                                key,
                                FromBroker::Triggered {
                                    job,
                                    pipeline: None,
                                    error: Some("this server takes no downstream pipelines".into()),
                                },
                            );
                        }
                        Vec::new()
                    }
                }
            };
            for (job, reason) in refused {
                self.send(key, FromBroker::Refuse { job, reason });
            }
            self.grant();
        }
        // The run ended or died: what it held is free.
        self.share
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .leave(key);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        writer.abort();
        self.grant();
    }

    /// Ask the run of `pipeline` to stop one of its jobs; false when that pipeline's run is
    /// not connected (not running, or still starting).
    pub fn cancel_job(&self, pipeline: i64, job: usize) -> bool {
        let key = self
            .share
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run_of(pipeline as u64);
        key.is_some_and(|k| self.send(k, FromBroker::Cancel { job }))
    }

    pub fn send(&self, key: RunKey, m: FromBroker) -> bool {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|tx| tx.send(m).is_ok())
    }

    /// Hand out whatever fits now.
    fn grant(&self) {
        let grants = self
            .share
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .select();
        for (key, job) in grants {
            if !self.send(key, FromBroker::Grant { job }) {
                self.share
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release(key, job);
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Where the socket goes: in the data dir (only the server's user can reach it).
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("budget.sock")
}
