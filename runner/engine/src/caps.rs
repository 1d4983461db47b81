//! The job's share of the budget, passed on to the tools it runs.
//!
//! Build tools size themselves from the machine, not from the job: cargo starts one rustc per
//! core, Nix multiplies `cores` by `max-jobs` (NixOS/nix#11760), Node's heap grows until the
//! kernel kills it. rave tells each tool the job's share instead, so a job stays inside its
//! memory limit by construction rather than by OOM kill.

use rave_model::Budget;

/// Environment variables that carry the job's share.
pub fn env(
    memory_bytes: u64,
    cpus: f64,
    budget: &Budget,
    user: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let whole_cpus = (cpus.floor() as u32).max(1);
    let limit_mb = memory_bytes / (1024 * 1024);
    // Nix: cores × max-jobs must not exceed the job's CPUs.
    let max_jobs = budget.nix_max_jobs.clamp(1, whole_cpus);
    let mut cores = (whole_cpus / max_jobs).max(1);
    if budget.nix_cores > 0 {
        cores = cores.min(budget.nix_cores);
    }
    // A user's own smaller value wins (the origin pipeline sets NIX_BUILD_CORES=2 and expects
    // no more than that); a larger one is clamped to the share.
    let clamp = |name: &str, share: u64| -> u64 {
        user(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|v| *v > 0)
            .map_or(share, |v| v.min(share))
    };
    let nix_cores = clamp("NIX_BUILD_CORES", cores as u64);
    let nix_max_jobs = clamp("NIX_MAX_JOBS", max_jobs as u64);
    let qemu_mb = clamp("QEMU_RAM_MB", (limit_mb * 3 / 4).max(64));
    let qemu_cpus = clamp("QEMU_CPUS", whole_cpus as u64);
    let node_heap_mb = (limit_mb * 3 / 4).max(64);
    vec![
        ("RAVE_MEMORY_LIMIT_MB".into(), limit_mb.to_string()),
        ("RAVE_CPUS".into(), format_cpus(cpus)),
        ("NIX_BUILD_CORES".into(), nix_cores.to_string()),
        ("NIX_MAX_JOBS".into(), nix_max_jobs.to_string()),
        (
            "NIX_CONFIG".into(),
            format!("cores = {nix_cores}\nmax-jobs = {nix_max_jobs}"),
        ),
        ("CARGO_BUILD_JOBS".into(), whole_cpus.to_string()),
        ("MAKEFLAGS".into(), format!("-j{whole_cpus}")),
        (
            "NODE_OPTIONS".into(),
            match user("NODE_OPTIONS") {
                Some(o) if !o.contains("--max-old-space-size") && !o.is_empty() => {
                    format!("{o} --max-old-space-size={node_heap_mb}")
                }
                Some(o) if !o.is_empty() => o,
                _ => format!("--max-old-space-size={node_heap_mb}"),
            },
        ),
        ("QEMU_RAM_MB".into(), qemu_mb.to_string()),
        ("QEMU_CPUS".into(), qemu_cpus.to_string()),
    ]
}

pub fn format_cpus(cpus: f64) -> String {
    if (cpus - cpus.round()).abs() < 1e-9 {
        format!("{}", cpus.round() as u64)
    } else {
        format!("{cpus:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(v: &[(String, String)], k: &str) -> String {
        v.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    }

    #[test]
    fn nix_cores_times_jobs_never_exceed_the_share() {
        for cpus in [1.0, 1.5, 2.0, 3.0, 8.0] {
            for max_jobs in [1, 2, 4] {
                let b = Budget {
                    nix_max_jobs: max_jobs,
                    nix_cores: 0,
                    ..Budget::SAFE
                };
                let e = env(1 << 30, cpus, &b, &|_| None);
                let c: u64 = get(&e, "NIX_BUILD_CORES").parse().unwrap();
                let j: u64 = get(&e, "NIX_MAX_JOBS").parse().unwrap();
                assert!(
                    c * j <= (cpus.floor() as u64).max(1),
                    "{cpus} {max_jobs}: {c}×{j}"
                );
                assert!(get(&e, "NIX_CONFIG").contains(&format!("cores = {c}")));
            }
        }
    }

    #[test]
    fn user_values_are_clamped_not_raised() {
        let e = env(2 << 30, 2.0, &Budget::SAFE, &|k| match k {
            "QEMU_RAM_MB" => Some("3072".into()),
            "NIX_BUILD_CORES" => Some("1".into()),
            _ => None,
        });
        assert_eq!(get(&e, "QEMU_RAM_MB"), "1536");
        assert_eq!(get(&e, "NIX_BUILD_CORES"), "1");
        assert_eq!(get(&e, "CARGO_BUILD_JOBS"), "2");
        assert_eq!(get(&e, "MAKEFLAGS"), "-j2");
        assert_eq!(get(&e, "NODE_OPTIONS"), "--max-old-space-size=1536");
        assert_eq!(get(&e, "RAVE_MEMORY_LIMIT_MB"), "2048");
    }
}
