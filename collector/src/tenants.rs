//! Tenants, their contracts and what they lease; attribution of GPUs.
//!
//! A GPU belongs to the tenant that claims its UUID; failing that, to the
//! tenant that names its node exactly; failing that, to the tenant whose
//! node glob matches (the longest pattern wins, as the most specific).
//! A GPU nobody claims belongs to [`UNASSIGNED`].
//!
//! A UUID is only what an agent says, so a UUID lease may name the node
//! (or node glob) the GPU lives in: it then counts only there, and any
//! other node announcing the UUID is refused ([`Tenants::check_gpu`]). A
//! lease without a node is honoured on one node at a time (see
//! `State::hello`).
//!
//! The file changes over time: [`TenantHistory`] keeps its versions with
//! the moment each took effect, so that an interval is attributed by the
//! version in force at its own time.
//!
//! *Invariant:* attribution is a function of (node id, GPU UUID) and the
//! tenant file alone; two tenants claiming one GPU, one node by name or
//! one node glob is a config error, caught at load time, never resolved
//! silently.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

use crate::accounting::{Basis, Contract};

/// Errors of reading a tenant file: the errors of every file an operator
/// writes, so a bad tenant file reads like a bad config file.
pub type TenantsError = capwatch_common::files::FileError;

/// The tenant of every GPU no tenant claims.
pub const UNASSIGNED: &str = "unassigned";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    /// When this file's leases take effect (an RFC 3339 date-time with an
    /// offset); unset: when the collector loads it.
    #[serde(default)]
    effective_from: Option<toml::value::Datetime>,
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
    /// GPUs this tenant leases one by one: a UUID, or `{ uuid, node }`
    /// naming the node (or node glob) the GPU may be reported from.
    #[serde(default)]
    gpus: Vec<toml::Value>,
    /// Power usage effectiveness of the tenant's site (1.0-3.0), for the
    /// estimated facility energy in usage rows.
    #[serde(default)]
    pue: Option<f64>,
    /// What the contract is measured on: "gpu" (default), "node" or
    /// "facility" (needs `pue`).
    #[serde(default)]
    basis: Option<String>,
}

#[derive(Debug)]
pub struct Tenant {
    pub id: Arc<str>,
    pub name: String,
    pub contracted_milliwatts: u64,
    pub pue: Option<f64>,
    pub basis: Basis,
}

impl Tenant {
    /// The tenant's contract, as a minute is measured against it.
    pub fn contract(&self) -> Contract {
        Contract {
            milliwatts: self.contracted_milliwatts,
            basis: self.basis,
            // 1.0-3.0: fits.
            pue_ppm: self.pue.map_or(0, |p| (p * 1e6).round() as u64),
        }
    }
}

/// A GPU leased by UUID.
#[derive(Debug)]
struct UuidLease {
    tenant: usize,
    /// Where the GPU may be reported from: a node name or glob. `None`: any
    /// node, one at a time (see `State::hello`).
    node: Option<(String, NodeMatch)>,
}

#[derive(Debug)]
enum NodeMatch {
    Exact,
    Glob(GlobMatcher),
}

impl UuidLease {
    fn allows(&self, node: &str) -> bool {
        match &self.node {
            None => true,
            Some((name, NodeMatch::Exact)) => name == node,
            Some((_, NodeMatch::Glob(m))) => m.is_match(node),
        }
    }
}

/// Why a node may not report a GPU leased by UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedElsewhere {
    pub tenant: Arc<str>,
    /// The node name or glob the lease names.
    pub node: String,
}

/// A validated tenant file.
#[derive(Debug)]
pub struct Tenants {
    /// Configured tenants, then `unassigned` last.
    tenants: Vec<Tenant>,
    by_uuid: HashMap<String, UuidLease>,
    by_node: HashMap<String, usize>,
    globs: Vec<(usize, String, GlobMatcher)>,
    /// `effective_from`, in Unix nanoseconds.
    effective_from_ns: Option<i64>,
    /// The text this was read from, kept in the ledger's history.
    source: String,
}

impl Tenants {
    /// No tenants: everything is unassigned.
    pub fn empty() -> Self {
        Self::build(Vec::new()).expect("an empty tenant list is valid")
    }

    pub fn from_file(path: &Path) -> Result<Self, TenantsError> {
        let text = capwatch_common::files::read_text(path)?;
        let file: TenantsFile = capwatch_common::files::parse_toml(&text, path)?;
        Self::from_parsed(file, text).map_err(|e| match e {
            TenantsError::Invalid { setting, reason } => TenantsError::Invalid {
                setting,
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, TenantsError> {
        let file: TenantsFile = capwatch_common::files::parse_toml(text, Path::new("<tenants>"))?;
        Self::from_parsed(file, text.to_string())
    }

    fn from_parsed(file: TenantsFile, source: String) -> Result<Self, TenantsError> {
        let effective_from_ns = file
            .effective_from
            .map(|d| {
                unix_nanos_of(&d).ok_or_else(|| TenantsError::Invalid {
                    setting: "effective_from",
                    reason: format!(
                        "{d} must be a date-time with an offset after 1970, e.g. 2026-12-01T00:00:00Z"
                    ),
                })
            })
            .transpose()?;
        let mut t = Self::build(file.tenants)?;
        t.effective_from_ns = effective_from_ns;
        t.source = source;
        Ok(t)
    }

    /// When the file says its leases take effect (Unix nanoseconds).
    pub fn effective_from_ns(&self) -> Option<i64> {
        self.effective_from_ns
    }

    /// The text the tenants were read from (empty for no file).
    pub fn source(&self) -> &str {
        &self.source
    }

    fn build(specs: Vec<TenantSpec>) -> Result<Self, TenantsError> {
        let invalid = |reason: String| TenantsError::Invalid {
            setting: "tenant",
            reason,
        };
        let mut tenants = Vec::with_capacity(specs.len() + 1);
        let mut by_uuid: HashMap<String, UuidLease> = HashMap::new();
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
            let basis = match spec.basis.as_deref() {
                None | Some("gpu") => Basis::Gpu,
                Some("node") => Basis::Node,
                Some("facility") if spec.pue.is_some() => Basis::Facility,
                Some("facility") => {
                    return Err(invalid(format!(
                        "tenant {id:?}: basis \"facility\" needs pue (facility energy of nodes not under a meter is node energy times pue)"
                    )));
                }
                Some(other) => {
                    return Err(invalid(format!(
                        "tenant {id:?}: basis must be \"gpu\", \"node\" or \"facility\", got {other:?}"
                    )));
                }
            };
            for entry in &spec.gpus {
                let (uuid, node) = gpu_lease(id, entry).map_err(invalid)?;
                let node = match node {
                    Some(n) if is_glob(&n) => {
                        let glob = Glob::new(&n).map_err(|e| {
                            invalid(format!(
                                "tenant {id:?}: GPU {uuid:?}: node pattern {n:?}: {e}"
                            ))
                        })?;
                        Some((n, NodeMatch::Glob(glob.compile_matcher())))
                    }
                    Some(n) => Some((n, NodeMatch::Exact)),
                    None => None,
                };
                let lease = UuidLease { tenant: i, node };
                if let Some(other) = by_uuid.insert(uuid.clone(), lease) {
                    return Err(twice("GPU", &uuid, other.tenant));
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
                basis,
            });
        }
        tenants.push(Tenant {
            id: Arc::from(UNASSIGNED),
            name: "GPUs no tenant leases".into(),
            contracted_milliwatts: 0,
            pue: None,
            basis: Basis::Gpu,
        });
        Ok(Self {
            tenants,
            by_uuid,
            by_node,
            globs,
            effective_from_ns: None,
            source: String::new(),
        })
    }

    /// Every tenant, `unassigned` last.
    pub fn all(&self) -> &[Tenant] {
        &self.tenants
    }

    /// The contract (mW; 0: none) this version of the file gives `tenant`.
    /// Which version a minute is measured against is the history's word:
    /// [`TenantHistory::contracted_milliwatts_at`].
    pub fn contracted_milliwatts(&self, tenant: &str) -> u64 {
        self.tenants
            .iter()
            .find(|t| &*t.id == tenant)
            .map_or(0, |t| t.contracted_milliwatts)
    }

    /// The contract this version of the file gives `tenant` (none, on GPU
    /// energy, for a tenant it does not list); which version a minute is
    /// measured against: [`TenantHistory::contract_at`].
    pub fn contract(&self, tenant: &str) -> Contract {
        self.tenants
            .iter()
            .find(|t| &*t.id == tenant)
            .map_or_else(Contract::default, Tenant::contract)
    }

    pub fn unassigned(&self) -> usize {
        self.tenants.len() - 1
    }

    /// The tenant of the GPU `uuid` on node `node` (`uuid` may be empty to
    /// ask about the node as a whole). A UUID lease that names its node
    /// counts only there.
    pub fn attribute(&self, node: &str, uuid: &str) -> usize {
        match self.by_uuid.get(uuid) {
            Some(lease) if lease.allows(node) => lease.tenant,
            _ => self.attribute_node(node),
        }
    }

    /// The tenant of MIG instance `instance` of board `board` on node
    /// `node`: its lessee by UUID, else the board's tenant.
    pub fn attribute_instance(&self, node: &str, instance: &str, board: &str) -> usize {
        match self.by_uuid.get(instance) {
            Some(lease) if lease.allows(node) => lease.tenant,
            _ => self.attribute(node, board),
        }
    }

    /// The tenant leasing GPU `uuid` by UUID, if any.
    pub fn uuid_lessee(&self, uuid: &str) -> Option<&Arc<str>> {
        self.by_uuid.get(uuid).map(|l| &self.tenants[l.tenant].id)
    }

    /// Whether node `node` may report GPU `uuid`: no, when a tenant leases
    /// the UUID on other nodes only.
    pub fn check_gpu(&self, node: &str, uuid: &str) -> Result<(), LeasedElsewhere> {
        match self.by_uuid.get(uuid) {
            Some(lease) if !lease.allows(node) => Err(LeasedElsewhere {
                tenant: self.tenants[lease.tenant].id.clone(),
                node: lease
                    .node
                    .as_ref()
                    .map_or_else(String::new, |(n, _)| n.clone()),
            }),
            _ => Ok(()),
        }
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

/// A TOML offset date-time as Unix nanoseconds; `None` without an offset
/// or before 1970.
fn unix_nanos_of(d: &toml::value::Datetime) -> Option<i64> {
    d.offset?;
    d.date?;
    d.time?;
    let ts: jiff::Timestamp = d.to_string().parse().ok()?;
    i64::try_from(ts.as_nanosecond()).ok().filter(|n| *n >= 0)
}

/// The versions of the tenant file in force over time: each with the
/// moment (Unix nanoseconds) it took effect, in order. The first also
/// covers everything before it (nothing earlier is known).
///
/// *Invariant:* an interval of a GPU belongs to the tenant that the
/// version in force at the interval's end (its sample's timestamp)
/// attributes it to.
#[derive(Debug, Clone)]
pub struct TenantHistory {
    /// (in force from, tenants); `from` strictly increasing.
    versions: Vec<(i64, Arc<Tenants>)>,
}

impl TenantHistory {
    /// A history of one version, in force at all times.
    pub fn new(first: Arc<Tenants>) -> Self {
        Self {
            versions: vec![(i64::MIN, first)],
        }
    }

    /// Adds a version in force from `from`: it replaces whatever was in
    /// force from then on (a file loaded later is the word on its period).
    pub fn push(&mut self, from: i64, tenants: Arc<Tenants>) {
        let keep = self.versions.partition_point(|(f, _)| *f < from);
        if keep == 0 {
            // Before every known version: this one covers all earlier time.
            self.versions.clear();
            self.versions.push((i64::MIN, tenants));
            return;
        }
        self.versions.truncate(keep);
        self.versions.push((from, tenants));
    }

    /// The index of the version in force at `at`.
    pub fn at(&self, at: i64) -> usize {
        self.versions
            .partition_point(|(f, _)| *f <= at)
            .saturating_sub(1)
    }

    /// The contract (mW; 0: none) that `tenant`'s minute starting at
    /// `minute_start` (Unix seconds) is measured against: the one place
    /// over-contract time and overage look a contract up. It is the
    /// version in force at the minute's start (as [`Self::at`] its first
    /// nanosecond) that says it, so a minute is judged by the same contract
    /// whenever its samples arrive; a version taking effect inside a
    /// minute applies from the next one.
    pub fn contracted_milliwatts_at(&self, tenant: &str, minute_start: i64) -> u64 {
        let at = minute_start.saturating_mul(1_000_000_000);
        let i = if self.versions.len() == 1 {
            0
        } else {
            self.at(at)
        };
        self.version(i).contracted_milliwatts(tenant)
    }

    /// The contract, with its basis, that `tenant`'s minute starting at
    /// `minute_start` is measured against, by the same version as
    /// [`Self::contracted_milliwatts_at`].
    pub fn contract_at(&self, tenant: &str, minute_start: i64) -> Contract {
        let at = minute_start.saturating_mul(1_000_000_000);
        let i = if self.versions.len() == 1 {
            0
        } else {
            self.at(at)
        };
        self.version(i).contract(tenant)
    }

    /// Every tenant's contract over time, for the tenants of any version:
    /// (from, mW) with `from` in Unix nanoseconds, strictly increasing, the
    /// first from `i64::MIN`; a version without the tenant gives it none
    /// (0), and consecutive versions with the same contract are one entry.
    pub fn contracts_by_tenant(&self) -> HashMap<Arc<str>, Vec<(i64, u64)>> {
        self.by_tenant_over_time(|t| t.contracted_milliwatts, 0)
    }

    /// As [`Self::contracts_by_tenant`], each contract with its basis and
    /// PUE: what usage rows are measured against.
    pub fn contract_terms_by_tenant(&self) -> HashMap<Arc<str>, Vec<(i64, Contract)>> {
        self.by_tenant_over_time(Tenant::contract, Contract::default())
    }

    /// `of` each tenant over time, for the tenants of any version, `none`
    /// where a version lacks the tenant; consecutive equal values are one
    /// entry.
    fn by_tenant_over_time<V: Copy + PartialEq>(
        &self,
        of: impl Fn(&Tenant) -> V,
        none: V,
    ) -> HashMap<Arc<str>, Vec<(i64, V)>> {
        let mut out: HashMap<Arc<str>, Vec<(i64, V)>> = HashMap::new();
        for (i, (from, version)) in self.versions.iter().enumerate() {
            let from = if i == 0 { i64::MIN } else { *from };
            let set = |spans: &mut Vec<(i64, V)>, c: V| match spans.last_mut() {
                Some((f, v)) if *f == from => *v = c,
                Some((_, v)) if *v == c => {}
                _ => spans.push((from, c)),
            };
            for t in version.all() {
                let spans = out
                    .entry(t.id.clone())
                    .or_insert_with(|| vec![(i64::MIN, none)]);
                set(spans, of(t));
            }
            if i > 0 {
                let here: HashSet<&str> = version.all().iter().map(|t| &*t.id).collect();
                for (id, spans) in &mut out {
                    if !here.contains(&**id) {
                        set(spans, none);
                    }
                }
            }
        }
        out
    }

    /// Version `i`.
    pub fn version(&self, i: usize) -> &Arc<Tenants> {
        &self.versions[i].1
    }

    /// The version loaded last.
    pub fn latest(&self) -> &Arc<Tenants> {
        &self.versions[self.versions.len() - 1].1
    }

    /// [from, until) of version `i`.
    pub fn span(&self, i: usize) -> (i64, i64) {
        let until = self.versions.get(i + 1).map_or(i64::MAX, |(f, _)| *f);
        (self.versions[i].0, until)
    }

    /// Forgets versions whose time ended at or before `before` (no sample
    /// that old is accepted); the first one left covers earlier time.
    pub fn forget_before(&mut self, before: i64) {
        let ended = (0..self.versions.len())
            .take_while(|&i| self.span(i).1 <= before)
            .count();
        self.versions.drain(..ended.min(self.versions.len() - 1));
        self.versions[0].0 = i64::MIN;
    }

    pub fn len(&self) -> usize {
        self.versions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }
}

/// One entry of a tenant's `gpus`: `"GPU-…"` or `{ uuid = "GPU-…", node =
/// "name or glob" }`; (UUID, node).
fn gpu_lease(tenant: &str, entry: &toml::Value) -> Result<(String, Option<String>), String> {
    let bad = |what: String| format!("tenant {tenant:?}: gpus entry {entry}: {what}");
    match entry {
        toml::Value::String(uuid) if !uuid.is_empty() => Ok((uuid.clone(), None)),
        toml::Value::Table(t) => {
            if let Some(k) = t.keys().find(|k| *k != "uuid" && *k != "node") {
                return Err(bad(format!(
                    "unknown key `{k}`, expected `uuid` and `node`"
                )));
            }
            let text = |key: &str| match t.get(key) {
                Some(toml::Value::String(v)) if !v.is_empty() => Ok(v.clone()),
                Some(_) => Err(bad(format!("`{key}` must be a non-empty string"))),
                None => Err(bad(format!("`{key}` is missing"))),
            };
            Ok((text("uuid")?, Some(text("node")?)))
        }
        _ => Err(bad(
            "must be a GPU UUID string or { uuid = \"…\", node = \"…\" }".into(),
        )),
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
    fn a_gpu_lease_naming_its_node_counts_only_there() {
        let t = Tenants::from_toml(
            r#"
            [[tenant]]
            id = "lab-a"
            contracted_kw = 1
            nodes = ["a-*"]

            [[tenant]]
            id = "lab-c"
            contracted_kw = 1
            gpus = ["GPU-plain", { uuid = "GPU-7", node = "gpu-node-7" }, { uuid = "GPU-r", node = "r-{1,2}" }]
            "#,
        )
        .unwrap();
        let id = |node, uuid| t.all()[t.attribute(node, uuid)].id.to_string();
        // (node, uuid, tenant, may the node report it)
        let cases = [
            ("gpu-node-7", "GPU-7", "lab-c", true),
            ("a-1", "GPU-7", "lab-a", false),
            ("evil-1", "GPU-7", UNASSIGNED, false),
            ("r-2", "GPU-r", "lab-c", true),
            ("r-3", "GPU-r", UNASSIGNED, false),
            ("evil-1", "GPU-plain", "lab-c", true),
            ("evil-1", "GPU-x", UNASSIGNED, true),
        ];
        for (node, uuid, want, may) in cases {
            assert_eq!(id(node, uuid), want, "{node} {uuid}");
            assert_eq!(t.check_gpu(node, uuid).is_ok(), may, "{node} {uuid}");
        }
        let e = t.check_gpu("evil-1", "GPU-7").unwrap_err();
        assert_eq!((&*e.tenant, e.node.as_str()), ("lab-c", "gpu-node-7"));
        assert_eq!(t.uuid_lessee("GPU-plain").map(|t| &**t), Some("lab-c"));
        assert_eq!(t.uuid_lessee("GPU-x"), None);
    }

    #[test]
    fn effective_from_is_an_offset_date_time() {
        let at = |v: &str| {
            Tenants::from_toml(&format!("effective_from = {v}\n")).map(|t| t.effective_from_ns())
        };
        assert_eq!(
            at("2026-12-01T00:00:00Z").unwrap(),
            Some(1_796_083_200_000_000_000)
        );
        assert_eq!(
            at("2026-12-01T01:00:00.5+01:00").unwrap(),
            Some(1_796_083_200_500_000_000)
        );
        assert_eq!(Tenants::from_toml("").unwrap().effective_from_ns(), None);
        for bad in ["2026-12-01T00:00:00", "2026-12-01", "1969-12-31T23:59:59Z"] {
            let err = at(bad).unwrap_err().to_string();
            assert!(
                err.contains("effective_from") && err.contains("offset"),
                "{bad}: {err}"
            );
        }
        let err = Tenants::from_toml("effective_from = 'tomorrow'\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("effective_from"), "{err}");
    }

    #[test]
    fn a_minute_is_measured_against_the_contract_in_force_at_its_start() {
        let v = |kw: u32, b: bool| {
            let b = if b {
                "[[tenant]]\nid = 'b'\ncontracted_kw = 3\n"
            } else {
                ""
            };
            Arc::new(
                Tenants::from_toml(&format!("[[tenant]]\nid = 'a'\ncontracted_kw = {kw}\n{b}"))
                    .unwrap(),
            )
        };
        const NS: i64 = 1_000_000_000;
        let mut h = TenantHistory::new(v(2, false));
        assert_eq!(h.contracted_milliwatts_at("a", i64::MIN), 2_000_000);
        // In force one nanosecond after minute 60 starts: from minute 120.
        h.push(60 * NS + 1, v(1, true));
        h.push(180 * NS, v(1, false));
        for (minute, a, b) in [(0, 2, 0), (60, 2, 0), (120, 1, 3), (180, 1, 0), (240, 1, 0)] {
            assert_eq!(h.contracted_milliwatts_at("a", minute), a * 1_000_000);
            assert_eq!(h.contracted_milliwatts_at("b", minute), b * 1_000_000);
        }
        assert_eq!(h.contracted_milliwatts_at("nobody", 120), 0);
        // Out-of-range minutes saturate rather than wrap.
        assert_eq!(h.contracted_milliwatts_at("a", i64::MAX), 1_000_000);
        assert_eq!(h.contracted_milliwatts_at("a", i64::MIN), 2_000_000);
        let c = h.contracts_by_tenant();
        assert_eq!(c["a"], [(i64::MIN, 2_000_000), (60 * NS + 1, 1_000_000)]);
        assert_eq!(
            c["b"],
            [(i64::MIN, 0), (60 * NS + 1, 3_000_000), (180 * NS, 0)]
        );
    }

    #[test]
    fn the_history_answers_which_version_was_in_force() {
        let v = |id: &str| {
            Arc::new(
                Tenants::from_toml(&format!("[[tenant]]\nid = '{id}'\ncontracted_kw = 1\n"))
                    .unwrap(),
            )
        };
        let id = |h: &TenantHistory, at: i64| h.version(h.at(at)).all()[0].id.to_string();
        let mut h = TenantHistory::new(v("a"));
        h.push(100, v("b"));
        h.push(200, v("c"));
        // (time, version in force): the first covers all earlier time.
        for (at, want) in [
            (i64::MIN, "a"),
            (99, "a"),
            (100, "b"),
            (199, "b"),
            (200, "c"),
            (i64::MAX, "c"),
        ] {
            assert_eq!(id(&h, at), want, "{at}");
        }
        assert_eq!(h.span(1), (100, 200));
        assert_eq!(h.span(2), (200, i64::MAX));
        // A file loaded later with an earlier effective time replaces what
        // was in force from then on.
        h.push(150, v("d"));
        assert_eq!(
            (id(&h, 149), id(&h, 150), id(&h, 500)),
            ("b".into(), "d".into(), "d".into())
        );
        assert_eq!(h.latest().all()[0].id.as_ref(), "d");
        h.push(i64::MIN, v("e"));
        assert_eq!((h.len(), id(&h, i64::MIN)), (1, "e".into()));
        // Versions whose time ended before the oldest acceptable sample go.
        let mut h = TenantHistory::new(v("a"));
        h.push(100, v("b"));
        h.push(200, v("c"));
        h.forget_before(150);
        assert_eq!(
            (h.len(), id(&h, 0), id(&h, 250)),
            (2, "b".into(), "c".into())
        );
        h.forget_before(i64::MAX);
        assert_eq!((h.len(), id(&h, 0)), (1, "c".into()));
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
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ngpus=[{uuid='G', nodes='n'}]",
                "unknown key `nodes`, expected `uuid` and `node`",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ngpus=[{uuid='G'}]",
                "`node` is missing",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ngpus=[{uuid='G', node=7}]",
                "`node` must be a non-empty string",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ngpus=[7]",
                "must be a GPU UUID string or",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ngpus=[{uuid='G', node='n['}]",
                "GPU \"G\": node pattern",
            ),
            (
                "[[tenant]]\nid='a'\ncontracted_kw=1\ngpus=['G']\n[[tenant]]\nid='b'\ncontracted_kw=1\ngpus=[{uuid='G', node='n'}]",
                "GPU G is claimed by both tenant \"a\" and tenant \"b\"",
            ),
        ];
        for (text, want) in cases {
            let err = Tenants::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn basis_is_read_and_a_facility_basis_needs_a_pue() {
        let t = Tenants::from_toml(
            "[[tenant]]\nid = \"a\"\ncontracted_kw = 1\n
             [[tenant]]\nid = \"b\"\ncontracted_kw = 1\nbasis = \"node\"\n
             [[tenant]]\nid = \"c\"\ncontracted_kw = 2\nbasis = \"facility\"\npue = 1.4\n",
        )
        .unwrap();
        assert_eq!(t.contract("a").basis, Basis::Gpu);
        assert_eq!(t.contract("b").basis, Basis::Node);
        assert_eq!(
            t.contract("c"),
            Contract {
                milliwatts: 2_000_000,
                basis: Basis::Facility,
                pue_ppm: 1_400_000
            }
        );
        assert_eq!(t.contract("nobody"), Contract::default());
        for (text, want) in [
            (
                "[[tenant]]\nid = \"a\"\ncontracted_kw = 1\nbasis = \"facility\"\n",
                "tenant \"a\": basis \"facility\" needs pue",
            ),
            (
                "[[tenant]]\nid = \"a\"\ncontracted_kw = 1\nbasis = \"rack\"\n",
                "tenant \"a\": basis must be \"gpu\", \"node\" or \"facility\", got \"rack\"",
            ),
        ] {
            let err = Tenants::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }
}
