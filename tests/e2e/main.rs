//! End-to-end tests: they run the real `rave` binary on real files and git repositories.

mod support;

mod graph;
mod lint;
