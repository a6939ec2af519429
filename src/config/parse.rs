//! Parsing of one variable's value, and the error that names the variable.

use std::time::Duration;

use crate::error::{Error, Result};

/// The [`Error::Config`] for `variable` set to `value`, saying what was `expected`.
pub(crate) fn config_error(variable: &str, value: &str, expected: &str) -> Error {
    Error::Config {
        variable: variable.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

/// Parses true/false, 1/0, yes/no in any case.
///
/// # Errors
/// [`Error::Config`] naming `variable`.
pub(crate) fn parse_bool(variable: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(config_error(variable, value, "true/false, 1/0 or yes/no")),
    }
}

/// Parses an integer from `min` to `max`.
///
/// # Errors
/// [`Error::Config`] naming `variable`.
pub(crate) fn parse_u64(variable: &str, value: &str, min: u64, max: u64) -> Result<u64> {
    match value.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(config_error(
            variable,
            value,
            &format!("an integer from {min} to {max}"),
        )),
    }
}

pub(super) fn parse_ttl(variable: &str, value: &str) -> Result<u64> {
    value.trim().parse::<u64>().map_err(|_| {
        config_error(
            variable,
            value,
            "a whole number of seconds, 0 or more (0 = no expiry)",
        )
    })
}

/// Parses seconds, decimals allowed.
pub(super) fn parse_seconds(variable: &str, value: &str, zero_ok: bool) -> Result<Duration> {
    let expected = if zero_ok {
        "a number of seconds, 0 or more (decimals allowed)"
    } else {
        "a number of seconds above 0 (decimals allowed)"
    };
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (s > 0.0 || (zero_ok && s == 0.0)) && s < 1e9 => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(config_error(variable, value, expected)),
    }
}
