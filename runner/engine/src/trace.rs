//! A job's place in its pipeline's OpenTelemetry trace: its span id (derived, so the run, the
//! server and the UI name the same span without asking each other) and the W3C
//! `TRACEPARENT` a job gets, so tools inside it (`rave release create`, or the job's own
//! instrumented programs) can add their spans under the job's.

/// The trace a run's jobs belong to, and where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobTrace {
    pub trace_id: [u8; 16],
    /// The OTLP/HTTP endpoint, passed to jobs as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: Option<String>,
}

/// The span id of a job's attempt in a trace: the first 8 bytes of
/// `sha256(trace id, job name, attempt)`.
pub fn job_span_id(trace_id: &[u8; 16], job: &str, attempt: u32) -> [u8; 8] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(trace_id);
    h.update(job.as_bytes());
    h.update(attempt.to_le_bytes());
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl JobTrace {
    /// What a job's environment gets: its `TRACEPARENT`, and the endpoint.
    pub fn env(&self, job: &str, attempt: u32) -> Vec<(String, String)> {
        let mut env = vec![(
            "TRACEPARENT".to_string(),
            format!(
                "00-{}-{}-01",
                hex(&self.trace_id),
                hex(&job_span_id(&self.trace_id, job, attempt))
            ),
        )];
        if let Some(e) = &self.endpoint {
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), e.clone()));
        }
        env
    }
}
