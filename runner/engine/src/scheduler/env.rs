//! A job's environment: the host's (all, or the clean allowlist), runner-level variables,
//! the job's own, the dotenv reports it receives, GitLab's predefined ones known only at start,
//! and the caps that pass its CPU and memory share on to the tools it runs.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use rave_plan::{JobInstance, Plan};

use super::{HostEnv, RunConfig};
use crate::caps;
use crate::workspace::Workspace;

/// What a job's environment is built from.
pub(super) struct EnvInput<'a> {
    pub plan: &'a Plan,
    pub job: &'a JobInstance,
    pub cfg: &'a RunConfig,
    pub ws: &'a Workspace,
    /// The dotenv reports of the jobs whose artifacts it gets.
    pub upstream_dotenv: Vec<&'a HashMap<String, String>>,
    /// Its memory limit this attempt.
    pub memory: u64,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
}

pub(super) fn job_env(i: &EnvInput, workdir: &Path) -> Vec<(String, String)> {
    let (j, id) = (i.job, i.job.id);
    // Lowest first: the host variables a clean environment keeps, then runner-level ones.
    let mut env: Vec<(String, String)> = match &i.cfg.host_env {
        HostEnv::Inherit => Vec::new(),
        HostEnv::Only(vars) => vars.clone(),
    };
    env.extend(i.cfg.env.iter().cloned());
    let mut vars = j.variables.clone();
    // dotenv reports of the jobs whose artifacts this job gets, below its own variables.
    for dotenv in &i.upstream_dotenv {
        for (k, v) in dotenv.iter() {
            if !j.job.variables.0.contains_key(k) {
                vars.insert(k.clone(), v.clone());
            }
        }
    }
    let dir = workdir.to_string_lossy().to_string();
    vars.insert("CI_PROJECT_DIR".into(), dir.clone());
    vars.insert(
        "CI_BUILDS_DIR".into(),
        i.ws.run_dir.join("jobs").to_string_lossy().to_string(),
    );
    vars.insert("CI_PIPELINE_ID".into(), i.cfg.pipeline_id.to_string());
    vars.insert("CI_PIPELINE_IID".into(), i.cfg.pipeline_id.to_string());
    vars.insert(
        "CI_JOB_ID".into(),
        (i.cfg.pipeline_id * 10_000 + id as u64 + 1).to_string(),
    );
    vars.insert(
        "CI_JOB_STARTED_AT".into(),
        crate::event::rfc3339_millis(SystemTime::now()),
    );
    vars.insert(
        "CI_RUNNER_EXECUTABLE_ARCH".into(),
        format!("linux/{}", std::env::consts::ARCH),
    );
    vars.insert(
        "CI_RETRY_ATTEMPT".into(),
        i.attempt.saturating_sub(1).to_string(),
    );
    // Last expansion pass, now that runtime variables exist. A name the job does not
    // define (or its own name, as in `PATH: "/opt/bin:$PATH"`) comes from rave's
    // environment, which the local shell inherits anyway.
    let finals: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| {
            if j.raw_variables.contains(k) || !v.contains('$') {
                return (k.clone(), v.clone());
            }
            let lookup = |n: &str| {
                let own = if n == k { None } else { vars.get(n).cloned() };
                own.or_else(|| {
                    i.cfg
                        .env
                        .iter()
                        .find(|(e, _)| e == n)
                        .map(|(_, v)| v.clone())
                })
                .or_else(|| i.cfg.host_env.get(n))
            };
            (k.clone(), rave_model::vars::expand(v, &lookup))
        })
        .collect();
    if j.job.trigger.is_some() {
        // What `forward: pipeline_variables` passes on to the child pipeline.
        env.push((
            "RAVE_PIPELINE_VARIABLES".into(),
            i.plan.pipeline_variables.join(" "),
        ));
        // The child pipeline's jobs work, cache and reuse in the project's state, beside
        // the parent's (its own run directory stays in the trigger job's directory).
        env.push((
            "RAVE_STATE_DIR".into(),
            i.ws.state_dir.to_string_lossy().into_owned(),
        ));
    }
    if let Some(t) = &i.cfg.trace {
        env.extend(t.env(&j.name, i.attempt));
    }
    let lookup = |k: &str| finals.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let caps = caps::env(i.memory, j.cpu_limit.max(j.cpus), &i.cfg.budget, &lookup);
    env.extend(finals.iter().cloned());
    env.extend(caps);
    env
}
