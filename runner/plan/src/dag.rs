//! Edges between job instances (`needs` and stage order), cycle detection and priorities.

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use rave_model::diag::did_you_mean;
use rave_model::{Diagnostic, Pipeline};

use crate::JobInstance;
use crate::matrix;

/// Fill `deps` and `artifacts_from` of every instance. `excluded` are job names that rules
/// removed from this pipeline (so a `needs` on them is explained, not "undefined").
pub fn link(
    jobs: &mut [JobInstance],
    pipeline: &Pipeline,
    excluded: &[&str],
    diags: &mut Vec<Diagnostic>,
) {
    let n_stages = jobs.iter().map(|j| j.stage_index + 1).max().unwrap_or(0);
    // Instances of earlier stages that no other earlier instance waits for: a stage-ordered
    // job waits for these, which implies waiting for every earlier-stage job.
    let mut frontier: Vec<usize> = Vec::new();
    for stage in 0..n_stages {
        let ids: Vec<usize> = jobs
            .iter()
            .filter(|j| j.stage_index == stage)
            .map(|j| j.id)
            .collect();
        for &id in &ids {
            let (deps, artifacts) = match jobs[id].job.needs.clone() {
                Some(needs) => resolve_needs(jobs, id, &needs, pipeline, excluded, diags),
                None => {
                    let earlier: Vec<usize> = jobs
                        .iter()
                        .filter(|j| j.stage_index < stage)
                        .map(|j| j.id)
                        .collect();
                    (frontier.clone(), earlier)
                }
            };
            let artifacts = filter_dependencies(jobs, id, artifacts, pipeline, diags);
            jobs[id].deps = deps;
            jobs[id].artifacts_from = artifacts;
        }
        for &id in &ids {
            frontier.push(id);
        }
        let covered: Vec<usize> = ids.iter().flat_map(|&id| jobs[id].deps.clone()).collect();
        frontier.retain(|f| !covered.contains(f));
    }
}

fn resolve_needs(
    jobs: &[JobInstance],
    id: usize,
    needs: &[rave_model::Need],
    pipeline: &Pipeline,
    excluded: &[&str],
    diags: &mut Vec<Diagnostic>,
) -> (Vec<usize>, Vec<usize>) {
    let me = &jobs[id];
    let mut deps = Vec::new();
    let mut artifacts = Vec::new();
    for need in needs {
        let job = matrix::substitute(&need.job, &me.matrix);
        let mut targets: Vec<&JobInstance> = jobs.iter().filter(|j| j.job_name == job).collect();
        if targets.is_empty() {
            // One instance by its expanded name: `needs: ["build: [amd64]"]`.
            targets = jobs.iter().filter(|j| j.name == job).collect();
        }
        let defined = pipeline.jobs.contains_key(&job);
        if targets.is_empty() {
            if need.optional {
                if !defined {
                    diags.push(
                        Diagnostic::warning(
                            format!(
                                "`{}` optionally needs `{}`, which is not defined",
                                me.name, job
                            ),
                            Some(need.span),
                        )
                        .with_help_opt(did_you_mean(
                            &job,
                            pipeline.jobs.keys().map(String::as_str),
                        )),
                    );
                }
                continue;
            }
            if excluded.contains(&job.as_str()) {
                diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` needs `{}`, but the rules of `{}` leave it out of this pipeline",
                            me.name, job, job
                        ),
                        Some(need.span),
                    )
                    .with_label("not in this pipeline")
                    .with_help(
                        "write `needs: [{job: …, optional: true}]`, or make both jobs' rules agree",
                    ),
                );
            } else if let Some(base) = job.split_once(": [").map(|(b, _)| b)
                && jobs.iter().any(|j| j.job_name == base)
            {
                let instances: Vec<&str> = jobs
                    .iter()
                    .filter(|j| j.job_name == base)
                    .map(|j| j.name.as_str())
                    .collect();
                diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` needs `{job}`, which is not an instance of `{base}`",
                            me.name
                        ),
                        Some(need.span),
                    )
                    .with_label("no such instance")
                    .with_help(format!("instances are: {}", instances.join("; "))),
                );
            } else {
                let candidates = pipeline
                    .jobs
                    .keys()
                    .map(String::as_str)
                    .filter(|n| *n != me.job_name);
                diags.push(
                    Diagnostic::error(
                        format!("`{}` needs `{}`, which is not defined", me.name, job),
                        Some(need.span),
                    )
                    .with_label("unknown job")
                    .with_help_opt(did_you_mean(&job, candidates))
                    .follow_on(),
                );
            }
            continue;
        }
        if let Some(rows) = &need.matrix {
            let rows: Vec<indexmap::IndexMap<String, Vec<String>>> = rows
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|(k, vs)| {
                            (
                                k.clone(),
                                vs.iter()
                                    .map(|v| matrix::substitute(v, &me.matrix))
                                    .collect(),
                            )
                        })
                        .collect()
                })
                .collect();
            let selected: Vec<&JobInstance> = targets
                .iter()
                .copied()
                .filter(|t| rows.iter().any(|r| matrix::selects(&t.matrix, r)))
                .collect();
            if selected.is_empty() {
                if need.optional {
                    continue;
                }
                diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` needs a matrix instance of `{}` that does not exist",
                            me.name, job
                        ),
                        Some(need.span),
                    )
                    .with_help(format!(
                        "instances are: {}",
                        targets
                            .iter()
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    )),
                );
                continue;
            }
            targets = selected;
        }
        for t in targets {
            if t.stage_index > me.stage_index {
                diags.push(
                    Diagnostic::error(
                        format!(
                            "`{}` (stage `{}`) needs `{}`, which is in the later stage `{}`",
                            me.name, me.stage, t.name, t.stage
                        ),
                        Some(need.span),
                    )
                    .with_help("a job can only need jobs in its own or earlier stages"),
                );
                continue;
            }
            if t.id == id {
                diags.push(Diagnostic::error(
                    format!("`{}` needs itself", me.name),
                    Some(need.span),
                ));
                continue;
            }
            if !deps.contains(&t.id) {
                deps.push(t.id);
            }
            if need.artifacts && !artifacts.contains(&t.id) {
                artifacts.push(t.id);
            }
        }
    }
    (deps, artifacts)
}

/// Apply `dependencies:` to the artifact sources.
fn filter_dependencies(
    jobs: &[JobInstance],
    id: usize,
    artifacts: Vec<usize>,
    pipeline: &Pipeline,
    diags: &mut Vec<Diagnostic>,
) -> Vec<usize> {
    let me = &jobs[id];
    let Some(deps) = &me.job.dependencies else {
        return artifacts;
    };
    for d in deps {
        if !pipeline.jobs.contains_key(&d.value) {
            diags.push(
                Diagnostic::error(
                    format!(
                        "`{}` has dependency `{}`, which is not defined",
                        me.name, d.value
                    ),
                    Some(d.span),
                )
                .with_label("unknown job")
                .with_help_opt(did_you_mean(
                    &d.value,
                    pipeline.jobs.keys().map(String::as_str),
                )),
            );
            continue;
        }
        // GitLab: a dependency must be in the job's own stage or an earlier one.
        if let Some(t) = jobs.iter().find(|j| j.job_name == d.value)
            && t.stage_index > me.stage_index
        {
            diags.push(
                Diagnostic::error(
                    format!(
                        "`{}` (stage `{}`) has dependency `{}`, which is in the later stage `{}`",
                        me.name, me.stage, d.value, t.stage
                    ),
                    Some(d.span),
                )
                .with_help("a dependency must be in the job's own stage or an earlier one"),
            );
        }
        // With `needs:`, GitLab requires `dependencies` to name only needed jobs.
        if let Some(needs) = &me.job.needs
            && !needs.iter().any(|n| n.job == d.value)
        {
            diags.push(
                Diagnostic::error(
                    format!(
                        "`{}` has dependency `{}`, which is not in its `needs`",
                        me.name, d.value
                    ),
                    Some(d.span),
                )
                .with_help(format!(
                    "add `{}` to `needs`, or drop it from `dependencies`",
                    d.value
                )),
            );
        }
    }
    artifacts
        .into_iter()
        .filter(|a| deps.iter().any(|d| d.value == jobs[*a].job_name))
        .collect()
}

/// Compute each instance's priority: the number of jobs on the longest path from it to the
/// end of the pipeline. Returns a cycle (as instance ids, first repeated last) if there is one.
pub fn priorities(jobs: &mut [JobInstance]) -> Result<(), Vec<usize>> {
    weighted_priorities(jobs, &|_| 1)
}

/// Priorities as the longest path to the end weighted by `weight` (e.g. the duration a job took
/// last time, so the scheduler starts what the critical path really is).
pub fn weighted_priorities(
    jobs: &mut [JobInstance],
    weight: &dyn Fn(&JobInstance) -> u64,
) -> Result<(), Vec<usize>> {
    let mut g: DiGraph<usize, ()> = DiGraph::with_capacity(jobs.len(), jobs.len());
    let nodes: Vec<NodeIndex> = jobs.iter().map(|j| g.add_node(j.id)).collect();
    for j in jobs.iter() {
        for &d in &j.deps {
            // Edge from a job to what it needs: the order a `needs` chain is read in.
            g.add_edge(nodes[j.id], nodes[d], ());
        }
    }
    let order = match toposort(&g, None) {
        Ok(o) => o,
        Err(c) => return Err(find_cycle(&g, c.node_id())),
    };
    // `order` lists dependents before their dependencies, so walking it forward sees every
    // job's dependents first.
    let mut prio = vec![0u64; jobs.len()];
    for n in order {
        let id = g[n];
        let down = g
            .neighbors_directed(n, petgraph::Direction::Incoming)
            .map(|m| prio[g[m]])
            .max()
            .unwrap_or(0);
        prio[id] = down.saturating_add(weight(&jobs[id]).max(1));
    }
    for j in jobs.iter_mut() {
        j.priority = prio[j.id];
    }
    Ok(())
}

fn find_cycle(g: &DiGraph<usize, ()>, start: NodeIndex) -> Vec<usize> {
    let scc = tarjan_scc(g)
        .into_iter()
        .find(|c| c.contains(&start))
        .unwrap_or_else(|| vec![start]);
    // Breadth-first search inside the component from `start` back to itself.
    let mut prev: std::collections::HashMap<NodeIndex, NodeIndex> = Default::default();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for m in g.neighbors(n) {
            if !scc.contains(&m) {
                continue;
            }
            if m == start {
                let mut path = vec![g[start]];
                let mut cur = n;
                while cur != start {
                    path.push(g[cur]);
                    cur = prev[&cur];
                }
                path.push(g[start]);
                let last = path.len() - 1;
                path[1..last].reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(m) {
                e.insert(n);
                queue.push_back(m);
            }
        }
    }
    vec![g[start], g[start]]
}
