//! Per-job cgroups: a memory limit the kernel enforces, the job's peak memory, whether the
//! kernel OOM-killed something in it, and a way to kill every process it holds.
//!
//! cgroup v2 (unified) is used where it is mounted with the memory controller; otherwise the
//! v1 `memory` (and `cpu`, when present) hierarchies. rave creates its groups under the cgroup
//! it runs in (`…/rave-<pid>/<job>`), so it works inside a container or a systemd unit that
//! delegated its subtree. Where no group can be made, [`Cgroups::detect`] says why and rave
//! falls back to admission-only budgeting.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

const V2_ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Debug)]
enum Layout {
    V2 {
        base: PathBuf,
    },
    V1 {
        memory: PathBuf,
        cpu: Option<PathBuf>,
        /// CPU accounting, when it is its own hierarchy (not `cpu,cpuacct`).
        cpuacct: Option<PathBuf>,
    },
}

/// The parent group under which rave makes one group per job.
#[derive(Clone, Debug)]
pub struct Cgroups {
    layout: Layout,
    /// Emptied v1 job groups kept for later jobs (see [`Cgroups::recycle`]).
    pool: std::sync::Arc<std::sync::Mutex<Vec<JobCgroup>>>,
}

/// How many emptied groups a run keeps for reuse: about the jobs that run at once.
const POOL_MAX: usize = 16;
/// A group still charged with more than this after its job (page cache the job left) is
/// removed, not reused: its charge would count in the next job's peak, and the kernel moves a
/// removed group's cache to the parent instead of dropping it.
const POOL_MAX_LEFT_BYTES: u64 = 1 << 20;

/// Whether OOM killers killed processes of a job's group, and for whose limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomKills {
    /// For the group's own limit.
    pub at_limit: bool,
    /// By an OOM killer beyond it: the host ran out, or an ancestor group at its limit.
    pub beyond_limit: bool,
}

/// One job's group.
#[derive(Debug)]
pub struct JobCgroup {
    layout: Layout,
    /// Files a process writes `0` to, to move itself into the group. On v1 these are the
    /// `tasks` files: moving one thread (bash is single-threaded) with `0` skips the
    /// threadgroup lock whose RCU grace period makes a `cgroup.procs` write take ~10 ms.
    pub join_files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    /// Where the group's CPU time is read: v2 `cpu.stat` (`usage_usec`), v1 `cpuacct.usage`.
    cpu_usage: Option<PathBuf>,
    /// Its memory limit now (a reused group's limit is changed in the order v1 allows).
    memory_bytes: u64,
    /// v1: whether memory+swap is limited too (`memory.memsw.*`, with swap accounting on).
    memsw: bool,
    /// v1: the CPU quota file, rewritten for each job a kept group serves.
    quota_file: Option<PathBuf>,
    /// OOM kills counted before this job had the group (a reused group keeps its count).
    oom_base: u64,
    /// Control files opened once and read or written in place (at offset 0) from then on:
    /// a kept group is read and written a dozen times a job, and opening a cgroup file is most
    /// of what such an access costs.
    held: std::sync::Mutex<std::collections::HashMap<PathBuf, fs::File>>,
}

fn own_path(controller: &str) -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _id = parts.next()?;
        let ctrls = parts.next()?;
        let path = parts.next()?;
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl Cgroups {
    /// Find a place to create job groups. The error says why none could be made.
    pub fn detect() -> Result<Cgroups, String> {
        let tag = format!("rave-{}", std::process::id());
        let v2_controllers = Path::new(V2_ROOT).join("cgroup.controllers");
        if v2_controllers.exists() {
            let own = own_path("").unwrap_or_else(|| "/".into());
            let own = Path::new(V2_ROOT).join(own.trim_start_matches('/'));
            // Our group's children only get a controller their parent hands down. Our own
            // group usually holds processes (rave, the shell that started it), and the kernel
            // lets no group with processes hand controllers down, except the root: so the
            // job groups go under the nearest group, ours or an ancestor we were delegated
            // (as systemd delegates `user@.service`), that hands memory down or can be made to.
            let hands_down = |g: &Path| {
                let handed =
                    fs::read_to_string(g.join("cgroup.subtree_control")).unwrap_or_default();
                for c in ["memory", "cpu"] {
                    if !handed.split_whitespace().any(|h| h == c) {
                        let _ = write(&g.join("cgroup.subtree_control"), &format!("+{c}"));
                    }
                }
                fs::read_to_string(g.join("cgroup.subtree_control"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .any(|h| h == "memory")
            };
            // … and one we may create our group in.
            let ours = |g: &Path| {
                rustix::fs::access(g, rustix::fs::Access::WRITE_OK).is_ok() && hands_down(g)
            };
            let mut parent = own.clone();
            while !ours(&parent) {
                match parent.parent() {
                    Some(up) if up.starts_with(V2_ROOT) && up != parent => {
                        parent = up.to_path_buf()
                    }
                    _ => {
                        return Err(format!(
                            "cgroup v2: no group from {} up hands the memory controller down to a group rave may create (delegate a subtree to this user, as systemd's Delegate=yes does)",
                            own.display()
                        ));
                    }
                }
            }
            let controllers =
                fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
            if !controllers.split_whitespace().any(|c| c == "memory") {
                return Err(format!(
                    "cgroup v2 is mounted but the memory controller is not delegated to {}",
                    parent.display()
                ));
            }
            sweep_dead(&parent);
            let base = parent.join(&tag);
            fs::create_dir_all(&base)
                .map_err(|e| format!("cannot create {}: {e}", base.display()))?;
            // Children of `base` get the memory and cpu controllers. `base` itself holds no
            // process, so the "no internal processes" rule is kept.
            let _ = write(&base.join("cgroup.subtree_control"), "+memory +cpu");
            let ok = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
            if !ok.contains("memory") {
                let _ = fs::remove_dir(&base);
                return Err(format!(
                    "cannot enable the memory controller under {}",
                    parent.display()
                ));
            }
            return Ok(Cgroups {
                pool: Default::default(),
                layout: Layout::V2 { base },
            });
        }
        let mem_root = Path::new(V2_ROOT).join("memory");
        if !mem_root.join("memory.limit_in_bytes").exists() {
            return Err("no cgroup memory controller is mounted (neither v2 nor v1 memory)".into());
        }
        let mem_own = own_path("memory").unwrap_or_else(|| "/".into());
        sweep_dead(&mem_root.join(mem_own.trim_start_matches('/')));
        let memory = mem_root.join(mem_own.trim_start_matches('/')).join(&tag);
        fs::create_dir_all(&memory)
            .map_err(|e| format!("cannot create {}: {e}", memory.display()))?;
        let cpu = own_path("cpu").and_then(|own| {
            let root = ["cpu", "cpu,cpuacct"]
                .iter()
                .map(|d| Path::new(V2_ROOT).join(d))
                .find(|p| p.join("cpu.cfs_quota_us").exists())?;
            sweep_dead(&root.join(own.trim_start_matches('/')));
            let dir = root.join(own.trim_start_matches('/')).join(&tag);
            fs::create_dir_all(&dir).ok().map(|_| dir)
        });
        // CPU time: in the cpu group when the hierarchy is `cpu,cpuacct`, else its own.
        let cpuacct = if cpu
            .as_ref()
            .is_some_and(|c| c.join("cpuacct.usage").exists())
        {
            None
        } else {
            own_path("cpuacct").and_then(|own| {
                let root = Path::new(V2_ROOT).join("cpuacct");
                if !root.join("cpuacct.usage").exists() {
                    return None;
                }
                sweep_dead(&root.join(own.trim_start_matches('/')));
                let dir = root.join(own.trim_start_matches('/')).join(&tag);
                fs::create_dir_all(&dir).ok().map(|_| dir)
            })
        };
        Ok(Cgroups {
            pool: Default::default(),
            layout: Layout::V1 {
                memory,
                cpu,
                cpuacct,
            },
        })
    }

    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::V2 { base } => format!("cgroup v2 at {}", base.display()),
            Layout::V1 { memory, cpu, .. } => format!(
                "cgroup v1 at {}{}",
                memory.display(),
                if cpu.is_some() { " (+cpu)" } else { "" }
            ),
        }
    }

    /// Make a group for one job with its limits.
    pub fn create(&self, name: &str, memory_bytes: u64, cpus: f64) -> io::Result<JobCgroup> {
        let period: u64 = 100_000;
        let quota = ((cpus * period as f64) as u64).max(1000);
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(mut g) = pooled {
            match g.reconfigure(memory_bytes, quota) {
                Ok(()) => return Ok(g),
                Err(_) => {
                    for d in g.dirs.iter().rev() {
                        let _ = fs::remove_dir(d);
                    }
                }
            }
        }
        match &self.layout {
            Layout::V2 { base } => {
                let dir = base.join(name);
                let _ = fs::remove_dir(&dir);
                fs::create_dir(&dir)?;
                write(&dir.join("memory.max"), &memory_bytes.to_string())?;
                // Swap would hide an OOM as slowness; the limit is on RAM plus swap.
                let _ = write(&dir.join("memory.swap.max"), "0");
                let _ = write(&dir.join("cpu.max"), &format!("{quota} {period}"));
                Ok(JobCgroup {
                    layout: self.layout.clone(),
                    join_files: vec![dir.join("cgroup.procs")],
                    cpu_usage: Some(dir.join("cpu.stat")),
                    dirs: vec![dir],
                    memory_bytes,
                    memsw: false,
                    quota_file: None,
                    oom_base: 0,
                    held: Default::default(),
                })
            }
            Layout::V1 {
                memory,
                cpu,
                cpuacct,
            } => {
                // A name taken by a group another job reuses gets a suffix.
                let (dir, name) = free_name(memory, name)?;
                let name = name.as_str();
                write(
                    &dir.join("memory.limit_in_bytes"),
                    &memory_bytes.to_string(),
                )?;
                let memsw_file = dir.join("memory.memsw.limit_in_bytes");
                let memsw = memsw_file.exists();
                if memsw {
                    let _ = write(&memsw_file, &memory_bytes.to_string());
                }
                let mut procs = vec![dir.join("tasks")];
                let mut dirs = vec![dir];
                let mut cpu_usage = None;
                let mut quota_file = None;
                if let Some(cpu) = cpu {
                    let cdir = cpu.join(name);
                    let _ = fs::remove_dir(&cdir);
                    if fs::create_dir(&cdir).is_ok() {
                        let _ = write(&cdir.join("cpu.cfs_period_us"), &period.to_string());
                        let file = cdir.join("cpu.cfs_quota_us");
                        if write(&file, &quota.to_string()).is_ok() {
                            quota_file = Some(file);
                        }
                        procs.push(cdir.join("tasks"));
                        if cdir.join("cpuacct.usage").exists() {
                            cpu_usage = Some(cdir.join("cpuacct.usage"));
                        }
                        dirs.push(cdir);
                    }
                }
                if let Some(acct) = cpuacct {
                    let adir = acct.join(name);
                    let _ = fs::remove_dir(&adir);
                    if fs::create_dir(&adir).is_ok() {
                        procs.push(adir.join("tasks"));
                        cpu_usage = Some(adir.join("cpuacct.usage"));
                        dirs.push(adir);
                    }
                }
                Ok(JobCgroup {
                    layout: self.layout.clone(),
                    join_files: procs,
                    dirs,
                    cpu_usage,
                    memory_bytes,
                    memsw,
                    quota_file,
                    oom_base: 0,
                    held: Default::default(),
                })
            }
        }
    }

    /// Done with a job's group, emptied by [`JobCgroup::kill_all`]: on cgroup v1 a group
    /// the job left (nearly) uncharged is kept for a later job — making and removing the three
    /// v1 groups of a job costs more than its whole run when the job is short — else it is
    /// removed in the background. v2 groups are always removed: `memory.peak` cannot be reset
    /// on the kernels most hosts run.
    pub fn recycle(&self, g: JobCgroup, emptied: bool) {
        let reusable = emptied
            && matches!(g.layout, Layout::V1 { .. })
            && g.read_u64(&g.mem_dir().join("memory.usage_in_bytes"))
                .is_some_and(|b| b <= POOL_MAX_LEFT_BYTES);
        if reusable {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(g);
                return;
            }
        }
        // The kernel frees an emptied group a moment after its last process is reaped;
        // removing it is not worth making the job (and its dependents) wait for that.
        tokio::spawn(async move { g.remove().await });
    }

    /// Remove rave's groups at exit: job groups not yet removed, then the parents. Job groups
    /// are empty by then (their jobs were killed); the kernel may need a moment to free them.
    pub fn remove(&self) {
        let parents: Vec<&PathBuf> = match &self.layout {
            Layout::V2 { base } => vec![base],
            Layout::V1 {
                memory,
                cpu,
                cpuacct,
            } => std::iter::once(memory)
                .chain(cpu.as_ref())
                .chain(cpuacct.as_ref())
                .collect(),
        };
        for parent in parents {
            for _ in 0..100 {
                let children: Vec<PathBuf> = fs::read_dir(parent)
                    .map(|rd| {
                        rd.flatten()
                            .filter(|e| e.path().is_dir())
                            .map(|e| e.path())
                            .collect()
                    })
                    .unwrap_or_default();
                for c in &children {
                    let _ = fs::remove_dir(c);
                }
                if fs::remove_dir(parent).is_ok() || !parent.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Sweep the groups of raves that are gone, wherever this process would make its own (v2, or
/// the v1 memory and cpu hierarchies). For a server restarting after a crash.
pub fn sweep_dead_raves() -> usize {
    let mut n = 0;
    if Path::new(V2_ROOT).join("cgroup.controllers").exists() {
        let own = own_path("").unwrap_or_else(|| "/".into());
        n += sweep_dead(&Path::new(V2_ROOT).join(own.trim_start_matches('/')));
        return n;
    }
    for (ctrl, dirs) in [
        ("memory", &["memory"][..]),
        ("cpu", &["cpu", "cpu,cpuacct"][..]),
        ("cpuacct", &["cpuacct"][..]),
    ] {
        let own = own_path(ctrl).unwrap_or_else(|| "/".into());
        for d in dirs {
            let parent = Path::new(V2_ROOT).join(d).join(own.trim_start_matches('/'));
            n += sweep_dead(&parent);
        }
    }
    n
}

/// Groups `rave-<pid>` under `parent` whose rave no longer runs (it was killed with -9 or
/// crashed): kill what still runs in them (a job outliving its rave) and remove them, deepest
/// first. Returns how many job processes were killed.
pub fn sweep_dead(parent: &Path) -> usize {
    let Ok(entries) = fs::read_dir(parent) else {
        return 0;
    };
    let mut killed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("rave-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        killed += remove_tree(&e.path());
    }
    killed
}

fn remove_tree(dir: &Path) -> usize {
    let mut killed = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                killed += remove_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        let pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() && fs::remove_dir(dir).is_ok() {
            break;
        }
        for pid in pids {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                if rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok() {
                    killed += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}

/// The biggest process in the group at `dir` or a group below it (a container job's
/// processes sit in the containers' own groups under the job's): (command, resident memory).
/// At most 256 processes are read.
pub fn largest_process_in(dir: &Path) -> Option<(String, u64)> {
    let mut pids = pids_in(dir);
    let mut stack: Vec<(PathBuf, u32)> = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        if depth >= 3 || pids.len() >= 256 {
            continue;
        }
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(pids_in(&e.path()));
                stack.push((e.path(), depth + 1));
            }
        }
    }
    pids.into_iter()
        .take(256)
        .filter_map(|pid| {
            let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
            let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((comm.trim().to_string(), pages * page_size()))
        })
        .max_by_key(|(_, rss)| *rss)
}

/// The last sample of a job's biggest process: (command, resident memory).
pub type Largest = std::sync::Arc<std::sync::Mutex<Option<(String, u64)>>>;

/// The biggest process under `dir`, sampled twice a second until the returned task is
/// aborted; the last sample is in the returned cell (OOM forensics for local and container
/// jobs alike). The first sample waits 100 ms: at its start a job is only its shell, and most
/// short jobs are over by then (sampling at once cost every job a thread hop and a few
/// hundred microseconds of /proc reads).
pub fn sample_largest(dir: PathBuf) -> (tokio::task::JoinHandle<()>, Largest) {
    let largest: Largest = std::sync::Arc::new(std::sync::Mutex::new(None));
    let cell = largest.clone();
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        loop {
            let d = dir.clone();
            if let Ok(Some(top)) = tokio::task::spawn_blocking(move || largest_process_in(&d)).await
            {
                *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(top);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    (task, largest)
}

fn pids_in(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// How many processes the kernel's OOM killer has killed on this host since boot (any cgroup
/// or none): compared before and after a job, it tells a host-wide OOM from the job's own.
pub fn host_oom_kills() -> Option<u64> {
    find_key(&fs::read_to_string("/proc/vmstat").ok()?, "oom_kill")
}

/// The value of `key` in `key value` lines.
fn find_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The whole content of a cgroup or proc file through an open descriptor, read from offset 0
/// (the kernel generates it anew for each read from the start).
fn read_at_start(f: &fs::File) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `parent/name`, or `parent/name-2`, `-3`, … when a group of that name is still there (a
/// group kept for reuse, or one the kernel has not freed yet).
fn free_name(parent: &Path, name: &str) -> io::Result<(PathBuf, String)> {
    let mut last = None;
    for n in 1..=64 {
        let candidate = if n == 1 {
            name.to_string()
        } else {
            format!("{name}-{n}")
        };
        let dir = parent.join(&candidate);
        // Never removed here: it may be a kept group another job is about to join.
        match fs::create_dir(&dir) {
            Ok(()) => return Ok((dir, candidate)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free cgroup name")))
}

impl JobCgroup {
    fn mem_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// `f(file)` on the group's control file at `path`, opened on first use (for reading
    /// and writing where the file takes writes). Never for the process list: see [`Self::pids`].
    fn held<T>(&self, path: &Path, f: impl FnOnce(&fs::File) -> io::Result<T>) -> io::Result<T> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let file = match held.entry(path.to_path_buf()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .or_else(|_| fs::File::open(path))?;
                v.insert(file)
            }
        };
        f(file)
    }

    fn read(&self, path: &Path) -> Option<String> {
        self.held(path, read_at_start).ok()
    }

    fn read_u64(&self, path: &Path) -> Option<u64> {
        self.read(path)?.trim().parse().ok()
    }

    fn read_key(&self, path: &Path, key: &str) -> Option<u64> {
        find_key(&self.read(path)?, key)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.held(path, |f| f.write_at(value.as_bytes(), 0).map(|_| ()))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// Make a kept v1 group ready for another job: its limits, its peak and CPU time reset,
    /// its OOM count so far remembered.
    fn reconfigure(&mut self, memory_bytes: u64, quota: u64) -> io::Result<()> {
        let mem = self.mem_dir().to_path_buf();
        let limit = mem.join("memory.limit_in_bytes");
        let memsw = mem.join("memory.memsw.limit_in_bytes");
        let has_memsw = self.memsw;
        // v1 wants limit ≤ memsw limit at every moment: raise memsw first, lower it last.
        if memory_bytes >= self.memory_bytes && has_memsw {
            self.write(&memsw, &memory_bytes.to_string())?;
        }
        self.write(&limit, &memory_bytes.to_string())?;
        if memory_bytes < self.memory_bytes && has_memsw {
            self.write(&memsw, &memory_bytes.to_string())?;
        }
        self.memory_bytes = memory_bytes;
        self.write(&mem.join("memory.max_usage_in_bytes"), "0")?;
        if has_memsw {
            self.write(&mem.join("memory.memsw.max_usage_in_bytes"), "0")?;
        }
        self.oom_base = self
            .read_key(&mem.join("memory.oom_control"), "oom_kill")
            .unwrap_or(0);
        if let Some(file) = self.quota_file.clone() {
            self.write(&file, &quota.to_string())?;
        }
        if let Some(usage) = self.cpu_usage.clone() {
            self.write(&usage, "0")?;
        }
        Ok(())
    }

    /// CPU time the group's processes used, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let path = self.cpu_usage.as_ref()?;
        match self.layout {
            Layout::V2 { .. } => self.read_key(path, "usage_usec").map(|us| us as f64 / 1e6),
            Layout::V1 { .. } => self.read_u64(path).map(|ns| ns as f64 / 1e9),
        }
    }

    /// Peak memory of everything that ran in the group.
    pub fn peak_memory(&self) -> Option<u64> {
        match self.layout {
            Layout::V2 { .. } => self.read_u64(&self.mem_dir().join("memory.peak")),
            Layout::V1 { .. } => self.read_u64(&self.mem_dir().join("memory.max_usage_in_bytes")),
        }
    }

    /// The OOM kills of the group's processes since this job got it, read once: at the
    /// group's own limit, or by an OOM killer beyond it (the host's, or an ancestor group's at
    /// its own limit). The kernel counts every OOM kill on the killed process's own group,
    /// whoever ran out.
    pub fn oom_kills(&self) -> OomKills {
        match self.layout {
            // v2's `oom_kill` counts kills by any OOM killer, the host's too; `oom` counts
            // the times the group itself hit its limit and had to kill (found by the QEMU
            // guest test: a host OOM was reported as the job's own).
            Layout::V2 { .. } => {
                let events = self.read(&self.mem_dir().join("memory.events"));
                let events = events.as_deref().unwrap_or_default();
                let (oom, killed) = (
                    find_key(events, "oom").unwrap_or(0),
                    find_key(events, "oom_kill").unwrap_or(0),
                );
                OomKills {
                    at_limit: oom.min(killed) > 0,
                    beyond_limit: killed > oom,
                }
            }
            // v1 counts kills only: a group whose high-water mark stayed below its limit
            // cannot have been the one that ran out.
            Layout::V1 { .. } => {
                let mem = self.mem_dir();
                let kills = self
                    .read_key(&mem.join("memory.oom_control"), "oom_kill")
                    .unwrap_or(0)
                    .saturating_sub(self.oom_base);
                let peak = self
                    .read_u64(&mem.join("memory.max_usage_in_bytes"))
                    .unwrap_or(0);
                // With swap accounted, the limit on memory plus swap may be what was reached.
                let peak_with_swap = if self.memsw {
                    self.read_u64(&mem.join("memory.memsw.max_usage_in_bytes"))
                        .unwrap_or(0)
                } else {
                    0
                };
                // Within a few pages of the limit is at it: the charge that failed was not made.
                let at_limit = peak.max(peak_with_swap) + (256 << 10) >= self.memory_bytes;
                OomKills {
                    at_limit: kills > 0 && at_limit,
                    beyond_limit: kills > 0 && !at_limit,
                }
            }
        }
    }

    /// Did the kernel OOM-kill a process of this group *for the group's own limit*?
    pub fn oom_killed(&self) -> bool {
        self.oom_kills().at_limit
    }

    /// The group as a Docker `cgroup_parent` (cgroupfs driver): the path below the controller's
    /// mount. Containers made with it sit in sub-groups, so the job's limit holds for all of
    /// its containers together (the job and its services) and its peak and OOM count are read
    /// here as for a local job.
    pub fn docker_parent(&self) -> Option<String> {
        let root = match self.layout {
            Layout::V2 { .. } => {
                // Children need the controllers; this group itself then holds no process.
                let _ = write(
                    &self.mem_dir().join("cgroup.subtree_control"),
                    "+memory +cpu",
                );
                PathBuf::from(V2_ROOT)
            }
            Layout::V1 { .. } => Path::new(V2_ROOT).join("memory"),
        };
        let rel = self.mem_dir().strip_prefix(&root).ok()?;
        Some(format!("/{}", rel.display()))
    }

    /// The group's biggest process now: (command, resident memory). Reads at most 256
    /// processes' `/proc/<pid>/statm`, so sampling costs little whatever the job runs.
    pub fn largest_process(&self) -> Option<(String, u64)> {
        largest_process_in(self.mem_dir())
    }

    /// The directory whose `cgroup.procs` lists the job's processes.
    pub fn procs_dir(&self) -> PathBuf {
        self.mem_dir().to_path_buf()
    }

    /// Pids currently in the group. Opened anew each time, never held: cgroup v1 keeps the
    /// list an open file read last (for a second after the last reader), so a held file kept
    /// listing the job's exited processes and `kill_all` waited ~0.5 s for the list to expire
    /// (every job in a kept group ended half a second late).
    pub fn pids(&self) -> Vec<i32> {
        pids_in(self.mem_dir())
    }

    /// SIGKILL everything in the group until it is empty (processes may fork while we kill).
    pub async fn kill_all(&self) -> bool {
        if let Layout::V2 { .. } = self.layout {
            let _ = fs::write(self.mem_dir().join("cgroup.kill"), "1");
        }
        // Exiting processes linger in `cgroup.procs` for a moment; poll quickly first so the
        // common case (nothing left but a process already on its way out) costs ~1 ms.
        let mut wait = Duration::from_micros(200);
        for _ in 0..200 {
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            for pid in pids {
                if let Some(p) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(20));
        }
        false
    }

    /// Remove the group; it must be empty (call [`JobCgroup::kill_all`] first). Whether its
    /// memory group is gone.
    pub async fn remove(&self) -> bool {
        // Nothing of it stays open.
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut gone = true;
        for dir in self.dirs.iter().rev() {
            gone = false;
            for _ in 0..50 {
                match fs::remove_dir(dir) {
                    Ok(()) => {
                        gone = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // The kernel frees a group a moment after its last process exits.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_s_process_list_is_current_even_right_after_a_read() {
        let cgroups =
            Cgroups::detect().expect("this test needs cgroups (as root, where `./x test` runs it)");
        let g = cgroups
            .create(&format!("pids-test-{}", std::process::id()), 64 << 20, 1.0)
            .unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        for f in &g.join_files {
            fs::write(f, pid.to_string()).unwrap();
        }
        assert_eq!(g.pids(), vec![pid]);
        child.wait().unwrap();
        // Gone from the list at once, not when the kernel's cached list of the read above expires.
        assert_eq!(g.pids(), Vec::<i32>::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert!(rt.block_on(g.remove()));
    }
}
