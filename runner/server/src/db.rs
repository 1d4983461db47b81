//! The server's history: deliveries, pipelines and jobs, behind [`PipelineStore`]; SQLite is
//! the embedded implementation.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`: a transaction is on disk when `commit`
//! returns, so a webhook is acknowledged (202) only once its delivery and its pipeline are
//! durable, and `kill -9` at any moment loses nothing acknowledged. Migrations are numbered
//! and applied at start-up (`PRAGMA user_version`).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A pipeline to create.
#[derive(Clone, Debug, Default)]
pub struct NewPipeline {
    pub project: String,
    pub ref_name: String,
    pub sha: String,
    pub tag: Option<String>,
    /// `push`, `web`, `api`, `rerun`, …
    pub source: String,
    /// Only these jobs (and what they need); empty: all.
    pub jobs: Vec<String>,
    pub rerun_of: Option<i64>,
    /// Values for the pipeline file's `spec: inputs` (name → value).
    pub inputs: std::collections::BTreeMap<String, String>,
    /// Pipeline variables (GitLab's "Run pipeline" form): above the project's variables.
    pub variables: std::collections::BTreeMap<String, String>,
}

impl NewPipeline {
    /// The same commit of `p` again (a rerun or a play), linked to it by `rerun_of`.
    pub fn again(p: &Pipeline, source: &str, jobs: Vec<String>) -> NewPipeline {
        NewPipeline {
            project: p.project.clone(),
            ref_name: p.ref_name.clone(),
            sha: p.sha.clone(),
            tag: p.tag.clone(),
            source: source.to_string(),
            jobs,
            rerun_of: Some(p.id),
            inputs: p.inputs.clone(),
            variables: p.variables.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pipeline {
    pub id: i64,
    pub project: String,
    #[serde(rename = "ref")]
    pub ref_name: String,
    pub sha: String,
    pub tag: Option<String>,
    pub source: String,
    pub status: String,
    pub jobs_filter: Vec<String>,
    pub rerun_of: Option<i64>,
    /// Values given for the pipeline file's `spec: inputs`.
    pub inputs: std::collections::BTreeMap<String, String>,
    /// Jobs retried or played inside this pipeline, waiting for the queue to run them (its
    /// next run goes on with the last one); empty for a pipeline's first run.
    pub resume: Vec<String>,
    /// Pipeline variables given when it was started (names and values; values may be
    /// secrets, so the API lists names only).
    #[serde(skip_serializing, default)]
    pub variables: std::collections::BTreeMap<String, String>,
    /// Its OpenTelemetry trace, when the server sends traces.
    #[serde(default)]
    pub trace_id: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    #[serde(skip)]
    pub dir: Option<String>,
    #[serde(skip)]
    pub pid: Option<i64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Job {
    pub id: i64,
    pub pipeline_id: i64,
    pub index: i64,
    pub name: String,
    pub stage: String,
    pub status: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub failure_reason: Option<String>,
    pub peak_memory_bytes: Option<i64>,
    pub memory_limit_bytes: Option<i64>,
    pub attempts: Option<i64>,
    pub note: Option<String>,
    /// Indices of the jobs it `needs:` (empty for a job ordered by stages).
    pub needs: Vec<i64>,
    /// Its pipeline's OpenTelemetry trace.
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(skip)]
    pub log_path: Option<String>,
    #[serde(skip)]
    pub artifacts_dir: Option<String>,
}

/// What a webhook delivery became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// New; this pipeline was queued (None: the event starts nothing, e.g. a branch deletion).
    New(Option<i64>),
    /// Seen before: the pipeline the first delivery made.
    Duplicate(Option<i64>),
}

/// The server's store. SQLite here; a PostgreSQL implementation serves a fleet.
pub trait PipelineStore: Send + Sync {
    /// Record a delivery and, when `pipeline` is given, queue it: one transaction, durable on
    /// return. A delivery id seen before creates nothing.
    fn record_delivery(
        &self,
        source: &str,
        delivery_id: &str,
        project: &str,
        event: &str,
        pipeline: Option<&NewPipeline>,
    ) -> Result<Delivery>;
    fn create_pipeline(&self, p: &NewPipeline) -> Result<i64>;
    /// Take the oldest queued pipeline and mark it running.
    fn claim_next(&self) -> Result<Option<Pipeline>>;
    fn pipeline(&self, id: i64) -> Result<Option<Pipeline>>;
    fn pipelines(&self, project: Option<&str>, limit: i64) -> Result<Vec<Pipeline>>;
    /// A page of pipelines, newest first, filtered by project and status; and whether more
    /// follow.
    fn pipeline_page(
        &self,
        project: Option<&str>,
        status: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<Pipeline>, bool)>;
    fn set_pipeline_process(&self, id: i64, dir: &str, pid: Option<i64>) -> Result<()>;
    fn set_trace(&self, id: i64, trace_id: &str) -> Result<()>;
    fn finish_pipeline(&self, id: i64, status: &str, error: Option<&str>) -> Result<()>;
    /// Queue a finished pipeline again to run `jobs` inside it (a retry or a play); false when
    /// it has not finished.
    fn reopen(&self, id: i64, jobs: &[String]) -> Result<bool>;
    fn jobs(&self, pipeline_id: i64) -> Result<Vec<Job>>;
    fn job(&self, id: i64) -> Result<Option<Job>>;
    /// Insert or update a job row; returns its id.
    fn upsert_job(&self, job: &Job) -> Result<i64>;
    /// Pipelines and jobs a crash left `running`: failed (or queued again), returned.
    fn recover(&self, requeue: bool) -> Result<Vec<Pipeline>>;
    /// Every pipeline and job counted by project and status (for the metrics: a scan of
    /// the whole history).
    fn counts(&self) -> Result<Counts>;
    /// How many pipelines wait to start (through the status index, whatever the history).
    fn queued_count(&self) -> Result<i64>;
}

#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// (project, status, count)
    pub pipelines: Vec<(String, String, i64)>,
    /// (project, status, count)
    pub jobs: Vec<(String, String, i64)>,
    pub queued: i64,
    pub running_memory_bytes: i64,
}

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// Answered from the `pipelines_status` index: the web UI's budget line asks it on every page
/// and refresh, and counting through `counts()` scanned the whole history (70 ms a page at
/// 100,000 pipelines).
const QUEUED_COUNT: &str = "SELECT COUNT(*) FROM pipelines WHERE status = 'queued'";
const PIPELINE_COUNTS: &str =
    "SELECT project, status, n FROM pipeline_counts WHERE n > 0 ORDER BY project, status";
const JOB_COUNTS: &str =
    "SELECT project, status, n FROM job_counts WHERE n > 0 ORDER BY project, status";
const RUNNING_MEMORY: &str =
    "SELECT COALESCE(SUM(memory_limit_bytes), 0) FROM jobs WHERE status = 'running'";

const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE deliveries (
        source TEXT NOT NULL,
        delivery_id TEXT NOT NULL,
        project TEXT NOT NULL,
        event TEXT NOT NULL,
        received_at TEXT NOT NULL,
        pipeline_id INTEGER,
        PRIMARY KEY (source, delivery_id)
    );
    CREATE TABLE pipelines (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        project TEXT NOT NULL,
        ref TEXT NOT NULL,
        sha TEXT NOT NULL,
        tag TEXT,
        source TEXT NOT NULL,
        status TEXT NOT NULL,
        jobs_filter TEXT NOT NULL DEFAULT '[]',
        rerun_of INTEGER,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        error TEXT,
        dir TEXT,
        pid INTEGER
    );
    CREATE INDEX pipelines_status ON pipelines (status, id);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        pipeline_id INTEGER NOT NULL REFERENCES pipelines (id),
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        stage TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        duration_ms INTEGER,
        exit_code INTEGER,
        failure_reason TEXT,
        peak_memory_bytes INTEGER,
        memory_limit_bytes INTEGER,
        attempts INTEGER,
        note TEXT,
        log_path TEXT,
        artifacts_dir TEXT,
        UNIQUE (pipeline_id, idx)
    );",
    // 2: deliveries are deduplicated per forge *and project*: one project's deliveries (or a
    // replay signed with its secret) can never make another project's delivery look seen.
    "CREATE TABLE deliveries2 (
        source TEXT NOT NULL,
        delivery_id TEXT NOT NULL,
        project TEXT NOT NULL,
        event TEXT NOT NULL,
        received_at TEXT NOT NULL,
        pipeline_id INTEGER,
        PRIMARY KEY (source, project, delivery_id)
    );
    INSERT INTO deliveries2 SELECT source, delivery_id, project, event, received_at, pipeline_id FROM deliveries;
    DROP TABLE deliveries;
    ALTER TABLE deliveries2 RENAME TO deliveries;",
    // 3: the values a pipeline was given for its file's `spec: inputs`.
    "ALTER TABLE pipelines ADD COLUMN inputs TEXT NOT NULL DEFAULT '{}';",
    // 4: a job's `needs:` (indices of jobs of its pipeline), for the pipeline graph.
    "ALTER TABLE jobs ADD COLUMN needs TEXT NOT NULL DEFAULT '[]';",
    // 5: a project's pipelines, newest first, without scanning everyone's (the UI's filter).
    "CREATE INDEX pipelines_project ON pipelines (project, id);",
    // 6: jobs retried or played inside a finished pipeline, for its next run.
    "ALTER TABLE pipelines ADD COLUMN resume TEXT NOT NULL DEFAULT '[]';",
    // 7: pipeline variables given through the API.
    "ALTER TABLE pipelines ADD COLUMN variables TEXT NOT NULL DEFAULT '{}';",
    // 8: the OpenTelemetry trace of a pipeline, and of its jobs.
    "ALTER TABLE pipelines ADD COLUMN trace_id TEXT; ALTER TABLE jobs ADD COLUMN trace_id TEXT;",
    // 9: counts by project and status kept up to date by triggers, and the running jobs
    // indexed: a Prometheus scrape counted the whole history under the store's lock (73 ms at
    // 100,000 pipelines, while webhooks waited).
    "CREATE TABLE pipeline_counts (
        project TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL,
        PRIMARY KEY (project, status)
    ) WITHOUT ROWID;
    CREATE TABLE job_counts (
        project TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL,
        PRIMARY KEY (project, status)
    ) WITHOUT ROWID;
    INSERT INTO pipeline_counts SELECT project, status, COUNT(*) FROM pipelines GROUP BY project, status;
    INSERT INTO job_counts SELECT p.project, j.status, COUNT(*) FROM jobs j JOIN pipelines p ON p.id = j.pipeline_id
        GROUP BY p.project, j.status;
    CREATE TRIGGER pipelines_counted AFTER INSERT ON pipelines BEGIN
        INSERT INTO pipeline_counts VALUES (NEW.project, NEW.status, 1)
            ON CONFLICT (project, status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER pipelines_recounted AFTER UPDATE OF project, status ON pipelines
    WHEN OLD.project IS NOT NEW.project OR OLD.status IS NOT NEW.status BEGIN
        UPDATE pipeline_counts SET n = n - 1 WHERE project = OLD.project AND status = OLD.status;
        INSERT INTO pipeline_counts VALUES (NEW.project, NEW.status, 1)
            ON CONFLICT (project, status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER pipelines_uncounted AFTER DELETE ON pipelines BEGIN
        UPDATE pipeline_counts SET n = n - 1 WHERE project = OLD.project AND status = OLD.status;
    END;
    CREATE TRIGGER jobs_counted AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts SELECT project, NEW.status, 1 FROM pipelines WHERE id = NEW.pipeline_id
            ON CONFLICT (project, status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_recounted AFTER UPDATE OF status ON jobs
    WHEN OLD.status IS NOT NEW.status BEGIN
        UPDATE job_counts SET n = n - 1
            WHERE project = (SELECT project FROM pipelines WHERE id = OLD.pipeline_id) AND status = OLD.status;
        INSERT INTO job_counts SELECT project, NEW.status, 1 FROM pipelines WHERE id = NEW.pipeline_id
            ON CONFLICT (project, status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_uncounted AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1
            WHERE project = (SELECT project FROM pipelines WHERE id = OLD.pipeline_id) AND status = OLD.status;
    END;
    CREATE INDEX jobs_running ON jobs (status) WHERE status = 'running';",
];

pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
        )?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError(format!(
                "{} was written by a newer rave (schema {version}, this rave knows {}); upgrade rave",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(m)?;
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
            tx.commit()?;
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

const PIPELINE_COLS: &str = "id, project, ref, sha, tag, source, status, jobs_filter, rerun_of, created_at, started_at, finished_at, error, dir, pid, inputs, resume, variables, trace_id";

fn pipeline_row(r: &rusqlite::Row) -> rusqlite::Result<Pipeline> {
    let filter: String = r.get(7)?;
    Ok(Pipeline {
        id: r.get(0)?,
        project: r.get(1)?,
        ref_name: r.get(2)?,
        sha: r.get(3)?,
        tag: r.get(4)?,
        source: r.get(5)?,
        status: r.get(6)?,
        jobs_filter: serde_json::from_str(&filter).unwrap_or_default(),
        rerun_of: r.get(8)?,
        created_at: r.get(9)?,
        started_at: r.get(10)?,
        finished_at: r.get(11)?,
        error: r.get(12)?,
        dir: r.get(13)?,
        pid: r.get(14)?,
        inputs: serde_json::from_str(&r.get::<_, String>(15)?).unwrap_or_default(),
        resume: serde_json::from_str(&r.get::<_, String>(16)?).unwrap_or_default(),
        variables: serde_json::from_str(&r.get::<_, String>(17)?).unwrap_or_default(),
        trace_id: r.get(18)?,
    })
}

const JOB_COLS: &str = "id, pipeline_id, idx, name, stage, status, started_at, finished_at, duration_ms, exit_code, failure_reason, peak_memory_bytes, memory_limit_bytes, attempts, note, log_path, artifacts_dir, needs, trace_id";

fn job_row(r: &rusqlite::Row) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        pipeline_id: r.get(1)?,
        index: r.get(2)?,
        name: r.get(3)?,
        stage: r.get(4)?,
        status: r.get(5)?,
        started_at: r.get(6)?,
        finished_at: r.get(7)?,
        duration_ms: r.get(8)?,
        exit_code: r.get(9)?,
        failure_reason: r.get(10)?,
        peak_memory_bytes: r.get(11)?,
        memory_limit_bytes: r.get(12)?,
        attempts: r.get(13)?,
        note: r.get(14)?,
        log_path: r.get(15)?,
        artifacts_dir: r.get(16)?,
        needs: serde_json::from_str(&r.get::<_, String>(17)?).unwrap_or_default(),
        trace_id: r.get(18)?,
    })
}

fn insert_pipeline(c: &Connection, p: &NewPipeline) -> rusqlite::Result<i64> {
    c.execute(
        "INSERT INTO pipelines (project, ref, sha, tag, source, status, jobs_filter, rerun_of, created_at, inputs, variables)
         VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8, ?9, ?10)",
        params![
            p.project,
            p.ref_name,
            p.sha,
            p.tag,
            p.source,
            serde_json::to_string(&p.jobs).unwrap_or_else(|_| "[]".into()),
            p.rerun_of,
            now(),
            serde_json::to_string(&p.inputs).unwrap_or_else(|_| "{}".into()),
            serde_json::to_string(&p.variables).unwrap_or_else(|_| "{}".into())
        ],
    )?;
    Ok(c.last_insert_rowid())
}

impl PipelineStore for SqliteStore {
    fn record_delivery(
        &self,
        source: &str,
        delivery_id: &str,
        project: &str,
        event: &str,
        pipeline: Option<&NewPipeline>,
    ) -> Result<Delivery> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let seen: Option<Option<i64>> = tx
            .query_row(
                "SELECT pipeline_id FROM deliveries WHERE source = ?1 AND project = ?2 AND delivery_id = ?3",
                params![source, project, delivery_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(p) = seen {
            return Ok(Delivery::Duplicate(p));
        }
        let id = match pipeline {
            Some(p) => Some(insert_pipeline(&tx, p)?),
            None => None,
        };
        tx.execute(
            "INSERT INTO deliveries (source, delivery_id, project, event, received_at, pipeline_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![source, delivery_id, project, event, now(), id],
        )?;
        tx.commit()?;
        Ok(Delivery::New(id))
    }

    fn create_pipeline(&self, p: &NewPipeline) -> Result<i64> {
        let c = self.lock();
        Ok(insert_pipeline(&c, p)?)
    }

    fn claim_next(&self) -> Result<Option<Pipeline>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let p = tx
            .query_row(
                &format!("SELECT {PIPELINE_COLS} FROM pipelines WHERE status = 'queued' ORDER BY id LIMIT 1"),
                [],
                pipeline_row,
            )
            .optional()?;
        if let Some(p) = &p {
            tx.execute(
                "UPDATE pipelines SET status = 'running', started_at = COALESCE(started_at, ?2) WHERE id = ?1",
                params![p.id, now()],
            )?;
        }
        tx.commit()?;
        Ok(p.map(|mut p| {
            p.status = "running".into();
            p
        }))
    }

    fn pipeline(&self, id: i64) -> Result<Option<Pipeline>> {
        let c = self.lock();
        Ok(c.query_row(
            &format!("SELECT {PIPELINE_COLS} FROM pipelines WHERE id = ?1"),
            [id],
            pipeline_row,
        )
        .optional()?)
    }

    fn pipelines(&self, project: Option<&str>, limit: i64) -> Result<Vec<Pipeline>> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {PIPELINE_COLS} FROM pipelines WHERE ?1 IS NULL OR project = ?1 ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = st.query_map(params![project, limit], pipeline_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn pipeline_page(
        &self,
        project: Option<&str>,
        status: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<Pipeline>, bool)> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {PIPELINE_COLS} FROM pipelines
             WHERE (?1 IS NULL OR project = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY id DESC LIMIT ?3 OFFSET ?4"
        ))?;
        let rows = st.query_map(params![project, status, limit + 1, offset], pipeline_row)?;
        let mut v: Vec<Pipeline> = rows.collect::<rusqlite::Result<_>>()?;
        let more = v.len() as i64 > limit;
        v.truncate(limit.max(0) as usize);
        Ok((v, more))
    }

    fn set_trace(&self, id: i64, trace_id: &str) -> Result<()> {
        let c = self.lock();
        c.execute(
            "UPDATE pipelines SET trace_id = ?2 WHERE id = ?1",
            params![id, trace_id],
        )?;
        Ok(())
    }

    fn set_pipeline_process(&self, id: i64, dir: &str, pid: Option<i64>) -> Result<()> {
        let c = self.lock();
        c.execute(
            "UPDATE pipelines SET dir = ?2, pid = ?3 WHERE id = ?1",
            params![id, dir, pid],
        )?;
        Ok(())
    }

    fn reopen(&self, id: i64, jobs: &[String]) -> Result<bool> {
        let c = self.lock();
        let n = c.execute(
            "UPDATE pipelines SET status = 'queued', resume = ?2, finished_at = NULL, error = NULL, pid = NULL
             WHERE id = ?1 AND status IN ('success', 'failed', 'canceled', 'manual', 'skipped')",
            params![id, serde_json::to_string(jobs).unwrap_or_else(|_| "[]".into())],
        )?;
        Ok(n == 1)
    }

    fn finish_pipeline(&self, id: i64, status: &str, error: Option<&str>) -> Result<()> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        tx.execute(
            "UPDATE pipelines SET status = ?2, error = COALESCE(?3, error), finished_at = ?4, pid = NULL WHERE id = ?1",
            params![id, status, error, now()],
        )?;
        // Jobs that never got to run end with the pipeline.
        tx.execute(
            "UPDATE jobs SET status = CASE WHEN status = 'running' THEN 'failed' ELSE 'skipped' END,
                 failure_reason = CASE WHEN status = 'running' THEN 'runner_error' ELSE failure_reason END
             WHERE pipeline_id = ?1 AND status IN ('created', 'running')",
            [id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn jobs(&self, pipeline_id: i64) -> Result<Vec<Job>> {
        let c = self.lock();
        let mut st = c.prepare(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE pipeline_id = ?1 ORDER BY idx"
        ))?;
        let rows = st.query_map([pipeline_id], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn job(&self, id: i64) -> Result<Option<Job>> {
        let c = self.lock();
        Ok(c.query_row(
            &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
            [id],
            job_row,
        )
        .optional()?)
    }

    fn upsert_job(&self, j: &Job) -> Result<i64> {
        let c = self.lock();
        let id = c.query_row(
            "INSERT INTO jobs (pipeline_id, idx, name, stage, status, started_at, finished_at, duration_ms, exit_code,
                 failure_reason, peak_memory_bytes, memory_limit_bytes, attempts, note, log_path, artifacts_dir, needs, trace_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
             ON CONFLICT (pipeline_id, idx) DO UPDATE SET
                 status = excluded.status, started_at = COALESCE(excluded.started_at, started_at),
                 finished_at = excluded.finished_at, duration_ms = excluded.duration_ms,
                 exit_code = excluded.exit_code, failure_reason = excluded.failure_reason,
                 peak_memory_bytes = excluded.peak_memory_bytes,
                 memory_limit_bytes = COALESCE(excluded.memory_limit_bytes, memory_limit_bytes),
                 attempts = COALESCE(excluded.attempts, attempts), note = excluded.note,
                 log_path = COALESCE(excluded.log_path, log_path),
                 artifacts_dir = COALESCE(excluded.artifacts_dir, artifacts_dir),
                 trace_id = COALESCE(excluded.trace_id, trace_id)
             RETURNING id",
            params![
                j.pipeline_id,
                j.index,
                j.name,
                j.stage,
                j.status,
                j.started_at,
                j.finished_at,
                j.duration_ms,
                j.exit_code,
                j.failure_reason,
                j.peak_memory_bytes,
                j.memory_limit_bytes,
                j.attempts,
                j.note,
                j.log_path,
                j.artifacts_dir,
                serde_json::to_string(&j.needs).unwrap_or_else(|_| "[]".into()),
                j.trace_id
            ],
            |r| r.get(0),
        )?;
        Ok(id)
    }

    fn recover(&self, requeue: bool) -> Result<Vec<Pipeline>> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let interrupted: Vec<Pipeline> = {
            let mut st = tx.prepare(&format!(
                "SELECT {PIPELINE_COLS} FROM pipelines WHERE status = 'running'"
            ))?;
            st.query_map([], pipeline_row)?
                .collect::<rusqlite::Result<_>>()?
        };
        for p in &interrupted {
            tx.execute(
                "UPDATE jobs SET status = 'failed', failure_reason = 'runner_error', finished_at = ?2,
                     note = 'rave serve stopped while the job ran'
                 WHERE pipeline_id = ?1 AND status = 'running'",
                params![p.id, now()],
            )?;
            if requeue {
                tx.execute(
                    "UPDATE pipelines SET status = 'queued', started_at = NULL, pid = NULL,
                         error = 'requeued: rave serve stopped while it ran' WHERE id = ?1",
                    [p.id],
                )?;
                // A pipeline's first run starts over; a retry inside it keeps what came before.
                if p.resume.is_empty() {
                    tx.execute("DELETE FROM jobs WHERE pipeline_id = ?1", [p.id])?;
                }
            } else {
                tx.execute(
                    "UPDATE jobs SET status = 'skipped' WHERE pipeline_id = ?1 AND status = 'created'",
                    [p.id],
                )?;
                tx.execute(
                    "UPDATE pipelines SET status = 'failed', finished_at = ?2, pid = NULL,
                         error = 'rave serve stopped while the pipeline ran (runner_error)' WHERE id = ?1",
                    params![p.id, now()],
                )?;
            }
        }
        tx.commit()?;
        Ok(interrupted)
    }

    fn queued_count(&self) -> Result<i64> {
        let c = self.lock();
        Ok(c.query_row(QUEUED_COUNT, [], |r| r.get(0))?)
    }

    fn counts(&self) -> Result<Counts> {
        let c = self.lock();
        let group = |sql: &str| -> Result<Vec<(String, String, i64)>> {
            let mut st = c.prepare(sql)?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        };
        // Kept by triggers (schema 9): a handful of rows, whatever the history.
        let pipelines = group(PIPELINE_COUNTS)?;
        let jobs = group(JOB_COUNTS)?;
        let queued = pipelines
            .iter()
            .filter(|(_, s, _)| s == "queued")
            .map(|(_, _, n)| *n)
            .sum();
        let running_memory_bytes = c.query_row(RUNNING_MEMORY, [], |r| r.get(0))?;
        Ok(Counts {
            pipelines,
            jobs,
            queued,
            running_memory_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(sha: &str) -> NewPipeline {
        NewPipeline {
            project: "p".into(),
            ref_name: "main".into(),
            sha: sha.into(),
            source: "push".into(),
            ..NewPipeline::default()
        }
    }

    fn running(pipeline_id: i64) -> Job {
        Job {
            pipeline_id,
            index: 0,
            name: "build".into(),
            stage: "build".into(),
            status: "running".into(),
            ..Job::default()
        }
    }

    #[test]
    fn a_delivery_id_seen_twice_makes_one_pipeline() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db")).unwrap();
        let a = s
            .record_delivery("github", "x1", "p", "push", Some(&np("a")))
            .unwrap();
        let b = s
            .record_delivery("github", "x1", "p", "push", Some(&np("a")))
            .unwrap();
        let Delivery::New(Some(id)) = a else {
            panic!("{a:?}")
        };
        assert_eq!(b, Delivery::Duplicate(Some(id)));
        // The same id for another project is another delivery.
        assert!(matches!(
            s.record_delivery("github", "x1", "other", "push", Some(&np("a")))
                .unwrap(),
            Delivery::New(Some(_))
        ));
        // The same id from another forge is another delivery.
        assert!(matches!(
            s.record_delivery("gitlab", "x1", "p", "push", Some(&np("a")))
                .unwrap(),
            Delivery::New(Some(_))
        ));
        assert_eq!(s.pipelines(None, 10).unwrap().len(), 3);
    }

    #[test]
    fn what_was_committed_survives_reopening_and_running_work_is_recovered() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.create_pipeline(&np("a")).unwrap();
            s.create_pipeline(&np("b")).unwrap();
            let p = s.claim_next().unwrap().unwrap();
            assert_eq!(p.sha, "a");
            s.upsert_job(&running(p.id)).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let rec = s.recover(false).unwrap();
        assert_eq!(rec.len(), 1);
        let p = s.pipeline(rec[0].id).unwrap().unwrap();
        assert_eq!(p.status, "failed");
        let jobs = s.jobs(p.id).unwrap();
        assert_eq!(jobs[0].failure_reason.as_deref(), Some("runner_error"));
        // The queued one is still queued, next in line.
        assert_eq!(s.claim_next().unwrap().unwrap().sha, "b");
    }

    #[test]
    fn the_queue_is_counted_from_the_status_index() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db")).unwrap();
        for sha in ["a", "b", "c"] {
            s.create_pipeline(&np(sha)).unwrap();
        }
        let p = s.claim_next().unwrap().unwrap();
        s.finish_pipeline(p.id, "success", None).unwrap();
        assert_eq!(s.queued_count().unwrap(), 2);
        assert_eq!(s.counts().unwrap().queued, 2);
        // Not a scan of the history: SQLite's plan searches the index.
        let plan = query_plan(&s, QUEUED_COUNT);
        assert!(
            plan.iter()
                .any(|l| l.contains("SEARCH") && l.contains("pipelines_status")),
            "{plan:?}"
        );
    }

    /// SQLite's plan for `sql`, a line per step (`SCAN t`, `SEARCH t USING INDEX i …`).
    fn query_plan(s: &SqliteStore, sql: &str) -> Vec<String> {
        s.lock()
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    type ByProjectAndStatus = Vec<(String, String, i64)>;

    /// What the counts must be: the history counted row by row.
    fn counted(s: &SqliteStore) -> (ByProjectAndStatus, ByProjectAndStatus) {
        let c = s.lock();
        let group = |sql: &str| {
            c.prepare(sql)
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<rusqlite::Result<Vec<_>>>()
                .unwrap()
        };
        (
            group("SELECT project, status, COUNT(*) FROM pipelines GROUP BY project, status ORDER BY 1, 2"),
            group(
                "SELECT p.project, j.status, COUNT(*) FROM jobs j JOIN pipelines p ON p.id = j.pipeline_id
                 GROUP BY 1, 2 ORDER BY 1, 2",
            ),
        )
    }

    #[test]
    fn counts_follow_every_change_without_reading_the_history() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db")).unwrap();
        let check = |s: &SqliteStore| {
            let c = s.counts().unwrap();
            assert_eq!((c.pipelines, c.jobs), counted(s));
        };
        for (project, sha) in [("a", "1"), ("a", "2"), ("b", "3"), ("b", "4")] {
            s.create_pipeline(&NewPipeline {
                project: project.into(),
                ..np(sha)
            })
            .unwrap();
        }
        check(&s);
        let p = s.claim_next().unwrap().unwrap();
        let mut job = running(p.id);
        s.upsert_job(&job).unwrap();
        job.index = 1;
        job.status = "created".into();
        s.upsert_job(&job).unwrap();
        check(&s);
        assert_eq!(s.counts().unwrap().running_memory_bytes, 0);
        job.status = "running".into();
        job.memory_limit_bytes = Some(1 << 20);
        s.upsert_job(&job).unwrap();
        assert_eq!(s.counts().unwrap().running_memory_bytes, 1 << 20);
        check(&s);
        // A crash: its jobs are dropped and the pipeline queued again.
        s.recover(true).unwrap();
        check(&s);
        let p = s.claim_next().unwrap().unwrap();
        s.upsert_job(&running(p.id)).unwrap();
        s.finish_pipeline(p.id, "failed", Some("x")).unwrap();
        assert!(s.reopen(p.id, &["build".to_string()]).unwrap());
        check(&s);
        // A scrape reads the small tables and the running jobs' index, never the history.
        for sql in [PIPELINE_COUNTS, JOB_COUNTS, RUNNING_MEMORY] {
            let plan = query_plan(&s, sql);
            assert!(
                !plan
                    .iter()
                    .any(|l| l.starts_with("SCAN pipelines") || l.starts_with("SCAN jobs")),
                "{sql}: {plan:?}"
            );
        }
    }

    #[test]
    fn counts_of_a_store_written_before_they_were_kept_are_filled_in() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        {
            // A store as schema 8 left it, with history.
            let conn = Connection::open(&path).unwrap();
            for m in &MIGRATIONS[..8] {
                conn.execute_batch(m).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 8;
                 INSERT INTO pipelines (project, ref, sha, source, status, created_at)
                     VALUES ('a', 'main', '1', 'push', 'success', 'x'), ('a', 'main', '2', 'push', 'failed', 'x'),
                            ('b', 'main', '3', 'push', 'success', 'x');
                 INSERT INTO jobs (pipeline_id, idx, name, stage, status) VALUES (1, 0, 'j', 's', 'success'),
                     (2, 0, 'j', 's', 'failed'), (2, 1, 'k', 's', 'skipped');",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let c = s.counts().unwrap();
        assert_eq!(c.pipelines.len(), 3);
        assert_eq!((c.pipelines, c.jobs), counted(&s));
    }

    #[test]
    fn requeue_puts_interrupted_pipelines_back_in_line() {
        let d = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&d.path().join("db")).unwrap();
        s.create_pipeline(&np("a")).unwrap();
        let p = s.claim_next().unwrap().unwrap();
        s.upsert_job(&running(p.id)).unwrap();
        assert_eq!(s.recover(true).unwrap().len(), 1);
        let again = s.claim_next().unwrap().unwrap();
        assert_eq!(again.id, p.id);
        assert!(
            s.jobs(p.id).unwrap().is_empty(),
            "a requeued pipeline starts over"
        );
    }
}
