//! Includes from outside the repository (`project`, `remote`, `template`, `component`): what
//! the loader asks for, and the trait through which it gets them.
//!
//! The model never touches the network: the caller hands the loader an [`IncludeSource`]
//! (rave's fetches with git and HTTPS, caches the results and works offline). Without one,
//! these includes are refused with a hint.

use serde::{Deserialize, Serialize};

/// One file from elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum External {
    /// `include: project` (and `include: local` inside a file that came from a project, which
    /// names a file of that project at the same commit).
    Project {
        project: String,
        /// Branch, tag or commit; None: the project's default branch.
        reference: Option<String>,
        file: String,
    },
    /// `include: remote`, with GitLab's `integrity: sha256-<base64>` when given.
    Remote {
        url: String,
        integrity: Option<String>,
    },
    /// `include: template`: a file of the configured templates source.
    Template { name: String },
    /// `include: component`: `<host>/<project path>/<name>@<version>`.
    Component { address: String },
}

impl External {
    pub fn kind(&self) -> &'static str {
        match self {
            External::Project { .. } => "project",
            External::Remote { .. } => "remote",
            External::Template { .. } => "template",
            External::Component { .. } => "component",
        }
    }

    /// How the user wrote it, for messages.
    pub fn describe(&self) -> String {
        match self {
            External::Project {
                project,
                reference,
                file,
            } => format!(
                "{project}{}:{file}",
                reference
                    .as_deref()
                    .map(|r| format!("@{r}"))
                    .unwrap_or_default()
            ),
            External::Remote { url, .. } => url.clone(),
            External::Template { name } => name.clone(),
            External::Component { address } => address.clone(),
        }
    }
}

/// What a fetch returns.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub text: String,
    /// The file as the user should see it in messages (`group/ci@1a2b3c4d:templates/x.yml`).
    pub display: String,
    /// Where it came from, pinned: for provenance and `rave graph`.
    pub origin: IncludedFile,
    /// For files of a project (project and component includes): that project and the commit
    /// they were read at, so their own `include: local` entries read the same commit.
    pub project: Option<(String, String)>,
}

/// An included file from outside the repository, pinned to what was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncludedFile {
    /// project, remote, template or component.
    pub kind: String,
    /// What was asked for (`group/ci@v1:ci/build.yml`, a URL, a component address).
    pub location: String,
    /// The commit it was read at (project, component, template from a project) or
    /// `sha256:<hex>` of its content (remote, template from a directory).
    pub resolved: String,
}

/// Where includes from outside the repository come from.
pub trait IncludeSource {
    /// Fetch one file. The error is a sentence naming the cause and the fix; the loader adds
    /// the include's position.
    fn fetch(&mut self, what: &External) -> Result<Fetched, String>;
}
