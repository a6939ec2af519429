//! Result rows and their output: the table, or one JSON object (`--json`).

use std::io::Write as _;

use serde_json::{json, Map, Value};

#[derive(Clone, Copy, PartialEq)]
pub enum Better {
    Lower,
    Higher,
}

pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub ours: f64,
    pub reference: Option<f64>,
    pub target: Option<(Better, f64)>,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        self.reference.map(|r| self.ours / r)
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// A row; a reference that is not a finite number (a failed parse) is left out.
pub fn row(
    name: &str,
    unit: &'static str,
    ours: f64,
    reference: Option<f64>,
    target: Option<(Better, f64)>,
) -> Row {
    Row {
        name: name.to_string(),
        unit,
        ours,
        reference: reference.filter(|r| r.is_finite()),
        target,
    }
}

/// Runs ours and the reference alternately `rounds` times and returns the row of the medians,
/// for a throughput that must reach `target` times the reference.
pub fn versus(
    name: &str,
    unit: &'static str,
    target: f64,
    rounds: usize,
    mut ours: impl FnMut() -> f64,
    mut reference: impl FnMut() -> f64,
) -> Row {
    let (mut o, mut r) = (vec![], vec![]);
    for _ in 0..rounds {
        o.push(ours());
        r.push(reference());
    }
    row(
        name,
        unit,
        median(o),
        Some(median(r)),
        Some((Better::Higher, target)),
    )
}

pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

pub fn print_json(rows: &[Row]) {
    let mut out = Map::new();
    for r in rows {
        out.insert(
            r.name.clone(),
            json!({"ours": num(r.ours), "reference": r.reference.map(num), "ratio": r.ratio().map(num)}),
        );
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&Value::Object(out)).expect("JSON")
    );
}

pub fn num(x: f64) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    // Three significant decimals are plenty for every figure.
    let r = if x.abs() >= 100.0 {
        x.round()
    } else {
        (x * 1000.0).round() / 1000.0
    };
    json!(r)
}

pub fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        let s = format!("{:.0}", x);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x.abs() >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

pub fn print_table(rows: &[Row]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| {:<32} | {:>16} | {:>12} | {:>7} | {:>7} | {:<4} |",
        "measure", "ours", "reference", "ratio", "target", "met"
    );
    let _ = writeln!(
        out,
        "|{:-<34}|{:->18}|{:->14}|{:->9}|{:->9}|{:-<6}|",
        "", "", "", "", "", ""
    );
    for r in rows {
        let (target, met) = match (r.target, r.ratio(), r.reference) {
            (Some((Better::Lower, x)), Some(ratio), _) => {
                (format!("≤{x}x"), if ratio <= x { "yes" } else { "NO" })
            }
            (Some((Better::Higher, x)), Some(ratio), _) => {
                (format!("≥{x}x"), if ratio >= x { "yes" } else { "NO" })
            }
            // all_keys_100k: an absolute target, the Python reference's seconds.
            (Some((Better::Lower, x)), None, None)
                if r.name.starts_with("memory_ratio") || r.name == "all_keys_100k" =>
            {
                (format!("≤{x}"), if r.ours <= x { "yes" } else { "NO" })
            }
            (Some((Better::Higher, x)), None, None) if r.name.starts_with("memory_ratio") => {
                (format!("≥{x}"), if r.ours >= x { "yes" } else { "NO" })
            }
            _ => (String::new(), ""),
        };
        let ours = format!("{} {}", fmt(r.ours), r.unit);
        let _ = writeln!(
            out,
            "| {:<32} | {:>16} | {:>12} | {:>7} | {:>7} | {:<4} |",
            r.name,
            ours.trim(),
            r.reference.map(fmt).unwrap_or_else(|| "-".into()),
            r.ratio()
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into()),
            target,
            met
        );
    }
}
