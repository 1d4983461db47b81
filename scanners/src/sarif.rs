//! SARIF 2.1.0: one run per tool, rules deduplicated, results pointing at file and line.

use serde_json::{Value, json};

use crate::finding::{Finding, Severity, Tool};

fn information_uri(t: Tool) -> &'static str {
    match t {
        Tool::Trivy => "https://github.com/aquasecurity/trivy",
        Tool::NpmAudit => "https://docs.npmjs.com/cli/commands/npm-audit",
        Tool::Secrets => "https://example.invalid/rave/scan/secrets",
    }
}

/// GitHub's `security-severity` score convention for a severity.
fn score(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "9.5",
        Severity::High => "8.0",
        Severity::Medium => "5.5",
        Severity::Low => "2.0",
        Severity::Unknown => "0.0",
    }
}

/// The SARIF log for `findings` from the tools in `ran` (a tool with no findings still gets
/// its run, so "scanned, found nothing" differs from "not scanned").
pub fn to_sarif(ran: &[Tool], findings: &[Finding], version: &str) -> Value {
    let runs: Vec<Value> = ran
        .iter()
        .map(|&tool| {
            let mine: Vec<&Finding> = findings.iter().filter(|f| f.tool == tool).collect();
            let mut rule_ids: Vec<&str> = Vec::new();
            let mut rules = Vec::new();
            for f in &mine {
                if !rule_ids.contains(&f.id.as_str()) {
                    rule_ids.push(&f.id);
                    let mut r = json!({
                        "id": f.id,
                        "shortDescription": {"text": if f.title.is_empty() { &f.id } else { &f.title }},
                        "defaultConfiguration": {"level": f.severity.sarif_level()},
                        "properties": {"security-severity": score(f.severity), "tags": ["security"]},
                    });
                    if let Some(l) = &f.link {
                        r["helpUri"] = json!(l);
                    }
                    rules.push(r);
                }
            }
            let results: Vec<Value> = mine
                .iter()
                .map(|f| {
                    let mut text = if f.title.is_empty() { f.id.clone() } else { f.title.clone() };
                    if let Some(p) = &f.package {
                        text.push_str(&format!(" (package {p}"));
                        if let Some(v) = &f.installed_version {
                            text.push_str(&format!(" {v}"));
                        }
                        if let Some(fix) = &f.fixed_version {
                            text.push_str(&format!(", fixed in {fix}"));
                        }
                        text.push(')');
                    }
                    let mut res = json!({
                        "ruleId": f.id,
                        "ruleIndex": rule_ids.iter().position(|r| *r == f.id).unwrap_or(0),
                        "level": f.severity.sarif_level(),
                        "message": {"text": text},
                        "properties": {"severity": f.severity.as_str()},
                    });
                    if let Some(t) = &f.target {
                        let mut loc = json!({"physicalLocation": {"artifactLocation": {"uri": t}}});
                        if let Some(l) = f.line.filter(|l| *l > 0) {
                            loc["physicalLocation"]["region"] = json!({"startLine": l});
                        }
                        res["locations"] = json!([loc]);
                    }
                    res
                })
                .collect();
            json!({
                "tool": {"driver": {
                    "name": tool.as_str(),
                    "informationUri": information_uri(tool),
                    "version": version,
                    "rules": rules,
                }},
                "results": results,
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": runs,
    })
}
