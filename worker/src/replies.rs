//! Which reply subjects the worker answers. A reply subject is data the sender chose: answering
//! it publishes with the worker's rights, which include the ring record, the leases and the
//! `appended.<id>` events. So the worker answers only inboxes (NATS_REPLY_PREFIXES) and never
//! its own inbox prefix (when it has one of its own), and counts what it refused (`logstore_replies_refused_total`).

/// The reply subjects the worker answers: those starting with one of `allowed`, except the
/// worker's own inboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPolicy {
    allowed: Vec<String>,
    /// The worker's own inbox prefix with its dot, when it has one of its own: answers to its
    /// JetStream requests arrive there, so a forged reply into it could pose as one. `None`
    /// for NATS's default `_INBOX`, which every client shares.
    own: Option<String>,
}

impl ReplyPolicy {
    /// `prefixes`: comma-separated; each is matched as given (`_INBOX.` matches `_INBOX.abc`,
    /// `_INBOX_` matches every per-user prefix). `own`: the worker's NATS_INBOX_PREFIX.
    pub fn new(prefixes: &str, own: &str) -> Result<ReplyPolicy, String> {
        let mut allowed = Vec::new();
        for prefix in prefixes.split(',').map(str::trim) {
            if prefix.is_empty() {
                continue;
            }
            if prefix.contains(|c: char| c.is_whitespace() || c == '*' || c == '>') {
                return Err(format!("{prefix:?} is not a subject prefix (no wildcards)"));
            }
            if prefix.len() < 3 {
                // A one- or two-character prefix would admit nearly any subject.
                return Err(format!("{prefix:?} is too short to name inboxes only"));
            }
            allowed.push(prefix.to_string());
        }
        if allowed.is_empty() {
            return Err("no prefix given: the worker could answer nobody".to_string());
        }
        Ok(ReplyPolicy {
            allowed,
            own: (own != "_INBOX").then(|| format!("{own}.")),
        })
    }

    /// Whether the worker may publish its answer to `reply`.
    pub fn admits(&self, reply: &str) -> bool {
        let own = self
            .own
            .as_deref()
            .is_some_and(|own| reply.starts_with(own));
        !own && self.allowed.iter().any(|p| reply.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> ReplyPolicy {
        ReplyPolicy::new("_INBOX.,_INBOX_,_R_.", "_INBOX_worker").expect("the default is valid")
    }

    #[test]
    fn inboxes_and_service_import_replies_are_answered() {
        let policy = default_policy();
        for reply in [
            "_INBOX.abc.1",
            "_INBOX_client.xyz",
            "_INBOX_admin.q.7",
            "_R_.aBc.dEf",
        ] {
            assert!(policy.admits(reply), "{reply}");
        }
    }

    #[test]
    fn coordination_subjects_and_the_workers_own_inbox_are_refused() {
        let policy = default_policy();
        for reply in [
            "$KV.logstore_ring.workers",
            "$KV.logstore_leases.intake.LOGS.workers",
            "$JS.API.STREAM.DELETE.LOGS",
            "appended.42",
            "logs",
            "dead_letter",
            "_INBOX_worker.AbC.1",
            "_INBOX",
            "_R_",
            "x_INBOX.abc",
        ] {
            assert!(!policy.admits(reply), "{reply}");
        }
    }

    #[test]
    fn the_shared_default_inbox_is_answered_when_the_worker_uses_it_too() {
        let policy = ReplyPolicy::new("_INBOX.,_INBOX_,_R_.", "_INBOX").expect("valid");
        assert!(policy.admits("_INBOX.abc.1"));
        assert!(!policy.admits("$KV.logstore_ring.workers"));
    }

    #[test]
    fn bad_prefix_lists_are_refused() {
        assert!(ReplyPolicy::new("", "_INBOX").is_err());
        assert!(ReplyPolicy::new(" , ", "_INBOX").is_err());
        assert!(ReplyPolicy::new("_INBOX.>", "_INBOX").is_err());
        assert!(ReplyPolicy::new("_", "_INBOX").is_err());
        assert_eq!(
            ReplyPolicy::new(" _INBOX. , my.replies. ", "_INBOX_w")
                .map(|p| p.admits("my.replies.1")),
            Ok(true)
        );
    }
}
