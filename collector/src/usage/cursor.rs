//! Page tokens: where the next page of usage rows starts, opaque to the
//! client and checked when it comes back.
//!
//! A token names the last row answered by its key (tenant, node, start:
//! the node is empty in rows per tenant) and the
//! ledger revision the first page was answered at, so that every page of
//! one walk lists the adjustments up to the same revision. It is keyset
//! pagination: rows of minutes appended meanwhile neither shift nor repeat
//! the rows after it.
//!
//! *Boundary:* the token comes back from the client. It carries a digest
//! of its content and of the query it was made for: a garbled token, or
//! one sent with another query (other tenants, period, step, time zone,
//! anchor or `since_revision`), is refused as a `page_token` error. The
//! digest is not secret: a forged token can only point into rows the
//! caller's token may read anyway.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::UsageError;

const VERSION: &str = "p2";
/// Tokens of walks grouped by GPU: the GPU after the node, both
/// length-prefixed.
const VERSION_GPU: &str = "p3";
/// Tokens of walks begun before rows per node (tenant, start and revision
/// only, bound to the query without its `group_by`): still taken, so a
/// walk begun before an upgrade goes on after it.
const VERSION_1: &str = "p1";
const TAG: usize = 12;

/// Where the next page starts: after the row of `tenant` (on `node`,
/// grouped by node; empty otherwise) starting at `start` (Unix seconds);
/// adjustments up to `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub tenant: String,
    pub node: String,
    /// The GPU, grouped by GPU; empty otherwise.
    pub gpu: String,
    pub start: i64,
    pub revision: u64,
}

/// What a token is bound to: the query's parameters that decide its rows
/// (not `limit` or `format`, which may change from page to page).
pub fn fingerprint(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

fn tag(query: &[u8; 32], payload: &[u8]) -> [u8; TAG] {
    let mut h = Sha256::new();
    h.update(query);
    h.update(payload);
    let full: [u8; 32] = h.finalize().into();
    let mut t = [0; TAG];
    t.copy_from_slice(&full[..TAG]);
    t
}

impl Cursor {
    pub fn encode(&self, query: &[u8; 32]) -> String {
        // The node is length-prefixed: node ids are the agents' to choose
        // (and so are GPU UUIDs).
        let payload = if self.gpu.is_empty() {
            format!(
                "{VERSION}\n{}\n{}\n{}\n{}{}",
                self.revision,
                self.start,
                self.node.len(),
                self.node,
                self.tenant
            )
        } else {
            format!(
                "{VERSION_GPU}\n{}\n{}\n{}\n{}\n{}{}{}",
                self.revision,
                self.start,
                self.node.len(),
                self.gpu.len(),
                self.node,
                self.gpu,
                self.tenant
            )
        };
        let mut bytes = tag(query, payload.as_bytes()).to_vec();
        bytes.extend_from_slice(payload.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The cursor `token` holds, if it was made for `query`, or (a token
    /// of the first version) for `query_v1`, the same query as that
    /// version bound it (none where it cannot have made one: rows per
    /// node).
    pub fn decode(
        token: &str,
        query: &[u8; 32],
        query_v1: Option<&[u8; 32]>,
    ) -> Result<Self, UsageError> {
        let garbled =
            UsageError::PageToken("not a page token from this API (garbled or cut short)");
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| garbled.clone())?;
        if bytes.len() <= TAG {
            return Err(garbled);
        }
        let (t, payload) = bytes.split_at(TAG);
        if t != tag(query, payload) {
            if let Some(v1) = query_v1
                && t == tag(v1, payload)
            {
                return Self::decode_v1(payload).ok_or(garbled);
            }
            return Err(UsageError::PageToken(
                "does not belong to this query (the tenants, period, step, tz, anchor, since_revision and group_by must stay as on the first page), or was altered",
            ));
        }
        // The digest matched: the payload is one this code wrote.
        let text = std::str::from_utf8(payload).map_err(|_| garbled.clone())?;
        if let Some(rest) = text
            .strip_prefix(VERSION_GPU)
            .and_then(|t| t.strip_prefix('\n'))
        {
            let mut parts = rest.splitn(5, '\n');
            let (Some(revision), Some(start), Some(node_len), Some(gpu_len), Some(rest)) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err(garbled);
            };
            let node_len: usize = node_len.parse().map_err(|_| garbled.clone())?;
            let gpu_len: usize = gpu_len.parse().map_err(|_| garbled.clone())?;
            let gpu_end = node_len.checked_add(gpu_len).ok_or(garbled.clone())?;
            let (Some(node), Some(gpu), Some(tenant)) = (
                rest.get(..node_len),
                rest.get(node_len..gpu_end),
                rest.get(gpu_end..),
            ) else {
                return Err(garbled);
            };
            return Ok(Self {
                tenant: tenant.to_string(),
                node: node.to_string(),
                gpu: gpu.to_string(),
                start: start.parse().map_err(|_| garbled.clone())?,
                revision: revision.parse().map_err(|_| garbled.clone())?,
            });
        }
        let mut parts = text.splitn(5, '\n');
        let (Some(VERSION), Some(revision), Some(start), Some(node_len), Some(rest)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(garbled);
        };
        let node_len: usize = node_len.parse().map_err(|_| garbled.clone())?;
        let (Some(node), Some(tenant)) = (rest.get(..node_len), rest.get(node_len..)) else {
            return Err(garbled);
        };
        Ok(Self {
            tenant: tenant.to_string(),
            node: node.to_string(),
            gpu: String::new(),
            start: start.parse().map_err(|_| garbled.clone())?,
            revision: revision.parse().map_err(|_| garbled.clone())?,
        })
    }

    /// The token the first version made of this cursor (its node aside).
    #[cfg(test)]
    pub fn encode_v1(&self, query_v1: &[u8; 32]) -> String {
        let payload = format!(
            "{VERSION_1}\n{}\n{}\n{}",
            self.revision, self.start, self.tenant
        );
        let mut bytes = tag(query_v1, payload.as_bytes()).to_vec();
        bytes.extend_from_slice(payload.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A first-version payload: "p1", revision, start, tenant.
    fn decode_v1(payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.splitn(4, '\n');
        let (Some(VERSION_1), Some(revision), Some(start), Some(tenant)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Self {
            tenant: tenant.to_string(),
            node: String::new(),
            gpu: String::new(),
            start: start.parse().ok()?,
            revision: revision.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query() -> [u8; 32] {
        fingerprint(&["lab-a", "2027-01-01T00:00:00Z", "1h"])
    }

    #[test]
    fn a_token_round_trips_with_any_tenant_id() {
        for (tenant, gpu) in [
            ("lab-a", ""),
            ("", ""),
            ("with\nnewline", ""),
            ("ünï,cödé", ""),
            ("lab-a", "GPU-1"),
            ("with\nnewline", "MIG-\n2"),
            ("", "x"),
        ] {
            let c = Cursor {
                tenant: tenant.into(),
                node: format!("n\n{tenant}"),
                gpu: gpu.into(),
                start: 1_798_761_600,
                revision: u64::MAX,
            };
            let token = c.encode(&query());
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(Cursor::decode(&token, &query(), None), Ok(c));
        }
    }

    #[test]
    fn a_garbled_altered_or_foreign_token_is_refused() {
        let c = Cursor {
            tenant: "lab-a".into(),
            node: String::new(),
            gpu: String::new(),
            start: 1_798_761_600,
            revision: 7,
        };
        let token = c.encode(&query());
        let other = fingerprint(&["lab-b", "2027-01-01T00:00:00Z", "1h"]);
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [
            "",
            "!!!",
            "abc",
            &token[..token.len() - 3],
            &flipped,
            &format!("{token}AA"),
        ] {
            let e = Cursor::decode(bad, &query(), None).unwrap_err();
            assert!(matches!(e, UsageError::PageToken(_)), "{bad:?}: {e:?}");
            assert_eq!(e.param(), Some("page_token"));
        }
        assert!(matches!(
            Cursor::decode(&token, &other, None),
            Err(UsageError::PageToken(_))
        ));
    }

    /// A token as the first version wrote it ("p1", revision, start,
    /// tenant, bound to the query of that version): taken where that
    /// query is given, with no node; refused where it is not.
    #[test]
    fn a_first_version_token_is_taken_for_its_own_query() {
        let v1 = fingerprint(&["lab-a", "2027-01-01T00:00:00Z"]);
        let payload = "p1\n7\n1798761600\nlab-a";
        let mut bytes = tag(&v1, payload.as_bytes()).to_vec();
        bytes.extend_from_slice(payload.as_bytes());
        let token = URL_SAFE_NO_PAD.encode(bytes);
        let c = Cursor {
            tenant: "lab-a".into(),
            node: String::new(),
            gpu: String::new(),
            start: 1_798_761_600,
            revision: 7,
        };
        assert_eq!(c.encode_v1(&v1), token);
        assert_eq!(
            Cursor::decode(&token, &query(), Some(&v1)),
            Ok(Cursor {
                tenant: "lab-a".into(),
                node: String::new(),
                gpu: String::new(),
                start: 1_798_761_600,
                revision: 7,
            })
        );
        for legacy in [None, Some(&query())] {
            assert!(matches!(
                Cursor::decode(&token, &query(), legacy),
                Err(UsageError::PageToken(_))
            ));
        }
    }
}
