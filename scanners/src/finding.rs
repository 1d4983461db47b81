//! One model for what every scanner finds.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    Unknown,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Critical,
        Severity::High,
        Severity::Medium,
        Severity::Low,
        Severity::Unknown,
    ];

    /// Parse the names Trivy and npm use (`moderate` is npm's medium, `info` its lowest).
    pub fn parse(s: &str) -> Option<Severity> {
        Some(match s.to_ascii_lowercase().as_str() {
            "critical" => Severity::Critical,
            "high" => Severity::High,
            "medium" | "moderate" => Severity::Medium,
            "low" | "info" => Severity::Low,
            "unknown" | "" => Severity::Unknown,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "CRITICAL",
            Severity::High => "HIGH",
            Severity::Medium => "MEDIUM",
            Severity::Low => "LOW",
            Severity::Unknown => "UNKNOWN",
        }
    }

    /// SARIF `level` for this severity.
    pub fn sarif_level(self) -> &'static str {
        match self {
            Severity::Critical | Severity::High => "error",
            Severity::Medium => "warning",
            Severity::Low | Severity::Unknown => "note",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    Trivy,
    NpmAudit,
    Secrets,
}

impl Tool {
    pub fn as_str(self) -> &'static str {
        match self {
            Tool::Trivy => "trivy",
            Tool::NpmAudit => "npm-audit",
            Tool::Secrets => "rave-secrets",
        }
    }
}

/// What a scanner found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub tool: Tool,
    /// Rule or advisory id: `CVE-2024-1234`, `GHSA-…`, `github-pat`, `masked-variable`.
    pub id: String,
    pub title: String,
    pub severity: Severity,
    pub package: Option<String>,
    pub installed_version: Option<String>,
    pub fixed_version: Option<String>,
    /// File the finding is in (relative to the scanned directory), and line when known.
    pub target: Option<String>,
    pub line: Option<u32>,
    pub link: Option<String>,
}

impl Finding {
    /// A finding with only what every scanner knows; the rest is filled in with `..`.
    pub fn new(tool: Tool, id: String, title: String, severity: Severity) -> Finding {
        Finding {
            tool,
            id,
            title,
            severity,
            package: None,
            installed_version: None,
            fixed_version: None,
            target: None,
            line: None,
            link: None,
        }
    }
}
