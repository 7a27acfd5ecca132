//! The simulated site the collector's benchmarks share: four node pools,
//! three of them leased whole by tenants, the fourth unassigned.

/// Three tenants leasing three of four node pools whole; the fourth pool
/// is unassigned. Nodes are named by `node_id`.
pub const TENANTS: &str = r#"
    [[tenant]]
    id = "lab-a"
    contracted_kw = 2000.0
    nodes = ["pool-0-*"]

    [[tenant]]
    id = "lab-b"
    contracted_kw = 2000.0
    nodes = ["pool-1-*"]

    [[tenant]]
    id = "lab-c"
    contracted_kw = 2000.0
    nodes = ["pool-2-*"]
"#;

/// Node pools; node `i` is in pool `i % POOLS`.
pub const POOLS: usize = 4;

/// Model name of every simulated GPU.
pub const MODEL: &str = "NVIDIA H100 80GB HBM3";

/// Board power limit of every simulated GPU (an H100 SXM): 700 W.
pub const POWER_LIMIT_MW: u64 = 700_000;

/// Name of node `index`: `pool-<k>-node-<index>`.
pub fn node_id(index: usize) -> String {
    format!("pool-{}-node-{index:05}", index % POOLS)
}
