//! The edge: everything an agent sends is converted and checked here, and
//! nowhere else. Domain types of Hellos and samples, their conversion from
//! the wire (the one place the collector reads protobufs), and the limits
//! that bound them.
//!
//! *Boundary:* the domain code (`fleet`, `billing`, `accounting`) only
//! sees values that passed these checks. A Hello is admitted only as a
//! [`Checked`] one, which only [`check_hello`] makes. A field of a sample
//! that fails a check rejects its whole sample (never the batch), with a
//! [`Reject`] reason that labels
//! `capwatch_collector_samples_total{outcome="rejected"}`; the checks that
//! need the node's inventory are [`check_sample`], called by the fleet
//! with what it knows of the node. Two exceptions are dropped alone, their
//! sample kept: a node power reading that fails a check
//! ([`check_node_power`], counted in
//! `capwatch_collector_node_power_readings_total{outcome="rejected"}`), and
//! a GPU's health readings out of range ([`check_health`], counted in
//! `capwatch_collector_gpu_health_dropped_total`); both are diagnostics or
//! have a source of their own, never what a GPU's energy is billed from.

use std::sync::Arc;
use std::time::Duration;

use capwatch_proto::limits::{MAX_NVLINKS, MAX_XID_CODES, XID_CODES};
use capwatch_proto::v1 as pb;

/// Largest step between sequence numbers: more than any spool holds.
pub const MAX_SEQ_JUMP: u64 = 10_000_000;

/// Longest interval whose energy is spread over minute buckets; a longer
/// one (a GPU back after weeks) is spread over its last seven days, so one
/// reading cannot create an unbounded number of buckets.
pub const MAX_SPREAD: Duration = Duration::from_secs(7 * 86_400);

/// Largest power limit accepted from an agent: 10 kW, above any GPU board.
pub const MAX_POWER_LIMIT_MILLIWATTS: u64 = 10_000_000;

/// Most node power sources one Hello may announce: a BMC and the RAPL
/// zones (a package and its DRAM per socket) of the largest hosts, with room.
pub const MAX_NODE_POWER_SOURCES: usize = 64;

/// Largest power one node power reading may report: 50 kW, above any
/// single server (an 8-GPU board with its host draws about 15 kW). Also
/// the plausibility bound of a source's counter deltas.
pub const MAX_NODE_POWER_MILLIWATTS: u64 = 50_000_000;

/// The node power domain whose energy goes into the ledger: the whole
/// node's input power.
pub const NODE_DOMAIN: &str = "node";

/// A string that ends up in a label: at most 128 bytes, no control
/// characters, at least `min` bytes.
fn label_ok(s: &str, min: usize) -> bool {
    (min..=128).contains(&s.len()) && !s.chars().any(char::is_control)
}

/// Whether `id` may name a node: 1-253 bytes, no control characters.
pub fn node_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 253 && !id.chars().any(char::is_control)
}

/// A value that passed the edge's checks; only this module makes one.
#[derive(Debug, Clone)]
pub struct Checked<T>(T);

impl<T> Checked<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Static facts about a GPU, from the Hello.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub uuid: String,
    pub model: String,
    pub power_limit_milliwatts: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub energy_counter_supported: bool,
    /// What users join on (`capwatch_gpu_info`), each checked as a label.
    pub identity: GpuIdentity,
    /// The board's MIG layout, if any.
    pub mig: Mig,
    /// The layout's id (`pb::GpuInfo::mig_layout_id`): on a board that can
    /// be put in MIG mode, what its readings are stamped with.
    pub mig_layout: Option<u64>,
    /// The layouts the board had earlier in the agent's run, by id, newest
    /// last, at most [`MAX_EARLIER_LAYOUTS`], each checked as `mig` is.
    pub earlier_mig: Vec<(u64, Mig)>,
}

// ---- MIG ----

impl GpuInfo {
    /// The UUIDs a tenant may lease of this GPU: the board's, and each
    /// of its MIG instances' (of a layout the edge accepted).
    /// Those of its earlier layouts too: the node may still deliver
    /// energy split to them.
    pub fn leasable_uuids(&self) -> impl Iterator<Item = &str> {
        fn instances(mig: &Mig) -> &[MigInstance] {
            match mig {
                Mig::Split { instances, .. } => instances,
                _ => &[],
            }
        }
        let earlier = self.earlier_mig.iter().flat_map(|(_, m)| instances(m));
        std::iter::once(self.uuid.as_str()).chain(
            instances(&self.mig)
                .iter()
                .chain(earlier)
                .map(|m| m.uuid.as_str()),
        )
    }
}

/// Earlier layouts kept per board (`GpuInfo::earlier_mig`): a board's
/// layout changes rarely (its GPU must be idle), so a spool delivered
/// late spans a few at most.
pub const MAX_EARLIER_LAYOUTS: usize = 4;

/// At most this many MIG devices per board (NVIDIA's boards have 7 GPU
/// instance slices; compute instances may split them further).
pub const MAX_MIG_INSTANCES: usize = 64;

/// One MIG device of a board, from the Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigInstance {
    /// `MIG-...`, what a tenant leases.
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    /// At least 1 (checked).
    pub multiprocessor_count: u32,
    /// Its GPU instance's slices, at least 1, the same for every compute
    /// instance of one GPU instance (checked).
    pub gpu_instance_slice_count: u32,
    /// Its compute instance's slices within the GPU instance, 1 to the GPU
    /// instance's; those of one GPU instance sum to at most its slices
    /// (checked).
    pub compute_instance_slice_count: u32,
    pub profile: String,
}

/// A board's MIG layout, as the Hello gave it and `check_hello` left it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Mig {
    /// Not in MIG mode (or an agent that predates MIG): metered whole.
    #[default]
    Whole,
    /// In MIG mode: the board's SM and GPU-instance slice counts and its
    /// instances, whose GPU instances' slices sum to at most the board's
    /// (checked). The board's energy is split among its GPU instances by
    /// slice share, and within a GPU instance among its compute instances
    /// by compute slice share; slices in no instance stay the board's.
    Split {
        board_sm: u32,
        board_slices: u32,
        instances: Vec<MigInstance>,
    },
    /// A layout the collector cannot apportion by: the board is metered
    /// whole, to its own UUID (nothing lost, nothing doubled).
    Refused(MigRefusal),
}

/// Why a board's MIG layout was refused
/// (`capwatch_collector_mig_layouts_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigRefusal {
    /// Instances without the board's SM count, or one beyond
    /// [`MAX_BOARD_SMS`].
    BoardSmCount = 0,
    /// An instance with no SMs.
    InstanceSmCount = 1,
    /// The instances' SMs sum beyond the board's.
    SmsBeyondBoard = 2,
    /// An instance UUID that is another instance's or a board's in the
    /// same Hello.
    DuplicateUuid = 3,
    /// An instance UUID or profile that is no label (empty, too long,
    /// control characters).
    Label = 4,
    /// More than [`MAX_MIG_INSTANCES`] instances.
    TooMany = 5,
    /// Instances without the board's slice count (an agent that sends SM
    /// counts only), or a board slice count beyond [`MAX_BOARD_SLICES`].
    BoardSliceCount = 6,
    /// An instance with no GPU-instance or compute-instance slices, more
    /// compute slices than its GPU instance's, compute instances of one GPU
    /// instance that disagree on its slices or sum beyond them.
    InstanceSliceCount = 7,
    /// The GPU instances' slices sum beyond the board's.
    SlicesBeyondBoard = 8,
    /// An instance UUID that does not start with `MIG-` (a board's, this
    /// node's or another's, listed as an instance).
    UuidPrefix = 9,
}

/// At most this many GPU-instance slices per board (7 on A100/H100/H200).
pub const MAX_BOARD_SLICES: u32 = 64;
/// At most this many SMs per board (132 on H100).
pub const MAX_BOARD_SMS: u32 = 1024;

impl MigRefusal {
    pub const ALL: [MigRefusal; 10] = [
        MigRefusal::BoardSmCount,
        MigRefusal::InstanceSmCount,
        MigRefusal::SmsBeyondBoard,
        MigRefusal::DuplicateUuid,
        MigRefusal::Label,
        MigRefusal::TooMany,
        MigRefusal::BoardSliceCount,
        MigRefusal::InstanceSliceCount,
        MigRefusal::SlicesBeyondBoard,
        MigRefusal::UuidPrefix,
    ];

    pub fn label(self) -> &'static str {
        match self {
            MigRefusal::BoardSmCount => "board_sm_count",
            MigRefusal::InstanceSmCount => "instance_sm_count",
            MigRefusal::SmsBeyondBoard => "sms_beyond_board",
            MigRefusal::DuplicateUuid => "duplicate_uuid",
            MigRefusal::Label => "label",
            MigRefusal::TooMany => "too_many",
            MigRefusal::BoardSliceCount => "board_slice_count",
            MigRefusal::InstanceSliceCount => "instance_slice_count",
            MigRefusal::SlicesBeyondBoard => "slices_beyond_board",
            MigRefusal::UuidPrefix => "uuid_prefix",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            MigRefusal::BoardSmCount => {
                "MIG instances listed without the board's multiprocessor_count, or with one beyond 1024"
            }
            MigRefusal::InstanceSmCount => "a MIG instance has multiprocessor_count 0",
            MigRefusal::SmsBeyondBoard => {
                "the MIG instances' multiprocessor counts sum beyond the board's"
            }
            MigRefusal::DuplicateUuid => {
                "a MIG instance UUID appears twice in the Hello (or is a board's)"
            }
            MigRefusal::Label => {
                "a MIG instance UUID (1-128) or profile (0-128) is not printable characters"
            }
            MigRefusal::TooMany => "more MIG instances than the limit of 64",
            MigRefusal::BoardSliceCount => {
                "MIG instances listed without the board's gpu_instance_slice_count (1-64)"
            }
            MigRefusal::InstanceSliceCount => {
                "a MIG instance's gpu_instance_slice_count or compute_instance_slice_count is 0 or inconsistent with its GPU instance"
            }
            MigRefusal::SlicesBeyondBoard => "the MIG GPU instances' slices sum beyond the board's",
            MigRefusal::UuidPrefix => "a MIG instance UUID does not start with \"MIG-\"",
        }
    }
}

/// Checks each board's earlier MIG layouts as `check_mig` checks the
/// current ones, each on its own: its instances may be its board's
/// current ones, never a board's UUID or another board's instance
/// (current or earlier). A layout refused is kept as `Mig::Refused` (its
/// readings metered whole); beyond [`MAX_EARLIER_LAYOUTS`] the oldest are
/// dropped.
fn check_earlier_layouts(hello: &mut Hello) {
    if hello.gpus.iter().all(|g| g.earlier_mig.is_empty()) {
        return;
    }
    let boards: std::collections::HashSet<String> =
        hello.gpus.iter().map(|g| g.uuid.clone()).collect();
    let instances_of = |g: &GpuInfo| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in std::iter::once(&g.mig).chain(g.earlier_mig.iter().map(|(_, m)| m)) {
            if let Mig::Split { instances, .. } = m {
                out.extend(instances.iter().map(|i| i.uuid.clone()));
            }
        }
        out
    };
    let per_board: Vec<Vec<String>> = hello.gpus.iter().map(instances_of).collect();
    for (index, g) in hello.gpus.iter_mut().enumerate() {
        if g.earlier_mig.is_empty() {
            continue;
        }
        let mut others = boards.clone();
        for (j, uuids) in per_board.iter().enumerate() {
            if j != index {
                others.extend(uuids.iter().cloned());
            }
        }
        if g.earlier_mig.len() > MAX_EARLIER_LAYOUTS {
            tracing::warn!(node = %hello.node_id, gpu = index, layouts = g.earlier_mig.len(), max = MAX_EARLIER_LAYOUTS, "more earlier MIG layouts than kept: the oldest are dropped (samples stamped with one go whole to the board)");
            let extra = g.earlier_mig.len() - MAX_EARLIER_LAYOUTS;
            g.earlier_mig.drain(..extra);
        }
        for (id, mig) in &mut g.earlier_mig {
            if let Mig::Split {
                board_sm,
                board_slices,
                instances,
            } = &*mig
                && let Err(reason) =
                    check_mig(*board_sm, *board_slices, instances, &mut others.clone())
            {
                tracing::warn!(node = %hello.node_id, gpu = index, uuid = %g.uuid, layout = *id, reason = reason.label(), "earlier MIG layout refused: {}; its samples' board energy goes to the board's UUID", reason.message());
                *mig = Mig::Refused(reason);
            }
        }
    }
}

/// A layout as the Hello gives it, before `check_mig`.
fn mig_of(
    board_sm: Option<u32>,
    board_slices: Option<u32>,
    instances: Vec<pb::MigInstance>,
) -> Mig {
    if instances.is_empty() {
        return Mig::Whole;
    }
    Mig::Split {
        board_sm: board_sm.unwrap_or(0),
        board_slices: board_slices.unwrap_or(0),
        instances: instances
            .into_iter()
            .map(|m| MigInstance {
                uuid: m.uuid,
                gpu_instance_id: m.gpu_instance_id,
                compute_instance_id: m.compute_instance_id,
                multiprocessor_count: m.multiprocessor_count,
                gpu_instance_slice_count: m.gpu_instance_slice_count,
                compute_instance_slice_count: m.compute_instance_slice_count,
                profile: m.profile,
            })
            .collect(),
    }
}

/// Checks one board's MIG layout; `taken` holds the board UUIDs of the
/// Hello and the instance UUIDs of the boards checked before.
fn check_mig(
    board_sm: u32,
    board_slices: u32,
    instances: &[MigInstance],
    taken: &mut std::collections::HashSet<String>,
) -> Result<(), MigRefusal> {
    if instances.len() > MAX_MIG_INSTANCES {
        return Err(MigRefusal::TooMany);
    }
    if instances
        .iter()
        .any(|m| !label_ok(&m.uuid, 1) || !label_ok(&m.profile, 0))
    {
        return Err(MigRefusal::Label);
    }
    // NVML names every MIG device `MIG-...`; anything else is a board's
    // UUID, which a node must not claim as an instance.
    if instances.iter().any(|m| !m.uuid.starts_with("MIG-")) {
        return Err(MigRefusal::UuidPrefix);
    }
    if board_sm == 0 || board_sm > MAX_BOARD_SMS {
        return Err(MigRefusal::BoardSmCount);
    }
    if board_slices == 0 || board_slices > MAX_BOARD_SLICES {
        return Err(MigRefusal::BoardSliceCount);
    }
    if instances.iter().any(|m| m.multiprocessor_count == 0) {
        return Err(MigRefusal::InstanceSmCount);
    }
    let sum: u64 = instances
        .iter()
        .map(|m| u64::from(m.multiprocessor_count))
        .sum();
    if sum > u64::from(board_sm) {
        return Err(MigRefusal::SmsBeyondBoard);
    }
    // Each GPU instance: its slices (the same from each of its compute
    // instances) and the compute slices used in it.
    let mut gis: Vec<(u32, u32, u64)> = Vec::new();
    for m in instances {
        let (g, c) = (m.gpu_instance_slice_count, m.compute_instance_slice_count);
        if g == 0 || c == 0 || c > g {
            return Err(MigRefusal::InstanceSliceCount);
        }
        match gis.iter_mut().find(|(id, _, _)| *id == m.gpu_instance_id) {
            Some((_, slices, _)) if *slices != g => return Err(MigRefusal::InstanceSliceCount),
            Some((_, _, used)) => *used += u64::from(c),
            None => gis.push((m.gpu_instance_id, g, u64::from(c))),
        }
    }
    if gis.iter().any(|(_, g, used)| *used > u64::from(*g)) {
        return Err(MigRefusal::InstanceSliceCount);
    }
    if gis.iter().map(|(_, g, _)| u64::from(*g)).sum::<u64>() > u64::from(board_slices) {
        return Err(MigRefusal::SlicesBeyondBoard);
    }
    let mut own = std::collections::HashSet::new();
    if instances
        .iter()
        .any(|m| taken.contains(&m.uuid) || !own.insert(m.uuid.as_str()))
    {
        return Err(MigRefusal::DuplicateUuid);
    }
    taken.extend(instances.iter().map(|m| m.uuid.clone()));
    Ok(())
}
// ---- end MIG ----

/// The PCI bus id, serial number and driver version of a GPU, from the
/// Hello: absent where the agent did not get them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuIdentity {
    pub pci_bus_id: Option<String>,
    pub serial: Option<String>,
    pub driver_version: Option<String>,
}

/// A node power source, from the Hello; readings name it by position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePowerSource {
    /// What reads it ("redfish", "ipmi", "rapl", "mock").
    pub kind: String,
    /// What it measures ("node", "cpu", "dram"; others are kept out of
    /// the ledger).
    pub domain: String,
    /// Which one (a chassis id, a RAPL zone); unique within the Hello.
    pub name: String,
    pub energy_counter_supported: bool,
    /// How often the agent reads it (10 ms - 1 h, as the GPUs' interval).
    pub interval: Duration,
}

impl NodePowerSource {
    /// `"{kind}/{name}"`: how the ledger keys its cursor.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    /// Whether its energy is the whole node's (the ledger's node energy).
    pub fn is_node(&self) -> bool {
        self.domain == NODE_DOMAIN
    }
}

#[derive(Debug, Clone)]
pub struct Hello {
    pub node_id: String,
    pub agent_version: String,
    pub epoch: u64,
    pub interval: Duration,
    pub gpus: Vec<GpuInfo>,
    pub node_power_sources: Vec<NodePowerSource>,
}

/// Why a Hello was refused: the first six variants by the edge's checks,
/// the rest by the fleet (the node's epoch, GPU leases and holders). One
/// type, so that the agent hears one kind of answer.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("node id must be 1-253 printable characters")]
    NodeId,
    #[error("inventory of {got} GPUs exceeds the limit of {max}")]
    TooManyGpus { got: usize, max: u32 },
    #[error("GPU {index}: {reason}")]
    Gpu { index: usize, reason: &'static str },
    #[error(
        "gpus[{position}].index is {index}: GPU indexes must be 0..n-1 in inventory order (samples refer to GPUs by index)"
    )]
    GpuIndex { position: usize, index: u32 },
    #[error("agent version must be at most 128 printable characters")]
    AgentVersion,
    #[error(
        "node_power_sources[{position}].index is {index}: node power source indexes must be 0..n-1 in order (readings refer to sources by index)"
    )]
    NodePowerIndex { position: usize, index: u32 },
    #[error("node_power_sources: {got} sources exceed the limit of {max}")]
    TooManyNodePowerSources { got: usize, max: usize },
    #[error("node_power_sources[{index}].{field}: {reason}")]
    NodePowerSource {
        index: usize,
        field: &'static str,
        reason: &'static str,
    },
    #[error("stream epoch must be below 2^63")]
    Epoch,
    /// The node already streams (or streamed) under a newer epoch: the
    /// agent must say Hello again with an epoch above `current`.
    #[error(
        "stream epoch {got} is older than the node's current epoch {current}{}; say Hello again with an epoch above it",
        .connected.then_some(", whose stream is still connected").unwrap_or_default()
    )]
    StaleEpoch {
        got: u64,
        current: u64,
        /// Whether a stream of the current epoch is connected now.
        connected: bool,
    },
    #[error(
        "GPU {uuid} is leased to tenant {tenant:?} on node {allowed:?} only; node {node:?} may not report it"
    )]
    GpuLeasedElsewhere {
        uuid: String,
        tenant: Arc<str>,
        allowed: String,
        node: String,
    },
    #[error(
        "GPU {uuid}, leased to tenant {tenant:?}, is held by node {holder:?}, which is connected; node {node:?} may report it once that node's stream has ended or its inventory no longer lists it"
    )]
    GpuHeldElsewhere {
        uuid: String,
        tenant: Arc<str>,
        holder: Arc<str>,
        node: String,
    },
}

/// Checks a Hello against the limits: node id, inventory size
/// (`max_gpus`), labels, epoch, power limits and unique UUIDs.
pub fn check_hello(mut hello: Hello, max_gpus: u32) -> Result<Checked<Hello>, HelloError> {
    if !node_id_ok(&hello.node_id) {
        return Err(HelloError::NodeId);
    }
    if hello.gpus.len() > max_gpus as usize {
        return Err(HelloError::TooManyGpus {
            got: hello.gpus.len(),
            max: max_gpus,
        });
    }
    if !label_ok(&hello.agent_version, 0) {
        return Err(HelloError::AgentVersion);
    }
    if hello.epoch > MAX_STORED {
        return Err(HelloError::Epoch);
    }
    check_node_power_sources(&hello.node_power_sources)?;
    for (index, g) in hello.gpus.iter().enumerate() {
        if !label_ok(&g.uuid, 1) {
            return Err(HelloError::Gpu {
                index,
                reason: "UUID must be 1-128 printable characters",
            });
        }
        if !label_ok(&g.model, 0) {
            return Err(HelloError::Gpu {
                index,
                reason: "model must be at most 128 printable characters",
            });
        }
        if g.power_limit_milliwatts
            .is_some_and(|l| l == 0 || l > MAX_POWER_LIMIT_MILLIWATTS)
        {
            return Err(HelloError::Gpu {
                index,
                reason: "power limit must be between 1 mW and 10 kW",
            });
        }
        if hello.gpus[..index].iter().any(|o| o.uuid == g.uuid) {
            return Err(HelloError::Gpu {
                index,
                reason: "UUID appears twice in the inventory",
            });
        }
    }
    // A MIG layout the collector cannot apportion by is dropped alone (the
    // board metered whole, to its UUID), never the node's Hello: counted
    // by `State::hello_checked`.
    let mut taken: std::collections::HashSet<String> =
        hello.gpus.iter().map(|g| g.uuid.clone()).collect();
    for (index, g) in hello.gpus.iter_mut().enumerate() {
        if let Mig::Split {
            board_sm,
            board_slices,
            instances,
        } = &g.mig
            && let Err(reason) = check_mig(*board_sm, *board_slices, instances, &mut taken)
        {
            tracing::warn!(node = %hello.node_id, gpu = index, uuid = %g.uuid, reason = reason.label(), "MIG layout refused: {}; the board's energy goes to the board's UUID", reason.message());
            g.mig = Mig::Refused(reason);
        }
    }
    check_earlier_layouts(&mut hello);
    // Identity is for joins only: a value that cannot be a label (empty,
    // too long, control characters) is dropped, logged, and the GPU
    // admitted; it never costs the node its metering.
    for (index, g) in hello.gpus.iter_mut().enumerate() {
        let id = &mut g.identity;
        for (value, field) in [
            (&mut id.pci_bus_id, "pci_bus_id"),
            (&mut id.serial, "serial"),
            (&mut id.driver_version, "driver_version"),
        ] {
            if value.as_deref().is_some_and(|v| !label_ok(v, 1)) {
                tracing::warn!(node = %hello.node_id, gpu = index, field, "GPU identity field is not 1-128 printable characters: dropped");
                *value = None;
            }
        }
    }
    Ok(Checked(hello))
}

/// Checks the Hello's node power sources: how many, label-safe kind,
/// domain and name, names unique, at most one whole-node source.
fn check_node_power_sources(sources: &[NodePowerSource]) -> Result<(), HelloError> {
    if sources.len() > MAX_NODE_POWER_SOURCES {
        return Err(HelloError::TooManyNodePowerSources {
            got: sources.len(),
            max: MAX_NODE_POWER_SOURCES,
        });
    }
    let label = |s: &str| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    for (index, p) in sources.iter().enumerate() {
        let bad = |field, reason| HelloError::NodePowerSource {
            index,
            field,
            reason,
        };
        if !label(&p.kind) {
            return Err(bad(
                "kind",
                "must be 1-64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if !label(&p.domain) {
            return Err(bad(
                "domain",
                "must be 1-64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if !label_ok(&p.name, 1) {
            return Err(bad("name", "must be 1-128 printable characters"));
        }
        if sources[..index].iter().any(|o| o.name == p.name) {
            return Err(bad("name", "appears twice among the node power sources"));
        }
        if p.is_node() && sources[..index].iter().any(NodePowerSource::is_node) {
            return Err(bad(
                "domain",
                "a second whole-node (\"node\") source: a node has at most one",
            ));
        }
    }
    Ok(())
}

/// Why a node power reading was dropped
/// (`capwatch_collector_node_power_readings_total{reason}`); its sample is
/// kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePowerReject {
    /// A source index not in the Hello's `node_power_sources`.
    Source = 0,
    /// Power above `MAX_NODE_POWER_MILLIWATTS`.
    Power = 1,
    /// A timestamp beyond the allowed clock skew or older than the oldest
    /// sample accepted.
    Timestamp = 2,
    /// An energy counter beyond what the ledger stores.
    Energy = 3,
}

impl NodePowerReject {
    pub const ALL: [NodePowerReject; 4] = [
        NodePowerReject::Source,
        NodePowerReject::Power,
        NodePowerReject::Timestamp,
        NodePowerReject::Energy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            NodePowerReject::Source => "source",
            NodePowerReject::Power => "power",
            NodePowerReject::Timestamp => "timestamp",
            NodePowerReject::Energy => "energy",
        }
    }
}

/// Checks one node power reading against the node's `sources` (how many
/// it announced) and the timestamps a reading may carry now: after
/// `oldest_timestamp` (and the Unix epoch), at most `latest_timestamp`.
/// Whether it follows the source's previous reading is the fleet's check
/// (a reading not after it is a duplicate).
pub fn check_node_power(
    r: &NodePowerReading,
    sources: usize,
    latest_timestamp: i64,
    oldest_timestamp: i64,
) -> Result<(), NodePowerReject> {
    if r.source as usize >= sources {
        return Err(NodePowerReject::Source);
    }
    if r.timestamp_unix_nanos <= oldest_timestamp.max(0)
        || r.timestamp_unix_nanos > latest_timestamp
    {
        return Err(NodePowerReject::Timestamp);
    }
    if r.power_milliwatts
        .is_some_and(|p| p > MAX_NODE_POWER_MILLIWATTS)
    {
        return Err(NodePowerReject::Power);
    }
    if r.energy_millijoules.is_some_and(|e| e > MAX_STORED) {
        return Err(NodePowerReject::Energy);
    }
    Ok(())
}

/// Checks a sample against the node's inventory (`gpus` GPUs, the power
/// limit of GPU `i` as the node knows it by `limit_of(i)`) and the
/// timestamps a sample may carry now: after `oldest_timestamp` (and the
/// Unix epoch), at most `latest_timestamp`.
#[inline]
pub fn check_sample(
    s: &NodeSample,
    gpus: usize,
    limit_of: impl Fn(usize) -> Option<u64>,
    latest_timestamp: i64,
    oldest_timestamp: i64,
) -> Result<(), Reject> {
    if s.timestamp_unix_nanos <= oldest_timestamp.max(0)
        || s.timestamp_unix_nanos > latest_timestamp
    {
        return Err(Reject::Timestamp);
    }
    let mut seen = vec![false; gpus];
    for r in &s.gpus {
        let i = r.index as usize;
        if i >= gpus || std::mem::replace(&mut seen[i], true) {
            return Err(Reject::GpuIndex);
        }
        let limit = match (r.power_limit_milliwatts, limit_of(i)) {
            (Some(l), _) if l == 0 || l > MAX_POWER_LIMIT_MILLIWATTS => return Err(Reject::Power),
            (a, b) => a.max(b),
        };
        // Three times the board limit (the larger of the announced and
        // the current one: limits change at run time), or 3 kW when the
        // limit is unknown. The instant and average readings are health
        // readings, bounded by `check_health`.
        let max = limit.map_or(3_000_000, |l| l * 3);
        if r.power_milliwatts.is_some_and(|p| p > max) {
            return Err(Reject::Power);
        }
    }
    Ok(())
}

/// Why a sample was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// A GPU index not in the stream's inventory, or twice in one sample.
    GpuIndex = 0,
    /// Utilization outside 0-100 %.
    Utilization = 1,
    /// Power above three times the GPU's limit.
    Power = 2,
    /// A timestamp at or before the Unix epoch.
    Timestamp = 3,
    /// Sequence number 0.
    Sequence = 4,
    /// A field that cannot be read (e.g. a non-finite host figure).
    Malformed = 5,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::GpuIndex => "gpu_index",
            Reject::Utilization => "utilization",
            Reject::Power => "power",
            Reject::Timestamp => "timestamp",
            Reject::Sequence => "sequence",
            Reject::Malformed => "malformed",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuReading {
    pub index: u32,
    pub power_milliwatts: Option<u64>,
    pub energy_millijoules: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub memory_utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_celsius: Option<i32>,
    pub sm_clock_mhz: Option<u32>,
    pub power_limit_milliwatts: Option<u64>,
    /// Boxed: most of a reading's path (accounting, the ledger) never
    /// looks at it, and a GPU without any keeps one pointer.
    pub health: Option<Box<GpuHealth>>,
    pub lost: bool,
    /// The MIG layout the reading was taken under
    /// (`pb::GpuSample::mig_layout_id`); `None`: the Hello's.
    pub mig_layout: Option<u64>,
}

/// A GPU's health readings, in NVML's units (`pb::GpuHealth` documents
/// each); checked by [`check_health`], the power readings by
/// [`check_sample`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuHealth {
    pub clock_event_reasons: Option<u64>,
    pub power_violation_nanoseconds: Option<u64>,
    pub thermal_violation_nanoseconds: Option<u64>,
    pub ecc_volatile_corrected: Option<u64>,
    pub ecc_volatile_uncorrected: Option<u64>,
    pub ecc_aggregate_corrected: Option<u64>,
    pub ecc_aggregate_uncorrected: Option<u64>,
    pub retired_pages_single_bit: Option<u64>,
    pub retired_pages_double_bit: Option<u64>,
    pub retired_pages_pending: Option<bool>,
    pub remapped_rows_correctable: Option<u64>,
    pub remapped_rows_uncorrectable: Option<u64>,
    pub remapped_rows_pending: Option<bool>,
    pub remapped_rows_failed: Option<bool>,
    pub memory_temperature_celsius: Option<i32>,
    pub memory_clock_mhz: Option<u32>,
    pub encoder_utilization_percent: Option<u32>,
    pub decoder_utilization_percent: Option<u32>,
    pub pcie_replays: Option<u64>,
    pub pcie_tx_kilobytes_per_second: Option<u32>,
    pub pcie_rx_kilobytes_per_second: Option<u32>,
    pub fan_speed_percent: Option<u32>,
    pub power_instant_milliwatts: Option<u64>,
    pub power_average_milliwatts: Option<u64>,
    /// XID errors counted by the agent (since it started, or across its
    /// restarts), (code, count) by code, each code once, at most
    /// [`MAX_XID_CODES`].
    pub xid_errors: Vec<(u32, u64)>,
    /// The most recent XID: code and Unix nanoseconds.
    pub last_xid: Option<(u32, i64)>,
    // ---- NVLink ----
    /// Active NVLink links; `None` on a GPU without NVLink.
    pub nvlink_active_links: Option<u32>,
    /// Each active link's error counters, by link, each link once, at
    /// most [`MAX_NVLINKS`] and at most `nvlink_active_links` of them.
    pub nvlinks: Vec<NvLinkErrors>,
}

/// One NVLink link's data-link error counters (`pb::NvLinkErrors`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvLinkErrors {
    pub link: u32,
    pub replay: Option<u64>,
    pub recovery: Option<u64>,
    pub crc_flit: Option<u64>,
    pub crc_data: Option<u64>,
    /// Data sent and received over the link (bytes, cumulative).
    pub transmit_bytes: Option<u64>,
    pub receive_bytes: Option<u64>,
}

/// Highest instant or average power accepted as a health reading: three
/// times the highest board limit accepted (a transient above the limit is
/// what the instant reading is for; an absurd one is a broken reading).
pub const MAX_HEALTH_POWER_MILLIWATTS: u64 = 3 * MAX_POWER_LIMIT_MILLIWATTS;

/// Highest memory clock accepted: 100 GHz, far above any HBM or GDDR.
pub const MAX_MEMORY_CLOCK_MHZ: u32 = 100_000;
/// Memory temperatures accepted (NVML reports 0 while the sensor warms up).
pub const MEMORY_TEMPERATURE_CELSIUS: std::ops::RangeInclusive<i32> = -50..=200;
/// Highest fan speed accepted: NVML may report above 100 %.
pub const MAX_FAN_SPEED_PERCENT: u32 = 200;

/// Checks the health readings that have a range: encoder and decoder
/// utilization 0-100 %, fan speed at most 200 %, memory temperature
/// -50 to 200 C, memory clock at most 100 GHz, instant and average power
/// at most `MAX_HEALTH_POWER_MILLIWATTS`, XID counts that hold together
/// (`xid_ok`), NVLink links that hold together (`nvlink_ok`). Counters
/// and the clock event bitmask are taken as NVML gives them. False: drop
/// them.
pub fn check_health(h: &GpuHealth) -> bool {
    let pct_ok = |v: Option<u32>| v.is_none_or(|v| v <= 100);
    pct_ok(h.encoder_utilization_percent)
        && pct_ok(h.decoder_utilization_percent)
        && h.fan_speed_percent
            .is_none_or(|v| v <= MAX_FAN_SPEED_PERCENT)
        && h.memory_temperature_celsius
            .is_none_or(|t| MEMORY_TEMPERATURE_CELSIUS.contains(&t))
        && h.memory_clock_mhz.is_none_or(|c| c <= MAX_MEMORY_CLOCK_MHZ)
        && [h.power_instant_milliwatts, h.power_average_milliwatts]
            .into_iter()
            .flatten()
            .all(|p| p <= MAX_HEALTH_POWER_MILLIWATTS)
        && xid_ok(h)
        && nvlink_ok(h)
}

/// NVLink readings hold together: at most [`MAX_NVLINKS`] links active,
/// entries for no more links than that count (none without it), each
/// link below [`MAX_NVLINKS`], once and in order. A counter lower than
/// the last sample's is a reset (driver reload, `nvidia-smi nvlink -re`),
/// exported as is: Prometheus takes a drop as a counter reset.
fn nvlink_ok(h: &GpuHealth) -> bool {
    let entries = h.nvlinks.len();
    h.nvlink_active_links
        .map_or(entries == 0, |n| n <= MAX_NVLINKS && entries <= n as usize)
        && h.nvlinks.iter().all(|l| l.link < MAX_NVLINKS)
        && h.nvlinks.windows(2).all(|w| w[0].link < w[1].link)
}

/// XID counts hold together: at most [`MAX_XID_CODES`] codes, each in
/// [`XID_CODES`], once and in order, each counted at least once; the last
/// XID's code in range and its time after 1970.
fn xid_ok(h: &GpuHealth) -> bool {
    h.xid_errors.len() <= MAX_XID_CODES
        && h.xid_errors
            .iter()
            .all(|&(c, n)| XID_CODES.contains(&c) && n > 0)
        && h.xid_errors.windows(2).all(|w| w[0].0 < w[1].0)
        && h.last_xid
            .is_none_or(|(c, at)| XID_CODES.contains(&c) && at > 0)
}

impl From<pb::GpuHealth> for GpuHealth {
    fn from(h: pb::GpuHealth) -> Self {
        Self {
            clock_event_reasons: h.clock_event_reasons,
            power_violation_nanoseconds: h.power_violation_nanoseconds,
            thermal_violation_nanoseconds: h.thermal_violation_nanoseconds,
            ecc_volatile_corrected: h.ecc_volatile_corrected,
            ecc_volatile_uncorrected: h.ecc_volatile_uncorrected,
            ecc_aggregate_corrected: h.ecc_aggregate_corrected,
            ecc_aggregate_uncorrected: h.ecc_aggregate_uncorrected,
            retired_pages_single_bit: h.retired_pages_single_bit,
            retired_pages_double_bit: h.retired_pages_double_bit,
            retired_pages_pending: h.retired_pages_pending,
            remapped_rows_correctable: h.remapped_rows_correctable,
            remapped_rows_uncorrectable: h.remapped_rows_uncorrectable,
            remapped_rows_pending: h.remapped_rows_pending,
            remapped_rows_failed: h.remapped_rows_failed,
            memory_temperature_celsius: h.memory_temperature_celsius,
            memory_clock_mhz: h.memory_clock_mhz,
            encoder_utilization_percent: h.encoder_utilization_percent,
            decoder_utilization_percent: h.decoder_utilization_percent,
            pcie_replays: h.pcie_replays,
            pcie_tx_kilobytes_per_second: h.pcie_tx_kilobytes_per_second,
            pcie_rx_kilobytes_per_second: h.pcie_rx_kilobytes_per_second,
            fan_speed_percent: h.fan_speed_percent,
            power_instant_milliwatts: h.power_instant_milliwatts,
            power_average_milliwatts: h.power_average_milliwatts,
            // Sorted by `check_health`'s rule; unsorted input drops the
            // GPU's health there, never silently reordered.
            xid_errors: h.xid_errors.iter().map(|x| (x.code, x.count)).collect(),
            // A code without its time (or the reverse) is kept as given
            // for `check_health` to drop.
            last_xid: match (h.last_xid, h.last_xid_unix_nanos) {
                (None, None) => None,
                (c, at) => Some((c.unwrap_or(0), at.unwrap_or(0))),
            },
            // ---- NVLink ----
            // Kept as given (bounded by the message size) for
            // `check_health` to drop.
            nvlink_active_links: h.nvlink_active_links,
            nvlinks: h
                .nvlinks
                .iter()
                .map(|l| NvLinkErrors {
                    link: l.link,
                    replay: l.replay,
                    recovery: l.recovery,
                    crc_flit: l.crc_flit,
                    crc_data: l.crc_data,
                    transmit_bytes: l.transmit_bytes,
                    receive_bytes: l.receive_bytes,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostReading {
    pub cpu_utilization_ratio: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
}

/// One reading of a node power source, taken at its own time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodePowerReading {
    /// Index into the Hello's `node_power_sources`.
    pub source: u32,
    pub timestamp_unix_nanos: i64,
    pub power_milliwatts: Option<u64>,
    /// Cumulative, from the source's counter.
    pub energy_millijoules: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeSample {
    pub seq: u64,
    pub timestamp_unix_nanos: i64,
    pub gpus: Vec<GpuReading>,
    pub host: Option<HostReading>,
    /// Checked by [`check_node_power`] one by one, when applied.
    pub node_power: Vec<NodePowerReading>,
}

/// Largest integer the ledger stores (SQLite INTEGER is an i64).
pub const MAX_STORED: u64 = i64::MAX as u64;

/// Converts a Hello (checked by [`check_hello`] when the fleet admits
/// it). Samples name a GPU by its `index`, which must be its
/// position in the inventory (0..n-1 in order); any other numbering is
/// refused rather than reinterpreted.
pub fn hello(h: pb::Hello) -> Result<Hello, HelloError> {
    if let Some((position, g)) = h
        .gpus
        .iter()
        .enumerate()
        .find(|(p, g)| u32::try_from(*p).ok() != Some(g.index))
    {
        return Err(HelloError::GpuIndex {
            position,
            index: g.index,
        });
    }
    if let Some((position, p)) = h
        .node_power_sources
        .iter()
        .enumerate()
        .find(|(i, p)| u32::try_from(*i).ok() != Some(p.index))
    {
        return Err(HelloError::NodePowerIndex {
            position,
            index: p.index,
        });
    }
    let interval = |millis: u32| Duration::from_millis(u64::from(millis.clamp(10, 3_600_000)));
    Ok(Hello {
        node_id: h.node_id,
        agent_version: h.agent_version,
        epoch: h.stream_epoch,
        interval: interval(h.interval_millis),
        gpus: h
            .gpus
            .into_iter()
            .map(|g| GpuInfo {
                uuid: g.uuid,
                model: g.model,
                power_limit_milliwatts: g.power_limit_milliwatts,
                memory_total_bytes: g.memory_total_bytes,
                energy_counter_supported: g.energy_counter_supported,
                identity: GpuIdentity {
                    pci_bus_id: g.pci_bus_id,
                    serial: g.serial,
                    driver_version: g.driver_version,
                },
                mig_layout: g.mig_layout_id,
                mig: mig_of(
                    g.multiprocessor_count,
                    g.gpu_instance_slice_count,
                    g.mig_instances,
                ),
                earlier_mig: g
                    .earlier_mig_layouts
                    .into_iter()
                    .map(|l| {
                        let mig = mig_of(
                            l.multiprocessor_count,
                            l.gpu_instance_slice_count,
                            l.mig_instances,
                        );
                        (l.id, mig)
                    })
                    .collect(),
            })
            .collect(),
        node_power_sources: h
            .node_power_sources
            .into_iter()
            .map(|p| NodePowerSource {
                kind: p.kind,
                domain: p.domain,
                name: p.name,
                energy_counter_supported: p.energy_counter_supported,
                interval: interval(p.interval_millis),
            })
            .collect(),
    })
}

/// Converts and checks one sample on its own; the checks that need the
/// node's inventory are [`check_sample`]. A GPU's health readings out of
/// range are dropped alone (see [`sample_counted`]).
pub fn sample(s: pb::NodeSample) -> Result<NodeSample, (u64, Reject)> {
    sample_counted(s).map(|(s, _)| s)
}

/// [`sample`], with the number of GPUs whose health readings were out of
/// range and dropped: they are diagnostics, so a bad one (a failing fan
/// sensor) drops that GPU's health block only, never its power, energy
/// or the rest of the node's sample.
pub fn sample_counted(s: pb::NodeSample) -> Result<(NodeSample, u32), (u64, Reject)> {
    let seq = s.seq;
    let mut health_dropped = 0u32;
    // The ledger stores integers as SQLite's i64: larger values are
    // refused here rather than failing a commit for the whole fleet.
    if seq == 0 || seq > MAX_STORED {
        return Err((seq.min(MAX_STORED), Reject::Sequence));
    }
    let mut gpus = Vec::with_capacity(s.gpus.len());
    for g in s.gpus {
        if g.energy_millijoules.is_some_and(|e| e > MAX_STORED) {
            return Err((seq, Reject::Malformed));
        }
        let pct_ok = |v: Option<u32>| v.is_none_or(|v| v <= 100);
        if !pct_ok(g.utilization_percent) || !pct_ok(g.memory_utilization_percent) {
            return Err((seq, Reject::Utilization));
        }
        let health = match g.health {
            Some(h) if !g.lost => {
                let h = GpuHealth::from(h);
                if check_health(&h) {
                    Some(Box::new(h))
                } else {
                    health_dropped += 1;
                    None
                }
            }
            _ => None,
        };
        let reading = if g.lost {
            GpuReading {
                index: g.index,
                lost: true,
                ..GpuReading::default()
            }
        } else {
            GpuReading {
                index: g.index,
                power_milliwatts: g.power_milliwatts,
                energy_millijoules: g.energy_millijoules,
                utilization_percent: g.utilization_percent,
                memory_utilization_percent: g.memory_utilization_percent,
                memory_used_bytes: g.memory_used_bytes,
                temperature_celsius: g.temperature_celsius,
                sm_clock_mhz: g.sm_clock_mhz,
                power_limit_milliwatts: g.power_limit_milliwatts,
                health,
                lost: false,
                mig_layout: g.mig_layout_id,
            }
        };
        gpus.push(reading);
    }
    let host = match s.host {
        None => None,
        Some(h) => {
            let cpu = match h.cpu_utilization_percent {
                Some(c) if !c.is_finite() || !(0.0..=100.0).contains(&c) => {
                    return Err((seq, Reject::Malformed));
                }
                c => c.map(|c| f64::from(c) / 100.0),
            };
            Some(HostReading {
                cpu_utilization_ratio: cpu,
                memory_used_bytes: h.memory_used_bytes,
                memory_total_bytes: h.memory_total_bytes,
            })
        }
    };
    // Bounded by the message size limit; each reading is checked when
    // applied, and a bad one is dropped alone.
    let node_power = s
        .node_power
        .into_iter()
        .map(|r| NodePowerReading {
            source: r.source,
            timestamp_unix_nanos: r.timestamp_unix_nanos,
            power_milliwatts: r.power_milliwatts,
            energy_millijoules: r.energy_millijoules,
        })
        .collect();
    Ok((
        NodeSample {
            seq,
            timestamp_unix_nanos: s.timestamp_unix_nanos,
            gpus,
            host,
            node_power,
        },
        health_dropped,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_beyond_the_ledger_are_refused_at_the_edge() {
        // (sample, expected rejection)
        let gpu = |energy| pb::GpuSample {
            energy_millijoules: Some(energy),
            ..Default::default()
        };
        let cases = [
            (
                pb::NodeSample {
                    seq: 0,
                    ..Default::default()
                },
                (0, Reject::Sequence),
            ),
            (
                pb::NodeSample {
                    seq: u64::MAX,
                    ..Default::default()
                },
                (MAX_STORED, Reject::Sequence),
            ),
            (
                pb::NodeSample {
                    seq: 7,
                    gpus: vec![gpu(MAX_STORED + 1)],
                    ..Default::default()
                },
                (7, Reject::Malformed),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(sample(s).err(), Some(want));
        }
        let ok = pb::NodeSample {
            node_power: Vec::new(),
            seq: 7,
            timestamp_unix_nanos: 1,
            gpus: vec![gpu(MAX_STORED)],
            host: None,
        };
        assert!(sample(ok).is_ok());
    }

    /// Invariant: a health reading out of range drops that GPU's health
    /// readings alone: the sample, the GPU's power and energy and the
    /// other GPUs' readings stay; one at its bound, and a lost GPU's, pass.
    #[test]
    fn a_health_reading_out_of_range_drops_its_gpus_health_alone() {
        type Set = fn(&mut pb::GpuHealth);
        // (reading, dropped)
        let cases: [(Set, bool); 12] = [
            (|h| h.encoder_utilization_percent = Some(100), false),
            (|h| h.encoder_utilization_percent = Some(101), true),
            (|h| h.decoder_utilization_percent = Some(101), true),
            (|h| h.fan_speed_percent = Some(200), false),
            (|h| h.fan_speed_percent = Some(201), true),
            (|h| h.memory_temperature_celsius = Some(-51), true),
            (|h| h.memory_temperature_celsius = Some(201), true),
            (|h| h.memory_clock_mhz = Some(100_001), true),
            // Counters and the bitmask as NVML gives them.
            (
                |h| {
                    h.clock_event_reasons = Some(u64::MAX);
                    h.ecc_aggregate_uncorrected = Some(u64::MAX);
                    h.power_violation_nanoseconds = Some(u64::MAX);
                },
                false,
            ),
            // A transient far above the 700 W limit is what the instant
            // reading shows; beyond any board, it is broken.
            (|h| h.power_instant_milliwatts = Some(30_000_000), false),
            (|h| h.power_instant_milliwatts = Some(30_000_001), true),
            (|h| h.power_average_milliwatts = Some(30_000_001), true),
        ];
        for (i, (set, dropped)) in cases.into_iter().enumerate() {
            for lost in [false, true] {
                let mut health = pb::GpuHealth::default();
                set(&mut health);
                let gpu = |index: u32, health: Option<pb::GpuHealth>| pb::GpuSample {
                    index,
                    power_milliwatts: Some(500_000),
                    energy_millijoules: Some(9_000),
                    power_limit_milliwatts: Some(700_000),
                    health,
                    lost,
                    ..Default::default()
                };
                let s = pb::NodeSample {
                    seq: 1,
                    timestamp_unix_nanos: 1_000,
                    gpus: vec![gpu(0, Some(health)), gpu(1, Some(pb::GpuHealth::default()))],
                    ..Default::default()
                };
                let (got, n) = sample_counted(s).unwrap_or_else(|e| panic!("case {i}: {e:?}"));
                assert_eq!(
                    check_sample(&got, 2, |_| None, 2_000, 0),
                    Ok(()),
                    "case {i}"
                );
                let dropped = dropped && !lost;
                assert_eq!(n, u32::from(dropped), "case {i}, lost {lost}");
                assert_eq!(got.gpus[0].health.is_none(), dropped || lost, "case {i}");
                assert_eq!(got.gpus[1].health.is_none(), lost, "case {i}");
                if !lost {
                    assert_eq!(got.gpus[0].power_milliwatts, Some(500_000));
                    assert_eq!(got.gpus[0].energy_millijoules, Some(9_000));
                }
            }
        }
    }

    /// Invariant: XID counts are bounded (at most 64 codes, each in
    /// 1-999, each once, in order, each counted; a last XID with its
    /// time): anything else drops that GPU's health readings alone, as
    /// any health reading out of range does; the sample, the GPU's power
    /// and energy and the other GPU's health stay.
    #[test]
    fn malformed_xid_counts_drop_their_gpus_health_alone() {
        let xid = |code, count| pb::XidCount { code, count };
        let last = |h: &mut pb::GpuHealth, code, at| {
            h.last_xid = code;
            h.last_xid_unix_nanos = at;
        };
        type Set = Box<dyn Fn(&mut pb::GpuHealth)>;
        // (case, XID readings, dropped)
        let cases: Vec<(&str, Set, bool)> = vec![
            ("none", Box::new(|_| {}), false),
            (
                "two codes and the last",
                Box::new(move |h| {
                    h.xid_errors = vec![xid(1, 3), xid(999, u64::MAX)];
                    last(h, Some(999), Some(1));
                }),
                false,
            ),
            (
                "64 codes",
                Box::new(move |h| h.xid_errors = (1..=64).map(|c| xid(c, 1)).collect()),
                false,
            ),
            (
                "65 codes",
                Box::new(move |h| h.xid_errors = (1..=65).map(|c| xid(c, 1)).collect()),
                true,
            ),
            (
                "code 0",
                Box::new(move |h| h.xid_errors = vec![xid(0, 1)]),
                true,
            ),
            (
                "code 1000",
                Box::new(move |h| h.xid_errors = vec![xid(1000, 1)]),
                true,
            ),
            (
                "a code counted 0 times",
                Box::new(move |h| h.xid_errors = vec![xid(48, 1), xid(79, 0)]),
                true,
            ),
            (
                "a code twice",
                Box::new(move |h| h.xid_errors = vec![xid(79, 1), xid(79, 1)]),
                true,
            ),
            (
                "out of order",
                Box::new(move |h| h.xid_errors = vec![xid(79, 1), xid(48, 1)]),
                true,
            ),
            (
                "last code out of range",
                Box::new(move |h| last(h, Some(1000), Some(1))),
                true,
            ),
            (
                "last XID at 1970",
                Box::new(move |h| last(h, Some(79), Some(0))),
                true,
            ),
            (
                "last code without its time",
                Box::new(move |h| last(h, Some(79), None)),
                true,
            ),
            (
                "a time without the code",
                Box::new(move |h| last(h, None, Some(1))),
                true,
            ),
        ];
        for (name, set, dropped) in cases {
            let mut health = pb::GpuHealth {
                fan_speed_percent: Some(40),
                ..Default::default()
            };
            set(&mut health);
            let gpu = |index: u32, health: pb::GpuHealth| pb::GpuSample {
                index,
                power_milliwatts: Some(500_000),
                energy_millijoules: Some(9_000 + u64::from(index)),
                health: Some(health),
                ..Default::default()
            };
            let s = pb::NodeSample {
                seq: 1,
                timestamp_unix_nanos: 1_000,
                gpus: vec![
                    gpu(
                        0,
                        pb::GpuHealth {
                            xid_errors: vec![xid(13, 2)],
                            ..Default::default()
                        },
                    ),
                    gpu(1, health),
                ],
                ..Default::default()
            };
            let (got, n) = sample_counted(s).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(n, u32::from(dropped), "{name}");
            let health = got.gpus[1].health.as_deref();
            assert_eq!(health.is_none(), dropped, "{name}");
            assert_eq!(
                health.and_then(|h| h.fan_speed_percent),
                (!dropped).then_some(40)
            );
            assert_eq!(
                got.gpus[0].health.as_deref().map(|h| h.xid_errors.clone()),
                Some(vec![(13, 2)]),
                "{name}"
            );
            for (i, g) in got.gpus.iter().enumerate() {
                assert_eq!(g.power_milliwatts, Some(500_000), "{name}");
                assert_eq!(g.energy_millijoules, Some(9_000 + i as u64), "{name}");
            }
        }
    }

    // ---- NVLink ----

    /// Invariant: NVLink readings hold together (at most 18 links
    /// active, an entry for no more links than are active, each link
    /// below 18, once, in order): anything else drops that GPU's health
    /// readings alone; the sample, its power and energy and the other
    /// GPU's health stay. A counter below the last sample's is a reset,
    /// not malformed: it is kept.
    #[test]
    fn malformed_nvlink_readings_drop_their_gpus_health_alone() {
        let link = |link, replay| pb::NvLinkErrors {
            link,
            replay: Some(replay),
            crc_flit: Some(u64::MAX),
            ..Default::default()
        };
        let nv = |active: Option<u32>, links: Vec<pb::NvLinkErrors>| pb::GpuHealth {
            fan_speed_percent: Some(40),
            nvlink_active_links: active,
            nvlinks: links,
            ..Default::default()
        };
        // (case, GPU 1's health on samples 1 and 2, dropped on sample 2)
        let cases: Vec<(&str, pb::GpuHealth, pb::GpuHealth, bool)> = vec![
            (
                "2 of 18 links",
                nv(Some(2), vec![link(0, 5)]),
                nv(Some(2), vec![link(3, 1), link(17, 9)]),
                false,
            ),
            ("18 active", nv(None, vec![]), nv(Some(18), vec![]), false),
            (
                "a counter going down is a reset",
                nv(Some(1), vec![link(3, 500)]),
                nv(Some(1), vec![link(3, 2)]),
                false,
            ),
            ("19 active", nv(None, vec![]), nv(Some(19), vec![]), true),
            (
                "link 18",
                nv(None, vec![]),
                nv(Some(1), vec![link(18, 1)]),
                true,
            ),
            (
                "more links than active",
                nv(None, vec![]),
                nv(Some(1), vec![link(0, 1), link(1, 1)]),
                true,
            ),
            (
                "links without the count",
                nv(None, vec![]),
                nv(None, vec![link(0, 1)]),
                true,
            ),
            (
                "a link twice",
                nv(None, vec![]),
                nv(Some(2), vec![link(4, 1), link(4, 1)]),
                true,
            ),
            (
                "out of order",
                nv(None, vec![]),
                nv(Some(2), vec![link(4, 1), link(2, 1)]),
                true,
            ),
        ];
        for (name, first, second, dropped) in cases {
            let mut got_links = Vec::new();
            for (seq, health) in [(1, first), (2, second)] {
                let gpu = |index: u32, health: pb::GpuHealth| pb::GpuSample {
                    index,
                    power_milliwatts: Some(500_000),
                    energy_millijoules: Some(9_000 + u64::from(index)),
                    health: Some(health),
                    ..Default::default()
                };
                let s = pb::NodeSample {
                    seq,
                    timestamp_unix_nanos: 1_000,
                    gpus: vec![gpu(0, nv(Some(1), vec![link(7, 3)])), gpu(1, health)],
                    ..Default::default()
                };
                let (got, n) = sample_counted(s).unwrap_or_else(|e| panic!("{name}: {e:?}"));
                let dropped = dropped && seq == 2;
                assert_eq!(n, u32::from(dropped), "{name}, sample {seq}");
                let health = got.gpus[1].health.as_deref();
                assert_eq!(health.is_none(), dropped, "{name}, sample {seq}");
                assert_eq!(
                    health.and_then(|h| h.fan_speed_percent),
                    (!dropped).then_some(40),
                    "{name}"
                );
                got_links.push(health.map(|h| {
                    h.nvlinks
                        .iter()
                        .map(|l| (l.link, l.replay))
                        .collect::<Vec<_>>()
                }));
                let other = got.gpus[0].health.as_deref().expect("GPU 0's health");
                assert_eq!(other.nvlink_active_links, Some(1), "{name}");
                assert_eq!(
                    other.nvlinks,
                    [NvLinkErrors {
                        link: 7,
                        replay: Some(3),
                        crc_flit: Some(u64::MAX),
                        ..Default::default()
                    }],
                    "{name}"
                );
                for (i, g) in got.gpus.iter().enumerate() {
                    assert_eq!(g.power_milliwatts, Some(500_000), "{name}");
                    assert_eq!(g.energy_millijoules, Some(9_000 + i as u64), "{name}");
                }
            }
            if name == "a counter going down is a reset" {
                assert_eq!(
                    got_links,
                    [Some(vec![(3, Some(500))]), Some(vec![(3, Some(2))])]
                );
            }
        }
    }

    #[test]
    fn a_gpus_identity_that_cannot_be_a_label_is_dropped_alone() {
        let gpu = |bus: &str, serial: &str, driver: &str| pb::GpuInfo {
            uuid: "GPU-1".into(),
            pci_bus_id: Some(bus.into()),
            serial: Some(serial.into()),
            driver_version: Some(driver.into()),
            ..Default::default()
        };
        let check = |g: pb::GpuInfo| {
            let h = pb::Hello {
                node_id: "n1".into(),
                gpus: vec![g],
                ..Default::default()
            };
            hello(h)
                .and_then(|h| check_hello(h, 8))
                .map(|h| h.gpus[0].identity.clone())
        };
        let ok = check(gpu("00000000:18:00.0", "1654321098765", "550.54.15")).unwrap();
        assert_eq!(ok.pci_bus_id.as_deref(), Some("00000000:18:00.0"));
        assert_eq!(ok.serial.as_deref(), Some("1654321098765"));
        // A value that cannot be a label is dropped alone; the GPU is
        // admitted with the rest of its identity.
        let got = |g| {
            let id = check(g).unwrap();
            (id.pci_bus_id, id.serial, id.driver_version)
        };
        let some = |v: &str| Some(v.to_string());
        assert_eq!(got(gpu("", "1", "2")), (None, some("1"), some("2")));
        assert_eq!(got(gpu("1", "a\nb", "2")), (some("1"), None, some("2")));
        assert_eq!(
            got(gpu("1", "2", &"9".repeat(129))),
            (some("1"), some("2"), None)
        );
    }

    fn power_source(index: u32, kind: &str, domain: &str, name: &str) -> pb::NodePowerSource {
        pb::NodePowerSource {
            index,
            kind: kind.into(),
            domain: domain.into(),
            name: name.into(),
            energy_counter_supported: true,
            interval_millis: 10_000,
        }
    }

    fn hello_with_power(sources: Vec<pb::NodePowerSource>) -> pb::Hello {
        pb::Hello {
            node_id: "n1".into(),
            agent_version: "1".into(),
            stream_epoch: 1,
            interval_millis: 1_000,
            node_power_sources: sources,
            ..Default::default()
        }
    }

    #[test]
    fn a_hellos_node_power_sources_are_checked_and_the_field_named() {
        let ok = vec![
            power_source(0, "redfish", "node", "1"),
            power_source(1, "rapl", "cpu", "package-0"),
            power_source(2, "rapl", "dram", "package-0/dram"),
        ];
        let h = check_hello(hello(hello_with_power(ok)).unwrap(), 8).unwrap();
        assert_eq!(h.node_power_sources.len(), 3);
        assert_eq!(h.node_power_sources[0].key(), "redfish/1");
        assert_eq!(h.node_power_sources[0].interval, Duration::from_secs(10));
        // (sources, what the error must say)
        let cases: Vec<(Vec<pb::NodePowerSource>, &str)> = vec![
            (
                vec![power_source(1, "redfish", "node", "1")],
                "node_power_sources[0].index is 1",
            ),
            (
                vec![power_source(0, "red fish", "node", "1")],
                "node_power_sources[0].kind",
            ),
            (
                vec![power_source(0, "redfish", "", "1")],
                "node_power_sources[0].domain",
            ),
            (
                vec![power_source(0, "redfish", "node", "a\nb")],
                "node_power_sources[0].name",
            ),
            (
                vec![
                    power_source(0, "rapl", "cpu", "package-0"),
                    power_source(1, "mock", "cpu", "package-0"),
                ],
                "node_power_sources[1].name: appears twice",
            ),
            (
                vec![
                    power_source(0, "redfish", "node", "1"),
                    power_source(1, "ipmi", "node", "node"),
                ],
                "node_power_sources[1].domain: a second whole-node",
            ),
            (
                (0..=MAX_NODE_POWER_SOURCES as u32)
                    .map(|i| power_source(i, "rapl", "cpu", &format!("package-{i}")))
                    .collect(),
                "node_power_sources: 65 sources exceed the limit of 64",
            ),
        ];
        for (sources, want) in cases {
            let err = hello(hello_with_power(sources))
                .and_then(|h| check_hello(h, 8))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
    }

    #[test]
    fn node_power_readings_are_checked_one_by_one() {
        let r = |source, ts, power, energy| NodePowerReading {
            source,
            timestamp_unix_nanos: ts,
            power_milliwatts: power,
            energy_millijoules: energy,
        };
        let check = |x: NodePowerReading| check_node_power(&x, 2, 1_000, 100);
        assert_eq!(
            check(r(1, 500, Some(MAX_NODE_POWER_MILLIWATTS), Some(MAX_STORED))),
            Ok(())
        );
        assert_eq!(check(r(2, 500, None, None)), Err(NodePowerReject::Source));
        assert_eq!(
            check(r(0, 100, None, None)),
            Err(NodePowerReject::Timestamp)
        );
        assert_eq!(
            check(r(0, 1_001, None, None)),
            Err(NodePowerReject::Timestamp)
        );
        assert_eq!(
            check(r(0, 500, Some(MAX_NODE_POWER_MILLIWATTS + 1), None)),
            Err(NodePowerReject::Power)
        );
        assert_eq!(
            check(r(0, 500, None, Some(MAX_STORED + 1))),
            Err(NodePowerReject::Energy)
        );
    }
}
