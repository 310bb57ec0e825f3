//! The audit trail's hash chain, sans-IO: who did what to which call or customer, when, and
//! whether it was allowed (PIPL Art. 55–56 processing records).
//!
//! Each entry carries the SHA-256 of the one before it, so editing, deleting or reordering
//! any entry breaks every link after it. Deleting the newest entries leaves a valid but
//! shorter chain; the store keeps the head (sequence number and hash) apart from the
//! entries, and `verify` compares the chain's end with it. Entries name calls and customers
//! only by their ids (a customer is a keyed hash), never by text or number.

use ring::digest;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an entry says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEvent {
    pub at_unix_ms: i64,
    /// Who: the peer's uid (SO_PEERCRED) and the role it was given.
    pub uid: u32,
    pub role: String,
    /// What: `transcript_read`, `export`, `forget`, `retention`, `key_rotation`, `refused` …
    pub action: String,
    /// Which call or customer (an id or keyed hash), or `-`.
    pub object: String,
    /// `ok`, or why it was refused or failed.
    pub outcome: String,
}

/// One entry as stored: the event, chained.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEntry {
    /// 1, 2, 3, … without gaps.
    pub seq: i64,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The previous entry's hash (zeros for the first).
    pub prev: String,
    pub hash: String,
}

/// The newest entry's sequence number and hash (kept apart from the chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: i64,
    pub hash: String,
}

impl ChainHead {
    pub fn empty() -> Self {
        Self { seq: 0, hash: GENESIS.to_owned() }
    }
}

/// Chains an event after `head`; the new head is the entry's (seq, hash).
pub fn chain(head: &ChainHead, event: AuditEvent) -> AuditEntry {
    let seq = head.seq + 1;
    let hash = entry_hash(seq, &event, &head.hash);
    AuditEntry { seq, event, prev: head.hash.clone(), hash }
}

fn entry_hash(seq: i64, e: &AuditEvent, prev: &str) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"callbox/audit/v1");
    for field in [
        &seq.to_be_bytes()[..],
        &e.at_unix_ms.to_be_bytes(),
        &e.uid.to_be_bytes(),
        e.role.as_bytes(),
        e.action.as_bytes(),
        e.object.as_bytes(),
        e.outcome.as_bytes(),
        prev.as_bytes(),
    ] {
        ctx.update(&(field.len() as u64).to_be_bytes());
        ctx.update(field);
    }
    crate::hex::encode(ctx.finish().as_ref())
}

/// The first broken link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at entry {seq}: {why}")]
pub struct BrokenChain {
    pub seq: i64,
    pub why: String,
}

/// Checks entries in stored order against each other and against the head kept apart.
/// Returns how many entries hold.
pub fn verify(entries: &[AuditEntry], head: &ChainHead) -> Result<usize, BrokenChain> {
    let mut expect = ChainHead::empty();
    for e in entries {
        let broken = |why: String| BrokenChain { seq: e.seq, why };
        if e.seq != expect.seq + 1 {
            return Err(broken(format!("follows entry {} (an entry was deleted or moved)", expect.seq)));
        }
        if e.prev != expect.hash {
            return Err(broken("does not link to the entry before it".into()));
        }
        if entry_hash(e.seq, &e.event, &e.prev) != e.hash {
            return Err(broken("its content does not match its hash (the entry was edited)".into()));
        }
        expect = ChainHead { seq: e.seq, hash: e.hash.clone() };
    }
    if expect != *head {
        return Err(BrokenChain {
            seq: expect.seq + 1,
            why: format!(
                "the chain ends at entry {} but the store's head says {} (entries at the end were removed)",
                expect.seq, head.seq
            ),
        });
    }
    Ok(entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: i64) -> AuditEvent {
        AuditEvent {
            at_unix_ms: 1_000 + i,
            uid: 0,
            role: "admin".into(),
            action: "transcript_read".into(),
            object: format!("call-{i}"),
            outcome: "ok".into(),
        }
    }

    fn chain_of(n: i64) -> (Vec<AuditEntry>, ChainHead) {
        let mut head = ChainHead::empty();
        let mut entries = Vec::new();
        for i in 0..n {
            let e = chain(&head, event(i));
            head = ChainHead { seq: e.seq, hash: e.hash.clone() };
            entries.push(e);
        }
        (entries, head)
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let (entries, head) = chain_of(5);
        assert_eq!(verify(&entries, &head), Ok(5));
        assert_eq!(verify(&[], &ChainHead::empty()), Ok(0));
    }

    #[test]
    fn edits_deletions_reorders_and_a_cut_tail_are_found_at_the_first_broken_entry() {
        let (entries, head) = chain_of(6);
        let mut edited = entries.clone();
        edited[2].event.object = "call-99".into();
        assert_eq!(verify(&edited, &head).unwrap_err().seq, 3);
        let mut edited_uid = entries.clone();
        edited_uid[4].event.uid = 1000;
        assert_eq!(verify(&edited_uid, &head).unwrap_err().seq, 5);

        let mut deleted = entries.clone();
        deleted.remove(3);
        assert_eq!(verify(&deleted, &head).unwrap_err().seq, 5);

        let mut reordered = entries.clone();
        reordered.swap(1, 2);
        assert_eq!(verify(&reordered, &head).unwrap_err().seq, 3);

        // A forger who renumbers and rehashes everything after an edit still cannot match
        // the head kept apart.
        let cut = &entries[..4];
        let err = verify(cut, &head).unwrap_err();
        assert_eq!(err.seq, 5);
        assert!(err.why.contains("removed"), "{err}");
    }
}
