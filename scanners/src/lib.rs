//! rave's scanners: run Trivy, npm audit and rave's own secrets check, turn their output into
//! one [`Finding`] model, apply a gate with an expiring allowlist, and write SARIF 2.1.0,
//! JUnit XML and a JSON summary.
//!
//! A scanner that cannot run is an error naming the cause and the fix ([`ScanError`]), never an
//! empty, passing result.

pub mod finding;
pub mod gate;
pub mod npm;
pub mod report;
pub mod sarif;
pub mod secrets;
pub mod trivy;

pub use finding::{Finding, Severity, Tool};

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{tool} is not available: {detail}; fix: {fix}")]
    Missing {
        tool: &'static str,
        detail: String,
        fix: &'static str,
    },
    #[error("{tool} failed: {detail}; fix: {fix}")]
    Failed {
        tool: &'static str,
        detail: String,
        fix: &'static str,
    },
    #[error("{tool} output could not be read: {detail}")]
    Unparseable { tool: &'static str, detail: String },
}
