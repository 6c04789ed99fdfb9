//! Text from the wire made safe to show to a person.
//!
//! Every string in a reply (host names, error messages, log lines, machine
//! names) was written by the builder, by Nix, by a flake's author or, without
//! `--builder-key`, by anyone who may publish on the bus. Printed raw, a
//! control character is an instruction to the terminal: ESC and the C1 CSI
//! move the cursor, erase lines, set the window title or write the clipboard
//! (OSC 52), BEL rings, a carriage return overwrites what was printed, and
//! the Unicode bidi controls reorder what the reader sees.
//!
//! The CLI and the MCP server pass every wire string through this module
//! before it is shown: such characters become visible escapes (`\x1b`,
//! `\u{202e}`), so nothing is lost and nothing is interpreted.

use std::borrow::Cow;

/// Whether `c` would act on a terminal (or on the reading order) instead of
/// being shown: C0 controls, DEL, C1 controls and the bidi embeddings,
/// overrides, isolates and marks. Tab and line feed are decided by the
/// caller.
fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{61c}' | '\u{200e}' | '\u{200f}'
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape(c: char, out: &mut String) {
    let code = u32::from(c);
    if code <= 0xff {
        out.push_str(&format!("\\x{code:02x}"));
    } else {
        out.push_str(&format!("\\u{{{code:x}}}"));
    }
}

fn escape_where(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| is_unsafe(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) && !keep(c) {
            escape(c, &mut out);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` for printing as one or more lines: line feeds and tabs stay,
/// every other control character is escaped.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape_where(text, |c| c == '\n' || c == '\t')
}

/// `text` for a place that must stay on one line (a status line redrawn in
/// place): line feeds are escaped too.
pub fn printable_line(text: &str) -> Cow<'_, str> {
    escape_where(text, |c| c == '\t')
}

/// A JSON document as received (already parsed, so valid JSON) for
/// printing: the same JSON value with no control character left raw. In
/// valid JSON, raw tab, CR and LF can only stand between tokens, where a
/// space means the same; every other such character can only be inside a
/// string, where its `\uXXXX` escape means the same.
pub fn printable_json(raw: &[u8]) -> Cow<'_, [u8]> {
    let Ok(text) = std::str::from_utf8(raw) else {
        // Not UTF-8 cannot have parsed as JSON; never print it raw.
        return Cow::Owned(
            printable(&String::from_utf8_lossy(raw))
                .into_owned()
                .into_bytes(),
        );
    };
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' | '\n' | '\r' => out.push(' '),
            c if is_unsafe(c) => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let text = "[1/2] ns1: success in 1.5s -> /nix/store/x-ns1\n  tab\there ✓";
        assert!(matches!(printable(text), Cow::Borrowed(t) if t == text));
    }

    #[test]
    fn terminal_control_sequences_become_visible_escapes() {
        // A window title, an OSC 52 clipboard write, cursor up + erase, a
        // carriage return, BEL, a C1 CSI and a right-to-left override.
        let hostile =
            "a\x1b]0;pwned\x07b\x1b]52;c;ZWNobw==\x07c\x1b[1A\x1b[2K\rd\u{9b}31me\u{202e}f\x7f";
        let shown = printable(hostile);
        assert_eq!(
            shown,
            "a\\x1b]0;pwned\\x07b\\x1b]52;c;ZWNobw==\\x07c\\x1b[1A\\x1b[2K\\x0dd\\x9b31me\\u{202e}f\\x7f"
        );
        assert!(!shown.chars().any(is_unsafe));
    }

    #[test]
    fn line_feeds_stay_in_text_but_not_on_a_status_line() {
        assert_eq!(printable("a\nb"), "a\nb");
        assert_eq!(printable_line("a\nb\tc"), "a\\x0ab\tc");
    }

    #[test]
    fn json_keeps_its_value_and_loses_raw_controls() {
        let raw = "{\"host\":\"a\u{9b}b\u{2066}\",\r\n\"n\":\"\\u001b\x7f\"}".as_bytes();
        let shown = printable_json(raw);
        let text = std::str::from_utf8(&shown).unwrap();
        assert!(!text.chars().any(is_unsafe), "{text:?}");
        let before: serde_json::Value = serde_json::from_slice(raw).unwrap();
        let after: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(before, after);
        let clean = br#"{"host":"ns1"}"#;
        assert!(matches!(printable_json(clean), Cow::Borrowed(_)));
    }
}
