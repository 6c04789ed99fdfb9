//! Escaping text for HTML, and the small pieces every page shares: sizes,
//! durations, times, revisions and the page around the content.
//!
//! Everything shown comes from the wire or from Nix (error messages are
//! the tail of what Nix said; package names come from store paths), so
//! every piece of data goes through [`text`]: credentials masked (they are
//! masked upstream too), control characters made visible, then escaped.

use crate::printable::printable;
use crate::redact::redact;

/// The style sheet inlined into every page.
const CSS: &str = include_str!("assets/page.css");
/// The script inlined into every page: it makes the page live.
const SCRIPT: &str = include_str!("assets/live.js");

/// `text` escaped for HTML text and for (double- or single-quoted)
/// attribute values: `&`, `<`, `>`, `"` and `'`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Data for a page: credentials masked, control characters (but line
/// feeds and tabs) shown as escapes, then [`escape`]d.
pub fn text(data: &str) -> String {
    let masked = redact(data);
    escape(&printable(&masked))
}

/// A path segment of a link (`/hosts/<repo>/<host>`): every byte but the
/// unreserved ones percent-encoded; safe in an attribute as it is.
pub fn segment(data: &str) -> String {
    let mut out = String::with_capacity(data.len());
    for byte in data.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `<a href="/builds/<id>">id</a>`.
pub fn build_link(build_id: &str) -> String {
    format!(
        "<a href=\"/builds/{}\"><code>{}</code></a>",
        segment(build_id),
        text(build_id)
    )
}

/// `<a href="/hosts/<repo>/<host>">host</a>`.
pub fn host_link(repo: &str, host: &str) -> String {
    format!(
        "<a href=\"/hosts/{}/{}\">{}</a>",
        segment(repo),
        segment(host),
        text(host)
    )
}

/// A size in bytes with a binary unit: `412 B`, `10.0 KiB`, `1.2 GiB`.
pub fn size(bytes: u64) -> String {
    crate::present::human_size(bytes)
}

/// A size change with its sign: `+12.0 MiB`, `-412 B`, `+0 B`.
pub fn size_delta(delta: i64) -> String {
    crate::present::human_size_delta(delta)
}

/// A duration as people read build times: `850ms`, `12s`, `1m 12s`,
/// `2h 05m`.
pub fn duration(ms: u64) -> String {
    let secs = ms / 1000;
    if ms < 1000 {
        format!("{ms}ms")
    } else if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// A commit as people quote it: its first 12 characters, `–` for none.
pub fn short_rev(rev: Option<&str>) -> String {
    match rev {
        Some(rev) => text(rev.get(..12).unwrap_or(rev)),
        None => "–".to_owned(),
    }
}

/// An RFC 3339 time as people read it: `2026-12-07 02:00:00 UTC`
/// (unescaped).
pub fn time_text(rfc3339: &str) -> String {
    let shown = rfc3339.replacen('T', " ", 1);
    match shown.strip_suffix('Z') {
        Some(utc) => format!("{utc} UTC"),
        None => shown,
    }
}

/// An RFC 3339 time as a `<time>` element reading `2026-12-07 02:00:00 UTC`.
pub fn time(rfc3339: &str) -> String {
    format!(
        "<time datetime=\"{}\">{}</time>",
        text(rfc3339),
        text(&time_text(rfc3339))
    )
}

/// [`time`], or `–` for none.
pub fn maybe_time(rfc3339: Option<&str>) -> String {
    rfc3339.map_or_else(|| "–".to_owned(), time)
}

/// A whole page: `title` (already escaped), the `<body>`'s attributes
/// (already escaped, each with its leading space) and its content; a
/// `live` page says in its footer that it follows the builder's events.
pub fn page(title: &str, body_attributes: &str, content: &str, live: bool) -> String {
    let footer = if live {
        "<footer>This page updates live while it is open.</footer>\n"
    } else {
        ""
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{CSS}</style></head>\n\
         <body{body_attributes}>\n{content}\n\
         {footer}<script>{SCRIPT}</script></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(
            escape(r#"<a href="x" onclick='y'>&amp;</a>"#),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
        );
        assert_eq!(escape("plain – text"), "plain – text");
    }

    #[test]
    fn data_is_masked_and_controls_are_shown() {
        let shown = text("fetching https://oauth2:glpat-SECRET@git.example/r.git\u{1b}[31m <b>");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("https://***@git.example/r.git"), "{shown}");
        assert!(shown.contains("\\x1b[31m &lt;b&gt;"), "{shown}");
        assert_eq!(text("two\nlines"), "two\nlines");
    }

    #[test]
    fn links_encode_their_segments() {
        assert_eq!(
            host_link("nix os", "a\"b"),
            "<a href=\"/hosts/nix%20os/a%22b\">a&quot;b</a>"
        );
        assert_eq!(segment("web-01_x.y~"), "web-01_x.y~");
        assert_eq!(segment("../é"), "..%2F%C3%A9");
    }

    #[test]
    fn numbers_read_like_people_write_them() {
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(12_300), "12s");
        assert_eq!(duration(72_000), "1m 12s");
        assert_eq!(duration(7_500_000), "2h 05m");
        assert_eq!(size(1_288_490_189), "1.2 GiB");
        assert_eq!(size_delta(12 * 1024 * 1024), "+12.0 MiB");
        assert_eq!(size_delta(-412), "-412 B");
        assert_eq!(
            short_rev(Some("609da7ab2bec60c568928f7e8d760a36e14805b0")),
            "609da7ab2bec"
        );
        assert_eq!(short_rev(None), "–");
        assert_eq!(
            time("2026-12-07T02:00:00Z"),
            "<time datetime=\"2026-12-07T02:00:00Z\">2026-12-07 02:00:00 UTC</time>"
        );
    }
}
