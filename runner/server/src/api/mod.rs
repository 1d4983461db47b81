//! HTTP: webhooks (`/hooks/{gitlab,github,gitea}`), the API under `/api` (bearer tokens,
//! read-only and admin scopes), `/metrics`, `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State as St};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::State;
use crate::body::ApiError;

macro_rules! store {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    };
}

mod auth;
mod files;
mod info;
mod pipelines;
mod webhook;

pub(crate) use auth::{Admin, Reader};
pub use files::{ArtifactPathError, resolve_artifact};
use files::{artifact_file, artifacts_archive, job_log};
pub(crate) use info::budget_view;
use info::{budget, events, metrics, project_variables};
use pipelines::{
    cancel, cancel_job, create_pipeline, list_pipelines, play, rerun, retry_job, show_job,
    show_pipeline,
};
use webhook::webhook;

pub(crate) type Shared = Arc<State>;

pub fn router(state: Shared) -> Router {
    let limit = state.cfg.server.max_body_bytes;
    Router::new()
        .route("/hooks/{forge}", post(webhook))
        .route("/api/pipelines", get(list_pipelines).post(create_pipeline))
        .route("/api/pipelines/{id}", get(show_pipeline))
        .route("/api/pipelines/{id}/rerun", post(rerun))
        .route("/api/jobs/{id}/retry", post(retry_job))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/pipelines/{id}/cancel", post(cancel))
        .route("/api/projects/{*name}", get(project_variables))
        .route("/api/events", get(events))
        .route("/api/budget", get(budget))
        .route("/api/jobs/{id}", get(show_job))
        .route("/api/jobs/{id}/play", post(play))
        .route("/api/jobs/{id}/log", get(job_log))
        .route("/api/jobs/{id}/artifacts", get(artifacts_archive))
        .route("/api/jobs/{id}/artifacts/{*path}", get(artifact_file))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::ui::routes())
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), rate_limit))
        .with_state(state)
}

/// Every error the API answers: a status and a message that names the cause, as
/// `{"error": "..."}`.
#[derive(Debug)]
pub(crate) struct Error {
    code: StatusCode,
    msg: String,
}

impl Error {
    fn new(code: StatusCode, msg: impl Into<String>) -> Error {
        Error {
            code,
            msg: msg.into(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (self.code, axum::Json(ApiError { error: self.msg })).into_response()
    }
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    Error {
        code,
        msg: msg.into(),
    }
    .into_response()
}

/// A token bucket per source address: `rate_limit_per_sec` requests a second, bursts up to
/// the same number. Past it: 429 with Retry-After.
async fn rate_limit(
    St(state): St<Shared>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let rate = state.cfg.server.rate_limit_per_sec.max(1) as f64;
    let allowed = {
        let mut m = state.limiter.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Bounded memory whatever the number of sources: forget the ones idle long enough
        // for their bucket to be full again.
        if m.len() >= 4096 {
            m.retain(|_, (_, last)| now.duration_since(*last) < Duration::from_secs(2));
        }
        let (tokens, last) = m.entry(addr.ip()).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    };
    if allowed {
        return next.run(req).await;
    }
    if req.uri().path().starts_with("/hooks/") {
        let forge = req.uri().path().trim_start_matches("/hooks/").to_string();
        state
            .metrics
            .webhook(&forge, 429, Duration::ZERO, Some("rate_limited"));
    }
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "more than {} requests a second from {}; retry later",
            rate,
            addr.ip()
        ),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}
