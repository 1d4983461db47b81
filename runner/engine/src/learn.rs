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
}

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

    /// Add the measured peaks of a finished run and write them back.
    pub fn record(mut self, records: &[&JobRecord]) -> Result<(), String> {
        self.store.runs += 1;
        let now = self.store.runs;
        for r in records {
            let Some(peak) = r.peak_memory_bytes.filter(|p| *p > 0) else {
                continue;
            };
            // A reused job did not run: nothing was measured.
            if r.reused_from.is_some() {
                continue;
            }
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
            name: name.into(),
            stage: "test".into(),
            status: crate::JobStatus::Success,
            failure_reason: None,
            exit_code: Some(0),
            started_at: None,
            finished_at: None,
            duration_ms: Some(1),
            peak_memory_bytes: Some(peak),
            setup_ms: None,
            memory_limit_bytes: 512 << 20,
            memory_source: None,
            cpus: 1.0,
            attempts: 1,
            note: None,
            reused_from: None,
            reuse: None,
            children: Vec::new(),
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
}
