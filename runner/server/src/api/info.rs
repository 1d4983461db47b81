//! What the server knows: project variables (names only), the events stream, the shared
//! budget, Prometheus metrics.

use std::time::Duration;

use axum::extract::{Path, State as St};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::State;
use crate::body::{BudgetView, ProjectVariables, VariableInfo};

use super::{Admin, Reader, Shared, error};

/// `GET /api/projects/{group/name}/variables` (admin): the project's CI/CD variables, listed
/// without their values.
pub(super) async fn project_variables(
    _: Admin,
    St(state): St<Shared>,
    Path(name): Path<String>,
) -> Response {
    let Some(project) = name
        .strip_suffix("/variables")
        .and_then(|n| state.cfg.project(n))
    else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no such project or path: {name}"),
        );
    };
    let variables = project
        .variables
        .iter()
        .map(|v| VariableInfo {
            name: v.name.clone(),
            masked: v.masked,
            protected: v.protected,
            file: v.file,
            raw: v.raw,
        })
        .collect();
    axum::Json(ProjectVariables {
        project: project.name.clone(),
        variables,
    })
    .into_response()
}

/// `GET /api/events`: status changes of pipelines and jobs as Server-Sent Events (`event:
/// pipeline` or `job`, `data:` a JSON [`ServerEvent`](crate::events::ServerEvent)), as they
/// are recorded; a comment every 15 s keeps proxies from closing the stream.
pub(super) async fn events(_: Reader, St(state): St<Shared>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let rx = state.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let ev = Event::default()
                        .event(e.kind.as_str())
                        .json_data(&e)
                        .unwrap_or_default();
                    return Some((Ok::<_, std::convert::Infallible>(ev), rx));
                }
                // Fell behind: the oldest events are gone; go on with the next.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

pub(crate) fn budget_view(state: &State) -> Result<BudgetView, crate::db::StoreError> {
    let queued = state.store.queued_count()?;
    let share = state.broker.view();
    Ok(BudgetView {
        memory_budget_bytes: Some(share.memory_bytes),
        held_bytes: i64::try_from(share.used_memory_bytes).unwrap_or(i64::MAX),
        running_jobs: i64::from(share.running),
        waiting_jobs: i64::from(share.waiting),
        queued_pipelines: queued,
        share,
    })
}

pub(super) async fn budget(_: Reader, St(state): St<Shared>) -> Response {
    let s = state.clone();
    match tokio::task::spawn_blocking(move || budget_view(&s)).await {
        Ok(Ok(b)) => axum::Json(b).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) async fn metrics(_: Reader, St(state): St<Shared>) -> Response {
    let counts = store!(state.store.counts());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(
            &counts,
            Some(state.broker.view().memory_bytes),
            &state
                .cfg
                .projects
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
        ),
    )
        .into_response()
}
