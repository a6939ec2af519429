//! The backends: where values live.

pub mod json_file;
pub mod redis;
