//! HTTP: webhooks (`/hooks/{gitlab,github,gitea}`), the API under `/api` (bearer tokens,
//! read-only and admin scopes), `/metrics`, `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State as St};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::State;
use crate::body::{
    ApiError, BudgetView, Cancel, CreatePipeline, JobDetail, PipelineDetail, PipelineList,
    ProjectVariables, Queued, Rerun, VariableInfo,
};
use crate::config::Scope;
use crate::db::{Delivery, NewPipeline, Pipeline};
use crate::hooks::{self, Action, Forge};

pub(crate) type Shared = Arc<State>;

pub fn router(state: Shared) -> Router {
    let limit = state.cfg.server.max_body_bytes;
    Router::new()
        .route("/hooks/{forge}", post(webhook))
        .route("/api/pipelines", get(list_pipelines).post(create_pipeline))
        .route("/api/pipelines/{id}", get(show_pipeline))
        .route("/api/pipelines/{id}/rerun", post(rerun))
        .route("/api/jobs/{id}/retry", post(retry_job))
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

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(ApiError { error: msg.into() })).into_response()
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

async fn webhook(
    St(state): St<Shared>,
    Path(forge): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let t = Instant::now();
    // Storing a delivery waits for an fsync: off the async workers, so a slow disk holds up
    // only the deliveries being stored, not every other request.
    let st = state.clone();
    let f = forge.clone();
    let handled = tokio::task::spawn_blocking(move || {
        handle_webhook(&st, &f, q.get("project"), &headers, &body)
    })
    .await;
    let (code, reason, resp) = match handled {
        Ok(r) => r,
        Err(e) => {
            let code = StatusCode::INTERNAL_SERVER_ERROR;
            (code, Some("internal"), error(code, e.to_string()))
        }
    };
    state
        .metrics
        .webhook(&forge, code.as_u16(), t.elapsed(), reason);
    resp
}

fn handle_webhook(
    state: &State,
    forge: &str,
    project_q: Option<&String>,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, Option<&'static str>, Response) {
    let fail = |code: StatusCode, reason: &'static str, msg: String| {
        // `{:?}`: the path and the message may hold newlines a client sent.
        warn!(forge = ?forge, reason, "webhook refused: {msg:?}");
        (code, Some(reason), error(code, msg))
    };
    // An unknown project, a project without a secret and a wrong signature get the same
    // answer, so a caller cannot learn which projects exist; the log says which it was.
    let refuse = |reason: &'static str, msg: String| {
        warn!(forge = ?forge, reason, "webhook refused: {msg:?}");
        let code = StatusCode::UNAUTHORIZED;
        (
            code,
            Some(reason),
            error(
                code,
                "the delivery is not signed for a project of this server (check the project name and its webhook secret)".to_string(),
            ),
        )
    };
    let forge = match forge {
        "gitlab" => Forge::Gitlab,
        "github" => Forge::Github,
        "gitea" | "forgejo" => Forge::Gitea,
        other => {
            return fail(
                StatusCode::NOT_FOUND,
                "unknown_forge",
                format!(
                    "no webhook endpoint for {other:?}: use /hooks/gitlab, /hooks/github or /hooks/gitea"
                ),
            );
        }
    };
    let delivery = match hooks::parse(forge, headers, body) {
        Ok(d) => d,
        Err(e) => return fail(StatusCode::BAD_REQUEST, "bad_request", e),
    };
    // The project: `?project=NAME` on the hook URL, else the forge's project path.
    let name = project_q.cloned().or(delivery.project_path.clone());
    let project = name
        .as_deref()
        .and_then(|n| state.cfg.project(n))
        .or_else(|| {
            // A ping names no project; with one project configured it can only be that one.
            (name.is_none() && state.cfg.projects.len() == 1).then(|| &state.cfg.projects[0])
        });
    let Some(project) = project else {
        return refuse(
            "unknown_project",
            format!(
                "no project `{}` in the server's config; add it under [[projects]] or put ?project=NAME on the hook URL",
                name.unwrap_or_default()
            ),
        );
    };
    let secret = match project.secret() {
        Ok(Some(s)) => s,
        _ => {
            return refuse(
                "no_secret",
                format!(
                    "project `{}` has no webhook secret configured; set `secret` or `secret_env`",
                    project.name
                ),
            );
        }
    };
    if let Err(e) = hooks::verify(forge, headers, body, &secret) {
        return refuse("bad_signature", e);
    }
    let new = match &delivery.action {
        Action::Branch { branch, sha } => Some(NewPipeline {
            project: project.name.clone(),
            ref_name: branch.clone(),
            sha: sha.clone(),
            tag: None,
            source: "push".into(),
            ..NewPipeline::default()
        }),
        Action::Tag { tag, sha } => Some(NewPipeline {
            project: project.name.clone(),
            ref_name: tag.clone(),
            sha: sha.clone(),
            tag: Some(tag.clone()),
            source: "push".into(),
            ..NewPipeline::default()
        }),
        Action::Nothing(_) => None,
    };
    match state.store.record_delivery(
        forge.as_str(),
        &delivery.id,
        &project.name,
        &delivery.event,
        new.as_ref(),
    ) {
        Ok(Delivery::New(Some(id))) => {
            state.wake.notify_one();
            info!(forge = forge.as_str(), delivery = %delivery.id, pipeline = id, "pipeline queued");
            (
                StatusCode::ACCEPTED,
                None,
                (
                    StatusCode::ACCEPTED,
                    axum::Json(Queued {
                        pipeline_id: Some(id),
                        ..Queued::default()
                    }),
                )
                    .into_response(),
            )
        }
        Ok(Delivery::New(None)) => {
            let why = match delivery.action {
                Action::Nothing(w) => w,
                _ => "",
            };
            (
                StatusCode::OK,
                None,
                axum::Json(Queued {
                    message: Some(why.to_string()),
                    ..Queued::default()
                })
                .into_response(),
            )
        }
        Ok(Delivery::Duplicate(id)) => {
            state.metrics.deduplicated();
            (
                StatusCode::OK,
                None,
                axum::Json(Queued {
                    pipeline_id: id,
                    duplicate: true,
                    message: None,
                })
                .into_response(),
            )
        }
        Err(e) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "store",
            format!("the delivery could not be stored ({e}); the forge will retry"),
        ),
    }
}

/// Bearer token with at least `need`, or the web UI's session cookie (whose calls that
/// change anything must also carry the session's CSRF token in `X-Rave-Csrf`).
#[allow(clippy::result_large_err)]
pub(crate) fn authorize(state: &State, headers: &HeaderMap, need: Scope) -> Result<(), Response> {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        if let Some(session) = crate::ui::session(state, headers) {
            if session.scope < need {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "this session is read-only; this call needs an admin token",
                ));
            }
            if need == Scope::Admin {
                let sent = headers
                    .get("x-rave-csrf")
                    .map(|v| v.as_bytes())
                    .unwrap_or_default();
                if !bool::from(sent.ct_eq(session.csrf.as_bytes())) {
                    return Err(error(StatusCode::FORBIDDEN, "missing or wrong X-Rave-Csrf"));
                }
            }
            return Ok(());
        }
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer <token>`",
        ));
    };
    let h = crate::sha(token.trim());
    // Compare against every token, in constant time each, whichever matches.
    let mut scope = None;
    for (t, s, _) in &state.tokens {
        if bool::from(t.ct_eq(&h)) {
            scope = Some(*s);
        }
    }
    match scope {
        None => Err(error(StatusCode::UNAUTHORIZED, "unknown token")),
        Some(s) if s < need => Err(error(
            StatusCode::FORBIDDEN,
            "this token is read-only; this call needs an admin token",
        )),
        Some(_) => Ok(()),
    }
}

macro_rules! auth {
    ($state:expr, $headers:expr, $scope:expr) => {
        if let Err(r) = authorize(&$state, &$headers, $scope) {
            return r;
        }
    };
}

macro_rules! store {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    };
}

#[derive(Deserialize)]
struct ListQuery {
    project: Option<String>,
    limit: Option<i64>,
}

async fn list_pipelines(
    St(state): St<Shared>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    auth!(state, headers, Scope::Read);
    let list = store!(
        state
            .store
            .pipelines(q.project.as_deref(), q.limit.unwrap_or(50).clamp(1, 1000))
    );
    axum::Json(PipelineList { pipelines: list }).into_response()
}

/// `GET /api/projects/{group/name}/variables` (admin): the project's CI/CD variables, listed
/// without their values.
async fn project_variables(
    St(state): St<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    auth!(state, headers, Scope::Admin);
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
async fn events(St(state): St<Shared>, headers: HeaderMap) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    auth!(state, headers, Scope::Read);
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

async fn show_pipeline(St(state): St<Shared>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    auth!(state, headers, Scope::Read);
    let Some(p) = store!(state.store.pipeline(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no pipeline {id}"));
    };
    let jobs = store!(state.store.jobs(id));
    axum::Json(PipelineDetail { pipeline: p, jobs }).into_response()
}

async fn show_job(St(state): St<Shared>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    auth!(state, headers, Scope::Read);
    match store!(state.store.job(id)) {
        Some(j) => axum::Json(JobDetail { job: j }).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no job {id}")),
    }
}

async fn create_pipeline(
    St(state): St<Shared>,
    headers: HeaderMap,
    axum::Json(b): axum::Json<CreatePipeline>,
) -> Response {
    auth!(state, headers, Scope::Admin);
    let (name, is_tag) = match (&b.ref_name, &b.tag) {
        (_, Some(t)) => (t.clone(), true),
        (Some(r), None) => (r.clone(), false),
        (None, None) => return error(StatusCode::BAD_REQUEST, "give `ref` (a branch) or `tag`"),
    };
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
        }
    ));
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
fn queue(state: &State, p: &NewPipeline) -> Result<i64, crate::db::StoreError> {
    let id = state.store.create_pipeline(p)?;
    state.wake.notify_one();
    Ok(id)
}

#[derive(Deserialize)]
struct RerunQuery {
    failed: Option<String>,
    job: Option<String>,
}

async fn rerun(
    St(state): St<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<RerunQuery>,
) -> Response {
    auth!(state, headers, Scope::Admin);
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
fn reopen(state: &State, p: &Pipeline, jobs: Vec<String>) -> Response {
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

async fn play(St(state): St<Shared>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    auth!(state, headers, Scope::Admin);
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
async fn retry_job(St(state): St<Shared>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    auth!(state, headers, Scope::Admin);
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

async fn cancel(St(state): St<Shared>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    auth!(state, headers, Scope::Admin);
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

#[derive(Deserialize)]
struct LogQuery {
    follow: Option<String>,
    /// With `follow`: start at this byte (a client that already has the first N bytes).
    offset: Option<u64>,
}

async fn job_log(
    St(state): St<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<LogQuery>,
    req: Request,
) -> Response {
    auth!(state, headers, Scope::Read);
    let Some(j) = store!(state.store.job(id)) else {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    };
    let Some(path) = j.log_path.clone() else {
        return error(StatusCode::NOT_FOUND, format!("job {id} has no log"));
    };
    let follow = q.follow.is_some_and(|f| f != "0" && f != "false");
    if !follow {
        if !std::path::Path::new(&path).exists() {
            return ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "").into_response();
        }
        // Ranges work here: a client that has the first N bytes asks for the rest.
        return serve_file(&path, req, "text/plain; charset=utf-8").await;
    }
    // Follow: stream what is there, then what is appended, until the job is over and the
    // file is read to its end. Chunked; memory is one read buffer whatever the log's size.
    let stream = futures_util::stream::unfold(
        (state.clone(), path, q.offset.unwrap_or(0), false),
        move |(state, path, offset, done)| async move {
            if done {
                return None;
            }
            loop {
                let chunk = read_at(&path, offset).await;
                if !chunk.is_empty() {
                    let n = chunk.len() as u64;
                    return Some((
                        Ok::<_, std::io::Error>(Bytes::from(chunk)),
                        (state, path, offset + n, false),
                    ));
                }
                let over = state
                    .store
                    .job(id)
                    .ok()
                    .flatten()
                    .is_none_or(|j| !matches!(j.status.as_str(), "created" | "running"));
                if over {
                    // One last read: lines written just before the job ended.
                    let chunk = read_at(&path, offset).await;
                    if chunk.is_empty() {
                        return None;
                    }
                    let n = chunk.len() as u64;
                    return Some((Ok(Bytes::from(chunk)), (state, path, offset + n, false)));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn read_at(path: &str, offset: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = vec![0u8; 64 * 1024];
    match f.read(&mut buf).await {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        Err(_) => Vec::new(),
    }
}

async fn serve_file(path: &str, req: Request, content_type: &'static str) -> Response {
    use tower::ServiceExt;
    match tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
    {
        Ok(r) => {
            let mut r = r.map(Body::new);
            if r.status().is_success() {
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            }
            r
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The job's artifacts directory, if it has one.
async fn artifacts_root(state: &State, id: i64) -> Result<std::path::PathBuf, Response> {
    let j = match state.store.job(id) {
        Ok(Some(j)) => j,
        Ok(None) => return Err(error(StatusCode::NOT_FOUND, format!("no job {id}"))),
        Err(e) => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    };
    let dir = j.artifacts_dir.map(std::path::PathBuf::from);
    match dir.filter(|d| d.is_dir()) {
        Some(d) => Ok(d),
        None => Err(error(
            StatusCode::NOT_FOUND,
            format!("job {id} (`{}`) has no artifacts", j.name),
        )),
    }
}

async fn artifacts_archive(
    St(state): St<Shared>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    auth!(state, headers, Scope::Read);
    let root = match artifacts_root(&state, id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    // The archive is written to a file that is unlinked at once and streamed from its open
    // handle: no artifact is held in memory, and nothing is left behind.
    let tmp_dir = state.data_dir.join("tmp");
    let built = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(&tmp_dir)?;
        // An anonymous file of its own per download: two downloads of one job never write
        // into the same file, and nothing is left behind if the server dies mid-way.
        let f = tempfile::tempfile_in(&tmp_dir)?;
        let mut b = tar::Builder::new(f);
        b.follow_symlinks(false);
        b.append_dir_all(".", &root)?;
        let mut f = b.into_inner()?;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))?;
        Ok(f)
    })
    .await;
    let f = match built {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot archive: {e}"),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(f));
    (
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"job-{id}-artifacts.tar\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn artifact_file(
    St(state): St<Shared>,
    headers: HeaderMap,
    Path((id, path)): Path<(i64, String)>,
    req: Request,
) -> Response {
    auth!(state, headers, Scope::Read);
    let root = match artifacts_root(&state, id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let full = match resolve_artifact(&root, &path) {
        Ok(f) => f,
        Err(ArtifactPathError::Escapes) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the path must stay inside the job's artifacts",
            );
        }
        Err(ArtifactPathError::NotFound) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("job {id} has no artifact `{path}`"),
            );
        }
    };
    serve_file(&full.to_string_lossy(), req, "application/octet-stream").await
}

#[derive(Debug, PartialEq, Eq)]
pub enum ArtifactPathError {
    /// `..`, an absolute path, or another component that is not a plain name.
    Escapes,
    /// No such file inside the artifacts (a symlink pointing outside counts as none).
    NotFound,
}

/// The file a request path names inside a job's artifacts directory `root`. Only plain names
/// are accepted, and the resolved file (symlinks followed) must still be inside `root`.
pub fn resolve_artifact(
    root: &std::path::Path,
    path: &str,
) -> Result<std::path::PathBuf, ArtifactPathError> {
    let rel = std::path::Path::new(path);
    if path.is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(ArtifactPathError::Escapes);
    }
    let full = root.join(rel);
    // A symlink inside the artifacts could point anywhere: resolve and check.
    match (full.canonicalize(), root.canonicalize()) {
        (Ok(f), Ok(r)) if f.starts_with(&r) && f.is_file() => Ok(full),
        _ => Err(ArtifactPathError::NotFound),
    }
}

pub(crate) fn budget_view(state: &State) -> Result<BudgetView, crate::db::StoreError> {
    let c = state.store.counts()?;
    let share = state.broker.view();
    Ok(BudgetView {
        memory_budget_bytes: Some(share.memory_bytes),
        held_bytes: i64::try_from(share.used_memory_bytes).unwrap_or(i64::MAX),
        running_jobs: i64::from(share.running),
        waiting_jobs: i64::from(share.waiting),
        queued_pipelines: c.queued,
        share,
    })
}

async fn budget(St(state): St<Shared>, headers: HeaderMap) -> Response {
    auth!(state, headers, Scope::Read);
    let s = state.clone();
    match tokio::task::spawn_blocking(move || budget_view(&s)).await {
        Ok(Ok(b)) => axum::Json(b).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn metrics(St(state): St<Shared>, headers: HeaderMap) -> Response {
    auth!(state, headers, Scope::Read);
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
