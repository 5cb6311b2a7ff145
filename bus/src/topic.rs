//! Topics and subscription patterns, and the trie that matches one against
//! the other.
//!
//! A topic is dot-separated segments of `[a-z0-9_-]`, each non-empty, at
//! most [`MAX_TOPIC_LEN`] bytes and [`MAX_LEVELS`] segments in all. A
//! pattern may also use `+` for exactly one segment and `#`, only as the
//! last segment, for zero or more trailing segments (MQTT semantics:
//! `events.#` matches `events`). Matching walks the trie one level at a
//! time, so its cost grows with the topic's depth and the wildcards on the
//! way, never with the number of subscriptions.

use std::collections::HashMap;

/// Longest topic or pattern, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Most segments in a topic or pattern.
pub const MAX_LEVELS: usize = 16;

/// Why a topic or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// Empty string, or an empty segment (`a..b`, leading or trailing dot).
    #[error("topic {0:?} has an empty segment")]
    EmptySegment(String),
    /// Longer than [`MAX_TOPIC_LEN`] bytes or deeper than [`MAX_LEVELS`].
    #[error(
        "topic of {len} bytes and {levels} segments exceeds {MAX_TOPIC_LEN} bytes or {MAX_LEVELS} segments"
    )]
    TooLong {
        /// Length in bytes.
        len: usize,
        /// Number of segments.
        levels: usize,
    },
    /// A character outside `[a-z0-9_-]` (or a wildcard inside a segment).
    #[error("topic {topic:?} has invalid character {ch:?} (segments use a-z, 0-9, '_' and '-')")]
    BadChar {
        /// The topic.
        topic: String,
        /// The offending character.
        ch: char,
    },
    /// A wildcard in a topic that is published to.
    #[error("topic {0:?} has a wildcard; only subscription patterns may")]
    WildcardInTopic(String),
    /// `#` anywhere but the last segment.
    #[error("pattern {0:?} has '#' before its last segment")]
    HashNotLast(String),
}

fn check(s: &str, allow_wildcards: bool) -> Result<(), TopicError> {
    let levels = s.split('.').count();
    if s.len() > MAX_TOPIC_LEN || levels > MAX_LEVELS {
        return Err(TopicError::TooLong { len: s.len(), levels });
    }
    for (i, seg) in s.split('.').enumerate() {
        match seg {
            "" => return Err(TopicError::EmptySegment(s.to_owned())),
            "+" | "#" if !allow_wildcards => return Err(TopicError::WildcardInTopic(s.to_owned())),
            "#" if i + 1 != levels => return Err(TopicError::HashNotLast(s.to_owned())),
            "+" | "#" => {}
            _ => {
                if let Some(ch) = seg.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-')) {
                    return Err(TopicError::BadChar { topic: s.to_owned(), ch });
                }
            }
        }
    }
    Ok(())
}

/// Checks a topic that is published to (no wildcards).
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    check(topic, false)
}

/// Checks a subscription pattern.
pub fn validate_pattern(pattern: &str) -> Result<(), TopicError> {
    check(pattern, true)
}

/// Whether `pattern` matches `topic` (both assumed valid). The reference
/// definition the trie must agree with.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = topic.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `pattern` matches is also matched by `allowed`
/// (both assumed valid): the test for "may subscribe to this".
pub fn covers(allowed: &str, pattern: &str) -> bool {
    let mut a = allowed.split('.');
    let mut p = pattern.split('.');
    loop {
        match (a.next(), p.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(x), Some(y)) if x == y && x != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[derive(Debug)]
struct Node<T> {
    children: HashMap<Box<str>, Node<T>>,
    plus: Option<Box<Node<T>>>,
    /// Subscriptions whose pattern ends here.
    exact: Vec<T>,
    /// Subscriptions whose pattern is this node's path followed by `#`.
    hash: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node { children: HashMap::new(), plus: None, exact: Vec::new(), hash: Vec::new() }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.exact.is_empty() && self.hash.is_empty()
    }
}

/// Subscriptions indexed by pattern.
#[derive(Debug)]
pub struct TopicTrie<T> {
    root: Node<T>,
    len: usize,
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie { root: Node::default(), len: 0 }
    }
}

impl<T> TopicTrie<T> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of subscriptions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no subscription is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a subscription under a pattern (validated here).
    pub fn insert(&mut self, pattern: &str, value: T) -> Result<(), TopicError> {
        validate_pattern(pattern)?;
        let mut node = &mut self.root;
        for seg in pattern.split('.') {
            node = match seg {
                "#" => {
                    node.hash.push(value);
                    self.len += 1;
                    return Ok(());
                }
                "+" => node.plus.get_or_insert_with(Box::default),
                s => node.children.entry(s.into()).or_default(),
            };
        }
        node.exact.push(value);
        self.len += 1;
        Ok(())
    }

    /// Removes the subscriptions under `pattern` for which `pred` holds;
    /// returns how many. Empty branches are pruned.
    pub fn remove(&mut self, pattern: &str, mut pred: impl FnMut(&T) -> bool) -> usize {
        let segs: Vec<&str> = pattern.split('.').collect();
        let n = Self::remove_at(&mut self.root, &segs, &mut pred);
        self.len -= n;
        n
    }

    fn remove_at(node: &mut Node<T>, segs: &[&str], pred: &mut impl FnMut(&T) -> bool) -> usize {
        let Some((first, rest)) = segs.split_first() else {
            let before = node.exact.len();
            node.exact.retain(|v| !pred(v));
            return before - node.exact.len();
        };
        match *first {
            "#" => {
                let before = node.hash.len();
                node.hash.retain(|v| !pred(v));
                before - node.hash.len()
            }
            "+" => {
                let Some(child) = node.plus.as_deref_mut() else { return 0 };
                let n = Self::remove_at(child, rest, pred);
                if child.is_empty() {
                    node.plus = None;
                }
                n
            }
            s => {
                let Some(child) = node.children.get_mut(s) else { return 0 };
                let n = Self::remove_at(child, rest, pred);
                if child.is_empty() {
                    node.children.remove(s);
                }
                n
            }
        }
    }

    /// Calls `f` for every subscription whose pattern matches `topic`.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a T)) {
        let mut segs = [""; MAX_LEVELS];
        let mut n = 0;
        for s in topic.split('.') {
            if n == MAX_LEVELS {
                return; // an invalid topic matches nothing
            }
            segs[n] = s;
            n += 1;
        }
        Self::match_at(&self.root, &segs[..n], &mut f);
    }

    fn match_at<'a>(node: &'a Node<T>, segs: &[&str], f: &mut impl FnMut(&'a T)) {
        node.hash.iter().for_each(&mut *f);
        let Some((first, rest)) = segs.split_first() else {
            node.exact.iter().for_each(&mut *f);
            return;
        };
        if let Some(child) = node.children.get(*first) {
            Self::match_at(child, rest, f);
        }
        if let Some(child) = node.plus.as_deref() {
            Self::match_at(child, rest, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_table() {
        for ok in ["events", "events.process.started", "control.health.heartbeat.procmond-1", "a_b.c-d.9"] {
            assert_eq!(validate_topic(ok), Ok(()), "{ok}");
        }
        for ok in ["events.#", "#", "+", "events.process.+", "+.+.x", "control.health.heartbeat.+"] {
            assert_eq!(validate_pattern(ok), Ok(()), "{ok}");
        }
        assert!(matches!(validate_topic(""), Err(TopicError::EmptySegment(_))));
        assert!(matches!(validate_topic("a..b"), Err(TopicError::EmptySegment(_))));
        assert!(matches!(validate_topic(".a"), Err(TopicError::EmptySegment(_))));
        assert!(matches!(validate_topic("a."), Err(TopicError::EmptySegment(_))));
        assert!(matches!(validate_topic("Events"), Err(TopicError::BadChar { ch: 'E', .. })));
        assert!(matches!(validate_topic("a b"), Err(TopicError::BadChar { ch: ' ', .. })));
        assert!(matches!(validate_topic("a.+"), Err(TopicError::WildcardInTopic(_))));
        assert!(matches!(validate_topic("a.#"), Err(TopicError::WildcardInTopic(_))));
        assert!(matches!(validate_pattern("a.#.b"), Err(TopicError::HashNotLast(_))));
        assert!(matches!(validate_pattern("a+.b"), Err(TopicError::BadChar { ch: '+', .. })));
        assert!(matches!(validate_pattern("a.b#"), Err(TopicError::BadChar { ch: '#', .. })));
        let deep = vec!["a"; MAX_LEVELS + 1].join(".");
        assert!(matches!(validate_topic(&deep), Err(TopicError::TooLong { .. })));
        assert!(matches!(validate_topic(&"a".repeat(MAX_TOPIC_LEN + 1)), Err(TopicError::TooLong { .. })));
    }

    #[test]
    fn matching_edge_cases() {
        let table = [
            ("events.#", "events", true),
            ("events.#", "events.process.started", true),
            ("events.#", "eventsx", false),
            ("#", "anything.at.all", true),
            ("events.+", "events", false),
            ("events.+", "events.process", true),
            ("events.+", "events.process.started", false),
            ("events.process.+", "events.process.stopped", true),
            ("+.process.+", "events.process.stopped", true),
            ("+", "events", true),
            ("+", "events.process", false),
            ("+.#", "events", true),
            ("a.b", "a.b", true),
            ("a.b", "a.b.c", false),
            ("a.b.c", "a.b", false),
            ("a.+.c", "a.x.c", true),
            ("a.+.#", "a.x", true),
            ("a.+.#", "a", false),
        ];
        for (pattern, topic, want) in table {
            assert_eq!(matches(pattern, topic), want, "reference: {pattern} ~ {topic}");
            let mut trie = TopicTrie::new();
            trie.insert(pattern, ()).expect("valid pattern");
            let mut n = 0;
            trie.for_each_match(topic, |_| n += 1);
            assert_eq!(n == 1, want, "trie: {pattern} ~ {topic}");
        }
    }

    #[test]
    fn covering_patterns() {
        let table = [
            ("events.process.#", "events.process.+", true),
            ("events.process.#", "events.process.started", true),
            ("events.process.#", "events.#", false),
            ("events.+", "events.x", true),
            ("events.+", "events.+", true),
            ("events.+", "events.#", false),
            ("events.x", "events.+", false),
            ("#", "anything.#", true),
            ("a.b", "a.b", true),
            ("a.b", "a.b.c", false),
            ("a.+.c", "a.+.c", true),
            ("a.+.c", "a.+.#", false),
        ];
        for (allowed, pattern, want) in table {
            assert_eq!(covers(allowed, pattern), want, "{allowed} covers {pattern}");
        }
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut t = TopicTrie::new();
        t.insert("a.+.c", 1).expect("insert");
        t.insert("a.+.c", 2).expect("insert");
        t.insert("a.#", 3).expect("insert");
        assert_eq!(t.len(), 3);
        assert_eq!(t.remove("a.+.c", |v| *v == 1), 1);
        assert_eq!(t.remove("a.x.c", |_| true), 0, "removal is by pattern, not by matching");
        let mut got = Vec::new();
        t.for_each_match("a.b.c", |v| got.push(*v));
        got.sort();
        assert_eq!(got, vec![2, 3]);
        assert_eq!(t.remove("a.+.c", |_| true), 1);
        assert_eq!(t.remove("a.#", |_| true), 1);
        assert!(t.is_empty() && t.root.is_empty(), "empty branches are pruned");
    }
}
