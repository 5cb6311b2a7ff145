//! Command-line sanitization (in progress).
