//! One attempt of one job, as its own task: decide reuse, prepare the working directory,
//! run the executor, save artifacts and caches, and tell the scheduler how it ended.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use rave_model::ArtifactsWhen;
use rave_model::units::format_memory;
use rave_plan::JobInstance;
use tokio::sync::mpsc;

use super::{Finished, Msg, oom_message};
use crate::builds::{CleanFlags, GitStrategy};
use crate::executor::{Cancel, Executor, JobSpec, LogSink};
use crate::outcome::{ExecOutcome, FailureReason};
use crate::workspace::{self, Workspace};

/// Everything the job's task needs, taken from the scheduler when it starts the job.
pub(super) struct JobTask<E: Executor> {
    pub id: usize,
    pub attempt: u32,
    pub job: JobInstance,
    pub slug: String,
    /// Slugs of the jobs whose artifacts it gets.
    pub deps: Vec<String>,
    pub claim: Result<crate::builds::Claim, String>,
    pub git: (Result<GitStrategy, String>, Result<CleanFlags, String>),
    pub git_vars: workspace::GitVars,
    pub scratch_dir: std::path::PathBuf,
    pub caches: Vec<crate::cache::JobCache>,
    pub cache_notes: Vec<String>,
    pub spec: JobSpec,
    /// Why the job is never reused, when it opts in anyway.
    pub refused: Option<&'static str>,
    pub reuse_mode: crate::reuse::Mode,
    pub dep_artifacts: Vec<(String, String)>,
    pub reuse_wanted: bool,
    pub exec: Arc<E>,
    pub ws: Arc<Workspace>,
    pub log: LogSink,
    pub cancel: Cancel,
    pub tx: mpsc::UnboundedSender<Msg>,
    pub keep: bool,
    /// Its memory limit this attempt.
    pub memory: u64,
}

impl<E: Executor> JobTask<E> {
    pub(super) async fn run(self) {
        let JobTask {
            id,
            attempt,
            job: j,
            slug,
            deps,
            claim,
            git,
            git_vars,
            scratch_dir,
            caches,
            cache_notes,
            spec,
            refused,
            reuse_mode,
            dep_artifacts,
            reuse_wanted,
            exec,
            ws,
            log,
            cancel,
            tx,
            keep,
            memory: j_memory,
        } = self;
        let spec_name = j.name.clone();
        let started_at = SystemTime::now();
        let started = Instant::now();
        let setup = Instant::now();
        // Reuse: decide before anything is prepared.
        let mut reuse: Option<(crate::reuse::Decision, Option<crate::reuse::Inputs>)> = None;
        if let Some(why) = refused {
            let d = crate::reuse::Decision {
                changed: vec![format!(
                    "never reused: {why} (RAVE_REUSE: always reuses it anyway)"
                )],
                ..Default::default()
            };
            reuse = Some((d, None));
        } else if reuse_mode != crate::reuse::Mode::Off {
            let (ws2, j2, slug2) = (ws.clone(), j.clone(), slug.clone());
            let looked = tokio::task::spawn_blocking(move || {
                let inputs = crate::reuse::inputs(&crate::reuse::Sources {
                    job: &j2,
                    snapshot: &ws2.source_root,
                    files: &ws2.files,
                    blob_ids: &ws2.blob_ids,
                    artifacts: dep_artifacts,
                })?;
                let last = ws2.reuse.load(&j2.name);
                let d = crate::reuse::decide(&inputs, last.as_ref());
                let reused = match (&d.reused_from, last) {
                    (Some(_), Some(rec)) => Some(reuse_outputs(&ws2, &j2, &slug2, &rec)),
                    _ => None,
                };
                Ok::<_, String>((d, inputs, reused))
            })
            .await
            .unwrap_or_else(|e| Err(format!("reuse check panicked: {e}")));
            match looked {
                Ok((d, _, Some(Ok((dotenv, artifacts_digest, notes))))) => {
                    log.system(&format!(
                        "Reused: every input is unchanged since pipeline {} (input digest {})",
                        d.reused_from.unwrap_or_default(),
                        &d.digest[..12]
                    ))
                    .await;
                    for n in notes {
                        log.system(&n).await;
                    }
                    let _ = tx.send(Msg::Finished(Box::new(Finished {
                        id,
                        attempt,
                        outcome: ExecOutcome {
                            exit_code: Some(0),
                            ..ExecOutcome::default()
                        },
                        started_at,
                        started,
                        dotenv,
                        setup_ms: None,
                        children: Vec::new(),
                        artifacts_digest: Some(artifacts_digest),
                        reuse: Some(d),
                    })));
                    return;
                }
                Ok((mut d, inputs, reused)) => {
                    if let Some(Err(e)) = reused {
                        d.reused_from = None;
                        d.changed = vec![e];
                    }
                    log.system(&format!("Not reused: {}", d.changed.join("; ")))
                        .await;
                    reuse = Some((d, Some(inputs)));
                }
                Err(e) => {
                    log.system(&format!("WARNING: reuse check failed ({e}); the job runs"))
                        .await;
                }
            }
        }
        let (claim, prep) = match (claim, git) {
            (Ok(mut claim), (Ok(strategy), Ok(clean))) => {
                let ws = ws.clone();
                let caches = caches.clone();
                tokio::task::spawn_blocking(move || {
                    let r = ws
                        .prepare(&mut claim, &deps, strategy, &clean, &git_vars)
                        .map(|mut notes| {
                            notes.extend(cache_notes);
                            for c in &caches {
                                notes.extend(ws.caches.restore(c, &claim.dir));
                            }
                            notes
                        });
                    (Some(claim), r)
                })
                .await
                .unwrap_or_else(|e| {
                    (
                        None,
                        Err(format!("preparing the working directory panicked: {e}")),
                    )
                })
            }
            (Err(e), _) | (_, (Err(e), _)) | (_, (_, Err(e))) => (None, Err(e)),
        };
        let setup_ms = Some(setup.elapsed().as_millis() as u64);
        let mut outcome = match prep {
            Ok(notes) => {
                for n in notes {
                    log.system(&n).await;
                }
                exec.run(spec, log.clone(), cancel).await
            }
            Err(e) => ExecOutcome {
                runner_error: Some(e),
                ..ExecOutcome::default()
            },
        };
        // After the job: artifacts, caches, the overlay taken down. A job with none of these
        // (most short jobs) has nothing that blocks, and skips the hop to a blocking thread.
        let nothing_to_save = j.job.artifacts.is_none()
            && caches.is_empty()
            && claim.as_ref().is_none_or(|c| !c.is_mounted());
        let (dotenv, notes) = if nothing_to_save {
            // The directory is free for the job's next attempt before the scheduler hears.
            drop(claim);
            (HashMap::new(), Vec::new())
        } else {
            let ws = ws.clone();
            let outcome = outcome.clone();
            let slug = slug.clone();
            tokio::task::spawn_blocking(move || {
                let mut claim = claim;
                let out = match &claim {
                    Some(c) => {
                        let (dotenv, mut notes) = save_outputs(&ws, &j, &slug, &c.dir, &outcome);
                        // After the script and after_script, as GitLab saves caches.
                        for cache in &caches {
                            notes.extend(ws.caches.save(
                                cache,
                                &c.dir,
                                ws.tracked(),
                                outcome.succeeded(),
                            ));
                        }
                        (dotenv, notes)
                    }
                    None => Default::default(),
                };
                if let Some(c) = claim.as_mut() {
                    ws.release(c, keep);
                }
                out
            })
            .await
            .unwrap_or_default()
        };
        let artifacts_digest = if reuse_wanted {
            let dir = ws.artifacts_dir(&slug);
            tokio::task::spawn_blocking(move || crate::reuse::artifacts_digest(&dir))
                .await
                .ok()
        } else {
            None
        };
        // A successful run of a job that opts in is what later runs may reuse.
        if outcome.succeeded()
            && let Some((d, Some(inputs))) = &reuse
        {
            let rec = crate::reuse::Record {
                digest: d.digest.clone(),
                inputs: inputs.clone(),
                pipeline_id: ws.pipeline_id,
                artifacts: artifacts_digest
                    .as_deref()
                    .filter(|a| *a != "none")
                    .map(|_| ws.artifacts_dir(&slug)),
                artifacts_digest: artifacts_digest.clone().unwrap_or_else(|| "none".into()),
                dotenv: dotenv.clone(),
            };
            if let Err(e) = ws.reuse.save(&spec_name, &rec) {
                log.system(&format!("WARNING: cannot record the run for reuse: {e}"))
                    .await;
            }
        }
        outcome.scan_gate = !outcome.succeeded() && scratch_dir.join("scan_gate").exists();
        let children = crate::event::read_child_jobs(&scratch_dir.join("child.json"));
        if outcome.failure_reason() == Some(FailureReason::OomKilled) {
            let msg = oom_message(j_memory, &outcome);
            log.system(&format!("{}: {msg}", spec_name)).await;
        }
        for n in notes {
            log.system(&n).await;
        }
        let _ = tx.send(Msg::Finished(Box::new(Finished {
            id,
            attempt,
            outcome,
            started_at,
            started,
            dotenv,
            setup_ms,
            children,
            artifacts_digest,
            reuse: reuse.map(|(d, _)| d),
        })));
    }
}

/// After a job: save its artifacts and read its dotenv report. Returns the dotenv variables
/// and lines for the job log.
fn save_outputs(
    ws: &Workspace,
    j: &JobInstance,
    slug: &str,
    workdir: &Path,
    outcome: &ExecOutcome,
) -> (HashMap<String, String>, Vec<String>) {
    let mut notes = Vec::new();
    let mut dotenv = HashMap::new();
    if let Some(a) = &j.job.artifacts {
        let ok = outcome.succeeded();
        let wanted = match a.when {
            ArtifactsWhen::OnSuccess => ok,
            ArtifactsWhen::OnFailure => !ok,
            ArtifactsWhen::Always => true,
        };
        if wanted && workdir.is_dir() {
            let project_dir = workdir.to_string_lossy().to_string();
            let expand = |p: &String| {
                rave_model::vars::expand(p, &|k| {
                    if k == "CI_PROJECT_DIR" {
                        Some(project_dir.clone())
                    } else {
                        j.variables.get(k).cloned()
                    }
                })
            };
            let mut paths: Vec<String> = a.paths.iter().map(expand).collect();
            paths.extend(a.reports.junit.iter().map(expand));
            paths.extend(a.reports.dotenv.iter().map(expand));
            for (_, files) in &a.reports.other {
                paths.extend(files.iter().map(expand));
            }
            let exclude: Vec<String> = a.exclude.iter().map(expand).collect();
            let c =
                workspace::collect_artifacts(workdir, &paths, &exclude, &ws.artifacts_dir(slug));
            for w in c.warnings {
                notes.push(format!("WARNING: {w}"));
            }
            notes.push(format!(
                "Saved {} artifact file(s), {}",
                c.files,
                format_memory(c.bytes)
            ));
            if c.files > 0 {
                ingest_artifacts(ws, a, slug, &mut notes);
            }
            if ok {
                for f in &a.reports.dotenv {
                    match workspace::read_dotenv(&workdir.join(expand(f))) {
                        Ok(v) => dotenv.extend(v),
                        Err(e) => notes.push(format!("WARNING: {e}")),
                    }
                }
            }
        }
    }
    (dotenv, notes)
}

/// Keep a job's saved artifacts in the store (content-addressed, with their expiry).
fn ingest_artifacts(
    ws: &Workspace,
    a: &rave_model::Artifacts,
    slug: &str,
    notes: &mut Vec<String>,
) {
    let Some(store) = &ws.store else { return };
    let now = rave_store::now_secs();
    let expire = |path: &str| {
        let secs = match a.expire_in {
            Some(d) => d.as_secs(),
            None => rave_store::default_expiry_days(path) * 86_400,
        };
        Some(now + secs)
    };
    let stored = store.ingest_dir(
        &ws.pipeline_id.to_string(),
        slug,
        &ws.artifacts_dir(slug),
        &expire,
    );
    if let Err(e) = stored {
        notes.push(format!("WARNING: artifacts not kept in the store: {e}"));
    }
}

/// What a reused job hands on: its dotenv, its artifacts' digest, lines for its log.
type Reused = (HashMap<String, String>, String, Vec<String>);

/// A reused job's outputs: the recorded run's artifacts (checked against their digest)
/// copied into this run, and its dotenv.
fn reuse_outputs(
    ws: &Workspace,
    j: &JobInstance,
    slug: &str,
    rec: &crate::reuse::Record,
) -> Result<Reused, String> {
    let mut notes = Vec::new();
    if let Some(src) = &rec.artifacts {
        let now = crate::reuse::artifacts_digest(src);
        if now != rec.artifacts_digest {
            return Err(format!(
                "the artifacts of pipeline {} changed on disk since",
                rec.pipeline_id
            ));
        }
        let dest = ws.artifacts_dir(slug);
        std::fs::create_dir_all(&dest)
            .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
        workspace::copy_dir(src, &dest, true).map_err(|e| {
            format!(
                "cannot copy the artifacts of pipeline {}: {e}",
                rec.pipeline_id
            )
        })?;
        notes.push(format!(
            "Artifacts taken from pipeline {} ({})",
            rec.pipeline_id,
            src.display()
        ));
        if let Some(a) = &j.job.artifacts {
            ingest_artifacts(ws, a, slug, &mut notes);
        }
    }
    Ok((rec.dotenv.clone(), rec.artifacts_digest.clone(), notes))
}

pub(super) fn service_spec(s: &rave_model::pipeline::Service) -> crate::executor::ServiceSpec {
    let mut aliases = crate::executor::ServiceSpec::derived_aliases(&s.name);
    // GitLab accepts several aliases in one `alias:`, separated by commas or spaces.
    for a in s
        .alias
        .iter()
        .flat_map(|a| a.split([',', ' ']))
        .filter(|a| !a.is_empty())
    {
        if !aliases.iter().any(|x| x == a) {
            aliases.push(a.to_string());
        }
    }
    crate::executor::ServiceSpec {
        image: s.name.clone(),
        aliases,
        entrypoint: s.entrypoint.clone(),
        command: s.command.clone(),
        variables: s
            .variables
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect(),
        pull_policy: s.pull_policy.first().cloned(),
    }
}
