//! Escaping text for HTML.
