//! `rave serve`: git push and tag webhooks start pipelines; history, logs and artifacts are
//! kept in a data dir and served over an HTTP API with bearer tokens; `/metrics` for
//! Prometheus.
//!
//! Data dir layout:
//!
//! ```text
//! rave.db                 SQLite (WAL): deliveries, pipelines, jobs
//! mirrors/<project>.git   bare mirrors, fetched before each pipeline
//! pipelines/<id>/src      the checkout of exactly the pipeline's commit; after the run only
//!                         its .rave/runs/1/{logs,artifacts,summary.json} are kept
//! pipelines/<id>/events.jsonl, console.log, summary.json
//! ```

pub mod api;
pub mod body;
pub mod budget;
pub mod config;
pub mod db;
pub mod events;
pub mod hooks;
pub mod listen;
pub mod metrics;
pub mod ui;
pub mod worker;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{info, warn};

use crate::config::{Config, OnRestart, Scope};
use crate::db::{PipelineStore, SqliteStore};

/// What every handler and the queue share.
pub struct State {
    pub store: Arc<dyn PipelineStore>,
    pub cfg: Config,
    pub data_dir: PathBuf,
    pub metrics: metrics::Metrics,
    /// Wakes the queue when a pipeline is added.
    pub wake: tokio::sync::Notify,
    /// Pipeline id → pid of its `rave run`, for cancel.
    pub running: Mutex<HashMap<i64, u32>>,
    /// Pipelines canceled before their `rave run` started (still fetching).
    pub cancel_requested: Mutex<std::collections::HashSet<i64>>,
    /// Set when the server is asked to stop: the queue takes nothing new.
    pub stopping: tokio_util::sync::CancellationToken,
    /// Per-source token buckets: (tokens, last refill).
    pub limiter: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    /// API tokens: sha256 of the value, scope, name.
    pub tokens: Vec<([u8; 32], Scope, String)>,
    pub rave_exe: PathBuf,
    /// One fetch at a time per server: libgit2 and a mirror do not like concurrent writers.
    pub fetch_lock: Arc<Mutex<()>>,
    /// The host budget the jobs of every running pipeline share.
    pub broker: Arc<budget::Broker>,
    /// Where pipelines' traces go (OTLP/HTTP), if anywhere.
    pub otlp: Option<String>,
    /// When each queued pipeline's request (webhook or API call) was handled: the first span
    /// of its trace. Bounded; lost on restart.
    pub intakes: Mutex<HashMap<i64, (std::time::SystemTime, std::time::SystemTime, String)>>,
    /// Status changes, for `GET /api/events`.
    pub events: tokio::sync::broadcast::Sender<events::ServerEvent>,
    /// Signed-in browsers of the web UI (in memory: a restart signs everyone out).
    pub sessions: Mutex<HashMap<String, ui::Session>>,
}

pub struct ServeOptions {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub json_logs: bool,
    /// The `rave` binary that runs pipelines.
    pub rave_exe: PathBuf,
}

/// Run the server until SIGINT/SIGTERM. Errors name what to fix.
pub fn serve(opts: ServeOptions) -> Result<(), String> {
    init_tracing(opts.json_logs);
    let cfg = match &opts.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let data_dir = opts
        .data_dir
        .clone()
        .or_else(|| cfg.server.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("rave-data"));
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create the data dir {}: {e}", data_dir.display()))?;
    // Children run in their checkouts: every path handed around must be absolute.
    let data_dir = data_dir
        .canonicalize()
        .map_err(|e| format!("cannot open the data dir {}: {e}", data_dir.display()))?;
    let listen = opts
        .listen
        .clone()
        .or_else(|| cfg.server.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let store = SqliteStore::open(&data_dir.join("rave.db")).map_err(|e| e.to_string())?;
    let mut tokens = Vec::new();
    for t in &cfg.tokens {
        let v = t.value()?;
        tokens.push((sha(&v), t.scope, t.name.clone()));
    }
    if tokens.is_empty() {
        warn!(
            "no [[tokens]] in the config: the API answers 401 to everything (webhooks still work)"
        );
    }
    if cfg.projects.is_empty() {
        warn!("no [[projects]] in the config: every webhook is refused");
    }
    let otlp = cfg
        .server
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.is_empty());
    let broker = budget::Broker::new(
        budget::host_budget(&cfg.server)?,
        budget::socket_path(&data_dir),
    );
    let requeue = cfg.server.on_restart == OnRestart::Requeue;
    let state = Arc::new(State {
        store: Arc::new(store),
        cfg,
        data_dir,
        metrics: metrics::Metrics::default(),
        wake: tokio::sync::Notify::new(),
        running: Mutex::new(HashMap::new()),
        cancel_requested: Mutex::new(Default::default()),
        stopping: tokio_util::sync::CancellationToken::new(),
        limiter: Mutex::new(HashMap::new()),
        tokens,
        rave_exe: opts.rave_exe,
        fetch_lock: Arc::new(Mutex::new(())),
        broker,
        otlp,
        intakes: Mutex::new(HashMap::new()),
        events: events::channel(),
        sessions: Mutex::new(HashMap::new()),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        // Before listening: whatever a crash interrupted is settled first.
        let interrupted = state.store.recover(requeue).map_err(|e| e.to_string())?;
        if !interrupted.is_empty() {
            warn!(
                count = interrupted.len(),
                requeue, "pipelines were running when rave serve stopped"
            );
        }
        worker::clean_up_after_crash(&interrupted).await;
        let broker = state.broker.clone().listen().await?;
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        info!(%addr, data_dir = %state.data_dir.display(), "rave serve listening");
        // Tests and scripts read the port from here when asked to listen on :0.
        println!("listening on {addr}");
        let (trigger_tx, trigger_rx) = tokio::sync::mpsc::unbounded_channel();
        state.broker.on_trigger(trigger_tx);
        tokio::spawn(worker::downstream_triggers(state.clone(), trigger_rx));
        let queue = tokio::spawn(worker::run_queue(state.clone()));
        let app = api::router(state.clone());
        let served = listen::serve(listener, app, shutdown()).await;
        // A stop (SIGTERM from systemd, Ctrl-C) cancels the running pipeline as a user's
        // cancel would (after_script runs, the record says `canceled`) instead of leaving it to
        // be failed at the next start; queued pipelines stay queued.
        state.stopping.cancel();
        let pids: Vec<u32> = state
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .copied()
            .collect();
        for pid in pids {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::INT);
            }
        }
        if tokio::time::timeout(std::time::Duration::from_secs(60), queue)
            .await
            .is_err()
        {
            warn!("the running pipelines did not stop within 60 s; the next start fails them");
        }
        broker.abort();
        let _ = std::fs::remove_file(&state.broker.socket);
        served
    })
}

impl State {
    /// Remember how long taking pipeline `id` in took (`what`: the webhook's forge, `api`).
    pub fn intake(&self, id: i64, started: std::time::SystemTime, what: &str) {
        if self.otlp.is_none() {
            return;
        }
        let mut m = self.intakes.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= 10_000 {
            // Pipelines queued long ago and never run (a stopped queue): forget the oldest.
            if let Some(&oldest) = m.keys().min() {
                m.remove(&oldest);
            }
        }
        m.insert(
            id,
            (started, std::time::SystemTime::now(), what.to_string()),
        );
    }
}

pub fn sha(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}

fn init_tracing(json: bool) {
    let b = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if json {
        let _ = b.json().try_init();
    } else {
        let _ = b.with_ansi(false).try_init();
    }
}
