//! Pipelines and jobs: list, show, create, retry and play inside a pipeline, rerun, cancel.

use axum::extract::{Path, Query, State as St};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::State;
use crate::body::{Cancel, CreatePipeline, JobDetail, PipelineDetail, PipelineList, Queued, Rerun};
use crate::db::{NewPipeline, Pipeline};

use super::{Admin, Reader, Shared, error};

#[derive(Deserialize)]
pub(super) struct ListQuery {
    project: Option<String>,
    limit: Option<i64>,
}

pub(super) async fn list_pipelines(
    _: Reader,
    St(state): St<Shared>,
    Query(q): Query<ListQuery>,
) -> Response {
    let list = store!(
        state
            .store
            .pipelines(q.project.as_deref(), q.limit.unwrap_or(50).clamp(1, 1000))
    );
    axum::Json(PipelineList { pipelines: list }).into_response()
}

pub(super) async fn show_pipeline(
    _: Reader,
    St(state): St<Shared>,
    Path(id): Path<i64>,
) -> Response {
    let Some(p) = store!(state.store.pipeline(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no pipeline {id}"));
    };
    let jobs = store!(state.store.jobs(id));
    axum::Json(PipelineDetail { pipeline: p, jobs }).into_response()
}

pub(super) async fn show_job(_: Reader, St(state): St<Shared>, Path(id): Path<i64>) -> Response {
    match store!(state.store.job(id)) {
        Some(j) => axum::Json(JobDetail { job: j }).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no job {id}")),
    }
}

pub(super) async fn create_pipeline(
    _: Admin,
    St(state): St<Shared>,
    axum::Json(b): axum::Json<CreatePipeline>,
) -> Response {
    let intake_started = std::time::SystemTime::now();
    let (name, is_tag) = match (&b.ref_name, &b.tag) {
        (_, Some(t)) => (t.clone(), true),
        (Some(r), None) => (r.clone(), false),
        (None, None) => return error(StatusCode::BAD_REQUEST, "give `ref` (a branch) or `tag`"),
    };
    if let Some(bad) = b.variables.keys().find(|k| {
        k.is_empty()
            || k.starts_with(|c: char| c.is_ascii_digit())
            || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`{bad}` is not a variable name: use letters, digits and _"),
        );
    }
    if state.cfg.project(&b.project).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no project `{}` in the server's config", b.project),
        );
    }
    let sha = match b.sha {
        Some(s) => s,
        None => {
            // Resolve the ref now, so the pipeline is pinned to what it names at this moment.
            let mirror = match crate::worker::fetch(&state, &b.project).await {
                Ok(m) => m,
                Err(e) => return error(StatusCode::BAD_GATEWAY, e),
            };
            match rave_repo::resolve_in_mirror(&mirror, &name, is_tag) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::NOT_FOUND, e.to_string()),
            }
        }
    };
    let id = store!(queue(
        &state,
        &NewPipeline {
            project: b.project,
            ref_name: name.clone(),
            sha,
            tag: is_tag.then_some(name),
            source: "api".into(),
            jobs: b.jobs,
            rerun_of: None,
            inputs: b.inputs,
            variables: b.variables,
        }
    ));
    state.intake(id, intake_started, "api");
    (
        StatusCode::CREATED,
        axum::Json(Queued {
            pipeline_id: Some(id),
            ..Queued::default()
        }),
    )
        .into_response()
}

/// Store a new pipeline and wake the queue for it.
pub(super) fn queue(state: &State, p: &NewPipeline) -> Result<i64, crate::db::StoreError> {
    let id = state.store.create_pipeline(p)?;
    state.wake.notify_one();
    Ok(id)
}

#[derive(Deserialize)]
pub(super) struct RerunQuery {
    failed: Option<String>,
    job: Option<String>,
}

pub(super) async fn rerun(
    _: Admin,
    St(state): St<Shared>,
    Path(id): Path<i64>,
    Query(q): Query<RerunQuery>,
) -> Response {
    let Some(p) = store!(state.store.pipeline(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no pipeline {id}"));
    };
    let jobs = store!(state.store.jobs(id));
    let again: Vec<String> = if let Some(name) = q.job {
        if !jobs.iter().any(|j| j.name == name) {
            return error(
                StatusCode::NOT_FOUND,
                format!("pipeline {id} has no job `{name}`"),
            );
        }
        vec![name]
    } else if q.failed.is_some() {
        let failed: Vec<String> = jobs
            .iter()
            .filter(|j| {
                matches!(j.status.as_str(), "failed" | "canceled") && !j.name.contains(" » ")
            })
            .map(|j| j.name.clone())
            .collect();
        if failed.is_empty() {
            return error(
                StatusCode::CONFLICT,
                format!("pipeline {id} has no failed jobs"),
            );
        }
        failed
    } else {
        // The whole pipeline again: a new pipeline at the same commit, as GitLab's "Run
        // pipeline"; `rerun_of` says it is one.
        let new = store!(queue(
            &state,
            &NewPipeline::again(&p, &p.source, p.jobs_filter.clone())
        ));
        return (
            StatusCode::CREATED,
            axum::Json(Rerun {
                pipeline_id: new,
                jobs: p.jobs_filter,
            }),
        )
            .into_response();
    };
    reopen(&state, &p, again)
}

/// Retry or play jobs inside their finished pipeline (as GitLab does): it is queued again and
/// its next run goes on with the last one.
pub(super) fn reopen(state: &State, p: &Pipeline, jobs: Vec<String>) -> Response {
    match state.store.reopen(p.id, &jobs) {
        Ok(true) => {
            let _ = state.events.send(crate::events::ServerEvent {
                kind: crate::events::EventKind::Pipeline,
                pipeline_id: p.id,
                project: p.project.clone(),
                job_id: None,
                job: None,
                status: "queued".into(),
            });
            state.wake.notify_one();
            (
                StatusCode::ACCEPTED,
                axum::Json(Rerun {
                    pipeline_id: p.id,
                    jobs,
                }),
            )
                .into_response()
        }
        Ok(false) => error(
            StatusCode::CONFLICT,
            format!(
                "pipeline {} is {}: retry or play its jobs once it has finished",
                p.id, p.status
            ),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) async fn play(_: Admin, St(state): St<Shared>, Path(id): Path<i64>) -> Response {
    let Some(j) = store!(state.store.job(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    };
    if j.status != "manual" {
        return error(
            StatusCode::CONFLICT,
            format!(
                "job {id} (`{}`) is {}, not a manual job waiting to be played",
                j.name, j.status
            ),
        );
    }
    let Some(p) = store!(state.store.pipeline(j.pipeline_id)) else {
        return error(StatusCode::NOT_FOUND, "its pipeline is gone");
    };
    // The manual job runs inside its pipeline, and then what waited for it.
    reopen(&state, &p, vec![j.name])
}

/// `POST /api/jobs/{id}/retry`: that job again, inside its pipeline.
pub(super) async fn retry_job(_: Admin, St(state): St<Shared>, Path(id): Path<i64>) -> Response {
    let Some(j) = store!(state.store.job(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    };
    if j.name.contains(" » ") {
        return error(
            StatusCode::CONFLICT,
            format!(
                "job {id} (`{}`) is a job of a child pipeline: retry its trigger job",
                j.name
            ),
        );
    }
    let Some(p) = store!(state.store.pipeline(j.pipeline_id)) else {
        return error(StatusCode::NOT_FOUND, "its pipeline is gone");
    };
    reopen(&state, &p, vec![j.name])
}

pub(super) async fn cancel(_: Admin, St(state): St<Shared>, Path(id): Path<i64>) -> Response {
    let Some(p) = store!(state.store.pipeline(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no pipeline {id}"));
    };
    match p.status.as_str() {
        "queued" => {
            store!(state.store.finish_pipeline(id, "canceled", None));
            axum::Json(Cancel {
                pipeline_id: id,
                status: "canceled".into(),
            })
            .into_response()
        }
        "running" => {
            // Under the `running` lock, so the queue, which registers the pid under it and
            // then looks for a cancel, cannot miss this one.
            let running = state.running.lock().unwrap_or_else(|p| p.into_inner());
            match running
                .get(&id)
                .and_then(|p| rustix::process::Pid::from_raw(*p as i32))
            {
                // As Ctrl-C: the run stops its jobs gracefully (after_script runs).
                Some(pg) => {
                    let _ = rustix::process::kill_process(pg, rustix::process::Signal::INT);
                }
                // Still fetching: the queue sees this before it starts the run.
                None => {
                    state
                        .cancel_requested
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id);
                }
            }
            drop(running);
            (
                StatusCode::ACCEPTED,
                axum::Json(Cancel {
                    pipeline_id: id,
                    status: "canceling".into(),
                }),
            )
                .into_response()
        }
        s => error(
            StatusCode::CONFLICT,
            format!("pipeline {id} is {s} already"),
        ),
    }
}

/// `POST /api/jobs/{id}/cancel`: stop one job of a running pipeline (as GitLab's cancel of a
/// job): a running one as with Ctrl-C (after_script runs), a waiting one at once; the jobs
/// that need it are skipped and the pipeline ends `canceled`.
pub(super) async fn cancel_job(_: Admin, St(state): St<Shared>, Path(id): Path<i64>) -> Response {
    let Some(j) = store!(state.store.job(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    };
    if !matches!(j.status.as_str(), "created" | "running") || j.name.contains(" » ") {
        return error(
            StatusCode::CONFLICT,
            format!("job {id} (`{}`) is {}: nothing to cancel", j.name, j.status),
        );
    }
    if !state.broker.cancel_job(
        j.pipeline_id,
        usize::try_from(j.index).unwrap_or(usize::MAX),
    ) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "pipeline {} is not running its jobs now; cancel the pipeline instead",
                j.pipeline_id
            ),
        );
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(Cancel {
            pipeline_id: j.pipeline_id,
            status: "canceling".into(),
        }),
    )
        .into_response()
}
