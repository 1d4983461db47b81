//! `rave run --push-metrics URL`: the run's job metrics to a Prometheus Pushgateway, grouped by
//! project and pipeline, so batch runs that no scraper sees still reach Prometheus.
//!
//! The body is Prometheus' classic text format (0.0.4), which the Pushgateway parses; the
//! `prometheus-client` crate writes OpenMetrics only, so the few lines are written here, with
//! label values escaped as the format says. A Pushgateway that does not answer within a few
//! seconds costs a warning, never the run's result.

use std::fmt::Write;
use std::time::Duration;

use base64::Engine;
use rave_engine::JobRecord;

const TIMEOUT: Duration = Duration::from_secs(5);

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text of a finished run.
pub fn body(records: &[&JobRecord], pipeline_status: &str, duration: Duration) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    gauge(
        &mut out,
        "rave_job_duration_seconds",
        "How long each job of the run took",
    );
    for r in records {
        if let Some(ms) = r.duration_ms {
            let _ = writeln!(
                out,
                "rave_job_duration_seconds{{rave_job=\"{}\",status=\"{}\"}} {}",
                escape(&r.name),
                r.status.as_str(),
                ms as f64 / 1000.0
            );
        }
    }
    gauge(
        &mut out,
        "rave_job_peak_memory_bytes",
        "Each job's peak memory (its cgroup's)",
    );
    for r in records {
        if let Some(p) = r.peak_memory_bytes {
            let _ = writeln!(
                out,
                "rave_job_peak_memory_bytes{{rave_job=\"{}\"}} {p}",
                escape(&r.name)
            );
        }
    }
    gauge(
        &mut out,
        "rave_job_memory_limit_bytes",
        "Each job's memory limit",
    );
    for r in records {
        let _ = writeln!(
            out,
            "rave_job_memory_limit_bytes{{rave_job=\"{}\"}} {}",
            escape(&r.name),
            r.memory_limit_bytes
        );
    }
    gauge(
        &mut out,
        "rave_job_success",
        "1 when the job succeeded (or was allowed to fail), else 0",
    );
    for r in records {
        let ok = matches!(
            r.status,
            rave_engine::JobStatus::Success | rave_engine::JobStatus::Warning
        );
        let _ = writeln!(
            out,
            "rave_job_success{{rave_job=\"{}\",status=\"{}\"}} {}",
            escape(&r.name),
            r.status.as_str(),
            u8::from(ok)
        );
    }
    let ooms = records
        .iter()
        .filter(|r| r.failure_reason == Some(rave_engine::FailureReason::OomKilled))
        .count();
    gauge(
        &mut out,
        "rave_run_oom_kills",
        "Jobs of the run killed at their memory limit",
    );
    let _ = writeln!(out, "rave_run_oom_kills {ooms}");
    gauge(
        &mut out,
        "rave_run_duration_seconds",
        "How long the run took",
    );
    let _ = writeln!(out, "rave_run_duration_seconds {}", duration.as_secs_f64());
    gauge(&mut out, "rave_run_success", "1 when the pipeline passed");
    let _ = writeln!(
        out,
        "rave_run_success{{status=\"{}\"}} {}",
        escape(pipeline_status),
        u8::from(pipeline_status == "success")
    );
    out
}

/// The group's URL: `job="rave"`, the project and the pipeline as grouping labels (base64 in
/// the path, so a project's `/` stays a value).
pub fn url(base: &str, project: &str, pipeline: u64) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(project.as_bytes());
    format!(
        "{}/metrics/job/rave/project@base64/{b64}/pipeline/{pipeline}",
        base.trim_end_matches('/')
    )
}

/// PUT the run's metrics (replacing the group). Returns a warning on failure.
pub fn push(base: &str, project: &str, pipeline: u64, body: String) -> Result<(), String> {
    let url = url(base, project, pipeline);
    let client = reqwest::blocking::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .put(&url)
        .header("Content-Type", "text/plain; version=0.0.4")
        .body(body)
        .send()
        .map_err(|e| format!("cannot reach the Pushgateway at {base}: {e}"))?;
    if !r.status().is_success() {
        let code = r.status();
        let text = r.text().unwrap_or_default();
        return Err(format!(
            "the Pushgateway at {base} answered {code}: {}",
            text.trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_projects_kept_whole() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let u = url("http://pgw:9091/", "group/app", 7);
        assert_eq!(
            u,
            "http://pgw:9091/metrics/job/rave/project@base64/Z3JvdXAvYXBw/pipeline/7"
        );
    }
}
