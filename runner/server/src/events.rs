//! What happens on the server, as a stream: every change of a pipeline's or a job's status,
//! published to subscribers of `GET /api/events` (Server-Sent Events) as it is recorded.
//!
//! Subscribers that fall behind lose the oldest events (a bounded channel), never slow the
//! queue; they can read the current state from the API at any time.

use serde::Serialize;

/// One change, as the API sends it (`data:` of an SSE event whose `event:` is `kind`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServerEvent {
    pub kind: EventKind,
    pub pipeline_id: i64,
    pub project: String,
    /// For a job event: the job's id and name.
    pub job_id: Option<i64>,
    pub job: Option<String>,
    pub status: String,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Pipeline,
    Job,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Pipeline => "pipeline",
            EventKind::Job => "job",
        }
    }
}

/// How many events a slow subscriber may lag behind before it loses the oldest.
pub const CAPACITY: usize = 1024;

pub fn channel() -> tokio::sync::broadcast::Sender<ServerEvent> {
    tokio::sync::broadcast::channel(CAPACITY).0
}
