//! The PostgreSQL ledger's schema: versioned in `ledger_schema` (one row),
//! migrations applied in order, each version in the same transaction as
//! the version it records.

/// Schema migrations, applied in order; the index is the version reached.
/// The tables mirror the SQLite ledger's, with the same meaning.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite ledger reached by its version 11.
    "CREATE TABLE ledger_identity (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        ledger_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        opened_at BIGINT NOT NULL
     );
     INSERT INTO ledger_identity
        VALUES (1, gen_random_uuid()::text, ledger_now(), ledger_now());
     CREATE TABLE watermark (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        revision BIGINT NOT NULL,
        finalized_through BIGINT NOT NULL
     );
     INSERT INTO watermark VALUES (1, 0, 0);
     -- A node's claim and its cursor in one row (the cursor columns are
     -- NULL until the node's first commit): a commit writes its nodes'
     -- cursors with one conditional UPDATE (holder = the committer), which
     -- is also the fencing check and its row lock. Every commit rewrites
     -- each of its nodes' rows, so pages are left half empty for the new
     -- version (a HOT update: no index entry, less WAL).
     CREATE TABLE node_claim (
        node TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        generation BIGINT NOT NULL,
        epoch BIGINT,
        last_seq BIGINT,
        gpus BYTEA
     ) WITH (fillfactor = 50);
     CREATE TABLE usage_minute (
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        minute_start BIGINT NOT NULL,
        energy_mj BIGINT NOT NULL,
        gpu_ns BIGINT NOT NULL,
        busy_gpu_ns BIGINT NOT NULL,
        samples BIGINT NOT NULL,
        expected_gpu_ns BIGINT NOT NULL,
        estimated_mj BIGINT NOT NULL,
        over_contract_ns BIGINT NOT NULL,
        overage_mj BIGINT NOT NULL,
        -- Time first: every read and roll-up asks for a span of minutes
        -- (and a tenant), so this one index serves them all, and a
        -- commit, which writes every node's minute each second, keeps
        -- one index instead of two.
        PRIMARY KEY (minute_start, tenant, node)
     ) WITH (fillfactor = 70); -- each row is updated every second of its minute
     CREATE TABLE tenant_total (
        tenant TEXT PRIMARY KEY,
        energy_mj BIGINT NOT NULL,
        over_contract_ns BIGINT NOT NULL DEFAULT 0
     );
     CREATE TABLE usage_rollup (
        period BIGINT NOT NULL,
        start BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        energy_mj BIGINT NOT NULL,
        gpu_ns BIGINT NOT NULL,
        busy_gpu_ns BIGINT NOT NULL,
        samples BIGINT NOT NULL,
        expected_gpu_ns BIGINT NOT NULL,
        estimated_mj BIGINT NOT NULL,
        over_contract_ns BIGINT NOT NULL,
        overage_mj BIGINT NOT NULL,
        PRIMARY KEY (period, start, tenant, node)
     );
     CREATE TABLE demand_rollup (
        period BIGINT NOT NULL,
        start BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        peak_quarter_mj BIGINT NOT NULL,
        over_contract_ns BIGINT NOT NULL DEFAULT 0,
        overage_mj BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (period, start, tenant)
     );
     CREATE TABLE rollup_pending (hour_start BIGINT PRIMARY KEY);
     CREATE TABLE retention (
        period BIGINT PRIMARY KEY,
        kept_from BIGINT NOT NULL
     );
     CREATE TABLE adjustment (
        revision BIGINT NOT NULL,
        booked_at BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        minute_start BIGINT NOT NULL,
        energy_mj BIGINT NOT NULL,
        gpu_ns BIGINT NOT NULL,
        busy_gpu_ns BIGINT NOT NULL,
        samples BIGINT NOT NULL,
        expected_gpu_ns BIGINT NOT NULL,
        estimated_mj BIGINT NOT NULL,
        over_contract_ns BIGINT NOT NULL,
        overage_mj BIGINT NOT NULL,
        PRIMARY KEY (revision, tenant, node, minute_start)
     );
     CREATE INDEX adjustment_by_time ON adjustment (minute_start, tenant);
     CREATE TABLE tenant_version (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        effective_from_ns BIGINT NOT NULL,
        loaded_at_ns BIGINT NOT NULL,
        file TEXT NOT NULL
     );
     CREATE TABLE holder_commit (
        holder TEXT PRIMARY KEY,
        last_id BIGINT NOT NULL
     );
     CREATE TABLE compaction_lease (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        holder TEXT NOT NULL,
        expires_at BIGINT NOT NULL
     );",
    // 2: node and facility power, as the SQLite ledger's version 13: node
    // energy in every bucket, rollup and adjustment, each tenant's total,
    // and a rollup's highest quarter-hour of it (rows from before hold 0);
    // the facility meters' state, meter-minutes and tenants' parts.
    "ALTER TABLE usage_minute
        ADD COLUMN node_energy_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN node_estimated_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN node_ns BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE usage_rollup
        ADD COLUMN node_energy_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN node_estimated_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN node_ns BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE adjustment
        ADD COLUMN node_energy_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN node_estimated_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN node_ns BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE tenant_total ADD COLUMN node_energy_mj BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE demand_rollup ADD COLUMN node_peak_quarter_mj BIGINT NOT NULL DEFAULT 0;
     CREATE TABLE meter_state (
        meter TEXT PRIMARY KEY,
        allocated_through BIGINT NOT NULL,
        reading_at_ns BIGINT NOT NULL,
        reading_raw BIGINT NOT NULL,
        carry_mj BIGINT NOT NULL
     );
     CREATE TABLE meter_minute (
        meter TEXT NOT NULL,
        minute_start BIGINT NOT NULL,
        metered_mj BIGINT NOT NULL,
        measured_mj BIGINT NOT NULL,
        unallocated_mj BIGINT NOT NULL,
        PRIMARY KEY (meter, minute_start)
     );
     CREATE TABLE meter_allocation (
        meter TEXT NOT NULL,
        tenant TEXT NOT NULL,
        minute_start BIGINT NOT NULL,
        measured_mj BIGINT NOT NULL,
        allocated_mj BIGINT NOT NULL,
        PRIMARY KEY (meter, minute_start, tenant)
     );",
    // 3: facility billing that stands, as the SQLite ledger's version 14:
    // each tenant's part of a meter-minute keeps the node energy its
    // allocation replaced (parts from before hold what was measured);
    // rollups keep the allocation, the node energy it replaced and the
    // highest quarter-hour of facility energy (NULL in rollups from
    // before), and hours whose minutes or allocations are kept are rolled
    // up again to fill them; meter-minutes and parts past the minute
    // retention are kept as hourly sums; an allocation is booked as
    // adjustments of its own revision, with the allocation and the node
    // energy it replaced.
    "ALTER TABLE meter_allocation ADD COLUMN node_mj BIGINT NOT NULL DEFAULT 0;
     UPDATE meter_allocation SET node_mj = measured_mj;
     ALTER TABLE demand_rollup
        ADD COLUMN allocated_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN allocated_node_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN facility_peak_quarter_mj BIGINT;
     INSERT INTO rollup_pending
        SELECT DISTINCT minute_start - minute_start % 3600 FROM usage_minute
        ON CONFLICT DO NOTHING;
     INSERT INTO rollup_pending
        SELECT DISTINCT minute_start - minute_start % 3600 FROM meter_allocation
        ON CONFLICT DO NOTHING;
     CREATE TABLE meter_rollup (
        meter TEXT NOT NULL,
        start BIGINT NOT NULL,
        minutes BIGINT NOT NULL,
        metered_mj BIGINT NOT NULL,
        measured_mj BIGINT NOT NULL,
        unallocated_mj BIGINT NOT NULL,
        PRIMARY KEY (meter, start)
     );
     CREATE TABLE meter_allocation_rollup (
        meter TEXT NOT NULL,
        start BIGINT NOT NULL,
        tenant TEXT NOT NULL,
        measured_mj BIGINT NOT NULL,
        allocated_mj BIGINT NOT NULL,
        node_mj BIGINT NOT NULL,
        PRIMARY KEY (meter, start, tenant)
     );
     ALTER TABLE adjustment
        ADD COLUMN facility_allocated_mj BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN facility_node_mj BIGINT NOT NULL DEFAULT 0;",
    // 4: where each node's power readings may still book energy, beside
    // its cursor, as the SQLite ledger's version 15: the meters'
    // allocation waits for it.
    "ALTER TABLE node_claim
        ADD COLUMN placing_from BIGINT,
        ADD COLUMN placing_seen BIGINT;",
    // 5: per-GPU hours, as the SQLite ledger's version 16, and from when
    // they hold every GPU's figures (NULL: not complete now; 0 for a
    // ledger without commits, else the first whole hour after this
    // migration by the database's clock).
    "CREATE TABLE gpu_hour (
        tenant TEXT NOT NULL,
        node TEXT NOT NULL,
        gpu TEXT NOT NULL,
        hour_start BIGINT NOT NULL,
        energy_mj BIGINT NOT NULL,
        gpu_ns BIGINT NOT NULL,
        busy_gpu_ns BIGINT NOT NULL,
        samples BIGINT NOT NULL,
        expected_gpu_ns BIGINT NOT NULL,
        estimated_mj BIGINT NOT NULL,
        revision BIGINT NOT NULL DEFAULT 0,
        -- A GPU's hours together: a walk reads one GPU's period at a
        -- time, and lists a tenant's GPUs.
        PRIMARY KEY (tenant, node, gpu, hour_start)
     ) WITH (fillfactor = 70); -- each row is updated every second of its hour
     CREATE TABLE gpu_rows (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        since BIGINT,
        -- The last minute a writer that kept no per-GPU rows booked.
        incomplete_through BIGINT
     );
     INSERT INTO gpu_rows SELECT 1, CASE WHEN revision = 0 THEN 0
        ELSE (ledger_now() / 3600 + 1) * 3600 END, NULL FROM watermark WHERE id = 1;",
    // 6: the GPU time whose readings carried no utilization, as the SQLite
    // ledger's version 17 (a constant default: no table is rewritten).
    "ALTER TABLE usage_minute ADD COLUMN busy_unknown_gpu_ns BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE usage_rollup ADD COLUMN busy_unknown_gpu_ns BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE adjustment ADD COLUMN busy_unknown_gpu_ns BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE gpu_hour ADD COLUMN busy_unknown_gpu_ns BIGINT NOT NULL DEFAULT 0;",
    // 7: the revision each meter's minutes were split as of, as the SQLite
    // ledger's version 18 (a meter allocated before starts from now).
    "ALTER TABLE meter_state ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
     UPDATE meter_state SET revision = (SELECT revision FROM watermark WHERE id = 1);",
];

/// What `init-ledger` runs before the migrations: the version table
/// (whose lock serialises two collectors migrating at once) and the
/// database clock the lease and the identity are stamped with.
pub(super) const BOOTSTRAP: &str = "
    CREATE TABLE ledger_schema (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        version INTEGER NOT NULL
    );
    INSERT INTO ledger_schema VALUES (1, 0);
    -- Unix seconds by the database's clock: every collector's lease is
    -- measured against the same clock, whatever theirs say.
    CREATE FUNCTION ledger_now() RETURNS BIGINT LANGUAGE sql STABLE
        AS 'SELECT floor(extract(epoch FROM now()))::bigint';";
