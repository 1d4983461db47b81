//! `rave`: a self-hosted CI runner. This binary is the command-line edge: it parses
//! arguments, calls the model/plan/engine crates, and turns their results into output and
//! exit codes (0 success, 1 pipeline failed, 2 definition or usage error, 130 interrupted).

mod cache;
mod client;
mod console;
mod graph;
mod history;
mod image;
mod lint;
mod otel;
mod project;
mod push;
mod release;
mod run;
mod scan;
mod serve;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "rave",
    version,
    about = "A self-hosted CI runner that runs GitLab CI pipelines within a memory budget"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the pipeline file: every error with file:line:col, a snippet and a hint.
    Lint(lint::LintArgs),
    /// Print the planned DAG of job instances (dot, mermaid or json).
    Graph(graph::GraphArgs),
    /// Run the pipeline here, admitting jobs by memory and CPU within the budget.
    Run(Box<run::RunArgs>),
    /// Scan with Trivy, npm audit and the masked-variable check; gate on severity; write SARIF.
    Scan(scan::ScanArgs),
    /// Release signing keys.
    #[command(subcommand)]
    Keys(release::KeysCommand),
    /// Signed release manifests: create them in a tag pipeline, verify them anywhere.
    #[command(subcommand)]
    Release(release::ReleaseCommand),
    /// Delete expired artifacts from the store (never what a live release references).
    Gc(release::GcArgs),
    /// The project's `cache:` archives: list them, clear them.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// List earlier runs of `rave run` in this project.
    Runs(history::RunsArgs),
    /// Print a job's log from the latest run (or `--run N`); without JOB, list the run's jobs.
    Logs(history::LogsArgs),
    /// VM images of the workspace's service crates: build them, boot-test them in QEMU.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Serve webhooks, the pipeline queue, the API and metrics for a team.
    Serve(serve::ServeArgs),
    /// List a server's pipelines, or show one with its jobs.
    Pipelines(client::PipelinesArgs),
    /// Run a server's pipeline again (all, `--failed`, or `--job NAME`).
    Rerun(client::RerunArgs),
    /// Run a server pipeline's failed jobs again (or `--job NAME`), at the same commit.
    Retry(client::RetryArgs),
    /// Play a manual job on a server.
    Play(client::JobIdArgs),
    /// Cancel a server's pipeline.
    Cancel(client::CancelArgs),
    /// Download artifacts from a server.
    #[command(subcommand)]
    Artifacts(client::ArtifactsCommand),
    /// Print shell completions.
    Completions {
        /// Shell to generate completions for.
        shell: clap_complete::Shell,
    },
}

/// Output piped into a reader that stops early (`rave runs --json | head`) is the reader's
/// choice, not an error: end quietly with the shell's "killed by SIGPIPE" status instead of
/// the panic `println!` raises. (Restoring the default SIGPIPE action would need `unsafe`.)
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// rave itself is the last thing the kernel's OOM killer should pick: it holds the state of
/// every job. Lowering the score needs privilege; without it rave keeps the default.
fn protect_from_oom_killer() {
    let _ = std::fs::write("/proc/self/oom_score_adj", "-900");
}

fn main() {
    quiet_on_broken_pipe();
    protect_from_oom_killer();
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Lint(a) => lint::run(a),
        Command::Graph(a) => graph::run(a),
        Command::Run(a) => run::run(a),
        Command::Scan(a) => scan::run(a),
        Command::Keys(c) => release::keys(c),
        Command::Release(c) => release::release(c),
        Command::Gc(a) => release::gc(a),
        Command::Cache(c) => cache::run(c),
        Command::Runs(a) => history::list(a),
        Command::Logs(a) => history::logs(a),
        Command::Serve(a) => serve::run(a),
        Command::Image(c) => image::run(c),
        Command::Pipelines(a) => client::pipelines(a),
        Command::Rerun(a) => client::rerun(a),
        Command::Retry(a) => client::retry(a),
        Command::Play(a) => client::play(a),
        Command::Cancel(a) => client::cancel(a),
        Command::Artifacts(c) => client::artifacts(c),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "rave", &mut std::io::stdout());
            Ok(0)
        }
    };
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                std::process::exit(141);
            }
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
