//! Webhook deliveries: arbitrary headers and bodies for every forge through signature checks
//! and payload parsing. Must never panic, and a delivery must never verify without the secret.
#![no_main]

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use rave_server::hooks::{Forge, parse, verify};

fuzz_target!(|data: &[u8]| {
    // First bytes: which forge and which headers; the rest is the body.
    if data.len() < 2 {
        return;
    }
    let forge = match data[0] % 3 {
        0 => Forge::Gitlab,
        1 => Forge::Github,
        _ => Forge::Gitea,
    };
    let split = (data[1] as usize).min(data.len() - 2);
    let (head, body) = data[2..].split_at(split);
    let mut h = HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        h.append(name, value);
    }
    for name in [
        "x-github-event",
        "x-gitlab-event",
        "x-gitea-event",
        "x-github-delivery",
    ] {
        if !h.contains_key(name) {
            h.insert(name, HeaderValue::from_static("push"));
        }
    }
    let _ = parse(forge, &h, body);
    // The secret is not in the input, so nothing the fuzzer writes can carry a valid
    // signature for it (short of forging HMAC-SHA256).
    assert!(verify(forge, &h, body, "fuzz-secret-7c1f0b9e").is_err());
});
