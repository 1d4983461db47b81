//! `rave.toml`: the server's settings, its projects and its API tokens.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"
//! data_dir = "/var/lib/rave"
//! max_body_bytes = 1048576      # webhook bodies above this get 413
//! rate_limit_per_sec = 100      # per source address; 429 past it
//! on_restart = "fail"           # or "requeue": what happens to pipelines a crash interrupted
//! memory = "6G"                 # passed to each pipeline as --memory (default: the profile)
//!
//! [[projects]]
//! name = "group/app"            # matched against the forge's project path
//! clone_url = "https://gitlab.example.com/group/app.git"   # or a local path
//! secret_env = "APP_HOOK_SECRET" # or secret = "…"
//! token_env = "APP_DEPLOY_TOKEN" # HTTPS fetch token; or ssh_key = "/etc/rave/app_key"
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
