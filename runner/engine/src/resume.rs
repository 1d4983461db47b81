//! Going on with an earlier run of the same pipeline: GitLab's "retry this job" and "play this
//! manual job", which happen inside the pipeline instead of making a new one.
//!
//! The named jobs run again (a retry is their next attempt), and so does every job after them
//! that did not get to run because of them (skipped, canceled, blocked on the manual job).
//! Every other job keeps its earlier result: its record, its artifacts (hard-linked into the
//! new run directory, never rebuilt) and its dotenv report.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rave_plan::Plan;

use crate::event::RunSummary;
use crate::outcome::JobStatus;
use crate::scheduler::Resume;
use crate::workspace;

/// What a resumed run does: which instances take part, and the [`Resume`] for the scheduler.
#[derive(Debug)]
pub struct Continuation {
    pub active: HashSet<usize>,
    pub resume: Resume,
    /// The jobs that run again, by name (the named ones and what waited on them).
    pub again: Vec<String>,
    /// The pipeline's id: a retry stays in its pipeline.
    pub pipeline_id: u64,
}

/// Plan going on with the run in `prev_dir` (its `summary.json`), running `named` again;
/// carried jobs' artifacts are linked into `new_dir`.
pub fn continue_run(
    plan: &Plan,
    prev_dir: &Path,
    named: &HashSet<usize>,
    new_dir: &Path,
) -> Result<Continuation, String> {
    let summary = RunSummary::read(&prev_dir.join("summary.json")).map_err(|e| {
        format!("{e}: only a run that ended (and wrote its summary) can be continued")
    })?;
    let earlier: HashMap<&str, &crate::JobRecord> =
        summary.jobs.iter().map(|r| (r.name.as_str(), r)).collect();
    let status = |id: usize| earlier.get(plan.jobs[id].name.as_str()).map(|r| r.status);
    for &id in named {
        if status(id).is_none() {
            return Err(format!(
                "job `{}` did not take part in run {}; it cannot be retried there",
                plan.jobs[id].name,
                prev_dir.display()
            ));
        }
    }
    // The named jobs, and after them whatever did not run because of them.
    let mut again: HashSet<usize> = named.clone();
    let mut grew = true;
    while grew {
        grew = false;
        for j in &plan.jobs {
            if again.contains(&j.id) || !j.deps.iter().any(|d| again.contains(d)) {
                continue;
            }
            if matches!(
                status(j.id),
                Some(JobStatus::Skipped | JobStatus::Canceled | JobStatus::Manual)
            ) {
                again.insert(j.id);
                grew = true;
            }
        }
    }
    let n = plan.jobs.len();
    let mut resume = Resume {
        carried: vec![None; n],
        named: named.clone(),
        attempts: vec![0; n],
    };
    let mut active = HashSet::new();
    for j in &plan.jobs {
        let Some(rec) = earlier.get(j.name.as_str()) else {
            continue;
        };
        active.insert(j.id);
        if again.contains(&j.id) {
            resume.attempts[j.id] = rec.attempts;
            continue;
        }
        let slug = workspace::slug(j.id, &j.name);
        let from = prev_dir.join("artifacts").join(&slug);
        let to = new_dir.join("artifacts").join(&slug);
        if from.is_dir() {
            std::fs::create_dir_all(&to)
                .and_then(|()| workspace::copy_dir(&from, &to, true))
                .map_err(|e| {
                    format!(
                        "cannot take over the artifacts of `{}` from {}: {e}",
                        j.name,
                        from.display()
                    )
                })?;
        }
        let mut dotenv = HashMap::new();
        if matches!(rec.status, JobStatus::Success | JobStatus::Warning)
            && let Some(a) = &j.job.artifacts
        {
            for f in &a.reports.dotenv {
                if let Ok(v) = workspace::read_dotenv(&to.join(f)) {
                    dotenv.extend(v);
                }
            }
        }
        resume.carried[j.id] = Some(((*rec).clone(), dotenv));
    }
    let mut again: Vec<usize> = again.into_iter().collect();
    again.sort_unstable();
    Ok(Continuation {
        pipeline_id: summary.pipeline.id,
        active,
        resume,
        again: again
            .into_iter()
            .map(|i| plan.jobs[i].name.clone())
            .collect(),
    })
}
