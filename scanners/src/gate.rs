//! The gate: fail when a finding is at or above a severity, unless an allowlist entry that
//! has not expired covers it.
//!
//! Allowlist (`.rave/scan-allow.yml`):
//!
//! ```yaml
//! - id: CVE-2021-23337
//!   reason: lodash.template is never called
//!   expires: 2027-01-31
//!   package: lodash        # optional: only for this package
//! ```
//!
//! Every entry needs an id, a reason and an expiry date; after that date it counts no more,
//! so an exception is always revisited.

use std::path::Path;

use rave_model::FileId;
use rave_model::yaml::{self, Limits, Value};

use crate::finding::{Finding, Severity};

#[derive(Clone, Debug, PartialEq)]
pub struct AllowEntry {
    pub id: String,
    pub reason: String,
    /// `YYYY-MM-DD`.
    pub expires: String,
    pub package: Option<String>,
}

fn valid_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && s.chars()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
        && (1..=12).contains(&s[5..7].parse::<u32>().unwrap_or(0))
        && (1..=31).contains(&s[8..10].parse::<u32>().unwrap_or(0))
}

/// Read an allowlist. Errors name the file, the entry's line and what is missing.
pub fn read_allowlist(path: &Path) -> Result<Vec<AllowEntry>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_allowlist(&text, &path.display().to_string())
}

pub fn parse_allowlist(text: &str, name: &str) -> Result<Vec<AllowEntry>, String> {
    let root = yaml::parse(text, FileId(0), Limits::default())
        .map_err(|e| format!("{name}:{}:{}: {}", e.span.line, e.span.col, e.message))?;
    let items = match &root.value {
        Value::Seq(s) => s.clone(),
        Value::Null => Vec::new(),
        _ => {
            return Err(format!(
                "{name}: the allowlist must be a list of entries (`- id: …`)"
            ));
        }
    };
    let mut out = Vec::new();
    for it in items {
        let at = format!("{name}:{}", it.span.line);
        let get = |k: &str| {
            it.get(k)
                .and_then(|v| v.scalar_string())
                .filter(|s| !s.trim().is_empty())
        };
        let (Some(id), Some(reason), Some(expires)) = (get("id"), get("reason"), get("expires"))
        else {
            return Err(format!(
                "{at}: every allowlist entry needs `id`, `reason` and `expires` (YYYY-MM-DD)"
            ));
        };
        if !valid_date(&expires) {
            return Err(format!(
                "{at}: `expires: {expires}` is not a date; write it as YYYY-MM-DD"
            ));
        }
        out.push(AllowEntry {
            id,
            reason,
            expires,
            package: get("package"),
        });
    }
    Ok(out)
}

/// Today as `YYYY-MM-DD` (UTC).
pub fn today() -> String {
    humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10].to_string()
}

#[derive(Debug, Default)]
pub struct GateResult<'a> {
    pub blocking: Vec<&'a Finding>,
    pub allowed: Vec<(&'a Finding, &'a AllowEntry)>,
    /// Entries past their date that matched a finding (which therefore counts again).
    pub expired: Vec<&'a AllowEntry>,
}

impl GateResult<'_> {
    pub fn passed(&self) -> bool {
        self.blocking.is_empty()
    }
}

pub fn evaluate<'a>(
    findings: &'a [Finding],
    fail_on: Severity,
    allow: &'a [AllowEntry],
    today: &str,
) -> GateResult<'a> {
    let mut r = GateResult::default();
    for f in findings {
        if f.severity < fail_on {
            continue;
        }
        let matching = allow.iter().filter(|e| {
            e.id == f.id
                && e.package
                    .as_ref()
                    .is_none_or(|p| Some(p) == f.package.as_ref())
        });
        let mut covered = None;
        for e in matching {
            if e.expires.as_str() >= today {
                covered = Some(e);
                break;
            }
            if !r.expired.contains(&e) {
                r.expired.push(e);
            }
        }
        match covered {
            Some(e) => r.allowed.push((f, e)),
            None => r.blocking.push(f),
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finding::Tool;

    fn f(id: &str, sev: Severity, pkg: Option<&str>) -> Finding {
        Finding {
            tool: Tool::Trivy,
            id: id.into(),
            title: String::new(),
            severity: sev,
            package: pkg.map(str::to_string),
            installed_version: None,
            fixed_version: None,
            target: None,
            line: None,
            link: None,
        }
    }

    #[test]
    fn threshold_allowlist_and_expiry() {
        let findings = vec![
            f("CVE-1", Severity::High, Some("lodash")),
            f("CVE-2", Severity::Critical, None),
            f("CVE-3", Severity::Medium, None),
            f("CVE-4", Severity::High, Some("other")),
        ];
        let allow = parse_allowlist(
            "- id: CVE-1\n  reason: unused code path\n  expires: 2027-01-31\n  package: lodash\n- id: CVE-2\n  reason: old\n  expires: 2026-01-01\n- id: CVE-4\n  reason: wrong package\n  expires: 2030-01-01\n  package: lodash\n",
            "allow.yml",
        )
        .unwrap();
        let r = evaluate(&findings, Severity::High, &allow, "2026-11-22");
        let blocking: Vec<&str> = r.blocking.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(blocking, ["CVE-2", "CVE-4"]);
        assert_eq!(r.allowed.len(), 1);
        assert_eq!(r.expired[0].id, "CVE-2");
        // After CVE-1's date it blocks too.
        let r = evaluate(&findings, Severity::High, &allow, "2027-02-01");
        assert_eq!(r.blocking.len(), 3);
        assert!(
            evaluate(&findings, Severity::Critical, &[], "2026-11-22")
                .blocking
                .len()
                == 1
        );
    }

    #[test]
    fn entries_need_id_reason_and_a_date() {
        let e = parse_allowlist("- id: CVE-1\n  expires: 2027-01-01\n", "a.yml").unwrap_err();
        assert!(e.contains("a.yml:1: every allowlist entry needs"), "{e}");
        let e = parse_allowlist("- {id: X, reason: r, expires: next year}\n", "a.yml").unwrap_err();
        assert!(e.contains("is not a date"), "{e}");
        assert!(parse_allowlist("", "a.yml").unwrap().is_empty());
    }
}
