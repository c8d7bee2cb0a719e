//! End-to-end tests that run the real `weir` binary: exit codes, validation messages,
//! golden window outputs, a folder of files in and out, the NAB runner, every example
//! pipeline (the MQTT ones against a test broker, and under a flood of 200,000 messages), process and container modules, signals,
//! `/metrics`, the idle footprint, the local API (queries, status, taps), and `weir agent` under a hub.

mod api;
mod checkpoints;
mod cli;
mod container_modules;
mod examples;
mod files;
mod footprint;
mod golden;
#[cfg(feature = "hub")]
mod hub;
mod metrics;
mod modules;
mod mqtt;
mod mqtt_flood;
mod nab;
mod outbox;
mod signals;
mod support;
