//! `rave run --otlp-endpoint URL`: the run's spans (the run, then each job that ran, with its
//! status, peak memory and failure reason) sent to an OpenTelemetry collector when the run
//! ends. Under `rave serve` the run's span hangs under the server's pipeline span
//! (`TRACEPARENT`).

use std::time::{Duration, SystemTime};

use rave_engine::JobRecord;
use rave_engine::trace::job_span_id;
use rave_traces::{SpanData, TraceContext};

/// The run's trace: under the caller's (`TRACEPARENT`), or a new one when spans are sent.
pub struct RunTrace {
    pub ctx: TraceContext,
    /// The span the run hangs under (None: the run's span is the root).
    pub parent: Option<[u8; 8]>,
}

impl RunTrace {
    pub fn from_env(exporting: bool) -> Option<RunTrace> {
        match std::env::var("TRACEPARENT")
            .ok()
            .and_then(|t| TraceContext::from_traceparent(&t))
        {
            Some(ctx) => Some(RunTrace {
                parent: Some(ctx.span_id),
                ctx,
            }),
            None if exporting => Some(RunTrace {
                ctx: TraceContext::new(),
                parent: None,
            }),
            None => None,
        }
    }

    /// The run's span and its jobs' spans.
    pub fn spans(
        &self,
        project: &str,
        pipeline_id: u64,
        status: &str,
        started: SystemTime,
        records: &[&JobRecord],
    ) -> Vec<SpanData> {
        let mut run = SpanData::new(format!("rave run {project} #{pipeline_id}"), self.parent)
            .attr("rave.project", project)
            .attr("rave.pipeline.id", pipeline_id as i64)
            .attr("rave.status", status);
        if self.parent.is_none() {
            run.span_id = self.ctx.span_id;
        }
        run.start = started;
        run.end = SystemTime::now();
        if status == "failed" {
            run.error = Some("the pipeline failed".into());
        }
        let mut out = vec![run.clone()];
        for r in records {
            let (Some(start), Some(end)) = (r.started_at, r.finished_at) else {
                continue;
            };
            let mut s = SpanData::new(format!("job {}", r.name), Some(run.span_id))
                .attr("rave.project", project)
                .attr("rave.pipeline.id", pipeline_id as i64)
                .attr("rave.job", r.name.as_str())
                .attr("rave.stage", r.stage.as_str())
                .attr("rave.status", r.status.as_str())
                .attr("rave.attempts", i64::from(r.attempts))
                .attr("rave.memory_limit_bytes", r.memory_limit_bytes as i64);
            if let Some(p) = r.peak_memory_bytes {
                s = s.attr("rave.peak_memory_bytes", p as i64);
            }
            if let Some(f) = r.failure_reason {
                s = s.attr("rave.failure_reason", f.as_str());
            }
            s.span_id = job_span_id(&self.ctx.trace_id, &r.name, r.attempts);
            s.start = start;
            s.end = end;
            if r.status == rave_engine::JobStatus::Failed {
                s.error = Some(r.note.clone().unwrap_or_else(|| "failed".into()));
            }
            out.push(s);
        }
        out
    }

    /// Send the spans; a collector that does not answer within 3 s costs a warning.
    pub fn export(&self, endpoint: &str, spans: &[SpanData]) {
        if let Err(e) =
            rave_traces::export(endpoint, &self.ctx.trace_id, spans, Duration::from_secs(3))
        {
            eprintln!("rave: WARNING: traces not sent: {e}");
        }
    }
}

/// A span of work done now by a rave command inside a traced job (`TRACEPARENT` and
/// `OTEL_EXPORTER_OTLP_ENDPOINT` in its environment), sent at once; nothing otherwise.
pub fn child_span(name: String, started: SystemTime, attributes: &[(&str, String)]) {
    let (Some(ctx), Some(endpoint)) = (
        std::env::var("TRACEPARENT")
            .ok()
            .and_then(|t| TraceContext::from_traceparent(&t)),
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty()),
    ) else {
        return;
    };
    let mut s = SpanData::new(name, Some(ctx.span_id));
    for (k, v) in attributes {
        s = s.attr(k, v.as_str());
    }
    s.start = started;
    s.end = SystemTime::now();
    if let Err(e) = rave_traces::export(&endpoint, &ctx.trace_id, &[s], Duration::from_secs(3)) {
        eprintln!("rave: WARNING: trace span not sent: {e}");
    }
}
