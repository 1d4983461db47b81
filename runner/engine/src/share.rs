//! One host budget shared by several pipelines: the admission `rave serve` runs for the jobs
//! of every pipeline it has running (each a `rave run` that asks over [`crate::lease`]).
//!
//! Every ready job of every pipeline is a candidate. Candidates are considered in this order:
//!
//! 1. jobs that have waited past the overtake limit (oldest pipeline first): nothing passes
//!    the first of them that does not fit, so no job starves, whatever else arrives;
//! 2. jobs of projects holding less than their fair share of memory (the budget split evenly
//!    among the projects that hold or want some), so a busy project cannot starve another;
//! 3. older pipelines first, so pushes finish in the order they came;
//! 4. within a pipeline, the longest remaining critical path first (as one run orders them).
//!
//! A job starts when its memory, CPUs and a slot fit in both what the host has free and what
//! its own pipeline's budget (its profile) has free; a `resource_group` is held by one job of
//! the project at a time, across pipelines, as GitLab's resource groups are.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::admission::Request;
use crate::lease::{Cap, Wanted};

/// A connected run (one pipeline's `rave run`).
pub type RunKey = u64;

const EPS: f64 = 1e-9;

#[derive(Debug)]
struct Held {
    request: Request,
    group: Option<String>,
}

#[derive(Debug)]
struct RunShare {
    pipeline: u64,
    project: String,
    cap: Cap,
    wants: Vec<Wanted>,
    overtaken: HashMap<usize, u32>,
    held: HashMap<usize, Held>,
}

impl RunShare {
    fn held_memory(&self) -> u64 {
        self.held.values().map(|h| h.request.memory_bytes).sum()
    }
    fn held_cpus(&self) -> f64 {
        self.held.values().map(|h| h.request.cpus).sum()
    }
    fn fits_cap(&self, r: Request) -> bool {
        (self.held.len() as u32) < self.cap.jobs
            && self.held_memory() + r.memory_bytes <= self.cap.memory_bytes
            && self.held_cpus() + r.cpus <= self.cap.cpus + EPS
    }
}

/// What the host budget holds and what waits for it (the server's budget view).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShareView {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub jobs: u32,
    pub used_memory_bytes: u64,
    pub used_cpus: f64,
    pub running: u32,
    pub waiting: u32,
    pub pipelines: Vec<PipelineShare>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PipelineShare {
    pub pipeline: u64,
    pub project: String,
    pub running: u32,
    pub held_memory_bytes: u64,
    pub waiting: u32,
}

#[derive(Debug)]
pub struct Share {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub jobs: u32,
    pub overtake_limit: u32,
    runs: BTreeMap<RunKey, RunShare>,
}

impl Share {
    pub fn new(memory_bytes: u64, cpus: f64, jobs: u32) -> Self {
        Share {
            memory_bytes,
            cpus,
            jobs,
            overtake_limit: jobs.max(2),
            runs: BTreeMap::new(),
        }
    }

    pub fn join(&mut self, key: RunKey, pipeline: u64, project: String, cap: Cap) {
        self.runs.insert(
            key,
            RunShare {
                pipeline,
                project,
                cap,
                wants: Vec::new(),
                overtaken: HashMap::new(),
                held: HashMap::new(),
            },
        );
    }

    /// A run's ready jobs, replacing what it wanted before. Returns the jobs that can never
    /// start (more than the host's whole budget, or than the run's own), with why.
    pub fn want(&mut self, key: RunKey, jobs: Vec<Wanted>) -> Vec<(usize, String)> {
        let (host_mem, host_cpus) = (self.memory_bytes, self.cpus);
        let Some(run) = self.runs.get_mut(&key) else {
            return Vec::new();
        };
        let fmt = rave_model::units::format_memory;
        let mut refused = Vec::new();
        let mut keep = Vec::new();
        for w in jobs {
            if w.memory_bytes > host_mem || w.cpus > host_cpus + EPS {
                refused.push((
                    w.job,
                    format!(
                        "needs {} and {} CPU(s), more than the server's whole budget ({} and {} CPU(s)); lower the job's request or raise `[server] memory`/`cpus`",
                        fmt(w.memory_bytes),
                        w.cpus,
                        fmt(host_mem),
                        host_cpus
                    ),
                ));
            } else if w.memory_bytes > run.cap.memory_bytes || w.cpus > run.cap.cpus + EPS {
                refused.push((
                    w.job,
                    format!(
                        "needs {}, more than its pipeline's budget ({})",
                        fmt(w.memory_bytes),
                        fmt(run.cap.memory_bytes)
                    ),
                ));
            } else {
                keep.push(w);
            }
        }
        let wanted: HashSet<usize> = keep.iter().map(|w| w.job).collect();
        run.overtaken.retain(|j, _| wanted.contains(j));
        run.wants = keep;
        refused
    }

    /// The pipeline and project of a connected run.
    pub fn pipeline_of(&self, key: RunKey) -> Option<(u64, String)> {
        self.runs.get(&key).map(|r| (r.pipeline, r.project.clone()))
    }

    /// The connected run of this pipeline, if it runs.
    pub fn run_of(&self, pipeline: u64) -> Option<RunKey> {
        self.runs
            .iter()
            .find(|(_, r)| r.pipeline == pipeline)
            .map(|(k, _)| *k)
    }

    pub fn release(&mut self, key: RunKey, job: usize) {
        if let Some(run) = self.runs.get_mut(&key) {
            run.held.remove(&job);
        }
    }

    /// A run went away (ended, or died): everything it held is free again.
    pub fn leave(&mut self, key: RunKey) {
        self.runs.remove(&key);
    }

    fn used(&self) -> (u64, f64, u32) {
        self.runs.values().fold((0, 0.0, 0), |(m, c, n), r| {
            (
                m + r.held_memory(),
                c + r.held_cpus(),
                n + r.held.len() as u32,
            )
        })
    }

    fn group_busy(&self, project: &str, group: &str) -> bool {
        self.runs.values().any(|r| {
            r.project == project && r.held.values().any(|h| h.group.as_deref() == Some(group))
        })
    }

    /// Grant what fits now, best first; each grant takes its resources. Returns the grants.
    pub fn select(&mut self) -> Vec<(RunKey, usize)> {
        let mut grants = Vec::new();
        loop {
            let (used_mem, used_cpus, running) = self.used();
            if running >= self.jobs {
                break;
            }
            // Fair share: the memory budget split among the projects that hold or want some.
            let mut by_project: BTreeMap<&str, u64> = BTreeMap::new();
            for r in self.runs.values() {
                if !r.held.is_empty() || !r.wants.is_empty() {
                    *by_project.entry(r.project.as_str()).or_default() += r.held_memory();
                }
            }
            let fair = self.memory_bytes / by_project.len().max(1) as u64;
            let limit = self.overtake_limit;
            let by_project = &by_project;
            let mut order: Vec<(bool, bool, u64, std::cmp::Reverse<u64>, RunKey, usize)> = self
                .runs
                .iter()
                .flat_map(|(&key, r)| {
                    let over = by_project.get(r.project.as_str()).copied().unwrap_or(0) >= fair
                        && by_project.len() > 1;
                    r.wants.iter().enumerate().map(move |(i, w)| {
                        let starving = r.overtaken.get(&w.job).copied().unwrap_or(0);
                        (
                            starving < limit,
                            over,
                            r.pipeline,
                            std::cmp::Reverse(w.priority),
                            key,
                            i,
                        )
                    })
                })
                .collect();
            order.sort();
            let mut granted = None;
            let mut waiting: Vec<(RunKey, usize)> = Vec::new();
            for &(patient, _, _, _, key, i) in &order {
                let run = &self.runs[&key];
                let w = &run.wants[i];
                if let Some(g) = &w.resource_group
                    && self.group_busy(&run.project, g)
                {
                    continue;
                }
                let r = Request {
                    memory_bytes: w.memory_bytes,
                    cpus: w.cpus,
                };
                let host_fits = used_mem + r.memory_bytes <= self.memory_bytes
                    && used_cpus + r.cpus <= self.cpus + EPS;
                if host_fits && run.fits_cap(r) {
                    granted = Some((key, i));
                    break;
                }
                if !patient {
                    // This job has waited long enough: nothing behind it starts until it fits.
                    break;
                }
                if host_fits {
                    // Held back by its own pipeline's budget only: it passes nobody.
                    continue;
                }
                waiting.push((key, w.job));
            }
            let Some((key, i)) = granted else { break };
            for (k, job) in waiting {
                if let Some(r) = self.runs.get_mut(&k) {
                    *r.overtaken.entry(job).or_default() += 1;
                }
            }
            let Some(run) = self.runs.get_mut(&key) else {
                break;
            };
            let w = run.wants.remove(i);
            run.overtaken.remove(&w.job);
            run.held.insert(
                w.job,
                Held {
                    request: Request {
                        memory_bytes: w.memory_bytes,
                        cpus: w.cpus,
                    },
                    group: w.resource_group.clone(),
                },
            );
            grants.push((key, w.job));
        }
        grants
    }

    pub fn view(&self) -> ShareView {
        let (used_memory_bytes, used_cpus, running) = self.used();
        ShareView {
            memory_bytes: self.memory_bytes,
            cpus: self.cpus,
            jobs: self.jobs,
            used_memory_bytes,
            used_cpus,
            running,
            waiting: self.runs.values().map(|r| r.wants.len() as u32).sum(),
            pipelines: self
                .runs
                .values()
                .map(|r| PipelineShare {
                    pipeline: r.pipeline,
                    project: r.project.clone(),
                    running: r.held.len() as u32,
                    held_memory_bytes: r.held_memory(),
                    waiting: r.wants.len() as u32,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn want(job: usize, mem: u64, priority: u64) -> Wanted {
        Wanted {
            job,
            name: format!("job{job}"),
            memory_bytes: mem * MIB,
            cpus: 0.5,
            priority,
            resource_group: None,
        }
    }

    fn cap(mem: u64) -> Cap {
        Cap {
            memory_bytes: mem * MIB,
            cpus: 8.0,
            jobs: 8,
        }
    }

    #[test]
    fn two_pipelines_pack_into_one_budget() {
        let mut s = Share::new(3072 * MIB, 4.0, 8);
        s.join(1, 10, "a".into(), cap(3072));
        s.join(2, 11, "a".into(), cap(3072));
        s.want(1, vec![want(0, 1024, 1)]);
        s.want(2, vec![want(0, 1024, 1)]);
        assert_eq!(s.select(), vec![(1, 0), (2, 0)]);
        assert_eq!(s.view().used_memory_bytes, 2048 * MIB);
        // The third asks for more than is left: it waits; a release lets it in.
        s.want(1, vec![want(1, 1536, 1)]);
        assert!(s.select().is_empty());
        s.release(2, 0);
        assert_eq!(s.select(), vec![(1, 1)]);
    }

    #[test]
    fn older_pipeline_first_then_critical_path() {
        let mut s = Share::new(1024 * MIB, 4.0, 1);
        s.join(1, 20, "a".into(), cap(4096));
        s.join(2, 19, "a".into(), cap(4096));
        s.want(1, vec![want(0, 100, 9)]);
        s.want(2, vec![want(0, 100, 1), want(1, 100, 5)]);
        assert_eq!(
            s.select(),
            vec![(2, 1)],
            "pipeline 19 is older; its longer path first"
        );
    }

    #[test]
    fn a_busy_project_does_not_starve_another() {
        let mut s = Share::new(2048 * MIB, 8.0, 8);
        s.join(1, 1, "busy".into(), cap(4096));
        s.want(1, (0..6).map(|j| want(j, 512, 1)).collect());
        assert_eq!(s.select().len(), 4, "alone, it may take the whole budget");
        // Another project's pipeline arrives, newer: when one job of the busy one ends, the
        // other project (under its share) goes first, though its pipeline is younger.
        s.join(2, 2, "quiet".into(), cap(4096));
        s.want(2, vec![want(0, 512, 1)]);
        assert!(s.select().is_empty());
        s.release(1, 0);
        assert_eq!(s.select(), vec![(2, 0)]);
    }

    #[test]
    fn a_pipelines_own_budget_caps_it() {
        let mut s = Share::new(4096 * MIB, 8.0, 8);
        s.join(1, 1, "a".into(), cap(1024));
        let refused = s.want(1, vec![want(0, 600, 1), want(1, 600, 1), want(2, 2048, 1)]);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].1.contains("pipeline's budget"), "{refused:?}");
        assert_eq!(
            s.select(),
            vec![(1, 0)],
            "the second would exceed its 1 GiB"
        );
        s.join(2, 2, "a".into(), cap(4096));
        assert_eq!(
            s.want(2, vec![want(0, 8192, 1)])[0].0,
            0,
            "more than the host's"
        );
    }

    #[test]
    fn resource_groups_span_pipelines_of_a_project() {
        let mut s = Share::new(4096 * MIB, 8.0, 8);
        for (k, project) in [(1, "a"), (2, "a"), (3, "b")] {
            s.join(k, k, project.into(), cap(4096));
            let mut w = want(0, 100, 1);
            w.resource_group = Some("production".into());
            s.want(k, vec![w]);
        }
        assert_eq!(s.select(), vec![(1, 0), (3, 0)]);
        s.release(1, 0);
        assert_eq!(s.select(), vec![(2, 0)]);
    }

    #[test]
    fn a_run_that_leaves_frees_what_it_held() {
        let mut s = Share::new(1024 * MIB, 8.0, 8);
        s.join(1, 1, "a".into(), cap(4096));
        s.want(1, vec![want(0, 1024, 1)]);
        assert_eq!(s.select().len(), 1);
        s.join(2, 2, "a".into(), cap(4096));
        s.want(2, vec![want(0, 1024, 1)]);
        assert!(s.select().is_empty());
        s.leave(1);
        assert_eq!(s.select(), vec![(2, 0)]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// A pipeline: its project, when it arrives, and its jobs (memory in MiB, duration).
        type Arrival = (u8, u32, Vec<(u64, u32)>);

        /// Several pipelines of several projects arrive over time, each a list of jobs
        /// (memory, duration) that become ready at once; whenever a job ends, admission runs
        /// again. The host budget and every pipeline's own budget are never exceeded, every
        /// job runs (no starvation, no deadlock), and no job is passed without bound.
        fn simulate(
            budget_mib: u64,
            slots: u32,
            pipelines: &[Arrival],
        ) -> Result<(), TestCaseError> {
            let mut s = Share::new(budget_mib * MIB, 64.0, slots);
            let total: usize = pipelines.iter().map(|p| p.2.len()).sum();
            let mut left: Vec<Vec<usize>> =
                pipelines.iter().map(|p| (0..p.2.len()).collect()).collect();
            let mut joined = vec![false; pipelines.len()];
            let mut running: Vec<(u32, RunKey, usize)> = Vec::new();
            let mut now = 0u32;
            let mut done = 0;
            let mut steps = 0;
            while done < total {
                steps += 1;
                prop_assert!(steps < 10 * total + 100, "no progress");
                for (k, p) in pipelines.iter().enumerate() {
                    if !joined[k] && p.1 <= now {
                        joined[k] = true;
                        s.join(k as RunKey, k as u64, format!("p{}", p.0), cap(budget_mib));
                    }
                    if joined[k] {
                        let wants = left[k].iter().map(|&j| want(j, p.2[j].0, 1)).collect();
                        prop_assert!(s.want(k as RunKey, wants).is_empty());
                    }
                }
                for (key, job) in s.select() {
                    let k = key as usize;
                    left[k].retain(|&j| j != job);
                    running.push((now + pipelines[k].2[job].1, key, job));
                }
                let v = s.view();
                prop_assert!(v.used_memory_bytes <= budget_mib * MIB);
                prop_assert!(v.running <= slots);
                for r in s.runs.values() {
                    for n in r.overtaken.values() {
                        prop_assert!(*n <= s.overtake_limit + total as u32, "passed {n} times");
                    }
                }
                // Advance to the next end, or the next arrival.
                let next_arrival = pipelines
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| !joined[*k])
                    .map(|(_, p)| p.1)
                    .min();
                running.sort_by_key(|r| r.0);
                let end = running.first().map(|r| r.0);
                if let Some(e) = end
                    && next_arrival.is_none_or(|a| e <= a)
                {
                    let (t, key, job) = running.remove(0);
                    now = t;
                    s.release(key, job);
                    done += 1;
                } else if let Some(a) = next_arrival {
                    now = a;
                } else {
                    prop_assert!(false, "deadlock: nothing runs, {} left", total - done);
                }
            }
            prop_assert_eq!(s.view().used_memory_bytes, 0);
            Ok(())
        }

        proptest! {
            #[test]
            fn host_budget_holds_and_every_job_of_every_pipeline_runs(
                pipelines in proptest::collection::vec(
                    (0u8..3, 0u32..30, proptest::collection::vec((1u64..3072, 1u32..20), 1..12)),
                    1..8,
                ),
                slots in 1u32..6,
            ) {
                simulate(3072, slots, &pipelines)?;
            }
        }
    }
}
