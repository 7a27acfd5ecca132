//! Who may talk to the collector: agent tokens, each allowed to report for
//! the nodes its globs match; usage API tokens, each reading every tenant
//! (admin) or one; and, with mutual TLS, client certificates whose identity
//! must be the node they report for.
//!
//! *Boundary:* the auth file and every presented token or certificate are
//! untrusted. Tokens are compared as SHA-256 digests in constant time and
//! never logged; the file may hold a token or only its digest.

use std::collections::BTreeSet;
use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Errors of reading the auth file (it has no parse error of its own: a
/// TOML error there is an `Invalid` that shows no token).
pub type AuthFileError = capwatch_common::files::FileError;

/// Shortest token accepted: 128 bits of base64 or hex are longer.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    agent: Vec<AgentEntry>,
    #[serde(default)]
    api: Vec<ApiEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentEntry {
    name: String,
    token: Option<String>,
    token_sha256: Option<String>,
    nodes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiEntry {
    name: String,
    token: Option<String>,
    token_sha256: Option<String>,
    tenant: Option<String>,
}

// Hand-written so a parse error or a debug log can never print a token.
impl std::fmt::Debug for AgentEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentEntry")
            .field("name", &self.name)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ApiEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiEntry")
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// What an API token may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant, `/metrics` and the status page.
    Admin,
    /// One tenant's rows and figures.
    Tenant(String),
}

#[derive(Debug)]
pub struct AgentGrant {
    pub name: String,
    digest: [u8; 32],
    nodes: GlobSet,
}

impl AgentGrant {
    /// Whether this token may report for `node`.
    pub fn allows(&self, node: &str) -> bool {
        self.nodes.is_match(node)
    }
}

#[derive(Debug)]
pub struct ApiGrant {
    pub name: String,
    digest: [u8; 32],
    pub scope: Scope,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no bearer token")]
    Missing,
    #[error("unknown token")]
    Unknown,
}

/// The tokens the collector accepts. Empty: no token is asked for.
#[derive(Debug, Default)]
pub struct Auth {
    agents: Vec<AgentGrant>,
    api: Vec<ApiGrant>,
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The entry whose digest matches `presented`, comparing against every
/// entry in constant time so timing does not reveal how close a guess was.
fn find<'a, T>(
    entries: &'a [T],
    digest: impl Fn(&T) -> &[u8; 32],
    presented: &str,
) -> Option<&'a T> {
    let wanted = sha256(presented);
    let mut found = None;
    for e in entries {
        if bool::from(wanted.ct_eq(digest(e))) {
            found = Some(e);
        }
    }
    found
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let (scheme, token) = h.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl Auth {
    /// Reads the auth file at `path`; warns when others may read it.
    pub fn from_file(path: &Path) -> Result<Self, AuthFileError> {
        capwatch_common::warn_if_exposed(path, "auth_file");
        let bad = |reason: String| AuthFileError::Invalid {
            setting: "auth_file",
            reason: format!("{}: {reason}", path.display()),
        };
        let text = capwatch_common::files::read_text(path)?;
        // Not `read_toml`: TOML errors quote the offending line, which may
        // hold a token. Only the message and the line number are shown.
        let file: AuthFile = toml::from_str(&text).map_err(|e| {
            let line = e.span().map_or(0, |s| {
                text[..s.start.min(text.len())].lines().count().max(1)
            });
            bad(format!("line {line}: {}", e.message().trim()))
        })?;
        let mut names = BTreeSet::new();
        let mut digests = BTreeSet::new();
        let mut digest_of = |kind: &str,
                             name: &str,
                             token: &Option<String>,
                             sha: &Option<String>|
         -> Result<[u8; 32], AuthFileError> {
            if name.is_empty() || !names.insert(format!("{kind}/{name}")) {
                return Err(bad(format!(
                    "{kind} names must be unique and non-empty: {name:?}"
                )));
            }
            let digest = match (token, sha) {
                (Some(t), None) if t.len() >= MIN_TOKEN_LEN => sha256(t),
                (Some(_), None) => {
                    return Err(bad(format!(
                        "{kind} {name:?}: token must be at least {MIN_TOKEN_LEN} characters"
                    )));
                }
                (None, Some(hex)) => parse_sha256(hex).ok_or_else(|| {
                    bad(format!(
                        "{kind} {name:?}: token_sha256 must be 64 hex digits"
                    ))
                })?,
                _ => {
                    return Err(bad(format!(
                        "{kind} {name:?}: set exactly one of token and token_sha256"
                    )));
                }
            };
            if !digests.insert(digest) {
                return Err(bad(format!(
                    "{kind} {name:?}: the same token appears twice"
                )));
            }
            Ok(digest)
        };
        let mut agents = Vec::new();
        for a in &file.agent {
            let digest = digest_of("agent", &a.name, &a.token, &a.token_sha256)?;
            if a.nodes.is_empty() {
                return Err(bad(format!("agent {:?}: nodes must not be empty", a.name)));
            }
            let mut set = GlobSetBuilder::new();
            for n in &a.nodes {
                set.add(
                    Glob::new(n)
                        .map_err(|e| bad(format!("agent {:?}: node pattern {n:?}: {e}", a.name)))?,
                );
            }
            agents.push(AgentGrant {
                name: a.name.clone(),
                digest,
                nodes: set
                    .build()
                    .map_err(|e| bad(format!("agent {:?}: {e}", a.name)))?,
            });
        }
        let mut api = Vec::new();
        for a in &file.api {
            let digest = digest_of("api", &a.name, &a.token, &a.token_sha256)?;
            api.push(ApiGrant {
                name: a.name.clone(),
                digest,
                scope: match &a.tenant {
                    Some(t) => Scope::Tenant(t.clone()),
                    None => Scope::Admin,
                },
            });
        }
        Ok(Self { agents, api })
    }

    /// Agents must present a token.
    pub fn agents_required(&self) -> bool {
        !self.agents.is_empty()
    }

    /// The usage API asks for a token.
    pub fn api_required(&self) -> bool {
        !self.api.is_empty()
    }

    pub fn agent(&self, token: Option<&str>) -> Result<&AgentGrant, Denied> {
        find(&self.agents, |g| &g.digest, token.ok_or(Denied::Missing)?).ok_or(Denied::Unknown)
    }

    pub fn api(&self, token: Option<&str>) -> Result<&ApiGrant, Denied> {
        find(&self.api, |g| &g.digest, token.ok_or(Denied::Missing)?).ok_or(Denied::Unknown)
    }
}

/// Whether the certificate `der` is valid for `node` as a DNS name (its
/// subject alternative names). The chain itself was checked by TLS.
pub fn certificate_names(der: &CertificateDer<'_>, node: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(node) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(text: &str) -> Result<Auth, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        std::fs::write(&path, text).unwrap();
        Auth::from_file(&path).map_err(|e| e.to_string())
    }

    const FILE: &str = r#"
[[agent]]
name = "fra1"
token = "fra1-secret-token-0001"
nodes = ["fra1-*"]

[[agent]]
name = "spare"
# sha256 of "spare-secret-token-02"
token_sha256 = "SHA"
nodes = ["spare-1"]

[[api]]
name = "billing"
token = "billing-secret-token-3"

[[api]]
name = "lab-a"
token = "lab-a-secret-token-04"
tenant = "lab-a"
"#;

    fn file() -> String {
        let sha: String = sha256("spare-secret-token-02")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        FILE.replace("SHA", &sha)
    }

    #[test]
    fn tokens_grant_their_nodes_and_scopes() {
        let a = auth(&file()).unwrap();
        assert!(a.agents_required() && a.api_required());
        let fra = a.agent(Some("fra1-secret-token-0001")).unwrap();
        assert!(fra.allows("fra1-n-7") && !fra.allows("spare-1"));
        let spare = a.agent(Some("spare-secret-token-02")).unwrap();
        assert_eq!(spare.name, "spare");
        assert!(spare.allows("spare-1") && !spare.allows("spare-10"));
        assert_eq!(a.agent(None).err(), Some(Denied::Missing));
        assert_eq!(
            a.agent(Some("fra1-secret-token-0002")).err(),
            Some(Denied::Unknown)
        );
        // API tokens are not agent tokens, and the other way round.
        assert_eq!(
            a.agent(Some("billing-secret-token-3")).err(),
            Some(Denied::Unknown)
        );
        assert_eq!(
            a.api(Some("billing-secret-token-3")).unwrap().scope,
            Scope::Admin
        );
        assert_eq!(
            a.api(Some("lab-a-secret-token-04")).unwrap().scope,
            Scope::Tenant("lab-a".into())
        );
        assert_eq!(
            a.api(Some("fra1-secret-token-0001")).err(),
            Some(Denied::Unknown)
        );
        // An empty file asks for nothing.
        let none = auth("").unwrap();
        assert!(!none.agents_required() && !none.api_required());
    }

    #[test]
    fn bearer_takes_the_token_of_the_header() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("abc")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn bad_files_name_the_problem_and_never_the_token() {
        let cases: [(&str, &str); 7] = [
            (
                "[[agent]]\nname = \"a\"\ntoken = \"0123456789abcdef\nnodes = [\"n\"]\n",
                "line 3",
            ),
            (
                "[[agent]]\nname = \"a\"\ntoken = \"short\"\nnodes = [\"n\"]\n",
                "at least 16 characters",
            ),
            (
                "[[agent]]\nname = \"a\"\ntoken_sha256 = \"abc\"\nnodes = [\"n\"]\n",
                "64 hex digits",
            ),
            (
                "[[agent]]\nname = \"a\"\nnodes = [\"n\"]\n",
                "exactly one of token and token_sha256",
            ),
            (
                "[[agent]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\nnodes = []\n",
                "nodes must not be empty",
            ),
            (
                "[[api]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\n\
                 [[api]]\nname = \"b\"\ntoken = \"0123456789abcdef\"\n",
                "the same token appears twice",
            ),
            (
                "[[api]]\nname = \"a\"\ntoken = \"0123456789abcdef\"\nrole = \"x\"\n",
                "unknown field `role`",
            ),
        ];
        for (text, want) in cases {
            let err = auth(text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains("0123456789abcdef"), "token in error: {err}");
        }
    }
}
