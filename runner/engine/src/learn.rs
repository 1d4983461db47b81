//! Memory requests learned from measured peaks: a job that states no request is admitted with
//! a high percentile of its recent peaks (times a margin) instead of the flat default, so the
//! budget packs what jobs really use.
//!
//! Peaks are kept per project in `<state>/learn/peaks.json` (the last [`KEEP`] of each job,
//! at most [`MAX_JOBS`] jobs), written after every run. Two runs finishing at once may lose
//! one run's samples (the last write wins); the next run records again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::JobRecord;

/// Samples kept per job.
pub const KEEP: usize = 20;
/// Jobs remembered per project (the least recently seen go first).
pub const MAX_JOBS: usize = 2000;
/// Head room over the 95th percentile of the peaks.
pub const MARGIN: f64 = 1.25;
/// Never learn below this: a shell and a small tool.
pub const FLOOR: u64 = 32 << 20;

#[derive(Serialize, Deserialize, Default, Debug)]
struct Store {
    /// Job name → (run counter when last seen, peaks oldest first).
    jobs: BTreeMap<String, (u64, Vec<u64>)>,
    runs: u64,
    /// Job name → CPUs it used (CPU time ÷ wall time), oldest first.
    #[serde(default)]
    cpus: BTreeMap<String, Vec<f64>>,
}

/// Jobs shorter than this say little about the CPUs they use (start-up dominates).
pub const CPU_MIN_WALL_MS: u64 = 500;
/// Never learn fewer CPUs than this.
pub const CPU_FLOOR: f64 = 0.25;

/// A project's learned peaks.
pub struct Peaks {
    path: PathBuf,
    store: Store,
}

impl Peaks {
    pub fn load(state_dir: &Path) -> Peaks {
        let path = state_dir.join("learn").join("peaks.json");
        let store = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Peaks { path, store }
    }

    /// The learned request for `job` and how many runs it comes from.
    pub fn request(&self, job: &str) -> Option<(u64, usize)> {
        let (_, peaks) = self.store.jobs.get(job)?;
        if peaks.is_empty() {
            return None;
        }
        let mut v = peaks.clone();
        v.sort_unstable();
        // Nearest-rank 95th percentile.
        let rank = ((0.95 * v.len() as f64).ceil() as usize).clamp(1, v.len());
        let p95 = v[rank - 1];
        Some(((((p95 as f64) * MARGIN) as u64).max(FLOOR), v.len()))
    }

    /// The learned CPU request for `job` (p95 of CPU time ÷ wall time, with the margin,
    /// rounded up to a quarter CPU) and how many runs it comes from.
    pub fn cpu_request(&self, job: &str) -> Option<(f64, usize)> {
        let used = self.store.cpus.get(job)?;
        if used.is_empty() {
            return None;
        }
        let mut v = used.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = ((0.95 * v.len() as f64).ceil() as usize).clamp(1, v.len());
        let want = (v[rank - 1] * MARGIN * 4.0).ceil() / 4.0;
        Some((want.max(CPU_FLOOR), v.len()))
    }

    /// Every learned CPU request, by job name.
    pub fn all_cpus(&self) -> std::collections::HashMap<String, (f64, usize)> {
        self.store
            .cpus
            .keys()
            .filter_map(|k| Some((k.clone(), self.cpu_request(k)?)))
            .collect()
    }

    /// Add the measured peaks of a finished run and write them back.
    pub fn record(mut self, records: &[&JobRecord]) -> Result<(), String> {
        self.store.runs += 1;
        let now = self.store.runs;
        for r in records {
            // A reused job did not run: nothing was measured.
            if r.reused_from.is_some() {
                continue;
            }
            if let (Some(cpu), Some(ms)) = (r.cpu_seconds, r.duration_ms)
                && ms >= CPU_MIN_WALL_MS
            {
                let e = self.store.cpus.entry(r.name.clone()).or_default();
                e.push(cpu / (ms as f64 / 1000.0));
                if e.len() > KEEP {
                    let drop = e.len() - KEEP;
                    e.drain(..drop);
                }
            }
            let Some(peak) = r.peak_memory_bytes.filter(|p| *p > 0) else {
                continue;
            };
            let e = self.store.jobs.entry(r.name.clone()).or_default();
            e.0 = now;
            e.1.push(peak);
            if e.1.len() > KEEP {
                let drop = e.1.len() - KEEP;
                e.1.drain(..drop);
            }
        }
        if self.store.jobs.len() > MAX_JOBS {
            let mut by_age: Vec<(u64, String)> = self
                .store
                .jobs
                .iter()
                .map(|(k, (seen, _))| (*seen, k.clone()))
                .collect();
            by_age.sort();
            for (_, k) in by_age.into_iter().take(self.store.jobs.len() - MAX_JOBS) {
                self.store.jobs.remove(&k);
                self.store.cpus.remove(&k);
            }
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        crate::snapshot::write_replacing(
            &self.path,
            &serde_json::to_vec(&self.store).map_err(|e| e.to_string())?,
            false,
        )
    }

    /// Every learned request, by job name.
    pub fn all(&self) -> std::collections::HashMap<String, (u64, usize)> {
        self.store
            .jobs
            .keys()
            .filter_map(|k| Some((k.clone(), self.request(k)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, peak: u64) -> JobRecord {
        JobRecord {
            exit_code: Some(0),
            duration_ms: Some(1),
            peak_memory_bytes: Some(peak),
            memory_limit_bytes: 512 << 20,
            ..JobRecord::new(name, "test", crate::JobStatus::Success)
        }
    }

    #[test]
    fn the_request_is_the_p95_of_recent_peaks_with_a_margin() {
        let d = tempfile::tempdir().unwrap();
        for mb in 1..=25u64 {
            let p = Peaks::load(d.path());
            p.record(&[&record("build", (mb * 10) << 20), &record("tiny", 1 << 20)])
                .unwrap();
        }
        let p = Peaks::load(d.path());
        // Only the last 20 runs (60..250 MiB) count; p95 of 20 samples is the 19th.
        let (req, n) = p.request("build").unwrap();
        assert_eq!(n, KEEP);
        assert_eq!(req, ((240u64 << 20) as f64 * MARGIN) as u64);
        // A job that uses almost nothing still gets the floor.
        assert_eq!(p.request("tiny").unwrap().0, FLOOR);
        assert!(p.request("never-ran").is_none());
    }

    #[test]
    fn the_cpu_request_is_what_the_job_used_with_a_margin() {
        let d = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let mut busy = record("compile", 64 << 20);
            busy.duration_ms = Some(10_000);
            busy.cpu_seconds = Some(15.0); // 1.5 CPUs on average
            let mut idle = record("sleepy", 64 << 20);
            idle.duration_ms = Some(10_000);
            idle.cpu_seconds = Some(0.1);
            let mut short = record("blink", 64 << 20);
            short.duration_ms = Some(20);
            short.cpu_seconds = Some(0.02);
            Peaks::load(d.path())
                .record(&[&busy, &idle, &short])
                .unwrap();
        }
        let p = Peaks::load(d.path());
        // 1.5 × 1.25 = 1.875, rounded up to a quarter CPU.
        assert_eq!(p.cpu_request("compile"), Some((2.0, 3)));
        assert_eq!(p.cpu_request("sleepy"), Some((CPU_FLOOR, 3)));
        assert!(p.cpu_request("blink").is_none(), "too short to learn from");
    }
}
