//! Built-in transforms.

pub mod sql;
