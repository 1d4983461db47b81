//! rave's engine: runs a planned pipeline on this machine.
//!
//! # Architecture
//!
//! ```text
//!            ┌──────────── scheduler (one task) ─────────────┐
//!  Plan ───► │ DAG state · admission (budget) · retry · skip │ ──► Event stream ──► console,
//!            └──────┬────────────────────────────▲───────────┘                    --json, store
//!                   │ start                      │ finished
//!             job task: prepare working copy → Executor::run → save artifacts
//!                   │ output (bounded channel) ──► log files, live console
//! ```
//!
//! - [`scheduler`] owns the state of every job and the budget; nothing else mutates them.
//! - [`admission`] decides which ready jobs fit (memory, CPUs, slots), never starving big ones.
//! - [`executor`] is the contract every executor follows; [`local`] runs bash in a process
//!   group and a [`cgroup`] with the job's memory limit, so an OOM kill is seen as one.
//! - [`caps`] turns the job's share into `CARGO_BUILD_JOBS`, `NIX_CONFIG`, `MAKEFLAGS`, …
//! - [`workspace`] lays out a run's files; [`snapshot`] freezes the project's files once per
//!   run and [`builds`] gives each job a stable directory filled from it (an overlay mount, or
//!   an incremental copy); [`logs`] writes logs.
//!
//! A failed job is a result ([`outcome::ExecOutcome`]), not an error; only the runner's own
//! failures are `runner_error`.

pub mod admission;
pub mod builds;
pub mod cache;
pub mod caps;
pub mod cgroup;
pub mod dispatch;
pub mod docker;
pub mod event;
pub mod executor;
#[cfg(test)]
mod fake;
pub mod learn;
pub mod lease;
pub mod local;
pub mod logs;
pub mod mask;
pub mod outcome;
pub mod resume;
pub mod reuse;
pub mod scheduler;
pub mod share;
pub mod snapshot;
pub mod trace;
pub mod workspace;

pub use event::{Event, JobRecord};
pub use executor::{Cancel, Executor, JobSpec, LogChunk, LogSink, Stream};
pub use outcome::{ExecOutcome, FailureReason, JobStatus};
pub use scheduler::{PipelineStatus, RunConfig, RunResult};
