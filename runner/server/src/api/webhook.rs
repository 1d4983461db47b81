//! `POST /hooks/{forge}`: signed push and tag deliveries, stored durably before the answer.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as St};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::{info, warn};

use crate::State;
use crate::body::Queued;
use crate::db::{Delivery, NewPipeline};
use crate::hooks::{self, Action, Forge};

use super::{Shared, error};

pub(super) async fn webhook(
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

pub(super) fn handle_webhook(
    state: &State,
    forge: &str,
    project_q: Option<&String>,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, Option<&'static str>, Response) {
    let intake_started = std::time::SystemTime::now();
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
            state.intake(id, intake_started, forge.as_str());
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
