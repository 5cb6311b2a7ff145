//! Requests in flight: each is registered in the shared `Wire` (under its
//! lock, before its frame can go out) and waits there for its replies (or
//! the broker's `NoReply`), which the reactor matches and hands to the
//! caller, until its deadline, on an unguessable inbox topic.

use super::*;

/// A request waiting for its replies.
pub(super) struct Pending {
    /// Where replies (and `NoReply` news) go.
    pub(super) reply: Sender<Result<Message, ClientError>>,
    pub(super) deadline: Instant,
    /// The token of its inbox topic.
    pub(super) token: u64,
    pub(super) topic: String,
    /// Replies are taken until the deadline, not just the first.
    pub(super) many: bool,
    /// `many`: who has answered (one answer per responder is handed over).
    pub(super) answered: HashSet<String>,
}

impl Wire {
    /// The pending request an inbox topic `...r<n>x<token>` belongs to. A
    /// reply whose token does not match its request (a guess) is dropped,
    /// and the request still waits.
    pub(super) fn pending_for(&self, topic: &str, from: &str, client_id: &str) -> Option<u64> {
        let parsed = topic
            .rsplit('.')
            .next()
            .and_then(|t| t.strip_prefix('r'))
            .and_then(|t| t.split_once('x'))
            .and_then(|(n, tok)| Some((n.parse::<u64>().ok()?, u64::from_str_radix(tok, 16).ok()?)));
        let matching = parsed.filter(|(n, tok)| self.requests.get(n).is_some_and(|r| r.token == *tok));
        if parsed.is_some() && matching.is_none() {
            log::debug!(
                "bus client {}: dropped a reply from {from} to an unknown or finished request {topic}",
                client_id
            );
        }
        matching.map(|(n, _)| n)
    }

    /// Hands a reply (or news of one that will not come) to request `n`; a
    /// single request ends with it, a `request_all` only when `last`.
    pub(super) fn answer(&mut self, n: u64, r: Result<Message, ClientError>, last: bool, client_id: &str) {
        let Some(p) = self.requests.get(&n) else { return };
        if !p.many || last {
            if let Some(p) = self.requests.remove(&n) {
                let _ = p.reply.try_send(r);
            }
            return;
        }
        if p.reply.try_send(r).is_err() {
            log::warn!(
                "bus client {}: more than {MAX_REPLIES} replies to one request, or nobody reading; dropped",
                client_id
            );
        }
    }

    pub(super) fn expire_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> =
            self.requests.iter().filter(|(_, r)| r.deadline <= now).map(|(n, _)| *n).collect();
        for n in expired {
            if let Some(p) = self.requests.remove(&n)
                && !p.many
            {
                // A `request_all` ends by its channel closing.
                let _ = p.reply.try_send(Err(ClientError::Timeout(Duration::ZERO)));
            }
        }
    }
}
