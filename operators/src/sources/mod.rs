//! Built-in sources.

pub mod file;
pub mod generator;
pub mod mqtt;
