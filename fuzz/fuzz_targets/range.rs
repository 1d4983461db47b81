//! `Range` headers on artifact and log downloads (served by tower-http's ServeFile, which the
//! server uses): any header value gets a well-formed answer (200, 206 or 416) with the right
//! length, and nothing panics.
#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const SIZE: usize = 1000;

fn file() -> &'static std::path::PathBuf {
    static F: OnceLock<std::path::PathBuf> = OnceLock::new();
    F.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("rave-fuzz-range-{}", std::process::id()));
        let _ = std::fs::write(&p, vec![b'x'; SIZE]);
        p
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static R: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    R.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = axum::http::HeaderValue::from_bytes(data) else {
        return;
    };
    let req = Request::builder()
        .uri("/artifact")
        .header(header::RANGE, value)
        .body(Body::empty())
        .expect("request");
    let resp = runtime().block_on(async {
        tower_http::services::ServeFile::new(file())
            .oneshot(req)
            .await
            .expect("ServeFile is infallible")
    });
    let status = resp.status();
    assert!(
        matches!(
            status,
            StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE
        ),
        "{status}"
    );
    if let Some(len) = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        assert!(len <= SIZE, "content-length {len} for a {SIZE}-byte file");
    }
});
