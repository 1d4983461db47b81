//! Admission: which ready jobs may start now, given what the budget has free.
//!
//! Ready jobs are considered best first (longest remaining critical path, then definition
//! order). A job starts only when its memory and CPU request fit in what is free and a job
//! slot is free. A job that does not fit may be overtaken by smaller ones behind it, but only
//! `overtake_limit` times: after that nothing else starts until it fits, so a large job is
//! never starved by a stream of small ones.

use rave_model::Budget;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    pub memory_bytes: u64,
    pub cpus: f64,
}

#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: usize,
    pub request: Request,
    /// How often a later job was started while this one waited for room.
    pub overtaken: u32,
    /// At most one job of a `resource_group` runs at a time.
    pub resource_group: Option<String>,
}

#[derive(Debug)]
pub struct Admission {
    pub budget: Budget,
    pub used_memory: u64,
    pub used_cpus: f64,
    pub running: u32,
    pub overtake_limit: u32,
    pub busy_groups: Vec<String>,
}

const EPS: f64 = 1e-9;

impl Admission {
    pub fn new(budget: Budget) -> Self {
        Admission {
            budget,
            used_memory: 0,
            used_cpus: 0.0,
            running: 0,
            overtake_limit: budget.jobs.max(2),
            busy_groups: Vec::new(),
        }
    }

    pub fn fits(&self, r: Request) -> bool {
        self.running < self.budget.jobs
            && self.used_memory + r.memory_bytes <= self.budget.memory_bytes
            && self.used_cpus + r.cpus <= self.budget.cpus + EPS
    }

    pub fn take(&mut self, r: Request, group: Option<&str>) {
        self.used_memory += r.memory_bytes;
        self.used_cpus += r.cpus;
        self.running += 1;
        if let Some(g) = group {
            self.busy_groups.push(g.to_string());
        }
    }

    pub fn give_back(&mut self, r: Request, group: Option<&str>) {
        self.used_memory = self.used_memory.saturating_sub(r.memory_bytes);
        self.used_cpus = (self.used_cpus - r.cpus).max(0.0);
        self.running = self.running.saturating_sub(1);
        if let Some(g) = group
            && let Some(i) = self.busy_groups.iter().position(|b| b == g)
        {
            self.busy_groups.remove(i);
        }
    }

    /// Pick jobs to start from `ready` (sorted best first); takes their resources and bumps
    /// the overtaken count of jobs they passed. Returns indices into `ready`.
    pub fn select(&mut self, ready: &mut [Candidate]) -> Vec<usize> {
        let mut started = Vec::new();
        let mut waiting: Vec<usize> = Vec::new();
        for i in 0..ready.len() {
            if self.running >= self.budget.jobs {
                break;
            }
            let c = &ready[i];
            if c.resource_group
                .as_ref()
                .is_some_and(|g| self.busy_groups.contains(g))
            {
                continue;
            }
            if self.fits(c.request) {
                let (req, group) = (c.request, c.resource_group.clone());
                self.take(req, group.as_deref());
                for &w in &waiting {
                    ready[w].overtaken += 1;
                }
                started.push(i);
            } else if c.overtaken >= self.overtake_limit {
                // This job has waited long enough: hold everything behind it.
                break;
            } else {
                waiting.push(i);
            }
        }
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn cand(id: usize, mem: u64) -> Candidate {
        Candidate {
            id,
            request: Request {
                memory_bytes: mem * MIB,
                cpus: 1.0,
            },
            overtaken: 0,
            resource_group: None,
        }
    }

    fn budget(mem: u64, cpus: f64, jobs: u32) -> Budget {
        Budget {
            memory_bytes: mem * MIB,
            cpus,
            jobs,
            ..Budget::SAFE
        }
    }

    #[test]
    fn admits_by_memory_not_count() {
        let mut a = Admission::new(budget(2048, 4.0, 4));
        let mut ready = vec![cand(0, 1536), cand(1, 1536), cand(2, 256)];
        let s = a.select(&mut ready);
        assert_eq!(s, vec![0, 2]);
        assert_eq!(ready[1].overtaken, 1);
    }

    #[test]
    fn big_job_is_not_starved() {
        let mut a = Admission::new(budget(2048, 8.0, 8));
        a.overtake_limit = 2;
        // Something holds 1 GiB; the 1.5 GiB job waits while small ones pass it, twice at most.
        a.take(
            Request {
                memory_bytes: 1024 * MIB,
                cpus: 1.0,
            },
            None,
        );
        let mut ready = vec![cand(0, 1536), cand(1, 128)];
        assert_eq!(a.select(&mut ready), vec![1]);
        a.give_back(ready[1].request, None);
        assert_eq!(a.select(&mut ready), vec![1]);
        a.give_back(ready[1].request, None);
        assert_eq!(ready[0].overtaken, 2);
        // Now nothing passes it until it fits.
        assert!(a.select(&mut ready).is_empty());
        a.give_back(
            Request {
                memory_bytes: 1024 * MIB,
                cpus: 1.0,
            },
            None,
        );
        assert_eq!(a.select(&mut ready), vec![0, 1]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Simulate a run: jobs with random requests and durations arrive ready; whenever one
        /// ends, admission runs again. The budget is never exceeded, every job runs (no
        /// starvation, no deadlock), and no job is overtaken more than the limit allows.
        fn simulate(budget: Budget, jobs: &[(u64, f64, u32)]) -> Result<(), TestCaseError> {
            let mut a = Admission::new(budget);
            let mut ready: Vec<Candidate> = jobs
                .iter()
                .enumerate()
                .map(|(id, (m, c, _))| Candidate {
                    id,
                    request: Request {
                        memory_bytes: *m,
                        cpus: *c,
                    },
                    overtaken: 0,
                    resource_group: None,
                })
                .collect();
            let mut running: Vec<(u32, Candidate)> = Vec::new();
            let mut now = 0u32;
            let mut done = 0;
            while done < jobs.len() {
                let picked = a.select(&mut ready);
                prop_assert!(a.used_memory <= budget.memory_bytes);
                prop_assert!(a.used_cpus <= budget.cpus + 1e-9);
                prop_assert!(a.running <= budget.jobs);
                for i in picked.into_iter().rev() {
                    let c = ready.remove(i);
                    running.push((now + jobs[c.id].2, c));
                }
                for c in &ready {
                    prop_assert!(c.overtaken <= a.overtake_limit + budget.jobs, "{c:?}");
                }
                prop_assert!(
                    !running.is_empty(),
                    "deadlock: nothing runs, {} ready",
                    ready.len()
                );
                running.sort_by_key(|(t, _)| *t);
                let (t, c) = running.remove(0);
                now = t;
                a.give_back(c.request, None);
                done += 1;
            }
            prop_assert_eq!(a.used_memory, 0);
            Ok(())
        }

        proptest! {
            #[test]
            fn budget_holds_and_every_job_runs(
                jobs in proptest::collection::vec((1u64..3072, 1u32..=4, 1u32..20), 1..60),
                slots in 1u32..5,
            ) {
                let budget = Budget { memory_bytes: 3072 * MIB, cpus: 2.0, jobs: slots, ..Budget::SAFE };
                let jobs: Vec<(u64, f64, u32)> = jobs
                    .into_iter()
                    .map(|(m, c, d)| (m * MIB, c as f64 * 0.5, d))
                    .collect();
                simulate(budget, &jobs)?;
            }
        }
    }

    #[test]
    fn slots_cpus_and_resource_groups_limit_too() {
        let mut a = Admission::new(budget(8192, 2.0, 8));
        let mut ready = vec![cand(0, 1), cand(1, 1), cand(2, 1)];
        assert_eq!(a.select(&mut ready).len(), 2, "2 CPUs, 1 CPU each");
        let mut a = Admission::new(budget(8192, 8.0, 8));
        let mut ready = vec![cand(0, 1), cand(1, 1)];
        for c in &mut ready {
            c.resource_group = Some("prod".into());
        }
        assert_eq!(a.select(&mut ready), vec![0]);
    }
}
