//! Expiry per namespace, and the `REDIS_TTL_*` variable names.

use std::collections::BTreeMap;

use crate::store::{COMMUNITY_REPORTS, FULL_DOCS, LLM_RESPONSE_CACHE, TEXT_CHUNKS};

/// Expiry per namespace, in seconds; 0 means keys never expire.
///
/// Defaults: `llm_response_cache` 43200 (12 h); `full_docs`, `text_chunks`, `community_reports`
/// and every other namespace 0. Community reports are index data, not cache: a default expiry
/// would make queries lose them a day after indexing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlTable {
    pub(super) by_namespace: BTreeMap<String, u64>,
    /// `REDIS_TTL_<NAME>` values for namespaces not known when the config was read, keyed by
    /// `<NAME>`.
    pub(super) by_env_name: BTreeMap<String, u64>,
}

impl Default for TtlTable {
    fn default() -> Self {
        let mut by_namespace = BTreeMap::new();
        by_namespace.insert(LLM_RESPONSE_CACHE.to_string(), 43_200);
        by_namespace.insert(COMMUNITY_REPORTS.to_string(), 0);
        by_namespace.insert(TEXT_CHUNKS.to_string(), 0);
        by_namespace.insert(FULL_DOCS.to_string(), 0);
        TtlTable {
            by_namespace,
            by_env_name: BTreeMap::new(),
        }
    }
}

/// The documented variable names of the four namespaces, and the reference implementation's
/// `REDIS_TTL_{NAMESPACE}` names, accepted as well.
pub(super) const TTL_VARIABLES: [(&str, &str, &str); 4] = [
    (
        LLM_RESPONSE_CACHE,
        "REDIS_TTL_LLM_CACHE",
        "REDIS_TTL_LLM_RESPONSE_CACHE",
    ),
    (
        COMMUNITY_REPORTS,
        "REDIS_TTL_COMMUNITY_REPORTS",
        "REDIS_TTL_COMMUNITY_REPORTS",
    ),
    (TEXT_CHUNKS, "REDIS_TTL_CHUNKS", "REDIS_TTL_TEXT_CHUNKS"),
    (FULL_DOCS, "REDIS_TTL_DOCS", "REDIS_TTL_FULL_DOCS"),
];

impl TtlTable {
    /// The TTL applied to new writes in `namespace`, in seconds (0 = none).
    pub fn ttl_for(&self, namespace: &str) -> u64 {
        if let Some(t) = self.by_namespace.get(namespace) {
            return *t;
        }
        let name = env_name(namespace);
        if is_reserved_ttl_name(&name) {
            return 0;
        }
        self.by_env_name.get(&name).copied().unwrap_or(0)
    }

    /// Sets the TTL of one namespace.
    pub fn set(&mut self, namespace: &str, seconds: u64) {
        self.by_namespace.insert(namespace.to_string(), seconds);
    }
}

/// `REDIS_TTL_` suffix for a namespace: upper-cased, `.` and `-` turned into `_`.
fn env_name(namespace: &str) -> String {
    namespace
        .chars()
        .map(|c| match c {
            '.' | '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// True when `REDIS_TTL_<name>` is one of the documented or reference names, whose meaning wins
/// over a namespace that happens to map to the same name.
pub(super) fn is_reserved_ttl_name(name: &str) -> bool {
    TTL_VARIABLES.iter().any(|(_, doc, reference)| {
        doc.strip_prefix("REDIS_TTL_") == Some(name)
            || reference.strip_prefix("REDIS_TTL_") == Some(name)
    })
}
