//! Who may call: bearer tokens (read or admin scope) or the web UI's session cookie, checked
//! by extractors so a handler that takes [`Reader`] or [`Admin`] cannot run unauthorised.

use axum::http::{HeaderMap, StatusCode, header};
use subtle::ConstantTimeEq;

use crate::State;
use crate::config::Scope;

use super::{Error, Shared};

/// A caller with a `read` token (or a signed-in session), or with an `admin` one (or an admin
/// session that sent its CSRF token): an extractor, so a handler that takes it cannot run
/// unauthorised.
pub(crate) struct Authorized<const ADMIN: bool>;
pub(crate) type Reader = Authorized<false>;
pub(crate) type Admin = Authorized<true>;

impl<const ADMIN: bool> axum::extract::FromRequestParts<Shared> for Authorized<ADMIN> {
    type Rejection = Error;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Shared,
    ) -> Result<Self, Error> {
        let need = if ADMIN { Scope::Admin } else { Scope::Read };
        authorize(state, &parts.headers, need).map(|()| Authorized)
    }
}

/// Bearer token with at least `need`, or the web UI's session cookie (whose calls that
/// change anything must also carry the session's CSRF token in `X-Rave-Csrf`).
pub(crate) fn authorize(state: &State, headers: &HeaderMap, need: Scope) -> Result<(), Error> {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        if let Some(session) = crate::ui::session(state, headers) {
            if session.scope < need {
                return Err(Error::new(
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
                    return Err(Error::new(
                        StatusCode::FORBIDDEN,
                        "missing or wrong X-Rave-Csrf",
                    ));
                }
            }
            return Ok(());
        }
        return Err(Error::new(
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
        None => Err(Error::new(StatusCode::UNAUTHORIZED, "unknown token")),
        Some(s) if s < need => Err(Error::new(
            StatusCode::FORBIDDEN,
            "this token is read-only; this call needs an admin token",
        )),
        Some(_) => Ok(()),
    }
}
