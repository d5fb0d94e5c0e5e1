//! Enrollment with join tokens, as k3s agents join a server: the node keeps token
//! secrets; an agent proves it knows one, and the node proves it back, in one exchange
//! over the Noise-authenticated connection. The token never travels: each side sends an
//! HMAC over both peer IDs, a fresh nonce and the time, so a proof is worthless to
//! anyone else, for any other pair of peers, and (the node remembers recent nonces) a
//! second time.
//!
//! Pure logic: the [`TrustDoc`] the node persists, token rules and proofs. Storage is
//! in `store`.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, Mac};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::wire::{JoinRequest, PeerRef};

/// A proof older or newer than this (by the node's clock) is refused.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Nonces remembered against replay: more than any burst of joins within the window.
const NONCE_MEMORY: usize = 4096;
const ID_LEN: usize = 6;
const SECRET_LEN: usize = 16;
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error(
        "a join token looks like abcdef.0123456789abcdef (6 and 16 lowercase letters or digits)"
    )]
    Malformed,
    #[error("no such join token (revoked, or never created on this node)")]
    UnknownToken,
    #[error("the join token expired")]
    Expired,
    #[error("the join token has no uses left")]
    UsedUp,
    #[error("the proof does not match the token")]
    BadProof,
    #[error("the proof's time is more than 5 minutes off the node's clock")]
    Stale,
    #[error("the proof was already used")]
    Replayed,
}

impl JoinError {
    /// A short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            JoinError::Malformed => "malformed",
            JoinError::UnknownToken => "unknown_token",
            JoinError::Expired => "expired",
            JoinError::UsedUp => "used_up",
            JoinError::BadProof => "bad_proof",
            JoinError::Stale => "stale",
            JoinError::Replayed => "replayed",
        }
    }
}

/// `<id>.<secret>`: the id names the token in lists and logs; only the secret is secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    secret: String,
}

/// Never prints the secret.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}.****)", self.id)
    }
}

impl JoinToken {
    /// A new random token.
    pub fn generate() -> Result<JoinToken, getrandom::Error> {
        Ok(JoinToken {
            id: random_text(ID_LEN)?,
            secret: random_text(SECRET_LEN)?,
        })
    }

    /// The whole token, secret included, for the one place it is shown.
    pub fn reveal(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

impl FromStr for JoinToken {
    type Err = JoinError;

    fn from_str(text: &str) -> Result<Self, JoinError> {
        let (id, secret) = text.trim().split_once('.').ok_or(JoinError::Malformed)?;
        let valid =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b));
        if !valid(id, ID_LEN) || !valid(secret, SECRET_LEN) {
            return Err(JoinError::Malformed);
        }
        Ok(JoinToken {
            id: id.into(),
            secret: secret.into(),
        })
    }
}

/// Uniform letters and digits: bytes at or above 252 (7 x 36) are drawn again.
fn random_text(len: usize) -> Result<String, getrandom::Error> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 32];
    while out.len() < len {
        getrandom::getrandom(&mut buf)?;
        for b in buf.iter().filter(|b| **b < 252) {
            if out.len() < len {
                out.push(ALPHABET[usize::from(*b) % 36] as char);
            }
        }
    }
    Ok(out)
}

/// A fresh 128-bit nonce, hex.
pub fn nonce() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Who is proving: the two proofs of one exchange differ.
#[derive(Debug, Clone, Copy)]
enum Role {
    Agent,
    Node,
}

fn mac(
    token: &JoinToken,
    role: Role,
    agent: &PeerId,
    node: &PeerId,
    nonce: &str,
    sent_at_ms: u64,
) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(token.secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    let role = match role {
        Role::Agent => "agent",
        Role::Node => "node",
    };
    for field in [
        b"beemesh/join/v1".as_slice(),
        role.as_bytes(),
        token.id.as_bytes(),
        &agent.to_bytes(),
        &node.to_bytes(),
        nonce.as_bytes(),
        &sent_at_ms.to_be_bytes(),
    ] {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac
}

fn verify(mac: Hmac<Sha256>, proof: &str) -> bool {
    // verify_slice compares in constant time.
    hex::decode(proof).is_ok_and(|bytes| mac.verify_slice(&bytes).is_ok())
}

/// The agent's request: proof that it knows `token`, for this agent and node only.
pub fn request(
    token: &JoinToken,
    agent: &PeerId,
    node: &PeerId,
    nonce: String,
    sent_at_ms: u64,
) -> JoinRequest {
    let proof = hex::encode(
        mac(token, Role::Agent, agent, node, &nonce, sent_at_ms)
            .finalize()
            .into_bytes(),
    );
    JoinRequest {
        token_id: token.id.clone(),
        nonce,
        sent_at_ms,
        proof,
    }
}

/// The node's answer to a request it accepted.
pub fn node_proof(token: &JoinToken, agent: &PeerId, node: &PeerId, req: &JoinRequest) -> String {
    hex::encode(
        mac(token, Role::Node, agent, node, &req.nonce, req.sent_at_ms)
            .finalize()
            .into_bytes(),
    )
}

/// The agent's check of the node's answer: only a node that knows the token can give it.
pub fn verify_node_proof(
    token: &JoinToken,
    agent: &PeerId,
    node: &PeerId,
    req: &JoinRequest,
    proof: &str,
) -> bool {
    verify(
        mac(token, Role::Node, agent, node, &req.nonce, req.sent_at_ms),
        proof,
    )
}

/// A join token as the node keeps it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    secret: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; None: never expires.
    pub expires_at: Option<u64>,
    /// None: unlimited.
    pub uses_left: Option<u32>,
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("expires_at", &self.expires_at)
            .field("uses_left", &self.uses_left)
            .finish_non_exhaustive()
    }
}

impl TokenRecord {
    fn token(&self) -> JoinToken {
        JoinToken {
            id: self.id.clone(),
            secret: self.secret.clone(),
        }
    }

    pub fn expired(&self, now_unix: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now_unix)
    }
}

/// An agent the node trusts because it joined with a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledAgent {
    pub peer: PeerRef,
    pub token_id: String,
    /// Unix seconds.
    pub enrolled_at: u64,
}

/// What a node persists: its join tokens and the agents that joined.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustDoc {
    #[serde(default)]
    pub tokens: Vec<TokenRecord>,
    #[serde(default)]
    pub agents: Vec<EnrolledAgent>,
    /// How many times the node has started: its epoch floor, kept here because this is
    /// the node's one durable document (a Secret in a cluster, where its state
    /// directory is not kept).
    #[serde(default)]
    pub owner_starts: u64,
}

/// How `revoke` was understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// A token, and the agents that joined with it.
    Token {
        id: String,
        agents: Vec<PeerId>,
    },
    Agent(PeerId),
}

/// The outcome of a join the node accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The node's proof for the agent.
    pub proof: String,
    /// False when the agent was already enrolled (no use of the token counted).
    pub new: bool,
}

impl TrustDoc {
    /// Adds a new token; `ttl_secs` 0 never expires, `uses` None is unlimited.
    pub fn create_token(
        &mut self,
        token: &JoinToken,
        now_unix: u64,
        ttl_secs: u64,
        uses: Option<u32>,
    ) {
        self.tokens.push(TokenRecord {
            id: token.id.clone(),
            secret: token.secret.clone(),
            created_at: now_unix,
            expires_at: (ttl_secs > 0).then(|| now_unix.saturating_add(ttl_secs)),
            uses_left: uses,
        });
    }

    /// Removes a token (and the agents that joined with it) or one agent, named by
    /// token id or peer ID. None when nothing matched.
    pub fn revoke(&mut self, what: &str) -> Option<Revoked> {
        if let Ok(peer) = what.parse::<PeerId>() {
            let before = self.agents.len();
            self.agents.retain(|a| a.peer.0 != peer);
            return (self.agents.len() < before).then_some(Revoked::Agent(peer));
        }
        let before = self.tokens.len();
        self.tokens.retain(|t| t.id != what);
        let agents: Vec<PeerId> = self
            .agents
            .iter()
            .filter(|a| a.token_id == what)
            .map(|a| a.peer.0)
            .collect();
        self.agents.retain(|a| a.token_id != what);
        (self.tokens.len() < before || !agents.is_empty()).then(|| Revoked::Token {
            id: what.to_string(),
            agents,
        })
    }

    pub fn enrolled(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.agents.iter().map(|a| a.peer.0)
    }

    /// Whether the request proves a token of this document that has not expired; the
    /// token's index then. Changes nothing, so that a node can turn away bad requests
    /// without writing its store.
    pub fn verify(
        &self,
        req: &JoinRequest,
        agent: &PeerId,
        node: &PeerId,
        now_unix: u64,
    ) -> Result<usize, JoinError> {
        let index = self
            .tokens
            .iter()
            .position(|t| t.id == req.token_id)
            .ok_or(JoinError::UnknownToken)?;
        let record = &self.tokens[index];
        // The proof first: who does not know the secret learns nothing about the token.
        if !verify(
            mac(
                &record.token(),
                Role::Agent,
                agent,
                node,
                &req.nonce,
                req.sent_at_ms,
            ),
            &req.proof,
        ) {
            return Err(JoinError::BadProof);
        }
        if record.expired(now_unix) {
            return Err(JoinError::Expired);
        }
        Ok(index)
    }

    /// Checks an agent's join request and, if it holds, enrolls the agent and counts a
    /// use of the token. Freshness and replay are checked by the caller's [`NonceBook`].
    pub fn accept(
        &mut self,
        req: &JoinRequest,
        agent: &PeerId,
        node: &PeerId,
        now_unix: u64,
    ) -> Result<Accepted, JoinError> {
        let index = self.verify(req, agent, node, now_unix)?;
        let record = &mut self.tokens[index];
        let token = record.token();
        let proof = node_proof(&token, agent, node, req);
        if self.agents.iter().any(|a| a.peer.0 == *agent) {
            return Ok(Accepted { proof, new: false });
        }
        match &mut record.uses_left {
            Some(0) => return Err(JoinError::UsedUp),
            Some(n) => *n -= 1,
            None => {}
        }
        self.agents.push(EnrolledAgent {
            peer: PeerRef(*agent),
            token_id: token.id,
            enrolled_at: now_unix,
        });
        Ok(Accepted { proof, new: true })
    }
}

/// Recent join nonces, and the time window a proof must fall in.
#[derive(Debug, Default)]
pub struct NonceBook {
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl NonceBook {
    /// Accepts a request's nonce once, and only if its time is near `now_ms`.
    pub fn check(&mut self, req: &JoinRequest, now_ms: u64) -> Result<(), JoinError> {
        if req.sent_at_ms.abs_diff(now_ms) > MAX_CLOCK_SKEW_MS {
            return Err(JoinError::Stale);
        }
        if req.nonce.len() != 32 || !self.seen.insert(req.nonce.clone()) {
            return Err(JoinError::Replayed);
        }
        self.order.push_back(req.nonce.clone());
        if self.order.len() > NONCE_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_from_before_the_start_count_reads_as_never_started() {
        let doc: TrustDoc = serde_json::from_str(r#"{"tokens": [], "agents": []}"#).expect("old");
        assert_eq!(doc.owner_starts, 0);
    }

    fn token() -> JoinToken {
        "abcdef.0123456789abcdef".parse().expect("valid")
    }

    #[test]
    fn tokens_parse_print_and_generate() {
        let t = token();
        assert_eq!(t.reveal(), "abcdef.0123456789abcdef");
        assert!(
            !format!("{t:?}").contains("0123456789"),
            "Debug hides the secret"
        );
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "ABCDEF.0123456789abcdef",
            "abc.0123456789abcdef",
            "abcdef.0123456789abcde!",
        ] {
            assert_eq!(bad.parse::<JoinToken>(), Err(JoinError::Malformed), "{bad}");
        }
        let a = JoinToken::generate().expect("random");
        let b = JoinToken::generate().expect("random");
        assert_ne!(a, b);
        assert_eq!(a.reveal().parse::<JoinToken>(), Ok(a));
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2: key "Jefe".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").expect("key");
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_join_enrolls_once_proves_the_node_and_counts_uses() {
        let (agent, node) = (PeerId::random(), PeerId::random());
        let t = token();
        let mut doc = TrustDoc::default();
        doc.create_token(&t, 100, 3600, Some(1));
        let req = request(&t, &agent, &node, "n1".repeat(16), 5);
        let accepted = doc.accept(&req, &agent, &node, 200).expect("accepted");
        assert!(accepted.new);
        assert!(verify_node_proof(&t, &agent, &node, &req, &accepted.proof));
        // The agent's own proof would not pass for the node's.
        assert!(!verify_node_proof(&t, &agent, &node, &req, &req.proof));
        assert_eq!(doc.enrolled().collect::<Vec<_>>(), vec![agent]);
        // Enrolled already: no use counted, the last use is still there for another.
        let again = doc.accept(&req, &agent, &node, 200).expect("accepted");
        assert!(!again.new);
        assert_eq!(doc.tokens[0].uses_left, Some(0));
        let other = PeerId::random();
        let req2 = request(&t, &other, &node, "n2".repeat(16), 5);
        assert_eq!(
            doc.accept(&req2, &other, &node, 200),
            Err(JoinError::UsedUp)
        );
    }

    #[test]
    fn wrong_tokens_foreign_proofs_and_expired_tokens_are_refused() {
        let (agent, node) = (PeerId::random(), PeerId::random());
        let t = token();
        let mut doc = TrustDoc::default();
        doc.create_token(&t, 100, 60, None);
        let wrong: JoinToken = "abcdef.ffffffffffffffff".parse().expect("valid");
        let req = request(&wrong, &agent, &node, "00".repeat(16), 5);
        assert_eq!(
            doc.accept(&req, &agent, &node, 120),
            Err(JoinError::BadProof)
        );
        let unknown: JoinToken = "zzzzzz.0123456789abcdef".parse().expect("valid");
        let req = request(&unknown, &agent, &node, "00".repeat(16), 5);
        assert_eq!(
            doc.accept(&req, &agent, &node, 120),
            Err(JoinError::UnknownToken)
        );
        // A genuine proof presented by another peer, or to another node.
        let req = request(&t, &agent, &node, "00".repeat(16), 5);
        let thief = PeerId::random();
        assert_eq!(
            doc.accept(&req, &thief, &node, 120),
            Err(JoinError::BadProof)
        );
        assert_eq!(
            doc.accept(&req, &agent, &PeerId::random(), 120),
            Err(JoinError::BadProof)
        );
        assert_eq!(
            doc.accept(&req, &agent, &node, 160),
            Err(JoinError::Expired)
        );
        assert!(doc.agents.is_empty());
    }

    #[test]
    fn revoking_a_token_drops_its_agents_and_an_agent_can_go_alone() {
        let (a, b, node) = (PeerId::random(), PeerId::random(), PeerId::random());
        let t1 = token();
        let t2: JoinToken = "ghijkl.0123456789abcdef".parse().expect("valid");
        let mut doc = TrustDoc::default();
        doc.create_token(&t1, 0, 0, None);
        doc.create_token(&t2, 0, 0, None);
        doc.accept(&request(&t1, &a, &node, "a".repeat(32), 0), &a, &node, 1)
            .expect("a joins");
        doc.accept(&request(&t2, &b, &node, "b".repeat(32), 0), &b, &node, 1)
            .expect("b joins");
        assert_eq!(
            doc.revoke("abcdef"),
            Some(Revoked::Token {
                id: "abcdef".into(),
                agents: vec![a]
            })
        );
        assert_eq!(doc.revoke(&b.to_string()), Some(Revoked::Agent(b)));
        assert_eq!(doc.revoke("abcdef"), None);
        assert!(doc.agents.is_empty());
        assert_eq!(doc.tokens.len(), 1);
    }

    #[test]
    fn nonces_are_single_use_and_must_be_fresh() {
        let t = token();
        let (agent, node) = (PeerId::random(), PeerId::random());
        let mut book = NonceBook::default();
        let req = request(&t, &agent, &node, "ab".repeat(16), 1_000_000);
        assert_eq!(book.check(&req, 1_000_000 + MAX_CLOCK_SKEW_MS), Ok(()));
        assert_eq!(book.check(&req, 1_000_000), Err(JoinError::Replayed));
        let late = request(&t, &agent, &node, "cd".repeat(16), 1_000_000);
        assert_eq!(
            book.check(&late, 1_000_001 + MAX_CLOCK_SKEW_MS),
            Err(JoinError::Stale)
        );
        // Memory is bounded: the oldest nonces are forgotten first.
        for i in 0..NONCE_MEMORY + 10 {
            let r = request(&t, &agent, &node, format!("{i:032x}"), 5);
            book.check(&r, 5).expect("fresh");
        }
        assert_eq!(book.seen.len(), NONCE_MEMORY);
        assert_eq!(book.order.len(), NONCE_MEMORY);
    }
}
