//! `/metrics` in the Prometheus text format. Counters live here; pipeline and job gauges are
//! read from the store at scrape time, so they are right after a restart too.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::Counts;

struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }
    fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    fn render(&self, out: &mut String, name: &str) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

struct Inner {
    webhook_requests: BTreeMap<(String, u16), u64>,
    webhook_errors: BTreeMap<(String, String), u64>,
    webhook_deduplicated: u64,
    webhook_duration: Histogram,
    job_duration: Histogram,
    oom_kills: u64,
}

pub struct Metrics {
    started: Instant,
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            inner: Mutex::new(Inner {
                webhook_requests: BTreeMap::new(),
                webhook_errors: BTreeMap::new(),
                webhook_deduplicated: 0,
                webhook_duration: Histogram::new(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ]),
                job_duration: Histogram::new(&[
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
                oom_kills: 0,
            }),
        }
    }
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn webhook(&self, forge: &str, code: u16, took: Duration, error: Option<&str>) {
        self.with(|m| {
            *m.webhook_requests.entry((forge.into(), code)).or_default() += 1;
            if let Some(e) = error {
                *m.webhook_errors
                    .entry((forge.into(), e.into()))
                    .or_default() += 1;
            }
            m.webhook_duration.observe(took.as_secs_f64());
        })
    }

    pub fn deduplicated(&self) {
        self.with(|m| m.webhook_deduplicated += 1)
    }

    pub fn job_finished(&self, duration_ms: Option<i64>, oom: bool) {
        self.with(|m| {
            if let Some(ms) = duration_ms {
                m.job_duration.observe(ms as f64 / 1000.0);
            }
            if oom {
                m.oom_kills += 1;
            }
        })
    }

    pub fn render(&self, counts: &Counts, budget_bytes: Option<u64>) -> String {
        let mut out = String::new();
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP webhook_requests_total Webhook deliveries received, by forge and HTTP status.\n# TYPE webhook_requests_total counter\n");
        for ((f, c), n) in &m.webhook_requests {
            let _ = writeln!(
                out,
                "webhook_requests_total{{forge=\"{f}\",code=\"{c}\"}} {n}"
            );
        }
        out.push_str("# HELP webhook_errors_total Webhook deliveries refused, by forge and reason.\n# TYPE webhook_errors_total counter\n");
        for ((f, r), n) in &m.webhook_errors {
            let _ = writeln!(
                out,
                "webhook_errors_total{{forge=\"{f}\",reason=\"{r}\"}} {n}"
            );
        }
        out.push_str("# HELP webhook_deduplicated_total Deliveries whose id was seen before.\n# TYPE webhook_deduplicated_total counter\n");
        let _ = writeln!(out, "webhook_deduplicated_total {}", m.webhook_deduplicated);
        out.push_str("# HELP webhook_duration_seconds Time to answer a webhook delivery.\n# TYPE webhook_duration_seconds histogram\n");
        m.webhook_duration
            .render(&mut out, "webhook_duration_seconds");
        out.push_str("# HELP rave_pipelines Pipelines by status.\n# TYPE rave_pipelines gauge\n");
        for (s, n) in &counts.pipelines {
            let _ = writeln!(out, "rave_pipelines{{status=\"{s}\"}} {n}");
        }
        out.push_str("# HELP rave_jobs Jobs by status.\n# TYPE rave_jobs gauge\n");
        for (s, n) in &counts.jobs {
            let _ = writeln!(out, "rave_jobs{{status=\"{s}\"}} {n}");
        }
        out.push_str("# HELP rave_job_duration_seconds Duration of finished jobs.\n# TYPE rave_job_duration_seconds histogram\n");
        m.job_duration.render(&mut out, "rave_job_duration_seconds");
        out.push_str(
            "# HELP rave_queue_depth Pipelines waiting to run.\n# TYPE rave_queue_depth gauge\n",
        );
        let _ = writeln!(out, "rave_queue_depth {}", counts.queued);
        out.push_str("# HELP rave_memory_budget_used_bytes Memory limits of the jobs running now.\n# TYPE rave_memory_budget_used_bytes gauge\n");
        let _ = writeln!(
            out,
            "rave_memory_budget_used_bytes {}",
            counts.running_memory_bytes
        );
        if let Some(b) = budget_bytes {
            out.push_str("# HELP rave_memory_budget_bytes The memory budget jobs are admitted under.\n# TYPE rave_memory_budget_bytes gauge\n");
            let _ = writeln!(out, "rave_memory_budget_bytes {b}");
        }
        out.push_str("# HELP rave_oom_kills_total Jobs killed for exceeding their memory limit.\n# TYPE rave_oom_kills_total counter\n");
        let _ = writeln!(out, "rave_oom_kills_total {}", m.oom_kills);
        out.push_str("# HELP rave_uptime_seconds Seconds since this server started.\n# TYPE rave_uptime_seconds gauge\n");
        let _ = writeln!(
            out,
            "rave_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );
        out
    }
}
