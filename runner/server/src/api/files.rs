//! Logs (with `Range` and live follow) and artifacts (one file, or all as a tar stream).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State as St};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::State;

use super::{Reader, Shared, error};

#[derive(Deserialize)]
pub(super) struct LogQuery {
    follow: Option<String>,
    /// With `follow`: start at this byte (a client that already has the first N bytes).
    offset: Option<u64>,
}

pub(super) async fn job_log(
    _: Reader,
    St(state): St<Shared>,
    Path(id): Path<i64>,
    Query(q): Query<LogQuery>,
    req: Request,
) -> Response {
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

pub(super) async fn read_at(path: &str, offset: u64) -> Vec<u8> {
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

pub(super) async fn serve_file(path: &str, req: Request, content_type: &'static str) -> Response {
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
pub(super) async fn artifacts_root(state: &State, id: i64) -> Result<std::path::PathBuf, Response> {
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

pub(super) async fn artifacts_archive(
    _: Reader,
    St(state): St<Shared>,
    Path(id): Path<i64>,
) -> Response {
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

pub(super) async fn artifact_file(
    _: Reader,
    St(state): St<Shared>,
    Path((id, path)): Path<(i64, String)>,
    req: Request,
) -> Response {
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
