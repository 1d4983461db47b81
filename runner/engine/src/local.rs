//! The `local` executor: the job's script in bash, in its own process group and cgroup.
//!
//! Lifecycle of one attempt: make the cgroup → write the script → spawn a small bash wrapper
//! that moves itself into the cgroup and then `exec`s the script (so no process of the job
//! ever runs outside the group, with no unsafe pre-exec hook) → stream stdout/stderr → wait,
//! racing the timeout and cancellation → kill what is left of the tree → after_script →
//! read peak memory and OOM kills → remove the cgroup.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use crate::cgroup::{Cgroups, JobCgroup};
use crate::executor::{Cancel, Executor, JobSpec, LogSink, Stream};
use crate::outcome::ExecOutcome;

/// Time between SIGTERM and SIGKILL when a job is stopped.
const GRACE: Duration = crate::executor::STOP_GRACE;
/// Largest piece of output sent at once; longer lines are split.
const CHUNK: usize = 64 * 1024;

pub struct LocalExecutor {
    cgroups: Option<Arc<Cgroups>>,
    /// bash, found on PATH once rather than at every job start.
    bash: PathBuf,
}

impl LocalExecutor {
    pub fn new(cgroups: Option<Arc<Cgroups>>) -> Self {
        LocalExecutor {
            cgroups,
            bash: find_on_path("bash").unwrap_or_else(|| "bash".into()),
        }
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| {
                p.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    })
}

/// Quote for a single-quoted bash string.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// GitLab's shell contract: `set -eo pipefail`, each command echoed as `$ cmd`, then run.
pub(crate) fn script_text(lines: &[String], fail_fast: bool) -> String {
    let mut s = String::from(if fail_fast {
        "set -eo pipefail\nset +o noclobber\n"
    } else {
        "set +o noclobber\n"
    });
    // The local executor hands the script over on fd 3 (see WRAPPER); closing an fd that is
    // not open is harmless where the script is a file (docker).
    s.push_str("exec 3<&-\n");
    for l in lines {
        s.push_str(&format!("printf '%s\\n' {}\n", sq(&format!("$ {l}"))));
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Move into the job's cgroup(s) (`0` = this process), then run the script in this same shell (sourcing it saves
/// a second bash start per job; the script's `set -eo pipefail` applies from its first line).
/// Joins the job's cgroups, marks the job as what the kernel's OOM killer takes first
/// (`oom_score_adj` 1000: a job, never rave or the desktop, is killed when the host runs out),
/// then runs the script in the same process.
///
/// The script arrives on stdin as a memory file (no file on disk per job): the wrapper moves
/// it to fd 3 and gives the job /dev/null as stdin; `.` reads the whole file before running
/// any of it, and the script's first line closes fd 3, so nothing the job runs can read it.
const WRAPPER: &str = r#"for f in "${@:1}"; do echo 0 > "$f" || { echo "rave: cannot join cgroup $f" >&2; exit 125; }; done; echo 1000 > /proc/self/oom_score_adj 2>/dev/null; exec 3<&0 </dev/null; set -- ; . /proc/self/fd/3"#;

/// The script as a sealed-off memory file, read from its start.
fn script_memfd(text: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{MemfdFlags, memfd_create};
    let fd = memfd_create("rave-job-script", MemfdFlags::CLOEXEC)?;
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
    Ok(f.into())
}

fn spawn(
    bash: &Path,
    spec: &JobSpec,
    script: &str,
    cg: Option<&JobCgroup>,
    extra_env: &[(String, String)],
) -> std::io::Result<Child> {
    let stdin = script_memfd(script)?;
    let mut cmd = Command::new(bash);
    cmd.arg("--noprofile")
        .arg("--norc")
        .arg("-c")
        .arg(WRAPPER)
        .arg("rave-job");
    if let Some(cg) = cg {
        cmd.args(&cg.join_files);
    }
    if spec.clean_env {
        cmd.env_clear();
    }
    cmd.current_dir(&spec.workdir)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
}

/// Forward a pipe to the log in chunks of whole lines.
async fn pump(mut r: impl AsyncRead + Unpin, stream: Stream, log: LogSink) {
    let mut buf = vec![0u8; CHUNK];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let cut = match pending.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if pending.len() >= CHUNK => pending.len(),
            None => continue,
        };
        let rest = pending.split_off(cut);
        let chunk = std::mem::replace(&mut pending, rest);
        log.write(stream, chunk).await;
    }
    if !pending.is_empty() {
        pending.push(b'\n');
        log.write(stream, pending).await;
    }
}

fn signal_group(pid: Option<u32>, sig: rustix::process::Signal) {
    if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

enum Ended {
    Exited(std::process::ExitStatus),
    TimedOut,
    Canceled,
    Forced,
}

/// What every shell of one job attempt shares.
struct Shell<'a> {
    bash: &'a Path,
    spec: &'a JobSpec,
    cg: Option<&'a JobCgroup>,
    cancel: &'a Cancel,
    log: &'a LogSink,
}

impl Shell<'_> {
    /// Run one shell to completion, racing `limit` and cancellation. Returns how it ended, after
    /// its whole tree is gone.
    async fn run(
        &self,
        script: &str,
        extra_env: &[(String, String)],
        limit: Duration,
        graceful_stops: bool,
    ) -> Result<Ended, String> {
        let Shell {
            bash,
            spec,
            cg,
            cancel,
            log,
        } = *self;
        let mut child = spawn(bash, spec, script, cg, extra_env)
            .map_err(|e| format!("cannot start bash: {e}"))?;
        let pid = child.id();
        let out = child
            .stdout
            .take()
            .map(|o| tokio::spawn(pump(o, Stream::Stdout, log.clone())));
        let err = child
            .stderr
            .take()
            .map(|e| tokio::spawn(pump(e, Stream::Stderr, log.clone())));
        let graceful = async {
            if graceful_stops {
                cancel.graceful.cancelled().await
            } else {
                std::future::pending().await
            }
        };
        let ended = tokio::select! {
            s = child.wait() => match s {
                Ok(s) => Ended::Exited(s),
                Err(e) => return Err(format!("waiting for the job: {e}")),
            },
            _ = tokio::time::sleep(limit) => Ended::TimedOut,
            _ = graceful => Ended::Canceled,
            _ = cancel.force.cancelled() => Ended::Forced,
        };
        if !matches!(ended, Ended::Exited(_)) {
            // Ask nicely, then insist. A forced stop skips the grace period.
            signal_group(pid, rustix::process::Signal::TERM);
            if !matches!(ended, Ended::Forced) {
                tokio::select! {
                    _ = child.wait() => {}
                    _ = tokio::time::sleep(GRACE) => {}
                    _ = cancel.force.cancelled() => {}
                }
            }
            signal_group(pid, rustix::process::Signal::KILL);
            let _ = child.wait().await;
        }
        // The script is done; anything it left running (background jobs, daemons) goes too, or
        // it would hold the output pipes open and outlive the job.
        signal_group(pid, rustix::process::Signal::KILL);
        if let Some(cg) = cg {
            cg.kill_all().await;
        }
        for h in [out, err].into_iter().flatten() {
            // A grandchild that escaped the group and the cgroup could keep a pipe open; don't wait
            // on it forever.
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        Ok(ended)
    }
}

impl Executor for LocalExecutor {
    async fn run(&self, spec: JobSpec, log: LogSink, cancel: Cancel) -> ExecOutcome {
        let mut outcome = ExecOutcome::default();
        let cg = match &self.cgroups {
            Some(c) => match c.create(&spec.slug, spec.memory_bytes, spec.cpus) {
                Ok(g) => Some(g),
                Err(e) => {
                    outcome.runner_error = Some(format!("cannot create the job's cgroup: {e}"));
                    return outcome;
                }
            },
            None => None,
        };
        let main = script_text(&spec.script, true);
        // OOM forensics: the job's biggest process sampled while it runs (twice a second, a
        // few hundred /proc reads at most); without cgroups, the host's OOM-kill counter
        // before, the only trace of an OOM kill there is.
        let host_kills_before = cg.is_none().then(crate::cgroup::host_oom_kills).flatten();
        let (sampler, largest) = match cg
            .as_ref()
            .map(|g| crate::cgroup::sample_largest(g.procs_dir()))
        {
            Some((task, cell)) => (Some(task), Some(cell)),
            None => (None, None),
        };
        let shell = Shell {
            bash: &self.bash,
            spec: &spec,
            cg: cg.as_ref(),
            cancel: &cancel,
            log: &log,
        };
        match shell.run(&main, &[], spec.timeout, true).await {
            Ok(Ended::Exited(s)) => {
                outcome.exit_code = s.code();
                outcome.signal = s.signal();
            }
            Ok(Ended::TimedOut) => outcome.timed_out = true,
            Ok(Ended::Canceled) | Ok(Ended::Forced) => outcome.canceled = true,
            Err(e) => outcome.runner_error = Some(e),
        }
        if let Some(s) = sampler {
            s.abort();
        }
        outcome.largest_process =
            largest.and_then(|l| l.lock().unwrap_or_else(|p| p.into_inner()).take());
        // The job's group says whether an OOM killer beyond its own limit hit it. Without
        // one, a SIGKILL while the host's OOM-kill count rose is the best guess there is.
        match &cg {
            Some(cg) => {
                let kills = cg.oom_kills();
                outcome.oom_killed = kills.at_limit;
                outcome.host_oom_kill = !kills.at_limit && kills.beyond_limit;
            }
            None => {
                outcome.host_oom_kill = outcome.signal == Some(9)
                    && matches!(
                        (host_kills_before, crate::cgroup::host_oom_kills()),
                        (Some(a), Some(b)) if b > a
                    );
            }
        }
        if !spec.after_script.is_empty() && !cancel.force.is_cancelled() {
            let status = outcome.ci_job_status();
            let after = script_text(&spec.after_script, true);
            {
                log.system("Running after_script").await;
                let env = [("CI_JOB_STATUS".to_string(), status.to_string())];
                match shell
                    .run(&after, &env, spec.after_script_timeout, false)
                    .await
                {
                    Ok(Ended::Exited(s)) if s.success() => {}
                    Ok(Ended::Exited(s)) => {
                        log.system(&format!(
                            "after_script failed with exit code {} (ignored)",
                            s.code().unwrap_or(-1)
                        ))
                        .await
                    }
                    Ok(Ended::TimedOut) => log.system("after_script timed out (ignored)").await,
                    Ok(_) => {}
                    Err(e) => {
                        log.system(&format!("after_script could not run: {e}"))
                            .await
                    }
                }
            }
        }
        if let (Some(cg), Some(cgroups)) = (cg, &self.cgroups) {
            outcome.peak_memory_bytes = cg.peak_memory();
            outcome.cpu_seconds = cg.cpu_seconds();
            // after_script may hit the limit too, but only the main script's OOM counts.
            let emptied = cg.kill_all().await;
            cgroups.recycle(cg, emptied);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_echoes_and_quotes_commands() {
        let s = script_text(&["echo 'it''s'".into(), "false".into()], true);
        assert!(s.starts_with("set -eo pipefail\n"));
        assert!(s.contains("printf '%s\\n' '$ echo '\\''it'\\'''\\''s'\\'''\n"));
        assert!(s.ends_with("false\n"));
    }
}
