//! End-to-end tests that run the real `weir` binary: exit codes, validation messages,
//! golden window outputs, every example pipeline (the MQTT ones against a test broker),
//! signals and `/metrics`.

mod cli;
mod examples;
mod golden;
mod metrics;
mod mqtt;
mod signals;
mod support;
