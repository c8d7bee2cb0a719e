//! End-to-end tests that run the real `weir` binary: exit codes, validation messages,
//! golden window outputs, every example pipeline, signals and `/metrics`.

mod cli;
mod examples;
mod golden;
mod metrics;
mod signals;
mod support;
