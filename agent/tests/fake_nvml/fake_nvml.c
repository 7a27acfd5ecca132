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
 *
 * Compile-time switches (-D):
 *
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

/* The handle type is opaque to callers; here it points at a struct fake_gpu. */
typedef struct fake_gpu *nvmlDevice_t;

/* ---- the fake node ----------------------------------------------------- */

#define FAKE_GPU_COUNT 2u

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
        .no_energy = GPU1_NO_ENERGY,
        .no_temperature = GPU1_NO_TEMPERATURE,
        .lost_after = GPU1_LOST_AFTER,
    },
};

static const char driver_version[] = "550.54.15";

/* nvmlInit_v2 / nvmlShutdown are reference counted in the real library. */
static int init_count;

/* Checks that NVML is initialised and `device` is one of ours. */
static nvmlReturn_t check_device(nvmlDevice_t device)
{
    if (init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    if (device != &gpus[0] && device != &gpus[1])
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
    nvmlReturn_t rc = check_device(device);
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
    nvmlReturn_t rc = check_device(device);
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

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    BLOCK_POINT();
    nvmlReturn_t rc = check_device(device);
    if (rc != NVML_SUCCESS)
        return rc;
    if (utilization == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
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
