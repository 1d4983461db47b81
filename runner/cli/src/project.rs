//! Everything a command needs before it can plan: the project directory, the loaded pipeline,
//! the trigger (from git and flags) and the budget (from profile and flags).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::Args;
use rave_model::{Loaded, Pipeline};
use rave_plan::{PlanOptions, Source, Trigger};

/// Where the pipeline comes from.
#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// Pipeline file (default: pipeline.yml, else .gitlab-ci.yml).
    #[arg(short, long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Project directory (default: the repository containing the current directory).
    #[arg(short = 'C', long = "dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The forge `include: project` and `component` fetch from (default: $CI_SERVER_URL,
    /// else the host of the `origin` remote). A token for it: $RAVE_INCLUDE_TOKEN.
    #[arg(long, value_name = "URL", env = "CI_SERVER_URL")]
    pub server_url: Option<String>,
    /// Use only included files fetched before (the include cache); say which is missing.
    #[arg(long)]
    pub offline: bool,
    /// A value for the pipeline file's `spec: inputs` (repeatable).
    #[arg(long = "input", value_name = "NAME=VALUE")]
    pub inputs: Vec<String>,
    /// Where `include: template` files are: a directory holding GitLab's templates.
    #[arg(long, value_name = "DIR", conflicts_with = "templates_project")]
    pub templates_dir: Option<PathBuf>,
    /// Where `include: template` files are: a project on the forge (`group/templates[@ref]`).
    #[arg(long, value_name = "PROJECT")]
    pub templates_project: Option<String>,
    /// Where `include: project` repositories are when not under the server URL:
    /// `<URL>/<project>.git` (e.g. `ssh://git@forge:2222`). With an SSH URL, the key is
    /// $RAVE_INCLUDE_SSH_KEY and the pinned host keys $RAVE_INCLUDE_SSH_KNOWN_HOSTS.
    #[arg(long, value_name = "URL")]
    pub include_base: Option<String>,
    /// Where fetched includes are kept (default: .rave/includes in the project).
    #[arg(long, value_name = "DIR", hide = true)]
    pub include_cache: Option<PathBuf>,
}

/// The event the pipeline is planned for.
#[derive(Args, Debug, Clone)]
pub struct TriggerArgs {
    /// Branch to plan for (default: the checked-out branch).
    #[arg(long = "ref", value_name = "BRANCH")]
    pub ref_name: Option<String>,
    /// Plan a tag pipeline for this tag (sets CI_COMMIT_TAG).
    #[arg(long, value_name = "TAG", conflicts_with = "ref_name")]
    pub tag: Option<String>,
    /// Pipeline source: push, web, api, schedule, trigger, local.
    #[arg(long, value_name = "SOURCE", default_value = "local")]
    pub source: String,
    /// Pipeline variable, highest precedence (repeatable).
    #[arg(long = "var", short = 'v', value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// CI/CD variables for this run, as JSON `{"variables": [{"name", "value", "masked",
    /// "raw"}], "mask": [values]}` (what
    /// `rave serve` hands a pipeline: its project's variables). `--var` wins over them.
    #[arg(long, value_name = "FILE")]
    pub variables_file: Option<PathBuf>,
    /// Evaluate `rules: changes` against this revision (default: `changes` is true, as in
    /// GitLab when there is nothing to compare with).
    #[arg(long, value_name = "REV")]
    pub compare_to: Option<String>,
    /// The project's path on its forge (`group/name`: CI_PROJECT_PATH, CI_PROJECT_NAMESPACE,
    /// CI_PROJECT_NAME), instead of the one read from the `origin` remote. `rave serve` passes
    /// its configured name: its checkouts' origin is a local mirror.
    #[arg(long, value_name = "GROUP/NAME", hide = true)]
    pub project_path: Option<String>,
}

/// The resource budget.
#[derive(Args, Debug, Clone)]
pub struct BudgetArgs {
    /// Budget profile: safe (3 GiB, 2 CPUs), full, or one from `.rave: profiles`.
    /// Default: `.rave: profile`, else safe unless the environment sets SAFE=0.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Memory budget, e.g. 3G or 1536M (overrides the profile).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU budget, e.g. 2 or 1.5 (overrides the profile).
    #[arg(long, value_name = "N")]
    pub cpus: Option<String>,
    /// Job slots: most jobs at once (overrides the profile).
    #[arg(long, value_name = "N")]
    pub jobs: Option<u32>,
    /// Accept a memory budget larger than this machine's memory.
    #[arg(long)]
    pub force_budget: bool,
    /// Admit jobs that state no memory request with the profile's default, not with what
    /// their earlier runs measured.
    #[arg(long)]
    pub no_learn: bool,
    /// Where the project's persistent state lives: the snapshot mirror, the jobs' build
    /// directories, `cache:` archives, learned requests (default: .rave in the project).
    #[arg(long, value_name = "DIR", env = "RAVE_STATE_DIR", hide = true)]
    pub state_dir: Option<PathBuf>,
}

pub struct Project {
    pub root: PathBuf,
    pub loaded: Loaded,
    pub repo: Option<rave_repo::Repo>,
    /// For a tag that exists here: the tag's commit, exported, which the pipeline is read
    /// from and jobs run on, whatever the working tree holds.
    pub tag_source: Option<TagSource>,
    /// The forge: `--server-url`, `$CI_SERVER_URL`, else the host of `origin`.
    pub server_url: Option<String>,
    /// The trigger computed while loading (include rules need it), so planning does not read
    /// the repository a second time.
    loaded_for: Option<Trigger>,
    /// Blob ids of the unmodified tracked files, read with the file list: the run's snapshot
    /// trusts them instead of re-reading files.
    pub blob_ids: std::sync::OnceLock<std::collections::HashMap<String, String>>,
    /// The working tree's status, read once while loading.
    listing: Option<rave_repo::Listing>,
}

/// The files of a tag's commit, exported under `.rave/tags/<sha>/`.
pub struct TagSource {
    /// The project directory inside the export.
    pub dir: PathBuf,
    /// Files relative to `dir`.
    pub files: Vec<String>,
    pub sha: String,
}

impl Project {
    /// Load for a trigger: with a tag that exists in the repository, from the tag's commit;
    /// include rules and inputs see the trigger's variables.
    pub fn load_for(args: &PipelineArgs, t: Option<&TriggerArgs>) -> anyhow::Result<Project> {
        let tag = t.and_then(|t| t.tag.as_deref());
        // Absolute: jobs run in other directories and find the run's files by these paths.
        let start = match &args.dir {
            Some(d) => std::path::absolute(d)?,
            None => std::env::current_dir()?,
        };
        // A directory inside rave's own `.rave/` (a trigger job's working copy, where a child
        // pipeline runs) is not part of the repository around it: its files are read from disk.
        let repo = rave_repo::Repo::discover(&start)
            .ok()
            .filter(|r| !inside_rave_dir(&start, r.root()));
        // The pipeline file is looked up in the given directory; the repository root is only
        // the fallback when rave is started from a subdirectory.
        let root = match &repo {
            Some(r) if args.dir.is_none() && !has_pipeline(&start) => r.root().to_path_buf(),
            _ => start.clone(),
        };
        // A relative --file is relative to where the user is (or to -C DIR), like any CLI
        // path; the project root only anchors `include: local`.
        let file = args.file.as_ref().map(|f| start.join(f));
        // `include: local` reads the files git tracks (relative to the project directory),
        // as GitLab reads them from the commit. A child pipeline reads its parent job's
        // working directory, artifacts (a generated pipeline) included.
        let child = t.is_some_and(|t| t.source == "parent_pipeline");
        // One status pass serves include: local here and the job's files later.
        let listing = repo.as_ref().and_then(|r| r.listing().ok());
        let tracked = repo.as_ref().filter(|_| !child).and_then(|r| {
            let files = listing.as_ref()?.tracked.clone();
            let prefix = relative_prefix(&root, r.root());
            Some(match prefix {
                None => files,
                Some(pre) => files
                    .into_iter()
                    .filter_map(|f| f.strip_prefix(pre.as_str()).map(str::to_string))
                    .collect(),
            })
        });
        let tag_source = match (tag, &repo) {
            (Some(t), Some(r)) => match r.tag_commit(t) {
                Some(sha) => Some(export_tag(&root, r, &sha)?),
                None => {
                    eprintln!(
                        "rave: there is no tag `{t}` in this repository; the tag pipeline runs on the working tree"
                    );
                    None
                }
            },
            _ => None,
        };
        let server_url = args.server_url.clone().or_else(|| {
            repo.as_ref()
                .and_then(|r| r.origin_url())
                .and_then(|u| rave_includes::server_url_of(&u))
        });
        let mut project = Project {
            root,
            loaded: rave_model::Loaded::empty(),
            repo,
            tag_source,
            server_url,
            loaded_for: None,
            blob_ids: Default::default(),
            listing,
        };
        let variables = match t {
            Some(t) => {
                let tr = project.trigger(t)?;
                let mut v = tr.predefined();
                v.extend(tr.variables.clone());
                project.loaded_for = Some(tr);
                v
            }
            None => Default::default(),
        };
        let mut inputs = Vec::new();
        for kv in &args.inputs {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--input `{kv}` must look like NAME=VALUE"))?;
            inputs.push((k.to_string(), v.to_string()));
        }
        let mut includes = project.include_source(args);
        let (dir, files) = match &project.tag_source {
            Some(ts) => (ts.dir.clone(), Some(ts.files.clone())),
            None => (project.root.clone(), tracked),
        };
        let file = file
            .as_deref()
            .map(|f| dir.join(f.strip_prefix(&project.root).unwrap_or(f)));
        project.loaded = rave_model::load_with(
            &dir,
            file.as_deref(),
            rave_model::LoadOptions {
                files: files.as_deref(),
                source: Some(&mut includes),
                variables,
                inputs,
            },
        );
        Ok(project)
    }

    /// Where `include: project`, `remote`, `template` and `component` come from.
    fn include_source(&self, args: &PipelineArgs) -> rave_includes::ForgeIncludes {
        let server_url = self.server_url.clone();
        let cache = args
            .include_cache
            .clone()
            .unwrap_or_else(|| self.root.join(".rave").join("includes"));
        let mut inc = rave_includes::ForgeIncludes::new(server_url, cache);
        inc.offline = args.offline;
        inc.project_base = args
            .include_base
            .as_ref()
            .map(|b| b.trim_end_matches('/').to_string());
        if let Ok(t) = std::env::var("RAVE_INCLUDE_TOKEN")
            && !t.is_empty()
        {
            inc.credentials = rave_repo::Credentials::Token(t);
        } else if let Ok(k) = std::env::var("RAVE_INCLUDE_SSH_KEY")
            && !k.is_empty()
        {
            inc.credentials = rave_repo::Credentials::SshKey {
                key: PathBuf::from(k),
                known_hosts: std::env::var_os("RAVE_INCLUDE_SSH_KNOWN_HOSTS").map(PathBuf::from),
            };
        }
        inc.templates = match (&args.templates_dir, &args.templates_project) {
            (Some(d), _) => Some(rave_includes::Templates::Dir(d.clone())),
            (None, Some(p)) => {
                let (project, reference) = match p.split_once('@') {
                    Some((p, r)) => (p.to_string(), Some(r.to_string())),
                    None => (p.clone(), None),
                };
                Some(rave_includes::Templates::Project { project, reference })
            }
            (None, None) => None,
        };
        inc
    }

    pub fn pipeline(&self) -> Option<&Pipeline> {
        self.loaded.pipeline.as_ref()
    }

    /// The trigger for these arguments (the one computed while loading, when there was one).
    pub fn trigger(&self, t: &TriggerArgs) -> anyhow::Result<Trigger> {
        match &self.loaded_for {
            Some(tr) => Ok(tr.clone()),
            None => self.read_trigger(t),
        }
    }

    fn read_trigger(&self, t: &TriggerArgs) -> anyhow::Result<Trigger> {
        let source = Source::parse(&t.source).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown --source `{}`: use push, web, api, schedule, trigger, pipeline or local",
                t.source
            )
        })?;
        let mut trigger = Trigger {
            source,
            server_url: self.server_url.clone(),
            ..Trigger::default()
        };
        if let Some(path) = &t.variables_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--variables-file {}: {e}", path.display()))?;
            let vars: rave_plan::RunVariables = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "--variables-file {}: expected {{\"variables\": [{{name, value, masked, raw}}], \"mask\": [...]}}: {e}",
                    path.display()
                )
            })?;
            let mut given = Trigger::default();
            given.add_run_variables(vars);
            trigger.literal_variables = given.literal_variables;
            trigger.masked_values = given.masked_values;
            trigger.variables = given.variables;
            trigger.ref_protected = given.ref_protected;
        }
        for kv in &t.vars {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--var `{kv}` must look like KEY=VALUE"))?;
            trigger.variables.insert(k.to_string(), v.to_string());
            trigger.pipeline_variables.push(k.to_string());
        }
        let dir_name = self
            .root
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "project".into());
        trigger.project_name = dir_name;
        if let Some(repo) = &self.repo {
            let head = repo.head()?;
            trigger.sha = match &self.tag_source {
                Some(ts) => ts.sha.clone(),
                None => head.sha,
            };
            trigger.ref_name = head.branch.unwrap_or_else(|| "HEAD".into());
            trigger.default_branch = repo.default_branch();
            let (ns, name) = match t.project_path.as_deref().and_then(|p| p.rsplit_once('/')) {
                Some((ns, name)) => (ns.to_string(), name.to_string()),
                None => repo.project_path(),
            };
            trigger.project_namespace = ns;
            trigger.project_name = name;
            if let Some((message, author, secs)) = repo.commit_meta(&trigger.sha) {
                trigger.commit.message = message;
                trigger.commit.author = author;
                trigger.commit.timestamp = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64),
                )
                .to_string();
            }
            // Paths in rules are relative to the project directory, which may be a
            // subdirectory of the repository (a monorepo, or `-C dir`).
            let prefix = relative_prefix(&self.root, repo.root());
            let relative = |files: Vec<String>| -> Vec<String> {
                match &prefix {
                    None => files,
                    Some(pre) => files
                        .into_iter()
                        .filter_map(|f| f.strip_prefix(pre.as_str()).map(str::to_string))
                        .collect(),
                }
            };
            trigger.files = match &self.tag_source {
                Some(ts) => ts.files.clone(),
                None => {
                    let (files, ids) = match &self.listing {
                        Some(l) => (l.files.clone(), l.ids.clone()),
                        None => repo.files_and_ids()?,
                    };
                    let _ = self.blob_ids.set(match &prefix {
                        None => ids,
                        Some(pre) => ids
                            .into_iter()
                            .filter_map(|(f, id)| {
                                f.strip_prefix(pre.as_str()).map(|r| (r.to_string(), id))
                            })
                            .collect(),
                    });
                    relative(files)
                }
            };
            if let Some(rev) = &t.compare_to {
                trigger.changed_files = Some(relative(repo.changed_since(rev)?));
            }
        } else {
            trigger.files = list_files(&self.root);
            if t.compare_to.is_some() {
                anyhow::bail!(
                    "--compare-to needs a git repository, and {} is not in one",
                    self.root.display()
                );
            }
        }
        if let Some(r) = &t.ref_name {
            trigger.ref_name = r.clone();
        }
        if let Some(tag) = &t.tag {
            trigger.ref_name = tag.clone();
            trigger.tag = Some(tag.clone());
        }
        Ok(trigger)
    }
}

/// Export a tag's commit under `<project>/.rave/tags/<sha>/` (fresh each time, so nothing of an
/// earlier run leaks in) and point at the project directory inside it.
fn export_tag(root: &Path, repo: &rave_repo::Repo, sha: &str) -> anyhow::Result<TagSource> {
    let dest = root.join(".rave").join("tags").join(sha);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest)?;
    let all = repo
        .export_commit(sha, &dest)
        .map_err(|e| anyhow::anyhow!("cannot export the tag's commit {sha}: {e}"))?;
    let prefix = relative_prefix(root, repo.root());
    let (dir, files) = match prefix {
        None => (dest, all),
        Some(pre) => (
            dest.join(pre.trim_end_matches('/')),
            all.into_iter()
                .filter_map(|f| f.strip_prefix(pre.as_str()).map(str::to_string))
                .collect(),
        ),
    };
    Ok(TagSource {
        dir,
        files,
        sha: sha.to_string(),
    })
}

fn inside_rave_dir(dir: &Path, top: &Path) -> bool {
    let (Ok(dir), Ok(top)) = (dir.canonicalize(), top.canonicalize()) else {
        return false;
    };
    dir.strip_prefix(&top)
        .is_ok_and(|rel| rel.components().any(|c| c.as_os_str() == ".rave"))
}

/// `sub/dir/` when the project directory is below the repository's top, else None.
fn relative_prefix(project: &Path, top: &Path) -> Option<String> {
    project
        .canonicalize()
        .ok()
        .zip(top.canonicalize().ok())
        .and_then(|(r, top)| {
            r.strip_prefix(&top)
                .ok()
                .map(|p| p.to_string_lossy().to_string())
        })
        .filter(|p| !p.is_empty())
        .map(|p| format!("{p}/"))
}

fn has_pipeline(dir: &Path) -> bool {
    rave_model::loader::DEFAULT_FILES
        .iter()
        .any(|f| dir.join(f).is_file())
}

/// Files under `root` when it is not a git repository (for `rules: exists`).
fn list_files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<String>) {
        if depth > 16 || out.len() > 100_000 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name == ".git" || name == ".rave" || name == "target" || name == "node_modules" {
                continue;
            }
            match e.file_type() {
                Ok(ft) if ft.is_dir() => walk(root, &p, depth + 1, out),
                Ok(_) => {
                    if let Ok(rel) = p.strip_prefix(root) {
                        out.push(rel.to_string_lossy().to_string());
                    }
                }
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, 0, &mut out);
    out.sort();
    out
}

/// Resolve the budget: flag > `.rave: profile` > SAFE=0 → full > safe; then flag overrides.
pub fn plan_options(pipeline: &Pipeline, b: &BudgetArgs) -> anyhow::Result<PlanOptions> {
    // The origin's switches: SAFE=0 or FULL_PIPE=1 select the full profile.
    let env_is = |k: &str, want_on: bool| {
        std::env::var(k).is_ok_and(|v| {
            if want_on {
                v == "1" || v.eq_ignore_ascii_case("true")
            } else {
                v == "0" || v.eq_ignore_ascii_case("false")
            }
        })
    };
    let full = env_is("SAFE", false) || env_is("FULL_PIPE", true);
    let profile = b
        .profile
        .clone()
        .or_else(|| pipeline.rave.profile.clone())
        .unwrap_or_else(|| if full { "full".into() } else { "safe".into() });
    let (profile, budget) = pipeline
        .rave
        .profile_budget(&profile)
        .map_err(|e| anyhow::anyhow!(e))?;
    let budget = budget
        .with_overrides(b.memory.as_deref(), b.cpus.as_deref(), b.jobs, |s| {
            format!("--{s}")
        })
        .map_err(|e| anyhow::anyhow!(e))?;
    // Admission by memory only protects the machine if the budget fits in it, with room left
    // for the system and rave itself (1 GiB, or an eighth of a small machine).
    if !b.force_budget
        && let Some(total) = host_memory_bytes()
    {
        let reserve = (1u64 << 30).min(total / 8);
        let fmt = rave_model::units::format_memory;
        if budget.memory_bytes > total {
            anyhow::bail!(
                "the memory budget ({}) is larger than this machine's memory ({}): jobs admitted under it could exhaust the host; lower --memory (or the profile's), or pass --force-budget",
                fmt(budget.memory_bytes),
                fmt(total)
            );
        }
        if budget.memory_bytes > total - reserve {
            anyhow::bail!(
                "the memory budget ({}) leaves less than {} of this machine's {} for the system and rave: jobs admitted under it could make the host's OOM killer act; lower --memory to at most {}, or pass --force-budget",
                fmt(budget.memory_bytes),
                fmt(reserve),
                fmt(total),
                fmt(total - reserve)
            );
        }
    }
    Ok(PlanOptions {
        budget,
        profile,
        learned: Default::default(),
        learned_cpus: Default::default(),
    })
}

/// MemTotal from /proc/meminfo.
fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The project directory a command works in, found as `rave run` finds it: `dir` if given,
/// else the current directory when it holds a pipeline file, else the top of the repository
/// it is in, else the current directory.
pub fn project_root(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let start = match dir {
        Some(d) => return Ok(d.to_path_buf()),
        None => std::env::current_dir()?,
    };
    if has_pipeline(&start) {
        return Ok(start);
    }
    Ok(rave_repo::Repo::discover(&start)
        .map(|r| r.root().to_path_buf())
        .unwrap_or(start))
}

/// Print diagnostics to stderr, compiler-style. Returns the number of errors.
pub fn report(loaded_sources: &rave_model::Sources, diags: &[rave_model::Diagnostic]) -> usize {
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut errors = 0;
    for d in diags {
        if d.is_error() {
            errors += 1;
        }
        eprintln!("{}\n", d.render(loaded_sources, color));
    }
    errors
}

/// A project planned for a trigger.
pub struct Planned {
    pub project: Project,
    pub trigger: Trigger,
    pub plan: rave_plan::Plan,
    /// Warnings from loading and planning (errors mean there is no plan).
    pub warnings: Vec<rave_model::Diagnostic>,
}

/// Load, build the trigger, plan. On a definition error the diagnostics are printed and the
/// exit code (2) comes back as `Err`.
/// The project's state directory (`--state-dir`, else `.rave` in the project).
pub fn state_dir(project: &Project, b: &BudgetArgs) -> PathBuf {
    b.state_dir
        .clone()
        .unwrap_or_else(|| project.root.join(".rave"))
}

pub fn plan_project(
    p: &PipelineArgs,
    t: &TriggerArgs,
    b: &BudgetArgs,
) -> anyhow::Result<Result<Planned, i32>> {
    let project = Project::load_for(p, Some(t))?;
    let Some(pipeline) = project.pipeline() else {
        report(&project.loaded.sources, &project.loaded.diagnostics);
        return Ok(Err(2));
    };
    let mut opts = plan_options(pipeline, b)?;
    if !b.no_learn {
        let peaks = rave_engine::learn::Peaks::load(&state_dir(&project, b));
        opts.learned = peaks.all();
        opts.learned_cpus = peaks.all_cpus();
    }
    let trigger = project.trigger(t)?;
    let (plan, diags) = rave_plan::plan(pipeline, &trigger, &opts);
    let warnings: Vec<_> = project
        .loaded
        .diagnostics
        .iter()
        .chain(diags.iter())
        .cloned()
        .collect();
    match plan {
        Some(plan) => Ok(Ok(Planned {
            project,
            trigger,
            plan,
            warnings,
        })),
        None => {
            report(&project.loaded.sources, &warnings);
            Ok(Err(2))
        }
    }
}
