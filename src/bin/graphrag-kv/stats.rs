//! `stats`: the namespace figures as a table, and the server's for Redis.

use std::io::{self, Write};

use graphrag_kv::metrics::{server_info, ServerInfo};
use graphrag_kv::{BackendKind, Storage};

/// The server's INFO figures for a Redis backend (`None` for JSON). An ACL user that may not
/// run INFO gets `Some(Err(why))`: the namespace figures are still worth printing.
pub(crate) fn server_figures(
    storage: &Storage,
) -> graphrag_kv::Result<Option<Result<ServerInfo, String>>> {
    let Some(shared) = storage.redis() else {
        return Ok(None);
    };
    match server_info(shared) {
        Ok(info) => Ok(Some(Ok(info))),
        Err(e) if e.is_permission_denied() => {
            Ok(Some(Err(format!("the Redis user may not run INFO ({e})"))))
        }
        Err(e) => Err(e),
    }
}

/// Bytes as `123456789 (117.7 MiB)`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{n} ({v:.1} {unit})")
}

/// Writes the stats as an aligned table; `~` marks sizes estimated from a sample. For Redis,
/// the server's figures follow the table.
pub(crate) fn write_stats_table(
    out: &mut impl Write,
    backend: BackendKind,
    stats: &[graphrag_kv::NamespaceStats],
    server: Option<&Result<ServerInfo, String>>,
) -> io::Result<()> {
    writeln!(out, "backend: {}", backend.as_str())?;
    let rows: Vec<[String; 4]> = stats
        .iter()
        .map(|s| {
            [
                s.namespace.clone(),
                s.keys.to_string(),
                format!("{}{}", if s.bytes_sampled { "~" } else { "" }, s.bytes),
                if s.ttl_seconds == 0 {
                    "none".to_string()
                } else {
                    format!("{}s", s.ttl_seconds)
                },
            ]
        })
        .collect();
    let header = ["NAMESPACE", "KEYS", "BYTES", "TTL"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        )?;
    }
    if stats.iter().any(|s| s.bytes_sampled) {
        writeln!(
            out,
            "~ sampled: value bytes of a sample of keys, scaled to the key count"
        )?;
    }
    match server {
        None => {}
        Some(Err(why)) => writeln!(out, "server: figures unavailable: {why}")?,
        Some(Ok(info)) => {
            let nodes = if info.nodes > 1 {
                format!(" (sum of {} masters)", info.nodes)
            } else {
                String::new()
            };
            writeln!(out, "server{nodes}:")?;
            writeln!(out, "  used_memory       {}", human_bytes(info.used_memory))?;
            let limit = if info.maxmemory == 0 {
                "0 (no limit)".to_string()
            } else {
                human_bytes(info.maxmemory)
            };
            writeln!(out, "  maxmemory         {limit}")?;
            writeln!(out, "  maxmemory-policy  {}", info.maxmemory_policy)?;
            writeln!(
                out,
                "  evicted_keys      {} (since the server started, all namespaces)",
                info.evicted_keys
            )?;
            writeln!(
                out,
                "  keys              {} (all prefixes and databases)",
                info.keys
            )?;
        }
    }
    Ok(())
}
