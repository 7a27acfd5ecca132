/*
 * fake_nvml.c: a stand-in libnvidia-ml.so for the capwatch agent's NVML
 * integration tests (agent/tests/nvml.rs).
 *
 * It exports the NVML entry points that nvml-wrapper 0.13 resolves for the
 * agent's NVML backend (agent/src/source/nvml.rs), with the signatures,
 * struct layouts and return codes of the real nvml.h, and describes a fake
 * node with two GPUs. nvml-wrapper looks every symbol up when the library
 * is loaded; a symbol missing here would only fail the call that uses it,
 * except nvmlShutdown, which nvml-wrapper's Drop calls unconditionally.
 *
 * Behaviour is chosen at compile time, never through the environment: each
 * test compiles its own copy into its own temporary directory, and the
 * copies, loaded from different paths, keep separate state even when tests
 * run in parallel in one process. All internal state and helpers are
 * `static` so one copy never binds to another copy's symbols.
 *
 * The fake node (GPU 0 / GPU 1):
 *
 *   UUID                 GPU-00000000-1111-2222-3333-444444444444
 *                        GPU-55555555-6666-7777-8888-999999999999
 *   name                 "NVIDIA H100 80GB HBM3" / "NVIDIA A100-SXM4-40GB"
 *   power usage          312345 mW / 98765 mW
 *   total energy         starts at 987654321 mJ / 123456789 mJ; every call
 *                        returns the current value and then advances it by
 *                        1000 mJ / 250 mJ
 *   utilization          gpu 87 %, memory 45 % / gpu 12 %, memory 3 %
 *   memory (v2 struct)   total 85899345920 B (80 GiB), used 12884901888 B
 *                        (12 GiB) / total 42949672960 B (40 GiB), used
 *                        1073741824 B (1 GiB); reserved 536870912 B (512 MiB)
 *                        on both; free = total - reserved - used
 *   temperature (GPU)    61 C / 47 C
 *   clocks (MHz)         SM 1980 / 1410; graphics, memory and video clocks
 *                        have other values (see clock_of), so a backend that
 *                        asks for the wrong clock reads a wrong number
 *   enforced power limit 700000 mW / 400000 mW
 *   driver version       "550.54.15"
 *   PCI bus id           "00000000:18:00.0" / "00000000:2A:00.0"
 *   serial               "1654321098765" / "1320921012345"
 *
 * Health readings (GPU 0 / GPU 1), chosen so that a wrong unit or a
 * swapped argument reads a wrong number:
 *
 *   clock-event reasons  0x44 (SW power cap | HW thermal slowdown) / 0x1
 *                        (GPU idle); FAKE_GPU0_CLOCK_EVENT_REASONS=N sets
 *                        GPU 0's
 *   violation time (ns)  power 123456789012, thermal 987654321 /
 *                        power 0, thermal 5
 *   total ECC errors     volatile corrected 17, uncorrected 2; aggregate
 *                        corrected 1234, uncorrected 5 / 1, 0, 3, 0
 *   encoder, decoder     11 %, 23 % / 0 %, 4 %
 *   PCIe replay counter  42 / 7
 *   PCIe throughput      tx 123456 KB/s, rx 654321 KB/s / tx 2000, rx 3000
 *   fan speed (fan 0)    NOT_SUPPORTED (an SXM board) / 67 %
 *   field values         MEMORY_TEMP 78 / 55 C; POWER_INSTANT 345678 /
 *                        101010 mW; POWER_AVERAGE 311111 / 98000 mW;
 *                        RETIRED_SBE 3 / 0, RETIRED_DBE 1 / 0,
 *                        RETIRED_PENDING 1 / 0; REMAPPED_COR 4 / 0,
 *                        REMAPPED_UNC 1 / 0, REMAPPED_PENDING 1 / 0,
 *                        REMAPPED_FAILURE 0 / 1; any other field id is
 *                        NOT_SUPPORTED
 *
 * Compile-time switches (-D):
 *
 *   FAKE_EXTRA_GPUS=N       N more GPUs (2..N+1) after the two above, each a
 *                           copy of GPU 0 (an H100 node of 2+N boards, for
 *                           measuring the agent at node scale) with a UUID
 *                           "GPU-00000000-1111-2222-3333-<12-digit index>",
 *                           bus id "00000000:<0x40+index>:00.0" and serial
 *                           of its own. They have GPU 0's NVLinks
 *                           (FAKE_GPU0_NVLINK*); MIG and the other
 *                           FAKE_GPU0_* switches stay GPU 0's alone.
 *   FAKE_INIT_FAILS         nvmlInit_v2 returns NVML_ERROR_DRIVER_NOT_LOADED.
 *   FAKE_GPU1_NO_ENERGY     nvmlDeviceGetTotalEnergyConsumption returns
 *                           NVML_ERROR_NOT_SUPPORTED for GPU 1.
 *   FAKE_GPU1_NO_TEMPERATURE
 *                           nvmlDeviceGetTemperature returns
 *                           NVML_ERROR_NOT_SUPPORTED for GPU 1.
 *   FAKE_NO_UUID_GPU=N      nvmlDeviceGetUUID returns NVML_ERROR_UNKNOWN for
 *                           GPU N, so it cannot be identified.
 *   FAKE_GPU1_LOST_AFTER=N  the first N power reads of GPU 1 succeed; the
 *                           next one returns NVML_ERROR_GPU_IS_LOST and from
 *                           then on every call about GPU 1, handle lookup by
 *                           index included, returns NVML_ERROR_GPU_IS_LOST.
 *   FAKE_GPU1_UNSUPPORTED="NAMES"
 *                           (a C string literal) a comma-separated list of
 *                           entry points (e.g. nvmlDeviceGetViolationStatus)
 *                           and field ids (e.g. NVML_FI_DEV_MEMORY_TEMP)
 *                           that answer NVML_ERROR_NOT_SUPPORTED for GPU 1.
 *   FAKE_OMIT_<entry point> leaves that health entry point out of the
 *                           library (e.g. -DFAKE_OMIT_nvmlDeviceGetFanSpeed_v2),
 *                           as an older driver lacks it.
 *   FAKE_BLOCK_FILE="PATH"  (a C string literal, quotes included)
 *                           a control file that makes calls block, for
 *                           tests of an agent whose driver hangs. While
 *                           PATH holds "FUNCTION MILLIS" (e.g.
 *                           "nvmlDeviceGetPowerUsage 60000", or "*" for
 *                           every entry point below), each call of that
 *                           function blocks until PATH is removed or no
 *                           longer names it, or MILLIS have passed, and
 *                           then answers as usual. The file is read at
 *                           each call, so a test can start and end a hang
 *                           at any moment of a run.
 *
 *   FAKE_XID_FILE="PATH"    (a C string literal, quotes included)
 *                           a control file that injects XID critical error
 *                           events. Each line "GPU XID" (e.g. "0 79") is one
 *                           event, delivered once, in order, by
 *                           nvmlEventSetWait_v2 to a set GPU GPU is
 *                           registered in; a test appends lines to inject
 *                           more. Without it no event ever arrives (every
 *                           wait sleeps its whole timeout).
 *   FAKE_XID_POLL_MS=N      with FAKE_XID_FILE, how often a wait reads the
 *                           control file again (default 10 ms): a larger N
 *                           wakes less, as the driver's wait (blocked in
 *                           the kernel) would, for measuring the agent.
 *   FAKE_NO_EVENTS          no GPU supports events: nvmlDeviceGetSupportedEventTypes
 *                           answers 0 and nvmlDeviceRegisterEvents
 *                           NVML_ERROR_NOT_SUPPORTED (as on a GPU or
 *                           driver without them); listing
 *                           nvmlDeviceRegisterEvents in FAKE_GPU1_UNSUPPORTED
 *                           does the same for GPU 1 only.
 *
 * NVLink (section "NVLink" below): no GPU has NVLink unless
 *
 *   FAKE_GPU0_NVLINKS=N     GPU 0 has links 0..N-1 (N at most 18, NVML's
 *                           NVML_NVLINK_MAX_LINKS); nvmlDeviceGetNvLinkState
 *                           answers NVML_ERROR_INVALID_ARGUMENT for a link
 *                           at or above N, and NVML_ERROR_NOT_SUPPORTED on
 *                           a GPU without NVLink (GPU 1, a PCIe board).
 *   FAKE_GPU0_NVLINK_ACTIVE=MASK
 *                           the links of GPU 0 that are active, a bit per
 *                           link (default: all of them); the others are
 *                           inactive.
 *   FAKE_GPU0_NVLINK_SLEEP=MASK
 *                           links of GPU 0 whose state is
 *                           NVML_NVLINK_STATE_SLEEP (2, newer drivers'
 *                           low-power state), whatever the active mask.
 *   FAKE_GPU0_NVLINK_STATE_FAILS=L
 *                           nvmlDeviceGetNvLinkState answers
 *                           NVML_ERROR_UNKNOWN for GPU 0's link L, at
 *                           start and on every tick.
 *   FAKE_NO_NVLINK_THROUGHPUT
 *                           the throughput field values (below) are not
 *                           supported, as on a driver without them.
 *
 * Each link L of GPU 0 sent (2^33 + 7000 L) KiB and received
 * (9000 L + 5) KiB: NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX / _RX with L as
 * the value's scopeId.
 *
 * Each link L of GPU 0 counts (nvmlDeviceGetNvLinkErrorCounter) replay
 * 1000 L + 1, recovery 1000 L + 2, CRC flit 2^40 + 1000 L + 3 (beyond 32
 * bits) and CRC data 1000 L + 4. FAKE_OMIT_nvmlDeviceGetNvLinkState and
 * FAKE_OMIT_nvmlDeviceGetNvLinkErrorCounter leave those out (an older
 * driver).
 *
 * Events: every GPU supports the XID critical error event type (0x8) and
 * nothing else; nvmlEventSetWait_v2 is a BLOCK_POINT like the readings.
 *
 * Calls made before nvmlInit_v2 (or after the last nvmlShutdown) return
 * NVML_ERROR_UNINITIALIZED, like the real library.
 */

#define _POSIX_C_SOURCE 200809L
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* ---- the parts of nvml.h this file needs ------------------------------ */

typedef enum nvmlReturn_enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999
} nvmlReturn_t;

typedef enum nvmlTemperatureSensors_enum {
    NVML_TEMPERATURE_GPU = 0
} nvmlTemperatureSensors_t;

typedef enum nvmlClockType_enum {
    NVML_CLOCK_GRAPHICS = 0,
    NVML_CLOCK_SM = 1,
    NVML_CLOCK_MEM = 2,
    NVML_CLOCK_VIDEO = 3
} nvmlClockType_t;

typedef struct nvmlUtilization_st {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct nvmlMemory_v2_st {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* NVML_STRUCT_VERSION(Memory, 2) */
#define NVML_MEMORY_V2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

typedef enum nvmlPerfPolicyType_enum {
    NVML_PERF_POLICY_POWER = 0,
    NVML_PERF_POLICY_THERMAL = 1
} nvmlPerfPolicyType_t;

typedef struct nvmlViolationTime_st {
    unsigned long long referenceTime; /* CPU timestamp, us */
    unsigned long long violationTime; /* ns */
} nvmlViolationTime_t;

typedef enum nvmlMemoryErrorType_enum {
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
} nvmlMemoryErrorType_t;

typedef enum nvmlEccCounterType_enum {
    NVML_VOLATILE_ECC = 0,
    NVML_AGGREGATE_ECC = 1
} nvmlEccCounterType_t;

typedef enum nvmlPcieUtilCounter_enum {
    NVML_PCIE_UTIL_TX_BYTES = 0,
    NVML_PCIE_UTIL_RX_BYTES = 1
} nvmlPcieUtilCounter_t;

typedef enum nvmlValueType_enum {
    NVML_VALUE_TYPE_DOUBLE = 0,
    NVML_VALUE_TYPE_UNSIGNED_INT = 1,
    NVML_VALUE_TYPE_UNSIGNED_LONG = 2,
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3,
    NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
} nvmlValueType_t;

typedef union nvmlValue_st {
    double dVal;
    int siVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    signed long long sllVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct nvmlFieldValue_st {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;
    long long latencyUsec;
    nvmlValueType_t valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

/* The field ids of nvml.h the fake answers. */
#define NVML_FI_DEV_RETIRED_SBE 29
#define NVML_FI_DEV_RETIRED_DBE 30
#define NVML_FI_DEV_RETIRED_PENDING 31
#define NVML_FI_DEV_MEMORY_TEMP 82
#define NVML_FI_DEV_REMAPPED_COR 142
#define NVML_FI_DEV_REMAPPED_UNC 143
#define NVML_FI_DEV_REMAPPED_PENDING 144
#define NVML_FI_DEV_REMAPPED_FAILURE 145
#define NVML_FI_DEV_POWER_AVERAGE 185
#define NVML_FI_DEV_POWER_INSTANT 186

typedef struct nvmlPciInfo_st {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

/* The handle type is opaque to callers; here it points at a struct fake_gpu. */
typedef struct fake_gpu *nvmlDevice_t;

/* ---- the fake node ----------------------------------------------------- */

#ifdef FAKE_EXTRA_GPUS
#define EXTRA_GPUS ((unsigned int)(FAKE_EXTRA_GPUS))
#else
#define EXTRA_GPUS 0u
#endif
#define FAKE_GPU_COUNT (2u + EXTRA_GPUS)

struct fake_gpu {
    const char *uuid;
    const char *name;
    unsigned int power_mw;
    unsigned long long energy_mj; /* the next value the counter returns */
    unsigned long long energy_step_mj;
    unsigned int util_gpu, util_memory;
    unsigned long long mem_total, mem_reserved, mem_used;
    unsigned int temperature_c;
    unsigned int clock_graphics, clock_sm, clock_mem, clock_video; /* MHz */
    unsigned int power_limit_mw;
    const char *pci_bus_id, *serial;
    unsigned long long clock_event_reasons;
    unsigned long long power_violation_ns, thermal_violation_ns;
    unsigned long long ecc[2][2]; /* [error type][counter type] */
    unsigned int encoder_util, decoder_util;
    unsigned int pcie_replays, pcie_tx_kbps, pcie_rx_kbps;
    int fan_speed; /* percent; < 0: no fan (NOT_SUPPORTED) */
    unsigned int memory_temp_c, power_instant_mw, power_average_mw;
    unsigned long long retired_sbe, retired_dbe;
    unsigned int retired_pending;
    unsigned int remapped_cor, remapped_unc, remapped_pending, remapped_failure;
    const char *unsupported; /* entry points and field ids: NOT_SUPPORTED */
    int no_energy, no_temperature; /* report NOT_SUPPORTED */
    long lost_after;               /* < 0: never lost */
    long power_reads;              /* successful power reads so far */
    int lost;
};

#ifdef FAKE_GPU1_NO_ENERGY
#define GPU1_NO_ENERGY 1
#else
#define GPU1_NO_ENERGY 0
#endif

#ifdef FAKE_GPU1_NO_TEMPERATURE
#define GPU1_NO_TEMPERATURE 1
#else
#define GPU1_NO_TEMPERATURE 0
#endif

#ifdef FAKE_GPU0_CLOCK_EVENT_REASONS
#define GPU0_CLOCK_EVENT_REASONS ((unsigned long long)(FAKE_GPU0_CLOCK_EVENT_REASONS))
#else
#define GPU0_CLOCK_EVENT_REASONS 0x44ULL
#endif

#ifdef FAKE_GPU1_UNSUPPORTED
#define GPU1_UNSUPPORTED FAKE_GPU1_UNSUPPORTED
#else
#define GPU1_UNSUPPORTED ""
#endif

#ifdef FAKE_GPU1_LOST_AFTER
#define GPU1_LOST_AFTER ((long)(FAKE_GPU1_LOST_AFTER))
#else
#define GPU1_LOST_AFTER (-1L)
#endif

static struct fake_gpu gpus[FAKE_GPU_COUNT] = {
    {
        .uuid = "GPU-00000000-1111-2222-3333-444444444444",
        .name = "NVIDIA H100 80GB HBM3",
        .power_mw = 312345,
        .energy_mj = 987654321ULL,
        .energy_step_mj = 1000,
        .util_gpu = 87,
        .util_memory = 45,
        .mem_total = 85899345920ULL,
        .mem_reserved = 536870912ULL,
        .mem_used = 12884901888ULL,
        .temperature_c = 61,
        .clock_graphics = 1755,
        .clock_sm = 1980,
        .clock_mem = 2619,
        .clock_video = 1635,
        .power_limit_mw = 700000,
        .pci_bus_id = "00000000:18:00.0",
        .serial = "1654321098765",
        .clock_event_reasons = GPU0_CLOCK_EVENT_REASONS,
        .power_violation_ns = 123456789012ULL,
        .thermal_violation_ns = 987654321ULL,
        .ecc = {{17, 1234}, {2, 5}},
        .encoder_util = 11,
        .decoder_util = 23,
        .pcie_replays = 42,
        .pcie_tx_kbps = 123456,
        .pcie_rx_kbps = 654321,
        .fan_speed = -1,
        .memory_temp_c = 78,
        .power_instant_mw = 345678,
        .power_average_mw = 311111,
        .retired_sbe = 3,
        .retired_dbe = 1,
        .retired_pending = 1,
        .remapped_cor = 4,
        .remapped_unc = 1,
        .remapped_pending = 1,
        .remapped_failure = 0,
        .unsupported = "",
        .no_energy = 0,
        .no_temperature = 0,
        .lost_after = -1,
    },
    {
        .uuid = "GPU-55555555-6666-7777-8888-999999999999",
        .name = "NVIDIA A100-SXM4-40GB",
        .power_mw = 98765,
        .energy_mj = 123456789ULL,
        .energy_step_mj = 250,
        .util_gpu = 12,
        .util_memory = 3,
        .mem_total = 42949672960ULL,
        .mem_reserved = 536870912ULL,
        .mem_used = 1073741824ULL,
        .temperature_c = 47,
        .clock_graphics = 1095,
        .clock_sm = 1410,
        .clock_mem = 1215,
        .clock_video = 1275,
        .power_limit_mw = 400000,
        .pci_bus_id = "00000000:2A:00.0",
        .serial = "1320921012345",
        .clock_event_reasons = 0x1ULL,
        .power_violation_ns = 0,
        .thermal_violation_ns = 5,
        .ecc = {{1, 3}, {0, 0}},
        .encoder_util = 0,
        .decoder_util = 4,
        .pcie_replays = 7,
        .pcie_tx_kbps = 2000,
        .pcie_rx_kbps = 3000,
        .fan_speed = 67,
        .memory_temp_c = 55,
        .power_instant_mw = 101010,
        .power_average_mw = 98000,
        .retired_sbe = 0,
        .retired_dbe = 0,
        .retired_pending = 0,
        .remapped_cor = 0,
        .remapped_unc = 0,
        .remapped_pending = 0,
        .remapped_failure = 1,
        .unsupported = GPU1_UNSUPPORTED,
        .no_energy = GPU1_NO_ENERGY,
        .no_temperature = GPU1_NO_TEMPERATURE,
        .lost_after = GPU1_LOST_AFTER,
    },
};

/* GPUs 2.. (FAKE_EXTRA_GPUS): copies of GPU 0 under an identity of their
 * own, filled in when the library is loaded. */
#define EXTRA_ID_LEN 48
static char extra_ids[EXTRA_GPUS + 1][3][EXTRA_ID_LEN];

__attribute__((constructor)) static void fill_extra_gpus(void)
{
    for (unsigned int i = 2; i < FAKE_GPU_COUNT; i++) {
        char *uuid = extra_ids[i - 2][0], *bus = extra_ids[i - 2][1], *serial = extra_ids[i - 2][2];
        snprintf(uuid, EXTRA_ID_LEN, "GPU-00000000-1111-2222-3333-%012u", i);
        snprintf(bus, EXTRA_ID_LEN, "00000000:%02X:00.0", 0x40u + i);
        snprintf(serial, EXTRA_ID_LEN, "16543210%05u", i);
        gpus[i] = gpus[0];
        gpus[i].uuid = uuid;
        gpus[i].pci_bus_id = bus;
        gpus[i].serial = serial;
    }
}

/* Whether `device` is one of the fake's GPU handles. */
static int is_gpu(nvmlDevice_t device)
{
    return device >= &gpus[0] && device < &gpus[FAKE_GPU_COUNT];
}

static const char driver_version[] = "550.54.15";

/* nvmlInit_v2 / nvmlShutdown are reference counted in the real library. */
static int init_count;

/* Checks that NVML is initialised and `device` is one of ours. */
static nvmlReturn_t check_device(nvmlDevice_t device)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!is_gpu(device))
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->lost)
        return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

/* Copies `s` into a caller's buffer of `length` bytes, NUL included. */
static nvmlReturn_t copy_string(const char *s, char *buf, unsigned int length)
{
    size_t n = strlen(s) + 1;
    if (buf == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (length < n)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, s, n);
    return NVML_SUCCESS;
}

/* ---- blocking on demand (FAKE_BLOCK_FILE) ------------------------------ */

#ifdef FAKE_BLOCK_FILE
/* How long the control file asks `function` to block, in ms; 0: not. */
static long block_millis(const char *function)
{
    char name[128];
    long millis = 0;
    FILE *f = fopen(FAKE_BLOCK_FILE, "r");
    if (f == NULL)
        return 0;
    if (fscanf(f, "%127s %ld", name, &millis) != 2)
        millis = 0;
    fclose(f);
    if (strcmp(name, function) != 0 && strcmp(name, "*") != 0)
        return 0;
    return millis > 0 ? millis : 0;
}

static long elapsed_ms(const struct timespec *since)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000L + (now.tv_nsec - since->tv_nsec) / 1000000L;
}

/* Blocks while the control file names `function`, up to its duration. */
static void maybe_block(const char *function)
{
    struct timespec start, step = {0, 10 * 1000 * 1000};
    long millis = block_millis(function);
    if (millis == 0)
        return;
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (elapsed_ms(&start) < millis && block_millis(function) > 0)
        nanosleep(&step, NULL);
}
#define BLOCK_POINT() maybe_block(__func__)
#else
#define BLOCK_POINT() ((void)0)
#endif

/* ---- MIG hooks (the MIG section at the end) --------------------------- */

/* Answers nvmlDeviceGetUUID / nvmlDeviceGetName for a MIG device handle;
 * returns 0 when `device` is not one (the board's answer follows). */
static int mig_uuid(nvmlDevice_t device, char *buf, unsigned int length, nvmlReturn_t *rc);
static int mig_name(nvmlDevice_t device, char *buf, unsigned int length, nvmlReturn_t *rc);

/* ---- exported NVML entry points ---------------------------------------- */

nvmlReturn_t nvmlInit_v2(void)
{
    BLOCK_POINT();
#ifdef FAKE_INIT_FAILS
    return NVML_ERROR_DRIVER_NOT_LOADED;
#else
    init_count++;
    return NVML_SUCCESS;
#endif
}

nvmlReturn_t nvmlShutdown(void)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

/* Not called by the agent today; exported so an error path that asks for
 * NVML's own message gets a sensible one instead of a load failure. */
const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    return copy_string(driver_version, version, length);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    BLOCK_POINT();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = FAKE_GPU_COUNT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    BLOCK_POINT();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (index >= FAKE_GPU_COUNT || device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (gpus[index].lost)
        return NVML_ERROR_GPU_IS_LOST;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    BLOCK_POINT();
    nvmlReturn_t rc;
    if (mig_uuid(device, uuid, length, &rc))
        return rc;
    rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
#ifdef FAKE_NO_UUID_GPU
    if (device == &gpus[FAKE_NO_UUID_GPU])
        return NVML_ERROR_UNKNOWN;
#endif
    return copy_string(device->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    BLOCK_POINT();
    nvmlReturn_t rc;
    if (mig_name(device, name, length, &rc))
        return rc;
    rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    return copy_string(device->name, name, length);
}

/* Counts power reads; GPU 1 falls off the bus on the read after the
 * FAKE_GPU1_LOST_AFTER-th. */
nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (power == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->lost_after >= 0 && device->power_reads >= device->lost_after) {
        device->lost = 1;
        return NVML_ERROR_GPU_IS_LOST;
    }
    device->power_reads++;
    *power = device->power_mw;
    return NVML_SUCCESS;
}

/* Returns the counter, then advances it by the GPU's step. */
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (device->no_energy)
        return NVML_ERROR_NOT_SUPPORTED;
    if (energy == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *energy = device->energy_mj;
    device->energy_mj += device->energy_step_mj;
    return NVML_SUCCESS;
}

static int mig_layout(void);

/* Like the real library, which does not give utilization rates for a
 * board in MIG mode (nvmlDeviceGetUtilizationRates: "On MIG-enabled
 * GPUs, querying device utilization rates is not currently supported"). */
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (utilization == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device == &gpus[0] && mig_layout() != 0)
        return NVML_ERROR_NOT_SUPPORTED;
    utilization->gpu = device->util_gpu;
    utilization->memory = device->util_memory;
    return NVML_SUCCESS;
}

/* Like the real library, insists on the caller's struct version. */
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != NVML_MEMORY_V2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    memory->total = device->mem_total;
    memory->reserved = device->mem_reserved;
    memory->used = device->mem_used;
    memory->free = device->mem_total - device->mem_reserved - device->mem_used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensor,
                                      unsigned int *temp)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (sensor != NVML_TEMPERATURE_GPU || temp == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->no_temperature)
        return NVML_ERROR_NOT_SUPPORTED;
    *temp = device->temperature_c;
    return NVML_SUCCESS;
}

static int clock_of(const struct fake_gpu *gpu, nvmlClockType_t type, unsigned int *mhz)
{
    switch (type) {
    case NVML_CLOCK_GRAPHICS: *mhz = gpu->clock_graphics; return 1;
    case NVML_CLOCK_SM: *mhz = gpu->clock_sm; return 1;
    case NVML_CLOCK_MEM: *mhz = gpu->clock_mem; return 1;
    case NVML_CLOCK_VIDEO: *mhz = gpu->clock_video; return 1;
    default: return 0;
    }
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (clock == NULL || !clock_of(device, type, clock))
        return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (limit == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *limit = device->power_limit_mw;
    return NVML_SUCCESS;
}

/* ---- health readings ------------------------------------------------------ */

/* Whether `name` is one of the comma-separated names in `list`. */
static int listed(const char *list, const char *name)
{
    size_t n = strlen(name);
    const char *p = list;
    while (p != NULL && *p != '\0') {
        const char *end = strchr(p, ',');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0)
            return 1;
        p = end != NULL ? end + 1 : NULL;
    }
    return 0;
}

/* check_device, then NOT_SUPPORTED where the GPU's list names `function`. */
static nvmlReturn_t check_health(nvmlDevice_t device, const char *function, const void *out)
{
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (listed(device->unsupported, function))
        return NVML_ERROR_NOT_SUPPORTED;
    if (out == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

#define CHECK_HEALTH(out)                                                   \
    do {                                                                    \
        nvmlReturn_t rc_ = check_health(device, __func__, (out));           \
        if (rc_ != NVML_SUCCESS)                                            \
            return rc_;                                                     \
    } while (0)

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    BLOCK_POINT();
    CHECK_HEALTH(pci);
    memset(pci, 0, sizeof *pci);
    strncpy(pci->busId, device->pci_bus_id, sizeof pci->busId - 1);
    strncpy(pci->busIdLegacy, device->pci_bus_id + 4, sizeof pci->busIdLegacy - 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length)
{
    BLOCK_POINT();
    CHECK_HEALTH(serial);
    return copy_string(device->serial, serial, length);
}

#ifndef FAKE_OMIT_nvmlDeviceGetCurrentClocksThrottleReasons
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                       unsigned long long *reasons)
{
    BLOCK_POINT();
    CHECK_HEALTH(reasons);
    *reasons = device->clock_event_reasons;
    return NVML_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetViolationStatus
nvmlReturn_t nvmlDeviceGetViolationStatus(nvmlDevice_t device, nvmlPerfPolicyType_t policy,
                                          nvmlViolationTime_t *violation)
{
    BLOCK_POINT();
    CHECK_HEALTH(violation);
    switch (policy) {
    case NVML_PERF_POLICY_POWER: violation->violationTime = device->power_violation_ns; break;
    case NVML_PERF_POLICY_THERMAL: violation->violationTime = device->thermal_violation_ns; break;
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
    violation->referenceTime = 1700000000000000ULL;
    return NVML_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetTotalEccErrors
nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t type,
                                         nvmlEccCounterType_t counter, unsigned long long *count)
{
    BLOCK_POINT();
    CHECK_HEALTH(count);
    if ((unsigned)type > 1 || (unsigned)counter > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = device->ecc[type][counter];
    return NVML_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetEncoderUtilization
nvmlReturn_t nvmlDeviceGetEncoderUtilization(nvmlDevice_t device, unsigned int *utilization,
                                             unsigned int *sampling_period_us)
{
    BLOCK_POINT();
    CHECK_HEALTH(utilization);
    if (sampling_period_us == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *utilization = device->encoder_util;
    *sampling_period_us = 167000;
    return NVML_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetDecoderUtilization
nvmlReturn_t nvmlDeviceGetDecoderUtilization(nvmlDevice_t device, unsigned int *utilization,
                                             unsigned int *sampling_period_us)
{
    BLOCK_POINT();
    CHECK_HEALTH(utilization);
    if (sampling_period_us == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *utilization = device->decoder_util;
    *sampling_period_us = 167000;
    return NVML_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetPcieReplayCounter
nvmlReturn_t nvmlDeviceGetPcieReplayCounter(nvmlDevice_t device, unsigned int *value)
{
    BLOCK_POINT();
    CHECK_HEALTH(value);
    *value = device->pcie_replays;
    return NVML_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetPcieThroughput
nvmlReturn_t nvmlDeviceGetPcieThroughput(nvmlDevice_t device, nvmlPcieUtilCounter_t counter,
                                         unsigned int *value)
{
    BLOCK_POINT();
    CHECK_HEALTH(value);
    switch (counter) {
    case NVML_PCIE_UTIL_TX_BYTES: *value = device->pcie_tx_kbps; return NVML_SUCCESS;
    case NVML_PCIE_UTIL_RX_BYTES: *value = device->pcie_rx_kbps; return NVML_SUCCESS;
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetFanSpeed_v2
nvmlReturn_t nvmlDeviceGetFanSpeed_v2(nvmlDevice_t device, unsigned int fan, unsigned int *speed)
{
    BLOCK_POINT();
    CHECK_HEALTH(speed);
    if (device->fan_speed < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    if (fan != 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    *speed = (unsigned int)device->fan_speed;
    return NVML_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetFieldValues
/* One field value: its name (for FAKE_GPU1_UNSUPPORTED), type and value. */
static int field_of(const struct fake_gpu *gpu, unsigned int id, const char **name,
                    nvmlValueType_t *type, nvmlValue_t *value)
{
    *type = NVML_VALUE_TYPE_UNSIGNED_INT;
    switch (id) {
    case NVML_FI_DEV_MEMORY_TEMP: *name = "NVML_FI_DEV_MEMORY_TEMP"; value->uiVal = gpu->memory_temp_c; return 1;
    case NVML_FI_DEV_POWER_INSTANT: *name = "NVML_FI_DEV_POWER_INSTANT"; value->uiVal = gpu->power_instant_mw; return 1;
    case NVML_FI_DEV_POWER_AVERAGE: *name = "NVML_FI_DEV_POWER_AVERAGE"; value->uiVal = gpu->power_average_mw; return 1;
    case NVML_FI_DEV_RETIRED_PENDING: *name = "NVML_FI_DEV_RETIRED_PENDING"; value->uiVal = gpu->retired_pending; return 1;
    case NVML_FI_DEV_REMAPPED_COR: *name = "NVML_FI_DEV_REMAPPED_COR"; value->uiVal = gpu->remapped_cor; return 1;
    case NVML_FI_DEV_REMAPPED_UNC: *name = "NVML_FI_DEV_REMAPPED_UNC"; value->uiVal = gpu->remapped_unc; return 1;
    case NVML_FI_DEV_REMAPPED_PENDING: *name = "NVML_FI_DEV_REMAPPED_PENDING"; value->uiVal = gpu->remapped_pending; return 1;
    case NVML_FI_DEV_REMAPPED_FAILURE: *name = "NVML_FI_DEV_REMAPPED_FAILURE"; value->uiVal = gpu->remapped_failure; return 1;
    case NVML_FI_DEV_RETIRED_SBE:
        *name = "NVML_FI_DEV_RETIRED_SBE";
        *type = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
        value->ullVal = gpu->retired_sbe;
        return 1;
    case NVML_FI_DEV_RETIRED_DBE:
        *name = "NVML_FI_DEV_RETIRED_DBE";
        *type = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
        value->ullVal = gpu->retired_dbe;
        return 1;
    default: return 0;
    }
}

/* NVLink data throughput (KiB, cumulative) of GPU 0's link `link` (the
 * value's scopeId): TX (1 << 33) + 7000 × link, RX 9000 × link + 5; not
 * supported on a GPU without NVLink or beyond its links, nor anywhere with
 * FAKE_NO_NVLINK_THROUGHPUT (a driver without these fields). */
#define NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX 138
#define NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX 139
static nvmlReturn_t nvlink_throughput(nvmlDevice_t device, unsigned int id, unsigned int link,
                                      nvmlValueType_t *type, nvmlValue_t *value)
{
#if defined(FAKE_GPU0_NVLINKS) && !defined(FAKE_NO_NVLINK_THROUGHPUT)
    if (device != &gpus[1] && link < (unsigned int)(FAKE_GPU0_NVLINKS)) {
        *type = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
        value->ullVal = id == NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
                            ? (1ULL << 33) + 7000ULL * link
                            : 9000ULL * link + 5;
        return NVML_SUCCESS;
    }
#endif
    (void)device;
    (void)id;
    (void)link;
    (void)type;
    (void)value;
    return NVML_ERROR_NOT_SUPPORTED;
}

/* Like the real library: the call succeeds and each value carries its own
 * return code. */
nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int count, nvmlFieldValue_t *values)
{
    int i;
    BLOCK_POINT();
    CHECK_HEALTH(values);
    if (count <= 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (i = 0; i < count; i++) {
        const char *name = "";
        nvmlFieldValue_t *v = &values[i];
        memset(&v->value, 0, sizeof v->value);
        v->timestamp = 1700000000000000LL;
        v->latencyUsec = 0;
        if (v->fieldId == NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
            || v->fieldId == NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX) {
            v->nvmlReturn = nvlink_throughput(device, v->fieldId, v->scopeId, &v->valueType, &v->value);
            continue;
        }
        if (!field_of(device, v->fieldId, &name, &v->valueType, &v->value)
            || listed(device->unsupported, name))
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        else
            v->nvmlReturn = NVML_SUCCESS;
    }
    return NVML_SUCCESS;
}
#endif

/* ---- NVLink -------------------------------------------------------------- */

typedef enum nvmlEnableState_enum {
    NVML_FEATURE_DISABLED = 0,
    NVML_FEATURE_ENABLED = 1
} nvmlEnableState_t;

typedef enum nvmlNvLinkErrorCounter_enum {
    NVML_NVLINK_ERROR_DL_REPLAY = 0,
    NVML_NVLINK_ERROR_DL_RECOVERY = 1,
    NVML_NVLINK_ERROR_DL_CRC_FLIT = 2,
    NVML_NVLINK_ERROR_DL_CRC_DATA = 3
} nvmlNvLinkErrorCounter_t;

#define NVML_NVLINK_MAX_LINKS 18u

#ifdef FAKE_GPU0_NVLINKS
#define GPU0_NVLINKS ((unsigned int)(FAKE_GPU0_NVLINKS))
#else
#define GPU0_NVLINKS 0u
#endif

#ifdef FAKE_GPU0_NVLINK_ACTIVE
#define GPU0_NVLINK_ACTIVE ((unsigned long)(FAKE_GPU0_NVLINK_ACTIVE))
#else
#define GPU0_NVLINK_ACTIVE 0x3FFFFul
#endif

/* check_health, then whether `link` is one of the GPU's links:
 * NOT_SUPPORTED without NVLink, INVALID_ARGUMENT beyond its links. */
static nvmlReturn_t check_link(nvmlDevice_t device, const char *function, unsigned int link,
                               const void *out)
{
    nvmlReturn_t rc = check_health(device, function, out);
    if (rc != NVML_SUCCESS)
        return rc;
    if (device == &gpus[1] || GPU0_NVLINKS == 0)
        return NVML_ERROR_NOT_SUPPORTED;
    if (link >= GPU0_NVLINKS || link >= NVML_NVLINK_MAX_LINKS)
        return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

#ifndef FAKE_OMIT_nvmlDeviceGetNvLinkState
nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link,
                                      nvmlEnableState_t *isActive)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_link(device, __func__, link, isActive);
    if (rc != NVML_SUCCESS)
        return rc;
#ifdef FAKE_GPU0_NVLINK_STATE_FAILS
    if (link == (unsigned int)(FAKE_GPU0_NVLINK_STATE_FAILS))
        return NVML_ERROR_UNKNOWN;
#endif
    *isActive = (GPU0_NVLINK_ACTIVE >> link) & 1ul ? NVML_FEATURE_ENABLED : NVML_FEATURE_DISABLED;
#ifdef FAKE_GPU0_NVLINK_SLEEP
    if (((unsigned long)(FAKE_GPU0_NVLINK_SLEEP) >> link) & 1ul)
        *isActive = (nvmlEnableState_t)2; /* NVML_NVLINK_STATE_SLEEP */
#endif
    return NVML_SUCCESS;
}
#endif

#ifndef FAKE_OMIT_nvmlDeviceGetNvLinkErrorCounter
nvmlReturn_t nvmlDeviceGetNvLinkErrorCounter(nvmlDevice_t device, unsigned int link,
                                             nvmlNvLinkErrorCounter_t counter,
                                             unsigned long long *counterValue)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_link(device, __func__, link, counterValue);
    if (rc != NVML_SUCCESS)
        return rc;
    switch (counter) {
    case NVML_NVLINK_ERROR_DL_REPLAY: *counterValue = 1000ULL * link + 1; return NVML_SUCCESS;
    case NVML_NVLINK_ERROR_DL_RECOVERY: *counterValue = 1000ULL * link + 2; return NVML_SUCCESS;
    case NVML_NVLINK_ERROR_DL_CRC_FLIT:
        *counterValue = (1ULL << 40) + 1000ULL * link + 3;
        return NVML_SUCCESS;
    case NVML_NVLINK_ERROR_DL_CRC_DATA: *counterValue = 1000ULL * link + 4; return NVML_SUCCESS;
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
}
#endif

/* ---- events (XID critical errors) -------------------------------------- */

#define NVML_EVENT_TYPE_XID_CRITICAL_ERROR 0x8ULL

/* The handle type is opaque to callers; here it points at a fake_event_set. */
struct fake_event_set {
    int registered[FAKE_GPU_COUNT];
};
typedef struct fake_event_set *nvmlEventSet_t;

typedef struct nvmlEventData_st {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

/* One set at a time is enough for the agent; a second create fails. */
static struct fake_event_set the_set;
static int set_in_use;

static int events_supported(nvmlDevice_t device)
{
#ifdef FAKE_NO_EVENTS
    (void)device;
    return 0;
#else
    return !listed(device->unsupported, "nvmlDeviceRegisterEvents");
#endif
}

#ifndef FAKE_OMIT_nvmlEventSetCreate
nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (set == NULL || set_in_use)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(&the_set, 0, sizeof the_set);
    set_in_use = 1;
    *set = &the_set;
    return NVML_SUCCESS;
}
#endif

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (set != &the_set || !set_in_use)
        return NVML_ERROR_INVALID_ARGUMENT;
    set_in_use = 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types)
{
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (types == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *types = events_supported(device) ? NVML_EVENT_TYPE_XID_CRITICAL_ERROR : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types,
                                      nvmlEventSet_t set)
{
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (set != &the_set || !set_in_use)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!events_supported(device) || (types & ~NVML_EVENT_TYPE_XID_CRITICAL_ERROR) != 0)
        return NVML_ERROR_NOT_SUPPORTED;
    the_set.registered[device - gpus] = 1;
    return NVML_SUCCESS;
}

#ifdef FAKE_XID_FILE
/* Lines of FAKE_XID_FILE already delivered (or skipped). */
static long xid_lines_done;

/* The next undelivered event of the control file for a registered GPU:
 * 1 and `data` filled, or 0 when there is none yet. */
static int next_xid(nvmlEventData_t *data)
{
    char line[128];
    long n = 0;
    int found = 0;
    FILE *f = fopen(FAKE_XID_FILE, "r");
    if (f == NULL)
        return 0;
    while (!found && fgets(line, sizeof line, f) != NULL) {
        unsigned int gpu;
        unsigned long long xid;
        if (n++ < xid_lines_done)
            continue;
        /* A line cut short (still being written) is read again next time. */
        if (strchr(line, '\n') == NULL)
            break;
        xid_lines_done = n;
        if (sscanf(line, "%u %llu", &gpu, &xid) != 2 || gpu >= FAKE_GPU_COUNT
            || !the_set.registered[gpu])
            continue;
        data->device = &gpus[gpu];
        data->eventType = NVML_EVENT_TYPE_XID_CRITICAL_ERROR;
        data->eventData = xid;
        data->gpuInstanceId = 0xFFFFFFFFu;
        data->computeInstanceId = 0xFFFFFFFFu;
        found = 1;
    }
    fclose(f);
    return found;
}
#else
static int next_xid(nvmlEventData_t *data)
{
    (void)data;
    return 0;
}
#endif

/* Delivers the next injected event, or waits for one up to `timeout_ms`. */
/* How often a wait looks at the control file again, in ms: every 10 ms by
 * default; FAKE_XID_POLL_MS=N for fewer wakeups (a measurement of the
 * agent's own cost, where the driver's wait would block in the kernel).
 * Without a control file a wait sleeps its whole timeout at once. */
#if !defined(FAKE_XID_FILE)
#define XID_POLL_MS 0x7fffffffL
#elif defined(FAKE_XID_POLL_MS)
#define XID_POLL_MS ((long)(FAKE_XID_POLL_MS))
#else
#define XID_POLL_MS 10L
#endif

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms)
{
    struct timespec start, now, step;
    BLOCK_POINT();
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (set != &the_set || !set_in_use || data == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        long waited;
        if (next_xid(data))
            return NVML_SUCCESS;
        clock_gettime(CLOCK_MONOTONIC, &now);
        waited = (now.tv_sec - start.tv_sec) * 1000L + (now.tv_nsec - start.tv_nsec) / 1000000L;
        if (waited >= (long)timeout_ms)
            return NVML_ERROR_TIMEOUT;
        {
            long ms = (long)timeout_ms - waited;
            if (ms > XID_POLL_MS)
                ms = XID_POLL_MS;
            step.tv_sec = ms / 1000;
            step.tv_nsec = (ms % 1000) * 1000000L;
        }
        nanosleep(&step, NULL);
    }
}

/* ---- MIG ----------------------------------------------------------------
 *
 * GPU 0 (98 SMs, 7 GPU-instance slices: numbers of the fake's own, given
 * in MIG mode by its full 7-slice profile, nvmlDeviceGetGpuInstanceProfileInfo;
 * nvmlDeviceGetAttributes_v2 answers MIG device handles only) can be
 * put in MIG mode with one of these layouts; GPU 1 does not support MIG
 * (nvmlDeviceGetMigMode answers NOT_SUPPORTED).
 *
 *   layout 0   MIG mode off
 *   layout 1   slot 0: MIG-11111111-0000-0000-0000-000000000001
 *                      "NVIDIA H100 80GB HBM3 MIG 3g.40gb", GI 1, CI 0, 42 SMs
 *              slot 1: MIG-11111111-0000-0000-0000-000000000002
 *                      "NVIDIA H100 80GB HBM3 MIG 2g.20gb", GI 5, CI 0, 28 SMs
 *              slot 2: MIG-11111111-0000-0000-0000-000000000003
 *                      name NOT_SUPPORTED (the profile comes from its
 *                      1 slice: "1g"), GI 13, CI 0, 14 SMs
 *              (14 of the board's SMs in no instance)
 *   layout 2   slot 0: MIG-22222222-0000-0000-0000-000000000001
 *                      "NVIDIA H100 80GB HBM3 MIG 4g.40gb", GI 2, CI 0, 56 SMs
 *              slot 3: MIG-22222222-0000-0000-0000-000000000002
 *                      "NVIDIA H100 80GB HBM3 MIG 3g.40gb", GI 1, CI 0, 42 SMs
 *              (slots 1, 2, 4-6 empty: NOT_FOUND)
 *   layout 3   one GPU instance shared by two compute instances:
 *              slot 0: MIG-33333333-0000-0000-0000-000000000001
 *                      "NVIDIA H100 80GB HBM3 MIG 2c.3g.40gb", GI 1, CI 0,
 *                      28 SMs, 3 GPU-instance slices, 2 compute slices
 *              slot 1: MIG-33333333-0000-0000-0000-000000000002
 *                      "NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb", GI 1, CI 1,
 *                      14 SMs, 3 GPU-instance slices, 1 compute slice
 *              slot 2: MIG-33333333-0000-0000-0000-000000000003
 *                      "NVIDIA H100 80GB HBM3 MIG 4g.40gb", GI 2, CI 0,
 *                      56 SMs, 4 slices
 *              (every slice in an instance)
 *
 * Compile-time switches (-D):
 *
 *   FAKE_MIG_LAYOUT=N   GPU 0's layout (default 0).
 *   FAKE_MIG_FILE="PATH"
 *                       (a C string literal) a control file read at each
 *                       MIG call: while it holds a layout number, that
 *                       layout is in force, so a test can change the
 *                       layout during a run.
 */

#define NVML_ERROR_NOT_FOUND 6
#define FAKE_MIG_SLOTS 7u

typedef struct nvmlDeviceAttributes_st {
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    unsigned int gpuInstanceSliceCount;
    unsigned int computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

struct fake_mig {
    const char *uuid; /* NULL: an empty slot */
    const char *name; /* NULL: nvmlDeviceGetName answers NOT_SUPPORTED */
    unsigned int gpu_instance, compute_instance, sms, slices;
    unsigned long long memory_mb;
    /* The compute instance's slices; 0: all of its GPU instance's. */
    unsigned int compute_slices;
};

#define FAKE_MIG_LAYOUTS 4

static struct fake_mig mig_layouts[FAKE_MIG_LAYOUTS][FAKE_MIG_SLOTS] = {
    {{0}},
    {
        {"MIG-11111111-0000-0000-0000-000000000001", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", 1, 0, 42, 3, 40192},
        {"MIG-11111111-0000-0000-0000-000000000002", "NVIDIA H100 80GB HBM3 MIG 2g.20gb", 5, 0, 28, 2, 19968},
        {"MIG-11111111-0000-0000-0000-000000000003", NULL, 13, 0, 14, 1, 9856},
    },
    {
        {"MIG-22222222-0000-0000-0000-000000000001", "NVIDIA H100 80GB HBM3 MIG 4g.40gb", 2, 0, 56, 4, 40192},
        {0},
        {0},
        {"MIG-22222222-0000-0000-0000-000000000002", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", 1, 0, 42, 3, 40192},
    },
    {
        {"MIG-33333333-0000-0000-0000-000000000001", "NVIDIA H100 80GB HBM3 MIG 2c.3g.40gb", 1, 0, 28, 3, 40192, 2},
        {"MIG-33333333-0000-0000-0000-000000000002", "NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb", 1, 1, 14, 3, 40192, 1},
        {"MIG-33333333-0000-0000-0000-000000000003", "NVIDIA H100 80GB HBM3 MIG 4g.40gb", 2, 0, 56, 4, 40192},
    },
};

#ifdef FAKE_MIG_LAYOUT
#define MIG_LAYOUT ((int)(FAKE_MIG_LAYOUT))
#else
#define MIG_LAYOUT 0
#endif

/* The layout in force: the control file's number, else the built-in one. */
static int mig_layout(void)
{
    int layout = MIG_LAYOUT;
#ifdef FAKE_MIG_FILE
    FILE *f = fopen(FAKE_MIG_FILE, "r");
    if (f != NULL) {
        int n;
        if (fscanf(f, "%d", &n) == 1)
            layout = n;
        fclose(f);
    }
#endif
    return layout >= 0 && layout < FAKE_MIG_LAYOUTS ? layout : 0;
}

/* The MIG device `device` points at, or NULL when it is no MIG handle. */
static struct fake_mig *as_mig(nvmlDevice_t device)
{
    const struct fake_mig *first = &mig_layouts[0][0];
    const struct fake_mig *end = first + FAKE_MIG_LAYOUTS * FAKE_MIG_SLOTS;
    const struct fake_mig *m = (const struct fake_mig *)(const void *)device;
    if (m < first || m >= end || m->uuid == NULL)
        return NULL;
    return (struct fake_mig *)m;
}

static int mig_uuid(nvmlDevice_t device, char *buf, unsigned int length, nvmlReturn_t *rc)
{
    struct fake_mig *m = as_mig(device);
    if (m == NULL)
        return 0;
    *rc = init_count <= 0 ? NVML_ERROR_UNINITIALIZED : copy_string(m->uuid, buf, length);
    return 1;
}

static int mig_name(nvmlDevice_t device, char *buf, unsigned int length, nvmlReturn_t *rc)
{
    struct fake_mig *m = as_mig(device);
    if (m == NULL)
        return 0;
    if (init_count <= 0)
        *rc = NVML_ERROR_UNINITIALIZED;
    else if (m->name == NULL)
        *rc = NVML_ERROR_NOT_SUPPORTED;
    else
        *rc = copy_string(m->name, buf, length);
    return 1;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending)
{
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (current == NULL || pending == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device != &gpus[0])
        return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = mig_layout() != 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device != &gpus[0])
        return NVML_ERROR_NOT_SUPPORTED;
    *count = FAKE_MIG_SLOTS;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig)
{
    nvmlReturn_t rc = check_device(device);
    int layout = mig_layout();
    if (rc != NVML_SUCCESS)
        return rc;
    if (mig == NULL || index >= FAKE_MIG_SLOTS)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device != &gpus[0] || layout == 0)
        return NVML_ERROR_NOT_SUPPORTED;
    if (mig_layouts[layout][index].uuid == NULL)
        return NVML_ERROR_NOT_FOUND;
    *mig = (nvmlDevice_t)(void *)&mig_layouts[layout][index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes)
{
    struct fake_mig *m = as_mig(device);
    if (attributes == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(attributes, 0, sizeof *attributes);
    if (m != NULL) {
        if (init_count <= 0)
            return NVML_ERROR_UNINITIALIZED;
        attributes->multiprocessorCount = m->sms;
        attributes->gpuInstanceSliceCount = m->slices;
        attributes->computeInstanceSliceCount = m->compute_slices ? m->compute_slices : m->slices;
        attributes->memorySizeMB = m->memory_mb;
        return NVML_SUCCESS;
    }
    /* A board handle: the driver answers for MIG device handles only. */
    nvmlReturn_t rc = check_device(device);
    return rc != NVML_SUCCESS ? rc : NVML_ERROR_NOT_SUPPORTED;
}

typedef struct nvmlGpuInstanceProfileInfo_st {
    unsigned int id;
    unsigned int isP2pSupported;
    unsigned int sliceCount;
    unsigned int instanceCount;
    unsigned int multiprocessorCount;
    unsigned int copyEngineCount;
    unsigned int decoderCount;
    unsigned int encoderCount;
    unsigned int jpegCount;
    unsigned int ofaCount;
    unsigned long long memorySizeMB;
} nvmlGpuInstanceProfileInfo_t;

#define NVML_GPU_INSTANCE_PROFILE_7_SLICE 4u

/* GPU 0 in MIG mode answers its full 7-slice profile (98 SMs) only; the
 * driver answers NOT_SUPPORTED with MIG mode off. */
nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfo(nvmlDevice_t device, unsigned int profile,
                                                 nvmlGpuInstanceProfileInfo_t *info)
{
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (info == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device != &gpus[0] || mig_layout() == 0 || profile != NVML_GPU_INSTANCE_PROFILE_7_SLICE)
        return NVML_ERROR_NOT_SUPPORTED;
    memset(info, 0, sizeof *info);
    info->id = profile;
    info->sliceCount = 7;
    info->instanceCount = 1;
    info->multiprocessorCount = 98;
    info->memorySizeMB = device->mem_total / (1024 * 1024);
    return NVML_SUCCESS;
}

static nvmlReturn_t mig_id(nvmlDevice_t device, unsigned int *id, int compute)
{
    struct fake_mig *m = as_mig(device);
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (id == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* A board handle: not a MIG device. */
    if (m == NULL)
        return check_device(device) == NVML_SUCCESS ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_INVALID_ARGUMENT;
    *id = compute ? m->compute_instance : m->gpu_instance;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    return mig_id(device, id, 0);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    return mig_id(device, id, 1);
}
/* ---- end MIG ------------------------------------------------------------ */
