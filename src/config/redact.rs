//! URLs as logs and errors show them: without passwords.

/// A URL (or comma-separated URLs) with any password replaced by `<redacted>`.
///
/// Written for URLs that do not parse too (that is when one lands in an error message): a raw
/// `/`, `?`, `@` or `,` inside a password must not leave part of it visible, so the user
/// information runs to the last `@` of its URL, and a comma starts a new URL only when a scheme
/// (`name://`) follows it.
pub fn redact_url(url: &str) -> String {
    split_urls(url)
        .iter()
        .map(|one| {
            let Some(scheme_end) = one.find("://") else {
                return one.to_string();
            };
            let rest = &one[scheme_end + 3..];
            let Some(at) = rest.rfind('@') else {
                return one.to_string();
            };
            let userinfo = &rest[..at];
            let redacted = match userinfo.find(':') {
                Some(colon) => format!("{}:<redacted>", &userinfo[..colon]),
                None => "<redacted>".to_string(),
            };
            format!("{}{}{}", &one[..scheme_end + 3], redacted, &rest[at..])
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The URL `one` of `value` (one of [`RedisConfig::urls`]) as errors show it: `value` is
/// redacted whole and then split, so a password is never cut apart from its URL's `@` (cut at
/// a comma, `redis://u:pa,ss@h` used to print `redis://u:pa`).
pub(super) fn shown_url(value: &str, one: &str) -> String {
    let redacted = redact_url(value);
    let index = split_urls(value)
        .into_iter()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .position(|u| std::ptr::eq(u, one));
    let pieces: Vec<&str> = split_urls(&redacted)
        .into_iter()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    match index.and_then(|i| pieces.get(i)) {
        Some(piece) => piece.to_string(),
        None => redacted,
    }
}

/// `url` split at the commas that are followed by a scheme (`redis://`, `rediss://`, ...).
pub(super) fn split_urls(url: &str) -> Vec<&str> {
    let starts_url = |s: &str| {
        s.trim_start().find("://").is_some_and(|i| {
            let scheme = &s.trim_start()[..i];
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        })
    };
    let mut out: Vec<&str> = Vec::new();
    let mut start = 0;
    for (i, _) in url.match_indices(',') {
        if starts_url(&url[i + 1..]) {
            out.push(&url[start..i]);
            start = i + 1;
        }
    }
    out.push(&url[start..]);
    out
}

/// True when `url` carries user information (a name or a password before an `@`).
pub(crate) fn has_userinfo(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(_, rest)| rest.contains('@'))
}
