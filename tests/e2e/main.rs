//! End-to-end tests: they run the real `rave` binary on real files and git repositories.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot set up should fail loudly

mod support;

mod cache;
mod cgroup_v2;
mod child;
mod cli;
mod conformance;
mod contract;
mod docker;
mod graph;
mod image;
mod includes;
mod lint;
mod monitoring;
mod release;
mod reuse;
mod run;
mod scan;
mod serve;
mod traces;
mod ui;
mod workspace;
