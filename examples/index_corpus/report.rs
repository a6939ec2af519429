//! The community report of a document, built from its chunks' answers.

use graphrag_kv::llm_hash::compute_mdhash_id;
use serde_json::{json, Value};

use crate::corpus::Doc;

/// One community report per document, in nano-graphrag's shape (`report_string`, `report_json`
/// with title, summary, rating and findings), built from the chunk answers.
pub(crate) fn community_report(doc: &Doc, answers: &[String]) -> (String, Value) {
    let title = doc_title(doc);
    let parsed: Vec<(String, Vec<String>)> = answers.iter().map(|a| parse_answer(a)).collect();
    let summary = parsed.first().map(|(s, _)| s.clone()).unwrap_or_default();
    let mut terms: Vec<String> = Vec::new();
    for (_, ts) in &parsed {
        for t in ts {
            if !terms.iter().any(|x| x.eq_ignore_ascii_case(t)) {
                terms.push(t.clone());
            }
        }
    }
    let findings: Vec<Value> = parsed
        .iter()
        .enumerate()
        .map(|(i, (s, ts))| {
            json!({
                "summary": format!("Part {} of {}: {}", i + 1, parsed.len(), ts.join(", ")),
                "explanation": s,
            })
        })
        .collect();
    let mut report_string = format!("# {title}\n\n{summary}\n");
    if !terms.is_empty() {
        report_string.push_str(&format!("\nKey terms: {}\n", terms.join(", ")));
    }
    for f in &findings {
        report_string.push_str(&format!(
            "\n## {}\n\n{}\n",
            f["summary"].as_str().unwrap_or(""),
            f["explanation"].as_str().unwrap_or("")
        ));
    }
    let report = json!({
        "report_string": report_string,
        "report_json": {
            "title": title,
            "summary": summary,
            "rating": (terms.len() as f64).min(10.0),
            "rating_explanation": "number of distinct key terms, at most 10",
            "findings": findings,
        },
        "level": 0,
        "title": title,
        "source": doc.name,
        "full_doc_id": doc.id,
        "chunk_ids": doc.chunk_ids,
        "occurrence": 1.0,
        "sub_communities": [],
    });
    let id = compute_mdhash_id(&doc.id, "report-");
    (id, report)
}

/// The document's first line when it looks like a title (a Markdown heading or a short line),
/// else its file name.
fn doc_title(doc: &Doc) -> String {
    let first = doc.content.lines().next().unwrap_or("").trim();
    let heading = first.trim_start_matches('#').trim();
    if !heading.is_empty() && heading.len() <= 120 && !heading.ends_with('.') {
        heading.to_string()
    } else {
        doc.name.clone()
    }
}

/// The `SUMMARY:` and `KEY TERMS:` lines of an answer; an answer without them is all summary.
fn parse_answer(answer: &str) -> (String, Vec<String>) {
    let mut summary = None;
    let mut terms = Vec::new();
    for line in answer.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix("SUMMARY:") {
            summary = Some(s.trim().to_string());
        } else if let Some(t) = line.strip_prefix("KEY TERMS:") {
            terms = t
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
        }
    }
    (summary.unwrap_or_else(|| answer.trim().to_string()), terms)
}
