/*
 * Simulated NVML: the subset of libnvidia-ml that dualscale's NVML backend calls, backed by a
 * simulated node whose state lives in a file, so several processes (an actuator, a test, a
 * reader) see one node. Built as libnvidia-ml.so.1 (SONAME included) so the real nvidia-ml-py
 * bindings load it unchanged: put its folder on LD_LIBRARY_PATH, or dlopen it by path first.
 *
 * The state file is named by the environment variable DUALSCALE_NVML_SIM_STATE (read at
 * nvmlInit), or attached with dsim_attach(); it is created with dsim_create(). Without one,
 * nvmlInit fails with NVML_ERROR_DRIVER_NOT_LOADED, like a machine without the driver.
 *
 * Modelled: supported memory and graphics clocks (one memory clock, graphics clocks from
 * clock_max down to clock_min in steps), locked clocks reached switch_delay_us after the call,
 * optional call latency, a throttle cap with its clock-event reasons, power linear in the clock
 * (mW), a 64-bit energy counter (mJ) that starts past 2^32 and updates every 100 ms.
 * Switches (dsim_set_error): an NVML error code returned by the clock setters of one GPU
 * (NVML_ERROR_NO_PERMISSION = 4, NVML_ERROR_NOT_SUPPORTED = 3, ...) or by its clock queries.
 *
 * Build: cc -O2 -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 nvml_sim.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

enum {
    NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NO_PERMISSION = 4, NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_DRIVER_NOT_LOADED = 9, NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999
};
enum { NVML_CLOCK_GRAPHICS = 0, NVML_CLOCK_SM = 1, NVML_CLOCK_MEM = 2, NVML_CLOCK_VIDEO = 3 };

#define DSIM_MAGIC 0x4d495344u /* "DSIM" */
#define DSIM_VERSION 1u
#define DSIM_MAX_GPUS 16
#define DSIM_MAX_CLOCKS 256
#define ENERGY_PERIOD_NS 100000000LL /* the counter updates every 100 ms */

typedef struct {
    uint32_t locked_min_mhz, locked_max_mhz; /* 0 = not locked */
    uint32_t prev_mhz, target_mhz;           /* clock before / after the last switch */
    int64_t switch_at_ns;                    /* target reached then (CLOCK_MONOTONIC) */
    uint32_t cap_mhz;                        /* throttle cap, 0 = none */
    uint32_t err_set, err_query;             /* forced NVML error codes, 0 = none */
    uint32_t writes;                         /* successful set/reset calls */
    uint64_t reasons;                        /* clock-event reasons while capped */
    double energy_mj;                        /* integrated energy */
    int64_t energy_ns;                       /* integrated up to */
    uint64_t reported_mj;                    /* what the counter shows (updated every 100 ms) */
    int64_t reported_ns;
} gpu_t;

typedef struct {
    uint32_t magic, version, n_gpus, n_clocks;
    uint32_t clocks_mhz[DSIM_MAX_CLOCKS]; /* descending, as NVML lists them */
    uint32_t mem_mhz, switch_delay_us, call_delay_us, pad;
    double power_min_mw, power_max_mw;    /* power at the lowest / highest clock */
    gpu_t gpu[DSIM_MAX_GPUS];
} state_t;

typedef struct nvmlDevice_st *nvmlDevice_t;

static state_t *S = NULL;
static int S_fd = -1;
static int initialized = 0;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void lock(void) { if (S_fd >= 0) flock(S_fd, LOCK_EX); }
static void unlock(void) { if (S_fd >= 0) flock(S_fd, LOCK_UN); }

static int map_file(const char *path) {
    int fd = open(path, O_RDWR);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size != sizeof(state_t)) { close(fd); return -1; }
    void *p = mmap(NULL, sizeof(state_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { close(fd); return -1; }
    state_t *s = (state_t *)p;
    if (s->magic != DSIM_MAGIC || s->version != DSIM_VERSION) { munmap(p, sizeof(state_t)); close(fd); return -1; }
    if (S) { munmap(S, sizeof(state_t)); close(S_fd); }
    S = s;
    S_fd = fd;
    return 0;
}

/* ---- simulation ------------------------------------------------------------------------- */
static uint32_t clock_now(const gpu_t *g, int64_t t) {
    uint32_t f = t >= g->switch_at_ns ? g->target_mhz : g->prev_mhz;
    return (g->cap_mhz && g->cap_mhz < f) ? g->cap_mhz : f;
}

static double power_mw_at(uint32_t f) {
    uint32_t lo = S->clocks_mhz[S->n_clocks - 1], hi = S->clocks_mhz[0];
    if (hi == lo) return S->power_max_mw;
    return S->power_min_mw + (S->power_max_mw - S->power_min_mw) * ((double)f - lo) / ((double)hi - lo);
}

static void integrate(gpu_t *g, int64_t t) {
    int64_t t0 = g->energy_ns;
    if (t <= t0) return;
    if (t0 < g->switch_at_ns && g->switch_at_ns < t) {
        g->energy_mj += power_mw_at(clock_now(g, g->switch_at_ns - 1)) * (double)(g->switch_at_ns - t0) * 1e-9;
        t0 = g->switch_at_ns;
    }
    g->energy_mj += power_mw_at(clock_now(g, t)) * (double)(t - t0) * 1e-9;
    g->energy_ns = t;
    if (t - g->reported_ns >= ENERGY_PERIOD_NS) {
        g->reported_mj = (uint64_t)g->energy_mj;
        g->reported_ns = t;
    }
}

static int get_gpu(nvmlDevice_t h, gpu_t **out) {
    if (!initialized || !S) return NVML_ERROR_UNINITIALIZED;
    uintptr_t i = (uintptr_t)h - 0x1000u;
    if (!h || i >= S->n_gpus) return NVML_ERROR_INVALID_ARGUMENT;
    *out = &S->gpu[i];
    return NVML_SUCCESS;
}

static uint32_t round_to_supported(uint32_t f) {
    /* the largest supported clock <= f (clocks are descending) */
    for (uint32_t k = 0; k < S->n_clocks; k++)
        if (S->clocks_mhz[k] <= f) return S->clocks_mhz[k];
    return S->clocks_mhz[S->n_clocks - 1];
}

static int do_switch(gpu_t *g, uint32_t lo, uint32_t hi, uint32_t target) {
    if (S->call_delay_us) usleep(S->call_delay_us);
    lock();
    int rc = (int)g->err_set;
    if (!rc) {
        int64_t t = now_ns();
        integrate(g, t);
        g->prev_mhz = t >= g->switch_at_ns ? g->target_mhz : g->prev_mhz;
        g->target_mhz = target;
        g->switch_at_ns = t + (int64_t)S->switch_delay_us * 1000;
        g->locked_min_mhz = lo;
        g->locked_max_mhz = hi;
        g->writes++;
    }
    unlock();
    return rc;
}

/* ---- control API (tests) ---------------------------------------------------------------- */
EXPORT int dsim_create(const char *path, unsigned n_gpus, unsigned clock_min_mhz, unsigned clock_max_mhz,
                       unsigned step_mhz, unsigned mem_mhz, unsigned switch_delay_us,
                       double power_min_w, double power_max_w) {
    if (n_gpus < 1 || n_gpus > DSIM_MAX_GPUS || step_mhz < 1 || clock_min_mhz > clock_max_mhz) return -EINVAL;
    unsigned n = (clock_max_mhz - clock_min_mhz) / step_mhz + 1;
    if (n > DSIM_MAX_CLOCKS) return -EINVAL;
    state_t *s = calloc(1, sizeof(state_t));
    if (!s) return -ENOMEM;
    s->magic = DSIM_MAGIC;
    s->version = DSIM_VERSION;
    s->n_gpus = n_gpus;
    s->n_clocks = n;
    for (unsigned k = 0; k < n; k++) s->clocks_mhz[k] = clock_max_mhz - k * step_mhz;
    s->mem_mhz = mem_mhz;
    s->switch_delay_us = switch_delay_us;
    s->power_min_mw = power_min_w * 1000.0;
    s->power_max_mw = power_max_w * 1000.0;
    int64_t t = now_ns();
    for (unsigned i = 0; i < n_gpus; i++) {
        gpu_t *g = &s->gpu[i];
        g->prev_mhz = g->target_mhz = s->clocks_mhz[0];
        g->energy_mj = 5.0e9; /* past 2^32 mJ: a 32-bit reader wraps */
        g->reported_mj = (uint64_t)g->energy_mj;
        g->energy_ns = g->reported_ns = t;
    }
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp) { free(s); return -ENAMETOOLONG; }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { free(s); return -errno; }
    ssize_t w = write(fd, s, sizeof(state_t));
    close(fd);
    free(s);
    if (w != (ssize_t)sizeof(state_t) || rename(tmp, path) != 0) { unlink(tmp); return -EIO; }
    return 0;
}

EXPORT int dsim_attach(const char *path) { return map_file(path) == 0 ? 0 : -EINVAL; }

EXPORT int dsim_set_error(unsigned gpu, unsigned err_set, unsigned err_query) {
    if (!S || gpu >= S->n_gpus) return -EINVAL;
    lock();
    S->gpu[gpu].err_set = err_set;
    S->gpu[gpu].err_query = err_query;
    unlock();
    return 0;
}

EXPORT int dsim_set_throttle(unsigned gpu, unsigned cap_mhz, unsigned long long reasons) {
    if (!S || gpu >= S->n_gpus) return -EINVAL;
    lock();
    integrate(&S->gpu[gpu], now_ns());
    S->gpu[gpu].cap_mhz = cap_mhz;
    S->gpu[gpu].reasons = cap_mhz ? reasons : 0;
    unlock();
    return 0;
}

EXPORT int dsim_set_call_delay_us(unsigned us) {
    if (!S) return -EINVAL;
    S->call_delay_us = us;
    return 0;
}

/* locked max clock (MHz, 0 = not locked), or -1 for a bad GPU */
EXPORT long dsim_locked_mhz(unsigned gpu) { return (S && gpu < S->n_gpus) ? (long)S->gpu[gpu].locked_max_mhz : -1; }
EXPORT long dsim_writes(unsigned gpu) { return (S && gpu < S->n_gpus) ? (long)S->gpu[gpu].writes : -1; }

/* ---- NVML ------------------------------------------------------------------------------ */
EXPORT int nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    const char *path = getenv("DUALSCALE_NVML_SIM_STATE");
    if (path && *path && map_file(path) != 0) return NVML_ERROR_DRIVER_NOT_LOADED;
    if (!S) return NVML_ERROR_DRIVER_NOT_LOADED;
    initialized++;
    return NVML_SUCCESS;
}
EXPORT int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
EXPORT int nvmlInit(void) { return nvmlInitWithFlags(0); }

EXPORT int nvmlShutdown(void) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    initialized--;
    return NVML_SUCCESS;
}

EXPORT const char *nvmlErrorString(int result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

EXPORT int nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized || !S) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = S->n_gpus;
    return NVML_SUCCESS;
}
EXPORT int nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

EXPORT int nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialized || !S) return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= S->n_gpus) return NVML_ERROR_INVALID_ARGUMENT;
    *device = (nvmlDevice_t)(uintptr_t)(0x1000u + index);
    return NVML_SUCCESS;
}
EXPORT int nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

EXPORT int nvmlDeviceGetName(nvmlDevice_t h, char *name, unsigned int length) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    const char *n = "NVIDIA H100 80GB HBM3 (simulated)";
    if (!name || length < strlen(n) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(name, n, strlen(n) + 1);
    return NVML_SUCCESS;
}

static int list_clocks(unsigned int *count, unsigned int *out, const uint32_t *src, unsigned n) {
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (!out || *count < n) { *count = n; return NVML_ERROR_INSUFFICIENT_SIZE; }
    memcpy(out, src, n * sizeof(uint32_t));
    *count = n;
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t h, unsigned int *count, unsigned int *clocks) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    if (g->err_query) return (int)g->err_query;
    return list_clocks(count, clocks, &S->mem_mhz, 1);
}

EXPORT int nvmlDeviceGetSupportedGraphicsClocks(nvmlDevice_t h, unsigned int mem_mhz, unsigned int *count,
                                                unsigned int *clocks) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    if (g->err_query) return (int)g->err_query;
    if (mem_mhz != S->mem_mhz) return NVML_ERROR_NOT_FOUND;
    return list_clocks(count, clocks, S->clocks_mhz, S->n_clocks);
}

EXPORT int nvmlDeviceSetGpuLockedClocks(nvmlDevice_t h, unsigned int min_mhz, unsigned int max_mhz) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    if (min_mhz > max_mhz || max_mhz > S->clocks_mhz[0] || min_mhz < S->clocks_mhz[S->n_clocks - 1])
        return g->err_set ? (int)g->err_set : NVML_ERROR_INVALID_ARGUMENT;
    return do_switch(g, min_mhz, max_mhz, round_to_supported(max_mhz));
}

EXPORT int nvmlDeviceResetGpuLockedClocks(nvmlDevice_t h) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    return do_switch(g, 0, 0, S->clocks_mhz[0]);
}

EXPORT int nvmlDeviceGetClockInfo(nvmlDevice_t h, int type, unsigned int *clock) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    if (!clock) return NVML_ERROR_INVALID_ARGUMENT;
    lock();
    if (type == NVML_CLOCK_SM || type == NVML_CLOCK_GRAPHICS) *clock = clock_now(g, now_ns());
    else if (type == NVML_CLOCK_MEM) *clock = S->mem_mhz;
    else rc = NVML_ERROR_NOT_SUPPORTED;
    unlock();
    return rc;
}

EXPORT int nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t h, unsigned long long *reasons) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    if (!reasons) return NVML_ERROR_INVALID_ARGUMENT;
    lock();
    *reasons = g->cap_mhz ? g->reasons : 0;
    unlock();
    return NVML_SUCCESS;
}
EXPORT int nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t h, unsigned long long *reasons) {
    return nvmlDeviceGetCurrentClocksEventReasons(h, reasons);
}

EXPORT int nvmlDeviceGetPowerUsage(nvmlDevice_t h, unsigned int *power_mw) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    if (!power_mw) return NVML_ERROR_INVALID_ARGUMENT;
    lock();
    *power_mw = (unsigned int)power_mw_at(clock_now(g, now_ns()));
    unlock();
    return NVML_SUCCESS;
}

EXPORT int nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t h, unsigned long long *energy_mj) {
    gpu_t *g;
    int rc = get_gpu(h, &g);
    if (rc) return rc;
    if (!energy_mj) return NVML_ERROR_INVALID_ARGUMENT;
    lock();
    integrate(g, now_ns());
    *energy_mj = g->reported_mj;
    unlock();
    return NVML_SUCCESS;
}
