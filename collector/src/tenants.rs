//! Tenants, their contracts and what they lease; attribution of GPUs.
//!
//! A GPU belongs to the tenant that claims its UUID; failing that, to the
//! tenant that names its node exactly; failing that, to the tenant whose
//! node glob matches (the longest pattern wins, as the most specific).
//! A GPU nobody claims belongs to [`UNASSIGNED`].
//!
//! *Invariant:* attribution is a function of (node id, GPU UUID) and the
//! tenant file alone; two tenants claiming one GPU or one node by name is a
//! config error, caught at load time, never resolved silently.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

use crate::config::{ConfigError, read_toml};

/// The tenant of every GPU no tenant claims.
pub const UNASSIGNED: &str = "unassigned";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default, rename = "tenant")]
    tenants: Vec<TenantSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantSpec {
    /// Short stable id used in labels and the API: `[a-z0-9_-]`.
    id: String,
    /// Display name; defaults to the id.
    #[serde(default)]
    name: Option<String>,
    /// Contracted capacity, kW.
    contracted_kw: f64,
    /// Node names or globs (`rack-a-*`) this tenant leases whole.
    #[serde(default)]
    nodes: Vec<String>,
    /// GPU UUIDs this tenant leases one by one.
    #[serde(default)]
    gpus: Vec<String>,
    /// Power usage effectiveness of the tenant's site (1.0-3.0), for the
    /// estimated facility energy in usage rows.
    #[serde(default)]
    pue: Option<f64>,
}

#[derive(Debug)]
pub struct Tenant {
    pub id: Arc<str>,
    pub name: String,
    pub contracted_milliwatts: u64,
    pub pue: Option<f64>,
}

/// A validated tenant file.
#[derive(Debug)]
pub struct Tenants {
    /// Configured tenants, then `unassigned` last.
    tenants: Vec<Tenant>,
    by_uuid: HashMap<String, usize>,
    by_node: HashMap<String, usize>,
    globs: Vec<(usize, String, GlobMatcher)>,
}

impl Tenants {
    /// No tenants: everything is unassigned.
    pub fn empty() -> Self {
        Self::build(Vec::new()).expect("an empty tenant list is valid")
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file: TenantsFile = read_toml(path)?;
        Self::build(file.tenants).map_err(|e| match e {
            ConfigError::Invalid { setting, reason } => ConfigError::Invalid {
                setting,
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: TenantsFile = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: "<tenants>".into(),
            error,
        })?;
        Self::build(file.tenants)
    }

    fn build(specs: Vec<TenantSpec>) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            setting: "tenant",
            reason,
        };
        let mut tenants = Vec::with_capacity(specs.len() + 1);
        let mut by_uuid: HashMap<String, usize> = HashMap::new();
        let mut by_node: HashMap<String, usize> = HashMap::new();
        let mut globs = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let id = spec.id.as_str();
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(invalid(format!(
                    "tenant id {id:?} must be 1-64 characters of a-z, 0-9, - and _"
                )));
            }
            if id == UNASSIGNED {
                return Err(invalid(format!("tenant id {UNASSIGNED:?} is reserved")));
            }
            if specs[..i].iter().any(|s| s.id == spec.id) {
                return Err(invalid(format!("tenant {id:?} is defined twice")));
            }
            if !spec.contracted_kw.is_finite()
                || spec.contracted_kw <= 0.0
                || spec.contracted_kw > 1e7
            {
                return Err(invalid(format!(
                    "tenant {id:?}: contracted_kw must be a positive number of kW (at most 10 GW), got {}",
                    spec.contracted_kw
                )));
            }
            let twice = |what: &str, name: &str, other: usize| {
                invalid(if other == i {
                    format!("tenant {id:?} lists {what} {name:?} twice")
                } else {
                    format!(
                        "{what} {name} is claimed by both tenant {:?} and tenant {id:?}",
                        specs[other].id
                    )
                })
            };
            if spec.pue.is_some_and(|p| !(1.0..=3.0).contains(&p)) {
                return Err(invalid(format!(
                    "tenant {id:?}: pue must be between 1.0 and 3.0"
                )));
            }
            for uuid in &spec.gpus {
                if let Some(other) = by_uuid.insert(uuid.clone(), i) {
                    return Err(twice("GPU", uuid, other));
                }
            }
            for node in &spec.nodes {
                if is_glob(node) {
                    let glob = Glob::new(node).map_err(|e| {
                        invalid(format!("tenant {id:?}: node pattern {node:?}: {e}"))
                    })?;
                    if let Some((j, _, _)) = globs.iter().find(|(_, p, _)| p == node) {
                        return Err(twice("node pattern", &format!("{node:?}"), *j));
                    }
                    globs.push((i, node.clone(), glob.compile_matcher()));
                } else if let Some(other) = by_node.insert(node.clone(), i) {
                    return Err(twice("node", &format!("{node:?}"), other));
                }
            }
            tenants.push(Tenant {
                id: Arc::from(id),
                name: spec.name.clone().unwrap_or_else(|| id.to_string()),
                // kW to mW; bounded above, so the cast cannot overflow.
                contracted_milliwatts: (spec.contracted_kw * 1e6).round() as u64,
                pue: spec.pue,
            });
        }
        tenants.push(Tenant {
            id: Arc::from(UNASSIGNED),
            name: "GPUs no tenant leases".into(),
            contracted_milliwatts: 0,
            pue: None,
        });
        Ok(Self {
            tenants,
            by_uuid,
            by_node,
            globs,
        })
    }

    /// Every tenant, `unassigned` last.
    pub fn all(&self) -> &[Tenant] {
        &self.tenants
    }

    /// The contract (mW; 0: none) that `tenant`'s minute starting at
    /// `minute_start` (Unix seconds) is measured against: the one place
    /// over-contract time and overage look a contract up. The tenant file
    /// in force says it for every minute.
    pub fn contracted_milliwatts_at(&self, tenant: &str, _minute_start: i64) -> u64 {
        self.tenants
            .iter()
            .find(|t| &*t.id == tenant)
            .map_or(0, |t| t.contracted_milliwatts)
    }

    pub fn unassigned(&self) -> usize {
        self.tenants.len() - 1
    }

    /// The tenant of the GPU `uuid` on node `node` (`uuid` may be empty to
    /// ask about the node as a whole).
    pub fn attribute(&self, node: &str, uuid: &str) -> usize {
        if let Some(&t) = self.by_uuid.get(uuid) {
            return t;
        }
        self.attribute_node(node)
    }

    /// The tenant leasing node `node` as a whole.
    pub fn attribute_node(&self, node: &str) -> usize {
        if let Some(&t) = self.by_node.get(node) {
            return t;
        }
        self.globs
            .iter()
            .filter(|(_, _, m)| m.is_match(node))
            // Most specific pattern: the longest; ties go to the file's order.
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(&a.0)))
            .map_or(self.unassigned(), |(t, _, _)| *t)
    }
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[tenant]]
        id = "lab-a"
        contracted_kw = 100
        nodes = ["a-*", "special"]

        [[tenant]]
        id = "lab-b"
        name = "Lab B"
        contracted_kw = 2.5
        nodes = ["a-b-*"]
        gpus = ["GPU-1"]
    "#;

    #[test]
    fn attribution_rules() {
        let t = Tenants::from_toml(FILE).unwrap();
        let id = |node, uuid| t.all()[t.attribute(node, uuid)].id.to_string();
        // (node, uuid, expected tenant)
        let cases = [
            ("a-1", "GPU-x", "lab-a"),
            ("special", "GPU-x", "lab-a"),
            ("a-b-7", "GPU-x", "lab-b"), // longer pattern wins
            ("a-1", "GPU-1", "lab-b"),   // UUID claim beats node claim
            ("z-1", "GPU-x", UNASSIGNED),
            ("z-1", "GPU-1", "lab-b"),
        ];
        for (node, uuid, want) in cases {
            assert_eq!(id(node, uuid), want, "{node} {uuid}");
        }
        assert_eq!(t.all()[1].contracted_milliwatts, 2_500_000);
        assert_eq!(t.all()[1].name, "Lab B");
        assert_eq!(t.all()[0].name, "lab-a");
    }

    #[test]
    fn invalid_files_name_the_problem() {
        // (file, text the error must contain)
        let cases = [
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ngpus=['G']\n[[tenant]]\nid='b'\ncontracted_kw=1\ngpus=['G']",
                "GPU G is claimed by both tenant \"a\" and tenant \"b\"",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=-5",
                "contracted_kw must be a positive",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=nan",
                "contracted_kw must be a positive",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ncolour='red'",
                "unknown field `colour`",
            ),
            (
                "[[tenant]]\nid='A B'\ncontracted_kw=1",
                "must be 1-64 characters",
            ),
            ("[[tenant]]\nid='unassigned'\ncontracted_kw=1", "reserved"),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\n[[tenant]]\nid='a'\ncontracted_kw=1",
                "defined twice",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\nnodes=['n1']\n[[tenant]]\nid='b'\ncontracted_kw=1\nnodes=['n1']",
                "node \"n1\" is claimed by both",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\nnodes=['n[']",
                "node pattern",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\npue=0.9",
                "pue must be between",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ngpus=['G','G']",
                "tenant \"a\" lists GPU \"G\" twice",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\nnodes=['r-*']\n[[tenant]]\nid='b'\ncontracted_kw=1\nnodes=['r-*']",
                "node pattern \"r-*\" is claimed by both tenant \"a\" and tenant \"b\"",
            ),
        ];
        for (text, want) in cases {
            let err = Tenants::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        }
    }
}
