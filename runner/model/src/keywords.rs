//! The keywords rave understands, used to reject unknown keys with a "did you mean".

/// Top-level keys that are not jobs.
pub const GLOBAL: &[&str] = &[
    "stages",
    "types",
    "variables",
    "workflow",
    "include",
    "default",
    "image",
    "services",
    "before_script",
    "after_script",
    "cache",
    ".rave",
];

/// Keys a job may have.
pub const JOB: &[&str] = &[
    "after_script",
    "allow_failure",
    "artifacts",
    "before_script",
    "cache",
    "coverage",
    "dast_configuration",
    "dependencies",
    "environment",
    "except",
    "extends",
    "hooks",
    "id_tokens",
    "identity",
    "image",
    "inherit",
    "interruptible",
    "manual_confirmation",
    "needs",
    "only",
    "pages",
    "parallel",
    "release",
    "resource_group",
    "resources",
    "retry",
    "rules",
    "script",
    "secrets",
    "services",
    "stage",
    "start_in",
    "tags",
    "timeout",
    "trigger",
    "variables",
    "when",
];

/// Keys `default:` may set.
pub const DEFAULT: &[&str] = &[
    "after_script",
    "artifacts",
    "before_script",
    "cache",
    "hooks",
    "id_tokens",
    "image",
    "interruptible",
    "retry",
    "services",
    "tags",
    "timeout",
];

pub const RULE: &[&str] = &[
    "if",
    "changes",
    "exists",
    "when",
    "allow_failure",
    "variables",
    "needs",
    "start_in",
    "interruptible",
];

pub const WORKFLOW_RULE: &[&str] = &[
    "if",
    "changes",
    "exists",
    "when",
    "variables",
    "auto_cancel",
];

pub const NEED: &[&str] = &[
    "job",
    "artifacts",
    "optional",
    "parallel",
    "pipeline",
    "project",
    "ref",
];

pub const ARTIFACTS: &[&str] = &[
    "paths",
    "exclude",
    "expire_in",
    "expose_as",
    "name",
    "public",
    "access",
    "reports",
    "untracked",
    "when",
];

/// `artifacts: reports:` types GitLab knows.
pub const REPORTS: &[&str] = &[
    "accessibility",
    "annotations",
    "api_fuzzing",
    "browser_performance",
    "codequality",
    "container_scanning",
    "coverage_fuzzing",
    "coverage_report",
    "cyclonedx",
    "dast",
    "dependency_scanning",
    "dotenv",
    "junit",
    "license_scanning",
    "load_performance",
    "metrics",
    "performance",
    "repository_xray",
    "requirements",
    "requirements_v2",
    "sast",
    "secret_detection",
    "terraform",
];

pub const CACHE: &[&str] = &[
    "key",
    "paths",
    "policy",
    "when",
    "untracked",
    "unprotect",
    "fallback_keys",
];

pub const RETRY: &[&str] = &["max", "when", "exit_codes"];

pub const RAVE: &[&str] = &[
    "profile",
    "profiles",
    "defaults",
    "executor",
    "default_image",
    "nix_single_user",
    "scan",
    "image",
];

pub const PROFILE: &[&str] = &["memory", "cpus", "jobs", "nix_cores", "nix_max_jobs"];

pub const RESOURCES: &[&str] = &["memory", "cpus"];

/// Stages GitLab provides when `stages:` is absent.
pub const DEFAULT_STAGES: &[&str] = &[".pre", "build", "test", "deploy", ".post"];
