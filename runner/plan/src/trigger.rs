//! What started a pipeline, and the predefined `CI_*` variables that follow from it.

use indexmap::IndexMap;

/// `CI_PIPELINE_SOURCE` values rave produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Push,
    Web,
    Api,
    Schedule,
    Trigger,
    /// A child pipeline run by a parent's `trigger:` job.
    ParentPipeline,
    /// A downstream pipeline started by another project's `trigger: project` job.
    Pipeline,
    /// `rave run` on a developer's machine. Rules see `push`, as gitlab-ci-local does, so a
    /// pipeline behaves locally as it does on the server.
    Local,
}

impl Source {
    pub fn parse(s: &str) -> Option<Source> {
        Some(match s {
            "push" | "tag" => Source::Push,
            "web" | "manual" => Source::Web,
            "api" => Source::Api,
            "schedule" => Source::Schedule,
            "trigger" => Source::Trigger,
            "parent_pipeline" => Source::ParentPipeline,
            "pipeline" => Source::Pipeline,
            "local" => Source::Local,
            _ => return None,
        })
    }

    /// The value jobs and rules see in `CI_PIPELINE_SOURCE`.
    pub fn ci_value(self) -> &'static str {
        match self {
            Source::Push | Source::Local => "push",
            Source::Web => "web",
            Source::Api => "api",
            Source::Schedule => "schedule",
            Source::Trigger => "trigger",
            Source::ParentPipeline => "parent_pipeline",
            Source::Pipeline => "pipeline",
        }
    }
}

/// Everything about the event and the repository that the plan needs. Plain data: reading git
/// is the caller's job, so planning stays pure and testable.
#[derive(Clone, Debug)]
pub struct Trigger {
    /// Branch name, or the tag name for a tag pipeline.
    pub ref_name: String,
    pub tag: Option<String>,
    pub sha: String,
    pub source: Source,
    pub default_branch: String,
    pub project_name: String,
    pub project_namespace: String,
    /// Variables given with the trigger (`--var`, API): highest precedence.
    pub variables: IndexMap<String, String>,
    /// Files in the repository at `sha`, for `rules: exists`.
    pub files: Vec<String>,
    /// Files changed by the push, for `rules: changes`. None when there is nothing to compare
    /// with (new branch, manual run): then `changes` is true, as in GitLab.
    pub changed_files: Option<Vec<String>>,
    /// The commit before the push (`CI_COMMIT_BEFORE_SHA`); zeros when unknown.
    pub before_sha: String,
    pub commit: CommitInfo,
    /// The forge (`https://gitlab.example.com`), when known: `CI_SERVER_URL` and friends.
    pub server_url: Option<String>,
    /// Names among `variables` given for this pipeline (`--var`), which a `trigger:` job with
    /// `forward: pipeline_variables: true` passes on to its child.
    pub pipeline_variables: Vec<String>,
    /// Names among `variables` taken literally (a CI/CD variable marked `raw`).
    pub literal_variables: Vec<String>,
    /// Values to mask in job output (CI/CD variables marked `masked`).
    pub masked_values: Vec<String>,
    /// The ref is protected on the server (`CI_COMMIT_REF_PROTECTED`; caches are kept apart).
    pub ref_protected: bool,
}

/// A CI/CD variable handed to a run from outside the pipeline file (a project's variables on
/// `rave serve`, written to the file `rave run --variables-file` reads). Above the file's own
/// variables, below `--var`, as in GitLab.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunVariable {
    pub name: String,
    pub value: String,
    /// Replaced by `[MASKED]` in job output.
    #[serde(default)]
    pub masked: bool,
    /// Never expanded (`$` is literal).
    #[serde(default)]
    pub raw: bool,
}

/// The file `rave run --variables-file` reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunVariables {
    pub variables: Vec<RunVariable>,
    /// More values to mask: the contents of `file` variables, whose value is a path.
    #[serde(default)]
    pub mask: Vec<String>,
    /// The pipeline's ref is protected (the server's `protected_branches` / `_tags`).
    #[serde(default)]
    pub ref_protected: bool,
}

impl Trigger {
    /// Add CI/CD variables (lower than the trigger's own `--var` values, which win).
    pub fn add_run_variables(&mut self, given: RunVariables) {
        self.masked_values.extend(given.mask);
        self.ref_protected = given.ref_protected;
        for v in given.variables {
            if v.masked {
                self.masked_values.push(v.value.clone());
            }
            if v.raw {
                self.literal_variables.push(v.name.clone());
            }
            self.variables.entry(v.name).or_insert(v.value);
        }
    }
}

/// What the commit says about itself. Data from the forge or the repository: jobs see it
/// literally, never expanded.
#[derive(Clone, Debug, Default)]
pub struct CommitInfo {
    pub message: String,
    /// `Name <email>`.
    pub author: String,
    /// ISO 8601.
    pub timestamp: String,
}

impl Default for Trigger {
    fn default() -> Self {
        Trigger {
            ref_name: "main".into(),
            tag: None,
            sha: "0000000000000000000000000000000000000000".into(),
            source: Source::Local,
            default_branch: "main".into(),
            project_name: "project".into(),
            project_namespace: "local".into(),
            variables: IndexMap::new(),
            files: Vec::new(),
            changed_files: None,
            before_sha: "0000000000000000000000000000000000000000".into(),
            commit: CommitInfo::default(),
            server_url: None,
            pipeline_variables: Vec::new(),
            literal_variables: Vec::new(),
            masked_values: Vec::new(),
            ref_protected: false,
        }
    }
}

/// GitLab's `CI_COMMIT_REF_SLUG`: lowercased, non-alphanumerics to `-`, at most 63 bytes,
/// no leading or trailing `-`.
pub fn slug(s: &str) -> String {
    let mapped: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cut: String = mapped.chars().take(63).collect();
    cut.trim_matches('-').to_string()
}

impl Trigger {
    /// `group/project`: `CI_PROJECT_PATH` when the trigger's variables set it, else the
    /// project's namespace and name.
    pub fn project_path(&self) -> String {
        self.variables
            .get("CI_PROJECT_PATH")
            .cloned()
            .unwrap_or_else(|| format!("{}/{}", self.project_namespace, self.project_name))
    }

    /// Pipeline-level predefined variables (job-level ones are added per job instance).
    pub fn predefined(&self) -> IndexMap<String, String> {
        let mut v = IndexMap::new();
        let mut set = |k: &str, val: &str| {
            v.insert(k.to_string(), val.to_string());
        };
        set("CI", "true");
        set("GITLAB_CI", "true");
        set("RAVE", "true");
        set("CI_SERVER", "yes");
        set("CI_COMMIT_BEFORE_SHA", &self.before_sha);
        set(
            "CI_COMMIT_REF_PROTECTED",
            if self.ref_protected { "true" } else { "false" },
        );
        set(
            "CI_COMMIT_TITLE",
            self.commit.message.lines().next().unwrap_or(""),
        );
        set("CI_COMMIT_MESSAGE", &self.commit.message);
        set(
            "CI_COMMIT_DESCRIPTION",
            self.commit
                .message
                .split_once('\n')
                .map_or("", |(_, rest)| rest.trim_start_matches('\n')),
        );
        set("CI_COMMIT_AUTHOR", &self.commit.author);
        set("CI_COMMIT_TIMESTAMP", &self.commit.timestamp);
        set("CI_PROJECT_TITLE", &self.project_name);
        if let Some(url) = &self.server_url {
            let (protocol, rest) = url.split_once("://").unwrap_or(("https", url));
            let fqdn = rest.split('/').next().unwrap_or(rest);
            let (host, port) = match fqdn.rsplit_once(':') {
                Some((h, p)) => (h, p.to_string()),
                None => (
                    fqdn,
                    if protocol == "http" { "80" } else { "443" }.to_string(),
                ),
            };
            set("CI_SERVER_URL", url);
            set("CI_SERVER_PROTOCOL", protocol);
            set("CI_SERVER_FQDN", fqdn);
            set("CI_SERVER_HOST", host);
            set("CI_SERVER_PORT", &port);
            set(
                "CI_PROJECT_URL",
                &format!("{url}/{}/{}", self.project_namespace, self.project_name),
            );
        }
        set(
            "CI_PROJECT_ROOT_NAMESPACE",
            self.project_namespace.split('/').next().unwrap_or(""),
        );
        set("CI_COMMIT_SHA", &self.sha);
        set("CI_COMMIT_SHORT_SHA", &self.sha[..self.sha.len().min(8)]);
        set("CI_COMMIT_REF_NAME", &self.ref_name);
        set("CI_COMMIT_REF_SLUG", &slug(&self.ref_name));
        match &self.tag {
            Some(t) => set("CI_COMMIT_TAG", t),
            None => set("CI_COMMIT_BRANCH", &self.ref_name),
        }
        set("CI_PIPELINE_SOURCE", self.source.ci_value());
        set("CI_DEFAULT_BRANCH", &self.default_branch);
        set("CI_PROJECT_NAME", &self.project_name);
        set("CI_PROJECT_NAMESPACE", &self.project_namespace);
        set(
            "CI_PROJECT_PATH",
            &format!("{}/{}", self.project_namespace, self.project_name),
        );
        set(
            "CI_PROJECT_PATH_SLUG",
            &slug(&format!("{}/{}", self.project_namespace, self.project_name)),
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_matches_gitlab() {
        assert_eq!(slug("Feature/ABC_1"), "feature-abc-1");
        assert_eq!(slug("-x-"), "x");
        assert_eq!(slug(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn tag_pipelines_have_no_branch() {
        let t = Trigger {
            ref_name: "v1.0".into(),
            tag: Some("v1.0".into()),
            ..Trigger::default()
        };
        let p = t.predefined();
        assert_eq!(p.get("CI_COMMIT_TAG").map(String::as_str), Some("v1.0"));
        assert!(!p.contains_key("CI_COMMIT_BRANCH"));
    }
}
