//! `/metrics` through `prometheus-client`, in the OpenMetrics text format. Counters live
//! here; pipeline and job gauges are read from the store at scrape time, so they are right
//! after a restart too.
//!
//! Every label value comes from a fixed set (an enum): a request path or a forge's header can
//! never become a label, so a crafted URL cannot write lines into `/metrics` or grow it without
//! bound.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::db::Counts;

/// Implements `EncodeLabelValue` from `as_str`, so values are written in snake case.
macro_rules! label_value {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ForgeLabel {
    Gitlab,
    Github,
    Gitea,
    Forgejo,
    Unknown,
}

impl ForgeLabel {
    fn parse(s: &str) -> ForgeLabel {
        match s {
            "gitlab" => ForgeLabel::Gitlab,
            "github" => ForgeLabel::Github,
            "gitea" => ForgeLabel::Gitea,
            "forgejo" => ForgeLabel::Forgejo,
            _ => ForgeLabel::Unknown,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            ForgeLabel::Gitlab => "gitlab",
            ForgeLabel::Github => "github",
            ForgeLabel::Gitea => "gitea",
            ForgeLabel::Forgejo => "forgejo",
            ForgeLabel::Unknown => "unknown",
        }
    }
}
label_value!(ForgeLabel);

/// Why a delivery was refused.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    UnknownForge,
    BadRequest,
    UnknownProject,
    NoSecret,
    BadSignature,
    RateLimited,
    Store,
    Internal,
    Other,
}

impl Reason {
    fn parse(s: &str) -> Reason {
        match s {
            "unknown_forge" => Reason::UnknownForge,
            "bad_request" => Reason::BadRequest,
            "unknown_project" => Reason::UnknownProject,
            "no_secret" => Reason::NoSecret,
            "bad_signature" => Reason::BadSignature,
            "rate_limited" => Reason::RateLimited,
            "store" => Reason::Store,
            "internal" => Reason::Internal,
            _ => Reason::Other,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownForge => "unknown_forge",
            Reason::BadRequest => "bad_request",
            Reason::UnknownProject => "unknown_project",
            Reason::NoSecret => "no_secret",
            Reason::BadSignature => "bad_signature",
            Reason::RateLimited => "rate_limited",
            Reason::Store => "store",
            Reason::Internal => "internal",
            Reason::Other => "other",
        }
    }
}
label_value!(Reason);

/// A pipeline's or job's status as stored.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum StatusLabel {
    Queued,
    Created,
    Running,
    Success,
    Failed,
    Canceled,
    Skipped,
    Manual,
    Warning,
    Other,
}

impl StatusLabel {
    fn parse(s: &str) -> StatusLabel {
        match s {
            "queued" => StatusLabel::Queued,
            "created" => StatusLabel::Created,
            "running" => StatusLabel::Running,
            "success" => StatusLabel::Success,
            "failed" => StatusLabel::Failed,
            "canceled" => StatusLabel::Canceled,
            "skipped" => StatusLabel::Skipped,
            "manual" => StatusLabel::Manual,
            "warning" => StatusLabel::Warning,
            _ => StatusLabel::Other,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            StatusLabel::Queued => "queued",
            StatusLabel::Created => "created",
            StatusLabel::Running => "running",
            StatusLabel::Success => "success",
            StatusLabel::Failed => "failed",
            StatusLabel::Canceled => "canceled",
            StatusLabel::Skipped => "skipped",
            StatusLabel::Manual => "manual",
            StatusLabel::Warning => "warning",
            StatusLabel::Other => "other",
        }
    }
}
label_value!(StatusLabel);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    forge: ForgeLabel,
    /// An HTTP status: at most a few hundred values.
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    forge: ForgeLabel,
    reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    /// A project of the server's config, or `other`: never a value from a request.
    project: String,
    status: StatusLabel,
}

pub struct Metrics {
    started: Instant,
    registry: Registry,
    webhook_requests: Family<RequestLabels, Counter>,
    webhook_errors: Family<ErrorLabels, Counter>,
    webhook_deduplicated: Counter,
    webhook_duration: Histogram,
    pipelines: Family<StatusLabels, Gauge>,
    jobs: Family<StatusLabels, Gauge>,
    job_duration: Histogram,
    utilisation: Histogram,
    queue_depth: Gauge,
    budget_used: Gauge,
    budget: Gauge,
    oom_kills: Counter,
    traces_dropped: Counter,
    uptime: Gauge,
    /// Encoding reads the registry while gauges are set: one scrape at a time.
    render_lock: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let webhook_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "webhook_requests",
            "Webhook deliveries received, by forge and HTTP status",
            webhook_requests.clone(),
        );
        let webhook_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "webhook_errors",
            "Webhook deliveries refused, by forge and reason",
            webhook_errors.clone(),
        );
        let webhook_deduplicated = Counter::default();
        registry.register(
            "webhook_deduplicated",
            "Deliveries whose id was seen before",
            webhook_deduplicated.clone(),
        );
        let webhook_duration =
            Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]);
        registry.register(
            "webhook_duration_seconds",
            "Time to answer a webhook delivery",
            webhook_duration.clone(),
        );
        let pipelines = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "rave_pipelines",
            "Pipelines by project and status",
            pipelines.clone(),
        );
        let jobs = Family::<StatusLabels, Gauge>::default();
        registry.register("rave_jobs", "Jobs by project and status", jobs.clone());
        let job_duration = Histogram::new([
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
        ]);
        registry.register(
            "rave_job_duration_seconds",
            "Duration of finished jobs",
            job_duration.clone(),
        );
        let utilisation = Histogram::new([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]);
        registry.register(
            "rave_budget_utilisation",
            "Per pipeline: memory-seconds its jobs used over the budget's memory-seconds during the run",
            utilisation.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "rave_queue_depth",
            "Pipelines waiting to run",
            queue_depth.clone(),
        );
        let budget_used = Gauge::default();
        registry.register(
            "rave_memory_budget_used_bytes",
            "Memory limits of the jobs running now",
            budget_used.clone(),
        );
        let budget = Gauge::default();
        registry.register(
            "rave_memory_budget_bytes",
            "The memory budget jobs are admitted under (0: the profile's)",
            budget.clone(),
        );
        let oom_kills = Counter::default();
        registry.register(
            "rave_oom_kills",
            "Jobs killed for exceeding their memory limit",
            oom_kills.clone(),
        );
        let traces_dropped = Counter::default();
        registry.register(
            "rave_traces_dropped",
            "Pipeline traces the OpenTelemetry collector did not take (unreachable, refused)",
            traces_dropped.clone(),
        );
        let uptime = Gauge::default();
        registry.register(
            "rave_uptime_seconds",
            "Seconds since this server started",
            uptime.clone(),
        );
        Metrics {
            started: Instant::now(),
            registry,
            webhook_requests,
            webhook_errors,
            webhook_deduplicated,
            webhook_duration,
            pipelines,
            jobs,
            job_duration,
            utilisation,
            queue_depth,
            budget_used,
            budget,
            oom_kills,
            traces_dropped,
            uptime,
            render_lock: Mutex::new(()),
        }
    }
}

impl Metrics {
    /// A webhook answered. `forge` and `error` may come from the request: they are mapped onto
    /// fixed label values.
    pub fn webhook(&self, forge: &str, code: u16, took: Duration, error: Option<&str>) {
        let forge = ForgeLabel::parse(forge);
        self.webhook_requests
            .get_or_create(&RequestLabels { forge, code })
            .inc();
        if let Some(e) = error {
            self.webhook_errors
                .get_or_create(&ErrorLabels {
                    forge,
                    reason: Reason::parse(e),
                })
                .inc();
        }
        self.webhook_duration.observe(took.as_secs_f64());
    }

    pub fn pipeline_utilisation(&self, ratio: f64) {
        self.utilisation.observe(ratio);
    }

    pub fn trace_dropped(&self) {
        self.traces_dropped.inc();
    }

    pub fn deduplicated(&self) {
        self.webhook_deduplicated.inc();
    }

    pub fn job_finished(&self, duration_ms: Option<i64>, oom: bool) {
        if let Some(ms) = duration_ms {
            self.job_duration.observe(ms as f64 / 1000.0);
        }
        if oom {
            self.oom_kills.inc();
        }
    }

    pub fn render(&self, counts: &Counts, budget_bytes: Option<u64>, projects: &[&str]) -> String {
        let _guard = self.render_lock.lock().unwrap_or_else(|p| p.into_inner());
        let project = |p: &str| {
            if projects.contains(&p) {
                p.to_string()
            } else {
                "other".to_string()
            }
        };
        self.pipelines.clear();
        for (p, s, n) in &counts.pipelines {
            self.pipelines
                .get_or_create(&StatusLabels {
                    project: project(p),
                    status: StatusLabel::parse(s),
                })
                .inc_by(*n);
        }
        self.jobs.clear();
        for (p, s, n) in &counts.jobs {
            self.jobs
                .get_or_create(&StatusLabels {
                    project: project(p),
                    status: StatusLabel::parse(s),
                })
                .inc_by(*n);
        }
        self.queue_depth.set(counts.queued);
        self.budget_used.set(counts.running_memory_bytes);
        self.budget
            .set(budget_bytes.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
        self.uptime
            .set(i64::try_from(self.started.elapsed().as_secs()).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crafted_forge_cannot_write_lines_or_labels() {
        let m = Metrics::default();
        let evil = "github\"} 1\nrave_oom_kills_total 999\nx{a=\"";
        m.webhook(evil, 404, Duration::ZERO, Some("made_up\"reason"));
        m.webhook("github", 202, Duration::ZERO, None);
        let out = m.render(
            &Counts {
                pipelines: vec![
                    ("team/app".into(), "success".into(), 3),
                    ("team/app".into(), "evil\"status".into(), 1),
                    ("evil\"} 1\nproject".into(), "success".into(), 2),
                ],
                jobs: vec![],
                queued: 0,
                running_memory_bytes: 0,
            },
            None,
            &["team/app"],
        );
        assert!(!out.contains("999"), "{out}");
        assert!(!out.contains("evil"), "{out}");
        assert!(
            out.contains("webhook_requests_total{forge=\"unknown\",code=\"404\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("webhook_errors_total{forge=\"unknown\",reason=\"other\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("webhook_requests_total{forge=\"github\",code=\"202\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("rave_pipelines{project=\"team/app\",status=\"success\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("rave_pipelines{project=\"team/app\",status=\"other\"} 1"),
            "{out}"
        );
        // A project not in the config (a row from before it was removed) is `other`.
        assert!(
            out.contains("rave_pipelines{project=\"other\",status=\"success\"} 2"),
            "{out}"
        );
    }
}
