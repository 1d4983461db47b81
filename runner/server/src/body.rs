//! The JSON bodies of the server's API, owned here and used by both sides: the server's
//! handlers answer with them and `rave pipelines`, `rave retry`, … read them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::db::{Job, Pipeline};

/// Every error answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /api/pipelines`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PipelineList {
    pub pipelines: Vec<Pipeline>,
}

/// `GET /api/pipelines/{id}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PipelineDetail {
    pub pipeline: Pipeline,
    pub jobs: Vec<Job>,
}

/// `GET /api/jobs/{id}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobDetail {
    pub job: Job,
}

/// `POST /api/pipelines`: a ref or a tag (resolved to its commit now, unless `sha` pins it).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CreatePipeline {
    pub project: String,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub ref_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    /// Only these jobs (with what they need).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<String>,
    /// Values for the pipeline file's `spec: inputs`.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Pipeline variables, above the project's (as GitLab's "Run pipeline" form gives them).
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

/// A webhook's or a create's answer: the pipeline it queued (none when the event starts
/// nothing), and whether the delivery was seen before.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Queued {
    pub pipeline_id: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The answer to a rerun, retry or play: the pipeline that runs them (the same one for a
/// retry or play inside it; a new one for a whole rerun) and the jobs named.
#[derive(Debug, Serialize, Deserialize)]
pub struct Rerun {
    pub pipeline_id: i64,
    #[serde(default)]
    pub jobs: Vec<String>,
}

/// `POST /api/pipelines/{id}/cancel`: `canceled` (it was queued) or `canceling` (it runs).
#[derive(Debug, Serialize, Deserialize)]
pub struct Cancel {
    pub pipeline_id: i64,
    pub status: String,
}

/// `GET /api/projects/{group/name}/variables` (admin): the project's CI/CD variables.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProjectVariables {
    pub project: String,
    pub variables: Vec<VariableInfo>,
}

/// A project's CI/CD variable as the API lists it: its name and flags, never its value.
#[derive(Debug, Serialize, Deserialize)]
pub struct VariableInfo {
    pub name: String,
    pub masked: bool,
    pub protected: bool,
    pub file: bool,
    pub raw: bool,
}

/// What the running jobs of all pipelines hold of the host budget, and what waits.
#[derive(Debug, Serialize, Deserialize)]
pub struct BudgetView {
    /// The host budget every running pipeline's jobs share.
    pub memory_budget_bytes: Option<u64>,
    /// Memory granted to the jobs running now, across pipelines.
    pub held_bytes: i64,
    pub running_jobs: i64,
    /// Ready jobs waiting for room, across pipelines.
    pub waiting_jobs: i64,
    pub queued_pipelines: i64,
    /// The budget in full: CPUs and slots too, and what each running pipeline holds.
    pub share: rave_engine::share::ShareView,
}
