//! How an event is printed for a person or a program: the one format
//! shared by `procmond --foreground` and `daemoneye-cli events`, so a line
//! reads the same whichever tool printed it; and [`printable`], through
//! which any text that comes from a process reaches a terminal or a log.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::event::EventEnvelope;

/// A string from a process (name, command line, path, user) made safe to
/// print on one terminal line: control characters (newline, tab, escape,
/// C1) and bidirectional overrides become escapes like `\n` and
/// `\u{1b}`, so a hostile command line can neither forge lines of output
/// nor send the terminal escape sequences. Anything else is unchanged.
pub fn printable(s: &str) -> Cow<'_, str> {
    let needs_escape =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            // `escape_debug` gives `\n`, `\t`, `\r` and `\u{..}` for these.
            let _ = write!(out, "{}", c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// One readable line: `#<seq> <kind> pid=… ppid=… user=… name=… exe=…`
/// (see [`crate::event::ProcessEvent::human_line`]), without a newline.
pub fn human_line(env: &EventEnvelope) -> String {
    format!("#{:<6} {}", env.seq, env.event.human_line())
}

/// The envelope as one JSON object on one line, without a newline.
pub fn json_line(env: &EventEnvelope) -> String {
    // Serializing plain data (string keys, no maps with non-string keys)
    // to JSON cannot fail.
    serde_json::to_string(env).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, ProcessEvent};

    #[test]
    fn printable_escapes_control_characters_and_leaves_the_rest() {
        assert!(matches!(printable("/usr/bin/sshd -D é ✓"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\nb\tc\rd\u{1b}[31m\u{7f}\u{9b}\u{202e}"),
            "a\\nb\\tc\\rd\\u{1b}[31m\\u{7f}\\u{9b}\\u{202e}"
        );
    }

    #[test]
    fn both_formats_are_one_line_naming_the_process() {
        let env = EventEnvelope {
            collector_id: "c1".to_owned(),
            stream_id: 7,
            seq: 42,
            event: ProcessEvent {
                kind: EventKind::Started,
                snapshot: false,
                changes: Vec::new(),
                observed_unix_ms: 1_000,
                process: crate::testing::record(10, 5, "sshd"),
                sha256: None,
                source: crate::event::EventSource::Poll,
                late: None,
                exit: None,
            },
        };
        let human = human_line(&env);
        assert!(human.starts_with("#42     started"), "{human}");
        assert!(human.contains("pid=10") && human.contains("name=\"sshd\""), "{human}");
        let json = json_line(&env);
        assert!(!json.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["seq"], 42);
        assert_eq!(value["collector_id"], "c1");
    }
}
