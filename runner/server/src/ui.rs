//! The web UI: pages rendered on the server with minijinja from templates embedded in the
//! binary (it works offline, nothing is fetched from elsewhere), with one small script that
//! follows `/api/events` and job logs to update pages live.
//!
//! Signing in takes an API token (read or admin) and gives a session cookie (`HttpOnly`,
//! `SameSite=Strict`, random id; the token itself is never stored in the browser). Pages and
//! the API accept the cookie; calls that change something (admin) also need the session's
//! CSRF token in an `X-Rave-Csrf` header, which only the page's own script can send.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, State as St};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::State;
use crate::api::Shared;
use crate::config::Scope;

/// How long a session lasts without signing in again.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const COOKIE: &str = "rave_session";
const PAGE: i64 = 50;

/// A signed-in browser.
#[derive(Clone, Debug)]
pub struct Session {
    pub scope: Scope,
    pub name: String,
    pub csrf: String,
    pub expires: Instant,
}

/// 32 bytes from the operating system's generator; without it no session can be made safely.
fn random_hex() -> Option<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).ok()?;
    Some(hex::encode(b))
}

/// The session the request's cookie names, if it is valid.
pub fn session(state: &State, headers: &HeaderMap) -> Option<Session> {
    let id = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())?;
    let mut sessions = state.sessions.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    sessions.retain(|_, s| s.expires > now);
    sessions.get(&id).cloned()
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/pipelines") }))
        .route("/ui", get(|| async { Redirect::to("/ui/pipelines") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", axum::routing::post(logout))
        .route("/ui/pipelines", get(pipelines_page))
        .route("/ui/pipelines/{id}", get(pipeline_page))
        .route("/ui/jobs/{id}", get(job_page))
        .route("/ui/assets/{file}", get(asset))
}

fn templates() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        for (name, text) in [
            ("base.html", include_str!("../ui/base.html")),
            ("login.html", include_str!("../ui/login.html")),
            ("pipelines.html", include_str!("../ui/pipelines.html")),
            ("pipeline.html", include_str!("../ui/pipeline.html")),
            ("job.html", include_str!("../ui/job.html")),
        ] {
            // A broken template shows as an error on its page (and fails the unit test below).
            if let Err(e) = env.add_template(name, text) {
                tracing::error!("web UI template {name}: {e}");
            }
        }
        env
    })
}

fn render(name: &str, ctx: minijinja::Value) -> Response {
    match templates().get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => (
            [
                (header::CACHE_CONTROL, "no-store"),
                // Nothing but this server's own script and styles runs on these pages.
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                ),
            ],
            Html(html),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("template {name}: {e}"),
        )
            .into_response(),
    }
}

/// The signed-in user as templates see it.
#[derive(Serialize)]
struct Viewer {
    name: String,
    admin: bool,
    csrf: String,
}

fn viewer(s: &Session) -> Viewer {
    Viewer {
        name: s.name.clone(),
        admin: s.scope == Scope::Admin,
        csrf: s.csrf.clone(),
    }
}

/// The session, or a redirect to the sign-in page that comes back here.
#[allow(clippy::result_large_err)]
fn signed_in(state: &State, headers: &HeaderMap, here: &str) -> Result<Session, Response> {
    session(state, headers).ok_or_else(|| {
        let next: String = url_escape(here);
        Redirect::to(&format!("/ui/login?next={next}")).into_response()
    })
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Only paths of this UI are places to go back to (never another site).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_string()
        }
        _ => "/ui/pipelines".into(),
    }
}

async fn login_page(Query(q): Query<NextQuery>) -> Response {
    render(
        "login.html",
        minijinja::context! { next => safe_next(q.next.as_deref()), error => false },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(St(state): St<Shared>, Form(f): Form<LoginForm>) -> Response {
    let h = crate::sha(f.token.trim());
    let mut found = None;
    for (t, scope, name) in &state.tokens {
        // Every token compared, in constant time each.
        if bool::from(subtle::ConstantTimeEq::ct_eq(&t[..], &h[..])) {
            found = Some((*scope, name.clone()));
        }
    }
    let Some((scope, name)) = found else {
        tracing::warn!("web UI sign-in refused: unknown token");
        return (
            StatusCode::UNAUTHORIZED,
            render(
                "login.html",
                minijinja::context! { next => safe_next(f.next.as_deref()), error => true },
            ),
        )
            .into_response();
    };
    let (Some(id), Some(csrf)) = (random_hex(), random_hex()) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the operating system's random number generator failed; no session can be made",
        )
            .into_response();
    };
    let s = Session {
        scope,
        name,
        csrf,
        expires: Instant::now() + SESSION_TTL,
    };
    state
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), s);
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    let mut r = Redirect::to(&safe_next(f.next.as_deref())).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(St(state): St<Shared>, headers: HeaderMap) -> Response {
    if let Some(s) = session(&state, &headers) {
        state
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, v| v.csrf != s.csrf);
    }
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("rave_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// A pipeline as the list and the pipeline page show it.
#[derive(Serialize)]
struct PipelineView {
    id: i64,
    project: String,
    ref_name: String,
    tag: Option<String>,
    short_sha: String,
    source: String,
    status: String,
    created_at: String,
    duration: String,
    error: Option<String>,
    trace_id: Option<String>,
}

fn short_time(t: &str) -> String {
    // RFC 3339 → "2026-11-30 05:21:07"
    t.replace('T', " ").chars().take(19).collect()
}

fn duration_between(a: Option<&str>, b: Option<&str>) -> Option<Duration> {
    let a = humantime::parse_rfc3339_weak(a?.trim_end_matches('Z')).ok()?;
    let b = humantime::parse_rfc3339_weak(b?.trim_end_matches('Z')).ok()?;
    b.duration_since(a).ok()
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{} ms", d.as_millis())
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

fn pipeline_view(p: &crate::db::Pipeline) -> PipelineView {
    PipelineView {
        id: p.id,
        project: p.project.clone(),
        ref_name: p.ref_name.clone(),
        tag: p.tag.clone(),
        short_sha: p.sha.chars().take(8).collect(),
        source: p.source.clone(),
        status: p.status.clone(),
        created_at: short_time(&p.created_at),
        duration: duration_between(p.started_at.as_deref(), p.finished_at.as_deref())
            .map(human)
            .unwrap_or_default(),
        error: p.error.clone(),
        trace_id: p.trace_id.clone(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    project: Option<String>,
    status: Option<String>,
    page: Option<i64>,
}

const STATUSES: [&str; 7] = [
    "queued", "running", "success", "failed", "canceled", "skipped", "manual",
];

async fn pipelines_page(
    St(state): St<Shared>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let s = match signed_in(&state, &headers, "/ui/pipelines") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let project = q.project.filter(|p| !p.is_empty());
    let status = q.status.filter(|p| STATUSES.contains(&p.as_str()));
    let page = q.page.unwrap_or(1).max(1);
    let store = state.store.clone();
    let (p2, s2) = (project.clone(), status.clone());
    let st = state.clone();
    let res = tokio::task::spawn_blocking(move || {
        let rows = store.pipeline_page(p2.as_deref(), s2.as_deref(), (page - 1) * PAGE, PAGE)?;
        Ok::<_, crate::db::StoreError>((rows, crate::api::budget_view(&st)?))
    })
    .await;
    // The filter offers the configured projects (no scan of the history for them).
    let projects: Vec<String> = state.cfg.projects.iter().map(|p| p.name.clone()).collect();
    let ((rows, more), budget) = match res {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let query = |page: i64| {
        let mut parts = vec![format!("page={page}")];
        if let Some(p) = &project {
            parts.push(format!("project={}", url_escape(p)));
        }
        if let Some(s) = &status {
            parts.push(format!("status={s}"));
        }
        format!("?{}", parts.join("&"))
    };
    render(
        "pipelines.html",
        minijinja::context! {
            viewer => viewer(&s),
            pipelines => rows.iter().map(pipeline_view).collect::<Vec<_>>(),
            projects => projects,
            statuses => STATUSES,
            project => project,
            status => status,
            page => page,
            prev => (page > 1).then(|| query(page - 1)),
            next => more.then(|| query(page + 1)),
            budget => budget_text(&budget),
        },
    )
}

/// The budget bar's line: what running jobs hold, of what, and what waits.
fn budget_text(b: &crate::body::BudgetView) -> String {
    let held = mib(b.held_bytes);
    let of = b
        .memory_budget_bytes
        .map(|m| format!(" of {}", rave_model::units::format_memory(m)))
        .unwrap_or_default();
    let pipelines = b.share.pipelines.len();
    format!(
        "{} running job(s) of {pipelines} pipeline(s) hold {held}{of} of memory and {} of {} CPU(s) · {} job(s) waiting for room · {} pipeline(s) queued",
        b.running_jobs,
        rave_engine::caps::format_cpus(b.share.used_cpus),
        rave_engine::caps::format_cpus(b.share.cpus),
        b.waiting_jobs,
        b.queued_pipelines
    )
}

/// A job box of the pipeline graph.
#[derive(Serialize)]
struct JobView {
    id: i64,
    index: i64,
    name: String,
    stage: String,
    status: String,
    duration: String,
    memory: String,
    /// Peak ÷ limit, 0–100, for the bar.
    memory_pct: u64,
    failure_reason: Option<String>,
    note: Option<String>,
    attempts: i64,
    needs: Vec<i64>,
    children: Vec<JobView>,
    trace_id: Option<String>,
    span_id: Option<String>,
}

fn mib(b: i64) -> String {
    rave_model::units::format_memory(b.max(0) as u64)
}

fn job_view(j: &crate::db::Job) -> JobView {
    let memory = match (j.peak_memory_bytes, j.memory_limit_bytes) {
        (Some(p), Some(l)) => format!("{} / {}", mib(p), mib(l)),
        (None, Some(l)) => format!("limit {}", mib(l)),
        _ => String::new(),
    };
    let memory_pct = match (j.peak_memory_bytes, j.memory_limit_bytes) {
        (Some(p), Some(l)) if l > 0 => ((p as f64 / l as f64) * 100.0).clamp(0.0, 100.0) as u64,
        _ => 0,
    };
    JobView {
        id: j.id,
        index: j.index,
        name: j.name.clone(),
        stage: j.stage.clone(),
        status: j.status.clone(),
        duration: j
            .duration_ms
            .map(|ms| human(Duration::from_millis(ms.max(0) as u64)))
            .unwrap_or_default(),
        memory,
        memory_pct,
        failure_reason: j.failure_reason.clone(),
        note: j.note.clone(),
        attempts: j.attempts.unwrap_or(0),
        needs: j.needs.clone(),
        children: Vec::new(),
        // The job's span, as the run named it (derived from the trace, the job and attempt).
        span_id: j.trace_id.as_deref().and_then(|t| {
            let trace: [u8; 16] = hex::decode(t).ok()?.try_into().ok()?;
            let attempt = u32::try_from(j.attempts.unwrap_or(1)).unwrap_or(1);
            Some(hex::encode(rave_engine::trace::job_span_id(
                &trace, &j.name, attempt,
            )))
        }),
        trace_id: j.trace_id.clone(),
    }
}

#[derive(Serialize)]
struct StageView {
    name: String,
    jobs: Vec<JobView>,
}

/// Jobs in stage columns, in pipeline order; a child pipeline's jobs (`trigger » job`) under
/// their trigger job.
fn stages(jobs: &[crate::db::Job]) -> Vec<StageView> {
    let mut out: Vec<StageView> = Vec::new();
    let mut children: HashMap<String, Vec<JobView>> = HashMap::new();
    for j in jobs {
        if let Some((parent, _)) = j.name.split_once(" » ") {
            children
                .entry(parent.to_string())
                .or_default()
                .push(job_view(j));
        }
    }
    for j in jobs.iter().filter(|j| !j.name.contains(" » ")) {
        let mut v = job_view(j);
        v.children = children.remove(&j.name).unwrap_or_default();
        match out.iter_mut().find(|s| s.name == j.stage) {
            Some(s) => s.jobs.push(v),
            None => out.push(StageView {
                name: j.stage.clone(),
                jobs: vec![v],
            }),
        }
    }
    out
}

async fn pipeline_page(St(state): St<Shared>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    let s = match signed_in(&state, &headers, &format!("/ui/pipelines/{id}")) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let store = state.store.clone();
    let res = tokio::task::spawn_blocking(move || {
        let p = store.pipeline(id)?;
        let jobs = store.jobs(id)?;
        Ok::<_, crate::db::StoreError>((p, jobs))
    })
    .await;
    let (p, jobs) = match res {
        Ok(Ok((Some(p), jobs))) => (p, jobs),
        Ok(Ok((None, _))) => {
            return (StatusCode::NOT_FOUND, format!("no pipeline {id}")).into_response();
        }
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let has_failed = jobs.iter().any(|j| j.status == "failed");
    render(
        "pipeline.html",
        minijinja::context! {
            viewer => viewer(&s),
            pipeline => pipeline_view(&p),
            stages => stages(&jobs),
            active => matches!(p.status.as_str(), "queued" | "running"),
            has_failed => has_failed,
        },
    )
}

/// One file of a job's artifacts.
#[derive(Serialize)]
struct ArtifactView {
    path: String,
    size: String,
}

fn artifacts(dir: Option<&str>) -> Vec<ArtifactView> {
    let Some(dir) = dir.map(std::path::PathBuf::from) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => {
                    let rel = p
                        .strip_prefix(&dir)
                        .map(|r| r.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                    out.push(ArtifactView {
                        path: rel,
                        size: rave_model::units::format_memory(size),
                    });
                }
                _ => {}
            }
            // A page, not an archive listing: the archive download has everything.
            if out.len() >= 500 {
                break;
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

async fn job_page(St(state): St<Shared>, headers: HeaderMap, Path(id): Path<i64>) -> Response {
    let s = match signed_in(&state, &headers, &format!("/ui/jobs/{id}")) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let store = state.store.clone();
    let res = tokio::task::spawn_blocking(move || {
        let Some(j) = store.job(id)? else {
            return Ok(None);
        };
        let p = store.pipeline(j.pipeline_id)?;
        let files = artifacts(j.artifacts_dir.as_deref());
        Ok::<_, crate::db::StoreError>(Some((j, p, files)))
    })
    .await;
    let (j, p, files) = match res {
        Ok(Ok(Some((j, Some(p), files)))) => (j, p, files),
        Ok(Ok(_)) => return (StatusCode::NOT_FOUND, format!("no job {id}")).into_response(),
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    render(
        "job.html",
        minijinja::context! {
            viewer => viewer(&s),
            job => job_view(&j),
            pipeline => pipeline_view(&p),
            running => matches!(j.status.as_str(), "created" | "running"),
            artifacts => files,
        },
    )
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (
            include_str!("../ui/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "app.css" => (include_str!("../ui/app.css"), "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_of_the_ui_are_places_to_return_to() {
        assert_eq!(safe_next(Some("/ui/jobs/3")), "/ui/jobs/3");
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/api/x",
            "/ui\\x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/pipelines", "{bad}");
        }
    }

    #[test]
    fn every_template_renders() {
        for name in [
            "base.html",
            "login.html",
            "pipelines.html",
            "pipeline.html",
            "job.html",
        ] {
            assert!(templates().get_template(name).is_ok(), "{name}");
        }
    }
}
