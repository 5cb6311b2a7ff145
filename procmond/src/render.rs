//! How an event is printed for a person or a program: the one format
//! shared by `procmond --foreground` and `daemoneye-cli events`, so a line
//! reads the same whichever tool printed it.

use crate::event::EventEnvelope;

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
