//! `rave lint`: load and plan the pipeline, report every problem, exit 0 or 2.

use clap::Args;
use rave_model::{Diagnostic, Severity, Sources};
use serde_json::json;

use crate::project::{BudgetArgs, PipelineArgs, Project, TriggerArgs, plan_options, report};

#[derive(Args, Debug)]
pub struct LintArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub trigger: TriggerArgs,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Print one JSON document instead of rendered diagnostics.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &LintArgs) -> anyhow::Result<i32> {
    let project = Project::load_for(&args.pipeline, Some(&args.trigger))?;
    let mut diags: Vec<Diagnostic> = project.loaded.diagnostics.clone();
    let mut jobs = 0;
    if let Some(p) = project.pipeline() {
        let opts = plan_options(p, &args.budget)?;
        let trigger = project.trigger(&args.trigger)?;
        let (plan, d) = rave_plan::plan(p, &trigger, &opts);
        diags.extend(d);
        jobs = plan.map_or(0, |p| p.jobs.len());
    }
    // Source order reads best: the user fixes the file top to bottom.
    diags.sort_by_key(|d| d.span.map(|s| (s.file, s.offset)));
    let errors = diags.iter().filter(|d| d.is_error()).count();
    let warnings = diags.len() - errors;
    let file = project.loaded.file.as_ref().map(|f| {
        f.strip_prefix(&project.root)
            .unwrap_or(f)
            .display()
            .to_string()
    });
    if args.json {
        let doc = json!({
            "valid": errors == 0,
            "file": file,
            "jobs": jobs,
            "errors": errors,
            "warnings": warnings,
            "diagnostics": diags.iter().map(|d| to_json(d, &project.loaded.sources)).collect::<Vec<_>>(),
            "includes": project.loaded.external,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        report(&project.loaded.sources, &diags);
        for inc in &project.loaded.external {
            eprintln!("included {} {} at {}", inc.kind, inc.location, inc.resolved);
        }
        let file = file.unwrap_or_else(|| "pipeline".into());
        if errors == 0 {
            eprintln!(
                "{file} is valid: {jobs} job{} planned{}",
                if jobs == 1 { "" } else { "s" },
                if warnings > 0 {
                    format!(", {warnings} warning(s)")
                } else {
                    String::new()
                }
            );
        } else {
            eprintln!("{file}: {errors} error(s), {warnings} warning(s)");
        }
    }
    Ok(if errors == 0 { 0 } else { 2 })
}

fn to_json(d: &Diagnostic, sources: &Sources) -> serde_json::Value {
    let (file, line, col) = match d.span.and_then(|s| sources.get(s.file).map(|f| (s, f))) {
        Some((s, f)) => (Some(f.display.clone()), Some(s.line), Some(s.col)),
        None => (None, None, None),
    };
    json!({
        "severity": match d.severity { Severity::Error => "error", Severity::Warning => "warning" },
        "message": d.message,
        "file": file,
        "line": line,
        "col": col,
        "help": d.help,
    })
}
