//! OpenTelemetry traces of pipelines, sent over OTLP/HTTP (protobuf, `POST {endpoint}/v1/traces`)
//! with the official OTLP message types.
//!
//! rave's spans describe work that already happened in other processes (a job ran in its own
//! process group, a pipeline in its own `rave run`), so they are built from what was measured
//! (start, end, status, peak memory) when that work ends, and sent then, in one request with a
//! short timeout: an unreachable collector costs a warning, never a job's time.
//!
//! One trace per pipeline: `rave serve` makes the trace id when it starts the pipeline and
//! passes it to the run as a W3C `TRACEPARENT`; a `rave run` on its own makes one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span};
use prost::Message;

/// A trace and the span new spans hang under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The parent of the spans made under this context.
    pub span_id: [u8; 8],
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // Ids need not be secret, only distinct; a failing system RNG falls back to the clock.
    if getrandom::fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = t[i % t.len()] ^ (i as u8);
        }
    }
    b
}

impl TraceContext {
    /// A new trace, with a new root span id.
    pub fn new() -> TraceContext {
        TraceContext {
            trace_id: random(),
            span_id: random(),
        }
    }

    /// A new span in an existing trace (hex, as stored); None when `trace` is not one.
    pub fn in_trace(trace: &str) -> Option<TraceContext> {
        let trace_id: [u8; 16] = hex::decode(trace).ok()?.try_into().ok()?;
        Some(TraceContext {
            trace_id,
            span_id: random(),
        })
    }

    /// From a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
    pub fn from_traceparent(s: &str) -> Option<TraceContext> {
        let mut parts = s.trim().split('-');
        let (version, trace, span, _flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex::decode(trace).ok()?.try_into().ok()?;
        let span_id: [u8; 8] = hex::decode(span).ok()?.try_into().ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, span_id })
    }

    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-01",
            hex::encode(self.trace_id),
            hex::encode(self.span_id)
        )
    }

    pub fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

impl Default for TraceContext {
    fn default() -> Self {
        TraceContext::new()
    }
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Attr {
        Attr::Str(s.to_string())
    }
}
impl From<String> for Attr {
    fn from(s: String) -> Attr {
        Attr::Str(s)
    }
}
impl From<i64> for Attr {
    fn from(n: i64) -> Attr {
        Attr::Int(n)
    }
}

/// One finished piece of work.
#[derive(Clone, Debug)]
pub struct SpanData {
    pub name: String,
    pub span_id: [u8; 8],
    /// None: a root span.
    pub parent: Option<[u8; 8]>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, Attr)>,
    /// Set for work that failed: the span's status is ERROR with this message.
    pub error: Option<String>,
}

impl SpanData {
    pub fn new(name: impl Into<String>, parent: Option<[u8; 8]>) -> SpanData {
        let now = SystemTime::now();
        SpanData {
            name: name.into(),
            span_id: random(),
            parent,
            start: now,
            end: now,
            attributes: Vec::new(),
            error: None,
        }
    }

    pub fn attr(mut self, key: &str, value: impl Into<Attr>) -> SpanData {
        self.attributes.push((key.to_string(), value.into()));
        self
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn key_value(k: &str, v: &Attr) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(match v {
                Attr::Str(s) => Value::StringValue(s.clone()),
                Attr::Int(n) => Value::IntValue(*n),
            }),
        }),
        ..Default::default()
    }
}

/// The OTLP request for `spans` of one trace.
pub fn request(trace_id: &[u8; 16], spans: &[SpanData]) -> ExportTraceServiceRequest {
    let spans = spans
        .iter()
        .map(|s| Span {
            trace_id: trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name.clone(),
            kind: span::SpanKind::Internal as i32,
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end.max(s.start)),
            attributes: s.attributes.iter().map(|(k, v)| key_value(k, v)).collect(),
            status: Some(Status {
                message: s.error.clone().unwrap_or_default(),
                code: if s.error.is_some() { 2 } else { 1 },
            }),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    key_value("service.name", &Attr::from("rave")),
                    key_value("service.version", &Attr::from(env!("CARGO_PKG_VERSION"))),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "rave".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Send `spans` to the OTLP/HTTP endpoint (`http://collector:4318`; `/v1/traces` is added
/// unless the URL already ends with it). At most `timeout`; the error says what failed.
pub fn export(
    endpoint: &str,
    trace_id: &[u8; 16],
    spans: &[SpanData],
    timeout: Duration,
) -> Result<(), String> {
    let url = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
        endpoint.to_string()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let body = request(trace_id, spans).encode_to_vec();
    let client = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let r = client
        .post(&url)
        .header("Content-Type", "application/x-protobuf")
        .body(body)
        .send()
        .map_err(|e| format!("cannot send traces to {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("{url} answered {}", r.status()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let c = TraceContext::new();
        assert_eq!(TraceContext::from_traceparent(&c.traceparent()), Some(c));
        for bad in [
            "",
            "00-abc-def-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceContext::from_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_request_decodes_as_otlp_with_the_tree_and_attributes() {
        let ctx = TraceContext::new();
        let root = SpanData::new("pipeline", None).attr("rave.pipeline.id", 7i64);
        let mut job = SpanData::new("job build", Some(root.span_id)).attr("rave.status", "failed");
        job.error = Some("script exited with code 1".into());
        let bytes = request(&ctx.trace_id, &[root.clone(), job.clone()]).encode_to_vec();
        let back = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let spans = &back.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[1].parent_span_id, root.span_id.to_vec());
        assert_eq!(spans[1].trace_id, ctx.trace_id.to_vec());
        assert_eq!(spans[1].status.as_ref().unwrap().code, 2);
        assert_eq!(
            spans[0].attributes[0].value.as_ref().unwrap().value,
            Some(Value::IntValue(7))
        );
    }
}
