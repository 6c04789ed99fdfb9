//! Status badges (`/badge/<repo>/<host>.svg`, `/badge/<repo>.svg`): a
//! standalone SVG (`image/svg+xml`) reading `label | status`, the status
//! on its colour, the width following the text.

use super::html::text;
use crate::protocol::HostStatus;

/// The content type to serve a badge with.
pub const CONTENT_TYPE: &str = "image/svg+xml";

const LABEL_COLOUR: &str = "#555";
/// Space left and right of each text.
const PADDING: u32 = 6;
const HEIGHT: u32 = 20;

/// The word and the colour for a status.
fn reading(status: Option<HostStatus>) -> (&'static str, &'static str) {
    match status {
        Some(HostStatus::Success) => ("success", "#2e9e44"),
        Some(HostStatus::Failed) => ("failed", "#d9453b"),
        Some(HostStatus::Timeout) => ("timeout", "#ec7a22"),
        Some(HostStatus::Cancelled) => ("cancelled", "#8a8a8a"),
        None => ("unknown", "#8a8a8a"),
    }
}

/// Roughly how wide `text` is at 11px in a sans-serif face, in tenths of
/// a pixel: close enough that the text fits its box.
fn text_width(text: &str) -> u32 {
    text.chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '|' | '!' | '\'' => 35,
            'f' | 't' | 'r' | 'I' | ' ' | '(' | ')' | '[' | ']' | '/' | '-' => 45,
            'm' | 'w' | 'M' | 'W' => 100,
            c if c.is_ascii_uppercase() => 80,
            c if c.is_ascii_digit() => 70,
            c if c.is_ascii() => 65,
            // Wide scripts and symbols: err on the wide side.
            _ => 110,
        })
        .sum::<u32>()
        .div_ceil(10)
}

/// A badge reading `label | status`; `None`: no result yet.
pub fn badge(label: &str, status: Option<HostStatus>) -> String {
    let (word, colour) = reading(status);
    let label_width = text_width(label) + 2 * PADDING;
    let word_width = text_width(word) + 2 * PADDING;
    let width = label_width + word_width;
    let label_middle = label_width * 10 / 2;
    let word_middle = (label_width * 2 + word_width) * 10 / 2;
    let label = text(label);
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{HEIGHT}\" \
         role=\"img\" aria-label=\"{label}: {word}\"><title>{label}: {word}</title>\
         <linearGradient id=\"s\" x2=\"0\" y2=\"100%\"><stop offset=\"0\" stop-color=\"#fff\" \
         stop-opacity=\".1\"/><stop offset=\"1\" stop-opacity=\".1\"/></linearGradient>\
         <clipPath id=\"r\"><rect width=\"{width}\" height=\"{HEIGHT}\" rx=\"3\"/></clipPath>\
         <g clip-path=\"url(#r)\"><rect width=\"{label_width}\" height=\"{HEIGHT}\" \
         fill=\"{LABEL_COLOUR}\"/><rect x=\"{label_width}\" width=\"{word_width}\" \
         height=\"{HEIGHT}\" fill=\"{colour}\"/><rect width=\"{width}\" height=\"{HEIGHT}\" \
         fill=\"url(#s)\"/></g>\
         <g fill=\"#fff\" text-anchor=\"middle\" \
         font-family=\"Verdana,DejaVu Sans,Geneva,sans-serif\" font-size=\"110\">\
         <text x=\"{label_middle}\" y=\"150\" fill=\"#010101\" fill-opacity=\".3\" \
         transform=\"scale(.1)\">{label}</text>\
         <text x=\"{label_middle}\" y=\"140\" transform=\"scale(.1)\">{label}</text>\
         <text x=\"{word_middle}\" y=\"150\" fill=\"#010101\" fill-opacity=\".3\" \
         transform=\"scale(.1)\">{word}</text>\
         <text x=\"{word_middle}\" y=\"140\" transform=\"scale(.1)\">{word}</text></g></svg>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn width(svg: &str) -> u32 {
        let start = svg.find(" width=\"").unwrap() + 8;
        let end = start + svg[start..].find('"').unwrap();
        svg[start..end].parse().unwrap()
    }

    #[test]
    fn each_status_has_its_word_and_colour() {
        let cases = [
            (Some(HostStatus::Success), "success", "#2e9e44"),
            (Some(HostStatus::Failed), "failed", "#d9453b"),
            (Some(HostStatus::Timeout), "timeout", "#ec7a22"),
            (Some(HostStatus::Cancelled), "cancelled", "#8a8a8a"),
            (None, "unknown", "#8a8a8a"),
        ];
        for (status, word, colour) in cases {
            let svg = badge("web-01", status);
            assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
            assert!(svg.contains(&format!(">{word}</text>")), "{svg}");
            assert!(svg.contains(&format!("fill=\"{colour}\"")), "{svg}");
            assert!(
                svg.contains(&format!("<title>web-01: {word}</title>")),
                "{svg}"
            );
        }
        assert_ne!(reading(Some(HostStatus::Success)).1, reading(None).1);
        assert_ne!(
            reading(Some(HostStatus::Failed)).1,
            reading(Some(HostStatus::Timeout)).1
        );
    }

    #[test]
    fn the_width_follows_the_label() {
        let short = width(&badge("db", Some(HostStatus::Success)));
        let long = width(&badge(
            "nixos-servers/web-frontend-01",
            Some(HostStatus::Success),
        ));
        assert!(long > short + 100, "{short} {long}");
        // The label's box and the status's box fill the width exactly.
        let svg = badge("db", Some(HostStatus::Success));
        let label_box = text_width("db") + 2 * PADDING;
        let word_box = text_width("success") + 2 * PADDING;
        assert_eq!(short, label_box + word_box);
        assert!(svg.contains(&format!("<rect x=\"{label_box}\" width=\"{word_box}\"")));
    }

    #[test]
    fn labels_are_escaped() {
        let svg = badge("<script>alert(1)</script>&", None);
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;&amp;"));
    }
}
