//! The typed pipeline: what a `.gitlab-ci.yml` (plus rave's `.rave:` settings) means.
//!
//! Values here are already validated; spans are kept where a later stage (the plan) may need
//! to point at the source, e.g. a `needs` entry naming a job that rules excluded.

use std::time::Duration;

use indexmap::IndexMap;

use crate::expr::Expr;
use crate::source::Span;

/// A name with the place it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

#[derive(Clone, Debug, Default)]
pub struct Pipeline {
    pub stages: Vec<Spanned<String>>,
    pub variables: Variables,
    pub workflow: Option<Workflow>,
    pub jobs: IndexMap<String, Job>,
    pub rave: RaveConfig,
    /// Hidden keys (`.name`) that no job extends or references, for an "unused" warning.
    pub hidden: Vec<Spanned<String>>,
}

/// Variables in definition order. Values are unexpanded (`$OTHER` stays as written) unless
/// `expand: false` was given, in which case `raw` is set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Variables(pub IndexMap<String, Variable>);

#[derive(Clone, Debug, PartialEq)]
pub struct Variable {
    pub value: String,
    /// `expand: false`: the value is taken literally.
    pub raw: bool,
    pub span: Span,
}

impl Variables {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.value.as_str())
    }
}

#[derive(Clone, Debug, Default)]
pub struct Workflow {
    pub name: Option<String>,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    #[default]
    OnSuccess,
    OnFailure,
    Always,
    Manual,
    Never,
    Delayed,
}

impl When {
    pub const NAMES: [&'static str; 6] = [
        "on_success",
        "on_failure",
        "always",
        "manual",
        "never",
        "delayed",
    ];

    pub fn parse(s: &str) -> Option<When> {
        Some(match s {
            "on_success" => When::OnSuccess,
            "on_failure" => When::OnFailure,
            "always" => When::Always,
            "manual" => When::Manual,
            "never" => When::Never,
            "delayed" => When::Delayed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub enum AllowFailure {
    #[default]
    No,
    Yes,
    /// Failure allowed only for these exit codes.
    ExitCodes(Vec<i32>),
}

impl AllowFailure {
    pub fn allows(&self, exit_code: Option<i32>) -> bool {
        match self {
            AllowFailure::No => false,
            AllowFailure::Yes => true,
            AllowFailure::ExitCodes(codes) => exit_code.is_some_and(|c| codes.contains(&c)),
        }
    }

    pub fn is_allowed_at_all(&self) -> bool {
        !matches!(self, AllowFailure::No)
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub span: Span,
    pub if_: Option<(String, Expr)>,
    pub changes: Option<Changes>,
    pub exists: Option<Vec<String>>,
    pub when: Option<When>,
    pub allow_failure: Option<AllowFailure>,
    pub variables: Variables,
    pub needs: Option<Vec<Need>>,
    pub start_in: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Changes {
    pub paths: Vec<String>,
    pub compare_to: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    pub job: String,
    pub span: Span,
    pub artifacts: bool,
    pub optional: bool,
    /// `parallel: matrix:` selection: the instances whose variables match one of these rows
    /// (each value one of the listed names; `$[[ matrix.NAME ]]` is the needing instance's own
    /// value).
    pub matrix: Option<Vec<IndexMap<String, Vec<String>>>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    pub max: u32,
    /// Failure kinds to retry on (GitLab names: always, script_failure, runner_system_failure,
    /// job_execution_timeout, …). Empty means always.
    pub when: Vec<String>,
    pub exit_codes: Vec<i32>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Parallel {
    Count(u32),
    Matrix(Vec<IndexMap<String, Vec<String>>>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactsWhen {
    #[default]
    OnSuccess,
    OnFailure,
    Always,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Artifacts {
    pub name: Option<String>,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub expire_in: Option<Duration>,
    pub when: ArtifactsWhen,
    pub untracked: bool,
    pub reports: Reports,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Reports {
    pub junit: Vec<String>,
    pub dotenv: Vec<String>,
    /// Report kinds rave stores but does not interpret.
    pub other: Vec<(String, Vec<String>)>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Cache {
    /// `key:` as a string (variables expanded when the job runs); None: `default`, or
    /// `key: files` below.
    pub key: Option<String>,
    /// `key: files:` (one or two files whose contents make the key) and `key: prefix:`.
    pub key_files: Vec<String>,
    pub key_prefix: Option<String>,
    /// `fallback_keys:` tried in order when `key` has no cache (at most 5).
    pub fallback_keys: Vec<String>,
    pub paths: Vec<String>,
    /// `pull`, `push` or `pull-push` (the default); may be a variable.
    pub policy: Option<String>,
    /// `on_success` (the default), `on_failure` or `always`.
    pub when: Option<String>,
    pub untracked: bool,
    /// Share the cache between protected and unprotected refs.
    pub unprotect: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Image {
    pub name: String,
    pub entrypoint: Option<Vec<String>>,
    pub pull_policy: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Service {
    pub name: String,
    pub alias: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub variables: Variables,
    pub pull_policy: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Environment {
    pub name: String,
    pub url: Option<String>,
    pub action: Option<String>,
    pub on_stop: Option<String>,
}

/// A job's own resource request, from `resources:` or `RAVE_MEMORY` / `RAVE_CPUS`.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Resources {
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub span: Option<Span>,
}

/// Legacy `only:` / `except:` (deprecated in GitLab, still common).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OnlyExcept {
    pub refs: Vec<String>,
    pub variables: Vec<(String, Expr)>,
    pub changes: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Job {
    pub name: String,
    pub span: Span,
    pub stage: Spanned<String>,
    pub before_script: Vec<String>,
    pub script: Vec<String>,
    pub after_script: Vec<String>,
    /// None: stage ordering; Some(vec![]) runs at once.
    pub needs: Option<Vec<Need>>,
    pub dependencies: Option<Vec<Spanned<String>>>,
    pub variables: Variables,
    /// Global variables this job inherits (`inherit: variables`).
    pub inherit_variables: InheritVariables,
    pub rules: Option<Vec<Rule>>,
    pub only: Option<OnlyExcept>,
    pub except: Option<OnlyExcept>,
    pub when: When,
    pub start_in: Option<Duration>,
    /// None: not written, so the default for the job's `when` applies.
    pub allow_failure: Option<AllowFailure>,
    pub retry: Option<Retry>,
    pub timeout: Option<Duration>,
    pub parallel: Option<Parallel>,
    pub artifacts: Option<Artifacts>,
    pub cache: Vec<Cache>,
    pub image: Option<Image>,
    pub services: Vec<Service>,
    pub resource_group: Option<String>,
    pub environment: Option<Environment>,
    pub interruptible: bool,
    pub tags: Vec<String>,
    pub coverage: Option<String>,
    pub resources: Resources,
    /// `trigger:`: the job runs a child pipeline (its `script` is the run of it).
    pub trigger: Option<crate::child::TriggerSpec>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub enum InheritVariables {
    #[default]
    All,
    None,
    Only(Vec<String>),
}

impl InheritVariables {
    pub fn includes(&self, name: &str) -> bool {
        match self {
            InheritVariables::All => true,
            InheritVariables::None => false,
            InheritVariables::Only(list) => list.iter().any(|n| n == name),
        }
    }
}

/// A memory/CPU/slot budget: how much of the machine a run may use.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Budget {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub jobs: u32,
    pub nix_cores: u32,
    pub nix_max_jobs: u32,
}

impl Budget {
    /// SAFE: fits a 4 GiB laptop with room for the desktop.
    pub const SAFE: Budget = Budget {
        memory_bytes: 3072 * 1024 * 1024,
        cpus: 2.0,
        jobs: 2,
        nix_cores: 2,
        nix_max_jobs: 1,
    };

    /// `memory`, `cpus` and `jobs` given (flags, `[server]` settings) over this budget; the
    /// error names the setting, `what` prefixing it (`--memory`, `[server] memory`).
    pub fn with_overrides(
        mut self,
        memory: Option<&str>,
        cpus: Option<&str>,
        jobs: Option<u32>,
        what: impl Fn(&str) -> String,
    ) -> Result<Budget, String> {
        if let Some(m) = memory {
            self.memory_bytes =
                crate::units::parse_memory(m).map_err(|e| format!("{}: {e}", what("memory")))?;
        }
        if let Some(c) = cpus {
            self.cpus =
                crate::units::parse_cpus(c).map_err(|e| format!("{}: {e}", what("cpus")))?;
        }
        if let Some(j) = jobs {
            if j == 0 {
                return Err(format!("{} must be at least 1", what("jobs")));
            }
            self.jobs = j;
        }
        Ok(self)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RaveConfig {
    /// Profile used when none is chosen on the command line.
    pub profile: Option<String>,
    /// Named budgets; `safe` and `full` always exist (config may override them).
    pub profiles: IndexMap<String, Budget>,
    /// Request of a job that states none.
    pub default_memory_bytes: u64,
    pub default_cpus: f64,
    pub executor: Option<String>,
    pub default_image: Option<String>,
    /// Run `nix` in jobs without the daemon (`NIX_REMOTE=local`), so builds stay in the
    /// job's cgroup and memory limit.
    pub nix_single_user: bool,
    pub span: Option<Span>,
}

impl RaveConfig {
    /// The budget of profile `name` (`full_pipe`/`full-pipe` are `full`, as the origin's
    /// switches called it), with its canonical name; the error lists the defined profiles.
    pub fn profile_budget(&self, name: &str) -> Result<(String, Budget), String> {
        let name = match name.to_ascii_lowercase().as_str() {
            "full_pipe" | "full-pipe" | "full" => "full".to_string(),
            "safe" => "safe".to_string(),
            _ => name.to_string(),
        };
        match self.profiles.get(&name) {
            Some(b) => Ok((name, *b)),
            None => {
                let names: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
                Err(format!(
                    "unknown profile `{name}`: defined profiles are {}",
                    names.join(", ")
                ))
            }
        }
    }

    /// The FULL_PIPE profile when config gives none: the whole machine, leaving 1 GiB spare.
    pub fn full_default() -> Budget {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
        let mem = total_memory_bytes().unwrap_or(8 << 30);
        Budget {
            memory_bytes: mem.saturating_sub(1 << 30).max(Budget::SAFE.memory_bytes),
            cpus: cpus as f64,
            jobs: cpus.max(2),
            nix_cores: cpus,
            nix_max_jobs: 1,
        }
    }
}

impl Default for RaveConfig {
    fn default() -> Self {
        let mut profiles = IndexMap::new();
        profiles.insert("safe".to_string(), Budget::SAFE);
        profiles.insert("full".to_string(), RaveConfig::full_default());
        RaveConfig {
            profile: None,
            profiles,
            default_memory_bytes: 512 * 1024 * 1024,
            default_cpus: 1.0,
            executor: None,
            default_image: None,
            nix_single_user: false,
            span: None,
        }
    }
}

fn total_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
