//! Human and machine summaries of a scan: the table in the job log, JUnit XML, summary JSON.

use serde_json::{Value, json};

use crate::finding::{Finding, Severity, Tool};
use crate::gate::GateResult;

fn counts(findings: &[Finding]) -> Vec<(Severity, usize)> {
    Severity::ALL
        .iter()
        .map(|s| (*s, findings.iter().filter(|f| f.severity == *s).count()))
        .collect()
}

/// Table by tool and severity, then the findings that block the gate.
/// The findings per tool and severity, and the gate's verdict. `complete` is false when a
/// scanner could not run: then "gate passed" is never said.
pub fn table(
    ran: &[Tool],
    findings: &[Finding],
    gate: &GateResult<'_>,
    fail_on: Severity,
    complete: bool,
) -> String {
    let mut s = format!("{:<14}", "TOOL");
    for sev in Severity::ALL {
        s.push_str(&format!("{:>10}", sev.as_str()));
    }
    s.push('\n');
    for t in ran {
        let mine: Vec<Finding> = findings.iter().filter(|f| f.tool == *t).cloned().collect();
        s.push_str(&format!("{:<14}", t.as_str()));
        for (_, n) in counts(&mine) {
            s.push_str(&format!("{n:>10}"));
        }
        s.push('\n');
    }
    for (f, e) in &gate.allowed {
        s.push_str(&format!(
            "allowed: {} {} until {} ({})\n",
            f.id,
            f.package.as_deref().unwrap_or(""),
            e.expires,
            e.reason
        ));
    }
    for e in &gate.expired {
        s.push_str(&format!(
            "expired allowlist entry: {} (expired {}); it counts again\n",
            e.id, e.expires
        ));
    }
    if gate.passed() && !complete {
        s.push_str("gate NOT PASSED: a scanner could not run (see the errors above), so the findings are incomplete\n");
    } else if gate.passed() {
        s.push_str(&format!(
            "gate passed: nothing at or above {} blocks\n",
            fail_on.as_str()
        ));
    } else {
        s.push_str(&format!(
            "gate FAILED: {} finding(s) at or above {}:\n",
            gate.blocking.len(),
            fail_on.as_str()
        ));
        for f in &gate.blocking {
            let at = match (&f.target, f.line) {
                (Some(t), Some(l)) => format!(" at {t}:{l}"),
                (Some(t), None) => format!(" in {t}"),
                _ => String::new(),
            };
            let fix = f
                .fixed_version
                .as_ref()
                .map(|v| format!(", fixed in {v}"))
                .unwrap_or_default();
            s.push_str(&format!(
                "  {} {} [{}] {}{}{at}{fix}\n",
                f.severity.as_str(),
                f.id,
                f.tool.as_str(),
                f.package
                    .as_ref()
                    .map(|p| format!("{p}: "))
                    .unwrap_or_default(),
                f.title
            ));
        }
    }
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JUnit XML: one test suite per tool, one failing test case per blocking finding, so test
/// report viewers show them.
pub fn junit(ran: &[Tool], gate: &GateResult<'_>, findings: &[Finding]) -> String {
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"rave scan\">\n",
    );
    for t in ran {
        let blocking: Vec<&&Finding> = gate.blocking.iter().filter(|f| f.tool == *t).collect();
        let total = findings.iter().filter(|f| f.tool == *t).count();
        s.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\">\n",
            t.as_str(),
            blocking.len().max(1),
            blocking.len()
        ));
        if blocking.is_empty() {
            s.push_str(&format!("    <testcase classname=\"{}\" name=\"gate ({total} findings below the threshold or allowed)\"/>\n", t.as_str()));
        }
        for f in blocking {
            s.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{} {}\">\n      <failure message=\"{}\" type=\"{}\">{}</failure>\n    </testcase>\n",
                t.as_str(),
                xml(&f.id),
                xml(f.package.as_deref().unwrap_or("")),
                xml(&f.title),
                f.severity.as_str(),
                xml(&format!("{} {}", f.target.as_deref().unwrap_or(""), f.fixed_version.as_deref().map(|v| format!("fixed in {v}")).unwrap_or_default())),
            ));
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}

/// The JSON summary a release manifest embeds.
pub fn summary(
    ran: &[Tool],
    findings: &[Finding],
    gate: &GateResult<'_>,
    fail_on: Severity,
) -> Value {
    let by_sev = |fs: &[Finding]| -> Value {
        let mut m = serde_json::Map::new();
        for (s, n) in counts(fs) {
            m.insert(s.as_str().to_string(), json!(n));
        }
        Value::Object(m)
    };
    json!({
        "tools": ran.iter().map(|t| json!({
            "tool": t.as_str(),
            "findings": by_sev(&findings.iter().filter(|f| f.tool == *t).cloned().collect::<Vec<_>>()),
        })).collect::<Vec<_>>(),
        "total": by_sev(findings),
        "gate": {
            "fail_on": fail_on.as_str(),
            "passed": gate.passed(),
            "blocking": gate.blocking.iter().map(|f| &f.id).collect::<Vec<_>>(),
            "allowed": gate.allowed.iter().map(|(f, e)| json!({"id": f.id, "expires": e.expires, "reason": e.reason})).collect::<Vec<_>>(),
        },
    })
}
