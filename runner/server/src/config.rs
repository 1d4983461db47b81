//! `rave.toml`: the server's settings, its projects and its API tokens.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"
//! data_dir = "/var/lib/rave"
//! max_body_bytes = 1048576      # webhook bodies above this get 413
//! rate_limit_per_sec = 100      # per source address; 429 past it
//! on_restart = "fail"           # or "requeue": what happens to pipelines a crash interrupted
//! memory = "6G"                 # the host budget every running pipeline's jobs share
//! cpus = "4"                    #   (default: the profile's; profile = "full" is the machine)
//! jobs = 4                      # at most this many jobs at once, of all pipelines
//! max_pipelines = 4             # pipelines running at once (their jobs share the budget)
//! otlp_endpoint = "http://otel:4318"   # OpenTelemetry traces (default: OTEL_EXPORTER_OTLP_ENDPOINT)
//!
//! [[projects]]
//! name = "group/app"            # matched against the forge's project path
//! clone_url = "https://gitlab.example.com/group/app.git"   # or a local path
//! secret_env = "APP_HOOK_SECRET" # or secret = "…"
//! token_env = "APP_DEPLOY_TOKEN" # HTTPS fetch token; or ssh_key = "/etc/rave/app_key"
//! protected_branches = ["main", "release/*"]   # default: main, master
//! protected_tags = ["v*"]                       # default: every tag
//!
//! [[projects.variables]]         # CI/CD variables the project's jobs get
//! name = "RAVE_SIGNING_KEY"
//! value_env = "APP_SIGNING_KEY"  # or value = "…"
//! masked = true                  # [MASKED] in job logs
//! protected = true               # only in pipelines of protected branches and tags
//! file = true                    # the job gets a path to a private file holding the value
//! raw = false                    # true: `$` in the value is never expanded
//!
//! [[tokens]]
//! name = "ops"
//! token_env = "RAVE_ADMIN_TOKEN"
//! scope = "admin"                # or "read"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub projects: Vec<Project>,
    #[serde(default)]
    pub tokens: Vec<Token>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub rate_limit_per_sec: u32,
    pub on_restart: OnRestart,
    pub memory: Option<String>,
    pub cpus: Option<String>,
    pub profile: Option<String>,
    pub executor: Option<String>,
    /// Variables of the server's environment passed to jobs beyond the fixed allowlist
    /// (PATH, HOME, LANG, LC_ALL, LC_CTYPE, TZ, TMPDIR, USER, LOGNAME, TERM), e.g. proxies.
    pub pass_env: Vec<String>,
    /// Where `include: template` files are: a directory, or a project on the forge.
    pub templates_dir: Option<PathBuf>,
    pub templates_project: Option<String>,
    /// A Prometheus Pushgateway every pipeline pushes its job metrics to when it ends
    /// (grouped by project and pipeline).
    pub push_metrics: Option<String>,
    /// Job slots of the host budget, shared by all pipelines (default: the profile's).
    pub jobs: Option<u32>,
    /// How many pipelines run at once; their jobs share one budget.
    pub max_pipelines: u32,
    /// An OpenTelemetry collector (OTLP/HTTP, `http://host:4318`) every pipeline's trace goes
    /// to; default: `OTEL_EXPORTER_OTLP_ENDPOINT` from the server's environment, else none.
    pub otlp_endpoint: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: None,
            data_dir: None,
            max_body_bytes: 1 << 20,
            rate_limit_per_sec: 100,
            on_restart: OnRestart::Fail,
            memory: None,
            cpus: None,
            profile: None,
            executor: None,
            pass_env: Vec::new(),
            templates_dir: None,
            templates_project: None,
            push_metrics: None,
            jobs: None,
            max_pipelines: 4,
            otlp_endpoint: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnRestart {
    /// Pipelines that were running are failed (`runner_error`).
    #[default]
    Fail,
    /// They are queued again from the start.
    Requeue,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    pub name: String,
    pub clone_url: String,
    pub secret: Option<String>,
    pub secret_env: Option<String>,
    /// Pipeline file in the repository (default: rave's search order).
    pub pipeline_file: Option<String>,
    pub token: Option<String>,
    pub token_env: Option<String>,
    pub ssh_key: Option<PathBuf>,
    /// OpenSSH known_hosts lines pinning the server's host key (default: ~/.ssh/known_hosts).
    pub ssh_known_hosts: Option<PathBuf>,
    /// Branches whose pipelines get protected variables (`*` matches any run of characters).
    #[serde(default = "default_protected_branches")]
    pub protected_branches: Vec<String>,
    /// Tags whose pipelines get protected variables.
    #[serde(default = "default_protected_tags")]
    pub protected_tags: Vec<String>,
    #[serde(default)]
    pub variables: Vec<Variable>,
    /// The forge `include: project` and `component` fetch from (default: the host of
    /// `clone_url`), with the project's token.
    pub server_url: Option<String>,
    /// Where included projects' repositories are, as `<include_base>/<project>.git`, when
    /// not under `server_url`: e.g. `ssh://git@forge:2222/srv/git` for a forge reached over
    /// SSH, fetched with this project's `ssh_key` and pinned `ssh_known_hosts`.
    pub include_base: Option<String>,
    /// Projects whose jobs may start this project's pipelines with `trigger: project` (`*`:
    /// any configured project). None by default: a trigger runs this project's code with
    /// its secrets and variables the other project chose, so this project's admin says who
    /// may, as GitLab asks the triggering user for rights on the downstream project.
    #[serde(default)]
    pub triggered_by: Vec<String>,
}

fn default_protected_branches() -> Vec<String> {
    vec!["main".into(), "master".into()]
}

fn default_protected_tags() -> Vec<String> {
    vec!["*".into()]
}

/// A project's CI/CD variable.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    pub name: String,
    pub value: Option<String>,
    pub value_env: Option<String>,
    #[serde(default)]
    pub masked: bool,
    #[serde(default)]
    pub protected: bool,
    #[serde(default)]
    pub file: bool,
    #[serde(default)]
    pub raw: bool,
}

impl Variable {
    pub fn value(&self, project: &str) -> Result<String, String> {
        from_env(
            &self.value,
            &self.value_env,
            &format!("project `{project}`: variable `{}`: value_env", self.name),
        )?
        .ok_or_else(|| {
            format!(
                "project `{project}`: variable `{}` needs `value` or `value_env`",
                self.name
            )
        })
    }
}

/// GitLab's protected-ref wildcard: `*` matches any run of characters (`/` included), every
/// other character itself. Written out because it is the only pattern the config needs.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Admin,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub name: String,
    pub token: Option<String>,
    pub token_env: Option<String>,
    pub scope: Scope,
}

fn from_env(
    inline: &Option<String>,
    env: &Option<String>,
    what: &str,
) -> Result<Option<String>, String> {
    match (inline, env) {
        (Some(v), _) => Ok(Some(v.clone())),
        (None, Some(name)) => std::env::var(name)
            .map(Some)
            .map_err(|_| format!("{what} names the environment variable {name}, which is not set")),
        (None, None) => Ok(None),
    }
}

impl Project {
    /// May a `trigger: project` job of `upstream` start this project's pipelines?
    pub fn accepts_trigger_from(&self, upstream: &str) -> bool {
        self.triggered_by.iter().any(|p| p == "*" || p == upstream)
    }

    /// Is this ref protected (its pipelines get protected variables)?
    pub fn is_protected(&self, ref_name: &str, tag: bool) -> bool {
        let patterns = if tag {
            &self.protected_tags
        } else {
            &self.protected_branches
        };
        patterns.iter().any(|p| wildcard_match(p, ref_name))
    }

    /// The variables a pipeline of `ref_name` gets: protected ones only on protected refs.
    pub fn variables_for(
        &self,
        ref_name: &str,
        tag: bool,
    ) -> Result<Vec<(&Variable, String)>, String> {
        let protected = self.is_protected(ref_name, tag);
        self.variables
            .iter()
            .filter(|v| protected || !v.protected)
            .map(|v| v.value(&self.name).map(|val| (v, val)))
            .collect()
    }

    pub fn secret(&self) -> Result<Option<String>, String> {
        from_env(
            &self.secret,
            &self.secret_env,
            &format!("project `{}`: secret_env", self.name),
        )
    }
    pub fn credentials(&self) -> Result<rave_repo::Credentials, String> {
        if let Some(k) = &self.ssh_key {
            return Ok(rave_repo::Credentials::SshKey {
                key: k.clone(),
                known_hosts: self.ssh_known_hosts.clone(),
            });
        }
        Ok(
            match from_env(
                &self.token,
                &self.token_env,
                &format!("project `{}`: token_env", self.name),
            )? {
                Some(t) => rave_repo::Credentials::Token(t),
                None => rave_repo::Credentials::None,
            },
        )
    }
}

impl Token {
    pub fn value(&self) -> Result<String, String> {
        from_env(
            &self.token,
            &self.token_env,
            &format!("token `{}`: token_env", self.name),
        )?
        .ok_or_else(|| format!("token `{}` needs `token` or `token_env`", self.name))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut seen = std::collections::HashSet::new();
        for p in &cfg.projects {
            if !seen.insert(&p.name) {
                return Err(format!(
                    "{}: project `{}` is listed twice",
                    path.display(),
                    p.name
                ));
            }
            p.secret()?;
            p.credentials()?;
            for v in &p.variables {
                v.value(&p.name)?;
                if v.name.is_empty()
                    || !v
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(format!(
                        "{}: project `{}`: `{}` is not a valid variable name (letters, digits, `_`)",
                        path.display(),
                        p.name,
                        v.name
                    ));
                }
            }
        }
        for t in &cfg.tokens {
            t.value()?;
        }
        Ok(cfg)
    }

    pub fn project(&self, name: &str) -> Option<&Project> {
        self.projects.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_ref_wildcards() {
        assert!(wildcard_match("main", "main"));
        assert!(!wildcard_match("main", "main2"));
        assert!(wildcard_match("release/*", "release/1.0/x"));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("v*.*", "v1.2"));
        assert!(!wildcard_match("v*.*", "v12"));
        assert!(!wildcard_match("release/*", "releases"));
    }
}
