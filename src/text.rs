//! Text helpers that are not part of any protocol.

/// Cuts `text` to its last `max` bytes on a character boundary. Text that
/// may carry a credential is masked first ([`crate::redact::redact_owned`]).
pub fn keep_tail(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_kept_on_a_character_boundary() {
        assert_eq!(keep_tail("short".into(), 10), "short");
        assert_eq!(keep_tail("abcdef".into(), 3), "def");
        assert_eq!(keep_tail("ééé".into(), 3), "é");
    }
}
