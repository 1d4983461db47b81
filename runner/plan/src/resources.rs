//! Each instance's memory/CPU request, checked against the budget.
//!
//! A request comes from, in order: the `RAVE_MEMORY` / `RAVE_CPUS` variables the job sees
//! (so rules and matrix rows can change them), the job's `resources:` key, then the
//! `.rave: defaults`. A request bigger than the whole budget could never be admitted, so it
//! is an error at plan time rather than a job that waits forever.

use rave_model::units::{format_memory, parse_cpus, parse_memory};
use rave_model::{Diagnostic, Pipeline};

use crate::{JobInstance, PlanOptions};

pub fn assign(
    jobs: &mut [JobInstance],
    pipeline: &Pipeline,
    opts: &PlanOptions,
    diags: &mut Vec<Diagnostic>,
) {
    let budget = opts.budget;
    for j in jobs.iter_mut() {
        let var_span = |name: &str| {
            j.job
                .variables
                .0
                .get(name)
                .or_else(|| pipeline.variables.0.get(name))
                .map(|v| v.span)
                .or(Some(j.job.span))
        };
        // A trigger job's child pipeline runs inside its share: unless it says otherwise, the
        // share is the whole budget (the child's jobs are packed within it). A multi-project
        // trigger runs nothing here (the server runs the other project's pipeline under the
        // host budget while this job waits), so it holds nothing.
        let (default_memory, default_cpus) = match &j.job.trigger {
            Some(t) if t.project.is_some() => (0, 0.0),
            Some(_) => (opts.budget.memory_bytes, opts.budget.cpus),
            None => (
                pipeline.rave.default_memory_bytes,
                pipeline.rave.default_cpus,
            ),
        };
        let mut memory = j.job.resources.memory_bytes.unwrap_or(default_memory);
        let mut source = if j.job.resources.memory_bytes.is_some() {
            crate::RequestSource::Explicit
        } else {
            crate::RequestSource::Default
        };
        let mut cpus = j.job.resources.cpus.unwrap_or(default_cpus);
        let mut cpu_source = if j.job.resources.cpus.is_some() {
            crate::RequestSource::Explicit
        } else {
            crate::RequestSource::Default
        };
        if let Some(m) = j.variables.get("RAVE_MEMORY").filter(|m| !m.is_empty()) {
            match parse_memory(m) {
                Ok(b) => {
                    memory = b;
                    source = crate::RequestSource::Explicit;
                }
                Err(e) => diags.push(
                    Diagnostic::error(
                        format!("job `{}`: RAVE_MEMORY: {e}", j.name),
                        var_span("RAVE_MEMORY"),
                    )
                    .with_help("write a size such as 512M or 1.5G"),
                ),
            }
        }
        if let Some(c) = j.variables.get("RAVE_CPUS").filter(|m| !m.is_empty()) {
            match parse_cpus(c) {
                Ok(v) => {
                    cpus = v;
                    cpu_source = crate::RequestSource::Explicit;
                }
                Err(e) => diags.push(
                    Diagnostic::error(
                        format!("job `{}`: RAVE_CPUS: {e}", j.name),
                        var_span("RAVE_CPUS"),
                    )
                    .with_help("write a number such as 1, 2 or 0.5"),
                ),
            }
        }
        let span = j.job.resources.span.or_else(|| var_span("RAVE_MEMORY"));
        if memory > budget.memory_bytes {
            diags.push(
                Diagnostic::error(
                    format!(
                        "job `{}` requests {} of memory, more than the whole budget of {} (profile {})",
                        j.name,
                        format_memory(memory),
                        format_memory(budget.memory_bytes),
                        opts.profile
                    ),
                    span,
                )
                .with_help("lower RAVE_MEMORY, or raise the budget with --memory or --profile full"),
            );
        }
        if cpus > budget.cpus + 1e-9 {
            diags.push(
                Diagnostic::error(
                    format!(
                        "job `{}` requests {cpus} CPUs, more than the whole budget of {} (profile {})",
                        j.name, budget.cpus, opts.profile
                    ),
                    var_span("RAVE_CPUS"),
                )
                .with_help("lower RAVE_CPUS, or raise the budget with --cpus or --profile full"),
            );
        }
        // Measured peaks beat the flat default, and never raise it: a job that needs more
        // than the default says so, or is retried with more after an OOM kill.
        if source == crate::RequestSource::Default
            && j.job.trigger.is_none()
            && let Some(&(learned, runs)) = opts.learned.get(&j.name)
        {
            memory = learned.min(default_memory);
            source = crate::RequestSource::Learned { runs };
        }
        // The same for CPUs, from CPU time ÷ wall time of earlier runs.
        if cpu_source == crate::RequestSource::Default
            && j.job.trigger.is_none()
            && let Some(&(learned, runs)) = opts.learned_cpus.get(&j.name)
        {
            cpus = learned.min(default_cpus);
            cpu_source = crate::RequestSource::Learned { runs };
        }
        j.memory_bytes = memory;
        j.memory_source = source;
        j.cpu_limit = if matches!(cpu_source, crate::RequestSource::Learned { .. }) {
            default_cpus.max(cpus)
        } else {
            cpus
        };
        j.cpus = cpus;
        j.cpu_source = cpu_source;
    }
}
