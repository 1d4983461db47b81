//! rave's planner: a trigger plus a pipeline become the DAG of job instances to run.
//!
//! Steps, in order: `workflow: rules` decide whether there is a pipeline at all; each job's
//! `rules` (or `only`/`except`) decide whether it is in it and how (`when`, `allow_failure`,
//! extra variables); `parallel` expands jobs into instances; `needs` and stage order become
//! edges ([`dag`]); each instance gets a resource request checked against the budget
//! ([`resources`]) and a priority, the longest path from it to the end of the pipeline.
//!
//! The plan is plain data, handed to the engine; nothing here runs anything.

pub mod dag;
pub mod matrix;
pub mod resources;
pub mod rules;
pub mod trigger;

use std::collections::HashSet;
use std::time::Duration;

use indexmap::IndexMap;
use rave_model::{AllowFailure, Budget, Diagnostic, Job, Pipeline, Span, When};

pub use trigger::{RunVariable, RunVariables, Source, Trigger};

/// One job instance to run.
#[derive(Clone, Debug)]
pub struct JobInstance {
    /// Index in [`Plan::jobs`].
    pub id: usize,
    /// GitLab's display name: `build`, `test 1/3`, `deploy: [eu, prod]`.
    pub name: String,
    /// The job key in the pipeline file.
    pub job_name: String,
    pub stage: String,
    pub stage_index: usize,
    /// Instances this one waits for directly.
    pub deps: Vec<usize>,
    /// Instances whose artifacts are copied in before the script runs.
    pub artifacts_from: Vec<usize>,
    /// True when the job uses `needs:` (GitLab's "DAG job"), false for stage ordering.
    pub uses_needs: bool,
    pub when: When,
    pub allow_failure: AllowFailure,
    pub start_in: Option<Duration>,
    /// Variables the job sees, expanded, without the runtime ones (`CI_JOB_ID`, …).
    pub variables: IndexMap<String, String>,
    /// Variables marked `expand: false`, kept literally.
    pub raw_variables: Vec<String>,
    /// `CI_NODE_INDEX` / `CI_NODE_TOTAL` for `parallel`.
    pub node: Option<(u32, u32)>,
    /// This instance's `parallel: matrix` values.
    pub matrix: IndexMap<String, String>,
    /// Longest path from this job to the end, in jobs (or, after
    /// [`dag::weighted_priorities`], in expected milliseconds).
    pub priority: u64,
    pub memory_bytes: u64,
    /// Where `memory_bytes` came from.
    pub memory_source: RequestSource,
    /// Where its CPU request came from.
    pub cpu_source: RequestSource,
    /// The CPU quota it runs under (and its tools' caps): its request, or for a learned
    /// request the default it would have had. CPU is compressible: admission packs by what
    /// a job usually uses, and a burst may still use the default's share (it slows others a
    /// little, it never kills anything).
    pub cpu_limit: f64,
    pub cpus: f64,
    pub job: Job,
}

/// Where a job's memory request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RequestSource {
    /// `RAVE_MEMORY` or `resources:`.
    Explicit,
    /// The profile's default (or, for a trigger job, the whole budget).
    #[default]
    Default,
    /// A high percentile of the job's measured peaks in this many earlier runs.
    Learned { runs: usize },
}

impl std::fmt::Display for RequestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestSource::Explicit => f.write_str("explicit"),
            RequestSource::Default => f.write_str("default"),
            RequestSource::Learned { runs } => write!(f, "learned from {runs} run(s)"),
        }
    }
}

impl serde::Serialize for RequestSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The planned pipeline.
#[derive(Clone, Debug)]
pub struct Plan {
    pub stages: Vec<String>,
    pub jobs: Vec<JobInstance>,
    pub budget: Budget,
    pub profile: String,
    /// `workflow: name`, expanded.
    pub name: Option<String>,
    /// Set when `workflow: rules` decided not to run a pipeline for this trigger.
    pub skipped_by_workflow: bool,
    /// Names of the variables given for this pipeline (`--var`), for child pipelines that
    /// forward them.
    pub pipeline_variables: Vec<String>,
    /// Names of the pipeline file's global `variables:` (what a trigger forwards as YAML
    /// variables, with the job's own).
    pub global_variables: Vec<String>,
}

impl Plan {
    pub fn by_name(&self, name: &str) -> Option<&JobInstance> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// Instances that depend directly on `id`.
    pub fn dependents(&self, id: usize) -> impl Iterator<Item = &JobInstance> {
        self.jobs.iter().filter(move |j| j.deps.contains(&id))
    }
}

/// How to plan: the budget and the profile name shown to the user.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub budget: Budget,
    pub profile: String,
    /// Memory requests learned from earlier runs, by instance name: (bytes, runs). Used for
    /// jobs that state no request, never above the default.
    pub learned: std::collections::HashMap<String, (u64, usize)>,
    /// CPU requests learned from earlier runs (CPU time ÷ wall time), by instance name.
    pub learned_cpus: std::collections::HashMap<String, (f64, usize)>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            budget: Budget::SAFE,
            profile: "safe".into(),
            learned: Default::default(),
            learned_cpus: Default::default(),
        }
    }
}

/// Plan a pipeline. Errors come back as diagnostics (warnings may come with a plan).
pub fn plan(
    pipeline: &Pipeline,
    trigger: &Trigger,
    opts: &PlanOptions,
) -> (Option<Plan>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let predefined = trigger.predefined();
    let stages: Vec<String> = pipeline.stages.iter().map(|s| s.value.clone()).collect();

    // Pipeline-level variables: predefined < global yaml < workflow rule < trigger.
    let mut global: IndexMap<String, String> = predefined.clone();
    for (k, v) in &pipeline.variables.0 {
        global.insert(k.clone(), v.value.clone());
    }
    for (k, v) in &trigger.variables {
        global.insert(k.clone(), v.clone());
    }
    // Values from the forge and the repository (branch names, commit messages) are data:
    // they are never expanded, so a branch called `x-$SECRET` stays exactly that.
    let literal: HashSet<String> = predefined
        .keys()
        .cloned()
        .chain(trigger.literal_variables.iter().cloned())
        .collect();
    let mut workflow_vars = IndexMap::new();
    let mut name = None;
    if let Some(wf) = &pipeline.workflow {
        if !wf.rules.is_empty() {
            let lookup = |n: &str| lookup_expanded(&global, &literal, n);
            let env = rules::RuleEnv {
                trigger,
                lookup: &lookup,
            };
            match env.evaluate(&wf.rules) {
                Ok(Some(o)) if o.when != Some(When::Never) => {
                    for (k, v) in &o.variables.0 {
                        workflow_vars.insert(k.clone(), v.value.clone());
                    }
                }
                Ok(_) => {
                    return (
                        Some(Plan {
                            stages,
                            jobs: Vec::new(),
                            budget: opts.budget,
                            profile: opts.profile.clone(),
                            name: None,
                            skipped_by_workflow: true,
                            pipeline_variables: Vec::new(),
                            global_variables: Vec::new(),
                        }),
                        diags,
                    );
                }
                Err(e) => {
                    diags.push(rule_error(e, "workflow"));
                    return (None, diags);
                }
            }
        }
        name = wf.name.clone();
    }
    for (k, v) in &workflow_vars {
        if !trigger.variables.contains_key(k) {
            global.insert(k.clone(), v.clone());
        }
    }
    let name =
        name.map(|n| rave_model::vars::expand(&n, &|k| lookup_expanded(&global, &literal, k)));

    // Each instance (a `parallel` copy or matrix combination) is its own job in GitLab, and
    // its rules are evaluated with its own variables: the matrix values and the job-level
    // predefined ones (`CI_JOB_NAME`, `CI_JOB_STAGE`, `CI_NODE_INDEX`, …).
    let mut jobs: Vec<JobInstance> = Vec::new();
    let mut excluded: Vec<&str> = Vec::new();
    for job in pipeline.jobs.values() {
        let stage_index = stages
            .iter()
            .position(|s| *s == job.stage.value)
            .unwrap_or(0);
        let raw: Vec<String> = pipeline
            .variables
            .0
            .iter()
            .chain(job.variables.0.iter())
            .filter(|(_, v)| v.raw)
            .map(|(k, _)| k.clone())
            .chain(literal.iter().cloned())
            .collect();
        let raw_set: HashSet<String> = raw.iter().cloned().collect();
        let mut any = false;
        for inst in matrix::expand(job) {
            let mut vars = job_variables(
                pipeline,
                job,
                &predefined,
                &workflow_vars,
                trigger,
                Some((&inst.variables, &rave_model::Variables::default())),
            );
            job_predefined(&mut vars, job, &inst);
            let outcome = {
                let lookup = |n: &str| lookup_expanded(&vars, &raw_set, n);
                let env = rules::RuleEnv {
                    trigger,
                    lookup: &lookup,
                };
                match &job.rules {
                    Some(r) => env.evaluate(r),
                    None => Ok(env
                        .only_except(job.only.as_ref(), job.except.as_ref())
                        .then(rules::RuleOutcome::default)),
                }
            };
            let outcome = match outcome {
                Ok(Some(o))
                    if o.when != Some(When::Never)
                        && !(o.when.is_none() && job.when == When::Never) =>
                {
                    o
                }
                Ok(_) => continue,
                Err(e) => {
                    diags.push(rule_error(e, &inst.name));
                    continue;
                }
            };
            any = true;
            if !outcome.variables.0.is_empty() {
                vars = job_variables(
                    pipeline,
                    job,
                    &predefined,
                    &workflow_vars,
                    trigger,
                    Some((&inst.variables, &outcome.variables)),
                );
                job_predefined(&mut vars, job, &inst);
            }
            let variables = expand_all(&vars, &raw_set);
            let when = outcome.when.unwrap_or(job.when);
            let allow_failure = match (&outcome.allow_failure, &job.allow_failure) {
                (Some(a), _) => a.clone(),
                (None, Some(a)) => a.clone(),
                // Manual jobs outside rules don't block the pipeline, as in GitLab.
                (None, None) if when == When::Manual && outcome.when.is_none() => AllowFailure::Yes,
                (None, None) => AllowFailure::No,
            };
            let mut job = (*job).clone();
            if let Some(n) = &outcome.needs {
                job.needs = Some(n.clone());
            }
            jobs.push(JobInstance {
                id: jobs.len(),
                name: inst.name,
                job_name: job.name.clone(),
                stage: job.stage.value.clone(),
                stage_index,
                deps: Vec::new(),
                artifacts_from: Vec::new(),
                uses_needs: job.needs.is_some(),
                when,
                allow_failure,
                start_in: outcome.start_in.or(job.start_in),
                variables,
                raw_variables: raw.clone(),
                node: inst.node,
                matrix: inst.variables,
                priority: 0,
                memory_bytes: 0,
                memory_source: RequestSource::Default,
                cpu_source: RequestSource::Default,
                cpu_limit: 0.0,
                cpus: 0.0,
                job,
            });
        }
        if !any {
            excluded.push(&job.name);
        }
    }
    // Stage order among instances, so ids follow execution order for stage-ordered pipelines.
    jobs.sort_by_key(|j| j.stage_index);
    for (i, j) in jobs.iter_mut().enumerate() {
        j.id = i;
    }

    dag::link(&mut jobs, pipeline, &excluded, &mut diags);
    resources::assign(&mut jobs, pipeline, opts, &mut diags);
    // A cycle is reported even next to other errors: the edges that resolved are enough to
    // find it, and one lint pass should show every independent problem.
    if let Err(cycle) = dag::priorities(&mut jobs) {
        {
            let names: Vec<&str> = cycle.iter().map(|&i| jobs[i].name.as_str()).collect();
            let span: Option<Span> = cycle.first().map(|&i| jobs[i].job.span);
            diags.push(
                Diagnostic::error(format!("`needs` form a cycle: {}", names.join(" → ")), span)
                    .with_help(
                        "a job cannot wait for itself; remove one `needs` entry in this cycle",
                    ),
            );
        }
    }
    if diags.iter().any(Diagnostic::is_error) {
        return (None, diags);
    }
    (
        Some(Plan {
            stages,
            jobs,
            budget: opts.budget,
            profile: opts.profile.clone(),
            name,
            skipped_by_workflow: false,
            pipeline_variables: trigger.pipeline_variables.clone(),
            global_variables: pipeline.variables.0.keys().cloned().collect(),
        }),
        diags,
    )
}

/// Variables of one job, GitLab's precedence from low to high: predefined, global yaml (as
/// `inherit: variables` allows), workflow rule, job yaml, matrix values, job rule, trigger.
fn job_variables(
    pipeline: &Pipeline,
    job: &Job,
    predefined: &IndexMap<String, String>,
    workflow_vars: &IndexMap<String, String>,
    trigger: &Trigger,
    extra: Option<(&IndexMap<String, String>, &rave_model::Variables)>,
) -> IndexMap<String, String> {
    let mut v = predefined.clone();
    for (k, var) in &pipeline.variables.0 {
        if job.inherit_variables.includes(k) {
            v.insert(k.clone(), var.value.clone());
        }
    }
    for (k, val) in workflow_vars {
        v.insert(k.clone(), val.clone());
    }
    for (k, var) in &job.variables.0 {
        v.insert(k.clone(), var.value.clone());
    }
    if let Some((matrix, rule)) = extra {
        for (k, val) in matrix {
            v.insert(k.clone(), val.clone());
        }
        for (k, var) in &rule.0 {
            v.insert(k.clone(), var.value.clone());
        }
    }
    for (k, val) in &trigger.variables {
        v.insert(k.clone(), val.clone());
    }
    v
}

/// The job-level predefined variables GitLab sets before rules are evaluated.
fn job_predefined(vars: &mut IndexMap<String, String>, job: &Job, inst: &matrix::Instance) {
    vars.insert("CI_JOB_NAME".into(), inst.name.clone());
    vars.insert("CI_JOB_NAME_SLUG".into(), trigger::slug(&inst.name));
    vars.insert("CI_JOB_STAGE".into(), job.stage.value.clone());
    if let Some((i, n)) = inst.node {
        vars.insert("CI_NODE_INDEX".into(), i.to_string());
        vars.insert("CI_NODE_TOTAL".into(), n.to_string());
    }
}

fn rule_error(e: rules::RuleError, what: &str) -> Diagnostic {
    Diagnostic::error(format!("{what}: {}", e.message), Some(e.span))
        .with_help("a variable on the right of `=~`/`!~` must hold a regex written as `/pattern/`")
}

/// Look a variable up, expanding references to other variables (bounded, so `A: $A` or
/// mutual references cannot loop). Variables in `literal` (`expand: false`, and values that
/// come from the forge) are returned as written.
fn lookup_expanded(
    vars: &IndexMap<String, String>,
    literal: &HashSet<String>,
    name: &str,
) -> Option<String> {
    fn go(
        vars: &IndexMap<String, String>,
        literal: &HashSet<String>,
        name: &str,
        depth: usize,
    ) -> Option<String> {
        let v = vars.get(name)?;
        if depth >= 8 || !v.contains('$') || literal.contains(name) {
            return Some(v.clone());
        }
        Some(rave_model::vars::expand_known(v, &|n| {
            if n == name {
                None
            } else {
                go(vars, literal, n, depth + 1)
            }
        }))
    }
    go(vars, literal, name, 0)
}

fn expand_all(
    vars: &IndexMap<String, String>,
    literal: &HashSet<String>,
) -> IndexMap<String, String> {
    vars.keys()
        .map(|k| {
            (
                k.clone(),
                lookup_expanded(vars, literal, k).unwrap_or_default(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests;
