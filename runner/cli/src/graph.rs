//! `rave graph`: the planned DAG as DOT, Mermaid or JSON.

use std::fmt::Write;

use clap::{Args, ValueEnum};
use rave_model::AllowFailure;
use rave_plan::Plan;
use serde_json::json;

use crate::project::{BudgetArgs, PipelineArgs, TriggerArgs, plan_project};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Dot,
    Mermaid,
    Json,
}

#[derive(Args, Debug)]
pub struct GraphArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub trigger: TriggerArgs,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "dot")]
    pub format: Format,
}

pub fn run(args: &GraphArgs) -> anyhow::Result<i32> {
    let planned = match plan_project(&args.pipeline, &args.trigger, &args.budget)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let plan = &planned.plan;
    let loaded = &planned.project.loaded;
    let out = match args.format {
        Format::Dot => dot(plan),
        Format::Mermaid => mermaid(plan),
        Format::Json => serde_json::to_string_pretty(&to_json(plan, loaded))? + "\n",
    };
    print!("{out}");
    Ok(0)
}

pub fn allow_failure_json(a: &AllowFailure) -> serde_json::Value {
    match a {
        AllowFailure::No => json!(false),
        AllowFailure::Yes => json!(true),
        AllowFailure::ExitCodes(c) => json!({ "exit_codes": c }),
    }
}

/// The plan as JSON: stages, budget, each job with where it was defined (`source`: the file,
/// `project@commit:file` for files from another project, and the line), and the files
/// included from outside the repository with what they resolved to.
pub fn to_json(plan: &Plan, loaded: &rave_model::Loaded) -> serde_json::Value {
    let stages: Vec<&String> = plan
        .stages
        .iter()
        .filter(|s| plan.jobs.iter().any(|j| &j.stage == *s) || !s.starts_with('.'))
        .collect();
    json!({
        "stages": stages,
        "skipped_by_workflow": plan.skipped_by_workflow,
        "budget": {
            "profile": plan.profile,
            "memory_bytes": plan.budget.memory_bytes,
            "cpus": plan.budget.cpus,
            "jobs": plan.budget.jobs,
        },
        "jobs": plan.jobs.iter().map(|j| json!({
            "name": j.name,
            "stage": j.stage,
            "needs": j.deps.iter().map(|&d| plan.jobs[d].name.as_str()).collect::<Vec<_>>(),
            "when": j.when.as_str(),
            "allow_failure": allow_failure_json(&j.allow_failure),
            "priority": j.priority,
            "memory_bytes": j.memory_bytes,
            "memory_source": j.memory_source,
            "cpu_source": j.cpu_source,
            "cpus": j.cpus,
            "source": loaded.sources.get(j.job.span.file).map(|f| json!({
                "file": f.display,
                "line": j.job.span.line,
            })),
        })).collect::<Vec<_>>(),
        "includes": loaded.external,
    })
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn dot(plan: &Plan) -> String {
    let mut s =
        String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for (si, stage) in plan.stages.iter().enumerate() {
        let members: Vec<_> = plan.jobs.iter().filter(|j| j.stage_index == si).collect();
        if members.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "  subgraph \"cluster_{}\" {{\n    label=\"{}\";",
            quote(stage),
            quote(stage)
        );
        for j in members {
            let style = match j.when {
                rave_model::When::Manual => ", style=\"rounded,dashed\"",
                _ => "",
            };
            let _ = writeln!(
                s,
                "    \"{}\" [label=\"{}\\n{}\"{style}];",
                quote(&j.name),
                quote(&j.name),
                rave_model::units::format_memory(j.memory_bytes)
            );
        }
        s.push_str("  }\n");
    }
    for j in &plan.jobs {
        for &d in &j.deps {
            let _ = writeln!(
                s,
                "  \"{}\" -> \"{}\";",
                quote(&plan.jobs[d].name),
                quote(&j.name)
            );
        }
    }
    s.push_str("}\n");
    s
}

fn mermaid(plan: &Plan) -> String {
    let mut s = String::from("flowchart LR\n");
    let id = |i: usize| format!("j{i}");
    for (si, stage) in plan.stages.iter().enumerate() {
        let members: Vec<_> = plan.jobs.iter().filter(|j| j.stage_index == si).collect();
        if members.is_empty() {
            continue;
        }
        let _ = writeln!(s, "  subgraph s{si}[\"{}\"]", stage.replace('"', "#quot;"));
        for j in members {
            let _ = writeln!(s, "    {}[\"{}\"]", id(j.id), j.name.replace('"', "#quot;"));
        }
        s.push_str("  end\n");
    }
    for j in &plan.jobs {
        for &d in &j.deps {
            let _ = writeln!(s, "  {} --> {}", id(d), id(j.id));
        }
    }
    s
}
