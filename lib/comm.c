/* comm: launch detection, backend choice, argument checks and the single-process backend.
 * See comm.h. */
#include "comm.h"

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct comm {
    comm_backend b;
    comm_backend boot;     /* MPI or TCP under NCCL, for its unique id; abi 0 when unused */
    comm_launch launch;
    comm_device dev;
    void *plugin;          /* dlopen handle of comm-mpi.so */
};

size_t comm_type_size(int type)
{
    static const size_t sz[COMM_NTYPES] = {4, 8, 2, 2, 4, 8, 1};
    return type >= 0 && type < COMM_NTYPES ? sz[type] : 0;
}

/* ---- launch ---------------------------------------------------------------------------- */

/* 1: var set and parsed into *v; 0: unset; -1: set but not an integer in [lo, hi]. */
static int env_int(const char *var, int lo, int hi, int *v, dsv3_err *e)
{
    const char *s = getenv(var);
    if (!s || !*s)
        return 0;
    char *end;
    errno = 0;
    long x = strtol(s, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return err_set(e, "environment variable %s='%s' is not an integer in [%d, %d]", var,
                       s, lo, hi);
    *v = (int)x;
    return 1;
}

/* Reads one launcher's (rank, size, local rank, local size) variables; 1 if its rank and
 * size are set. */
static int launch_vars(comm_launch *l, const char *rank, const char *size, const char *lrank,
                       const char *lsize, dsv3_err *e)
{
    int r = 0, w = 0, got_r, got_w;
    if ((got_r = env_int(rank, 0, INT_MAX - 1, &r, e)) < 0 ||
        (got_w = env_int(size, 1, INT_MAX, &w, e)) < 0)
        return -1;
    if (!got_r || !got_w)
        return 0;
    if (r >= w)
        return err_set(e, "%s=%d is not below %s=%d", rank, r, size, w);
    l->rank = r, l->world = w;
    if (lrank && env_int(lrank, 0, INT_MAX - 1, &l->local_rank, e) < 0)
        return -1;
    if (lsize && env_int(lsize, 1, INT_MAX, &l->local_world, e) < 0)
        return -1;
    return 1;
}

static int master_vars(comm_launch *l, dsv3_err *e)
{
    const char *a = getenv("MASTER_ADDR");
    snprintf(l->master_addr, sizeof l->master_addr, "%s", a && *a ? a : "127.0.0.1");
    l->master_port = 29500;
    return env_int("MASTER_PORT", 1, 65535, &l->master_port, e) < 0 ? -1 : 0;
}

int comm_detect_launch(comm_launch *l, dsv3_err *e)
{
    memset(l, 0, sizeof *l);
    l->world = 1;
    strcpy(l->launcher, "single");
    int got;
    /* MPI launchers first: under srun --mpi=pmix the Slurm variables are set too */
    if ((got = launch_vars(l, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                           "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", e)))
        return got < 0 ? -1 : (strcpy(l->launcher, "mpirun"), l->mpi = 1, 0);
    if ((got = launch_vars(l, "PMIX_RANK", "PMIX_SIZE", NULL, NULL, e)) ||
        (got = launch_vars(l, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", e)))
        return got < 0 ? -1 : (strcpy(l->launcher, "mpi"), l->mpi = 1, 0);
    if ((got = launch_vars(l, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", e)))
        return got < 0 ? -1 : (strcpy(l->launcher, "torchrun"), master_vars(l, e));
    if ((got = launch_vars(l, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                           "SLURM_NTASKS_PER_NODE", e)))
        return got < 0 ? -1 : (strcpy(l->launcher, "srun"), master_vars(l, e));
    return 0;
}

/* ---- the MPI plugin --------------------------------------------------------------------- */

/* comm-mpi.so sits in lib/dsv3/ beside bin/ (build/ and an installed prefix alike); tests
 * run from build/tests/DIR/. DSV3_COMM_MPI overrides. */
static void *plugin_load(char *tried, size_t n)
{
    const char *env = getenv("DSV3_COMM_MPI");
    if (env && *env) {
        snprintf(tried, n, "%s", env);
        return dlopen(env, RTLD_NOW | RTLD_GLOBAL);
    }
    char exe[PATH_MAX];
    ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (k <= 0)
        return snprintf(tried, n, "(no /proc/self/exe)"), NULL;
    exe[k] = 0;
    char *slash = strrchr(exe, '/');
    if (slash)
        *slash = 0;
    static const char *rel[] = {"/../lib/dsv3/comm-mpi.so", "/../../lib/dsv3/comm-mpi.so"};
    tried[0] = 0;
    for (size_t i = 0; i < sizeof rel / sizeof *rel; i++) {
        char p[PATH_MAX + 64];
        snprintf(p, sizeof p, "%s%s", exe, rel[i]);
        if (access(p, R_OK) == 0) {
            snprintf(tried, n, "%s", p);
            /* RTLD_GLOBAL: Open MPI's own components resolve symbols of libmpi */
            return dlopen(p, RTLD_NOW | RTLD_GLOBAL);
        }
        size_t used = strlen(tried);
        snprintf(tried + used, n - used, "%s%s", used ? ", " : "", p);
    }
    return NULL;
}

static int mpi_open(comm *c, comm_backend *b, dsv3_err *e)
{
    char tried[2 * PATH_MAX + 200];
    if (!c->plugin && !(c->plugin = plugin_load(tried, sizeof tried))) {
        const char *why = dlerror();
        return err_set(e, "started by an MPI launcher, but the MPI backend could not be loaded "
                          "(%s%s%s); build with libopenmpi-dev installed",
                       tried, why ? ": " : "", why ? why : "");
    }
    comm_plugin_open_fn open_fn = (comm_plugin_open_fn)(uintptr_t)dlsym(c->plugin,
                                                                        COMM_PLUGIN_SYMBOL);
    if (!open_fn)
        return err_set(e, "%s: no symbol %s", tried, COMM_PLUGIN_SYMBOL);
    if (open_fn(b) < 0)
        return err_set(e, "MPI: %s", b->err);
    if (b->abi != COMM_BACKEND_ABI)
        return err_set(e, "%s: backend ABI %d, expected %d (rebuild)", tried, b->abi,
                       COMM_BACKEND_ABI);
    if (b->rank != c->launch.rank || b->world != c->launch.world)
        return err_set(e, "MPI says rank %d of %d, the launcher's environment %d of %d",
                       b->rank, b->world, c->launch.rank, c->launch.world);
    return 0;
}

/* ---- single process --------------------------------------------------------------------- */

static int self_copy(const void *send, void *recv, size_t bytes)
{
    if (send != recv && bytes)
        memmove(recv, send, bytes);
    return 0;
}

static int self_allreduce(comm_backend *b, const void *s, void *r, size_t n, int t, int op)
{
    (void)b, (void)op;
    return self_copy(s, r, n * comm_type_size(t));
}

static int self_allgather(comm_backend *b, const void *s, void *r, size_t n, int t)
{
    (void)b;
    return self_copy(s, r, n * comm_type_size(t));
}

static int self_alltoallv(comm_backend *b, const void *s, const size_t *sn, const size_t *so,
                          void *r, const size_t *rn, const size_t *ro, int t)
{
    size_t es = comm_type_size(t);
    (void)rn;
    (void)b;
    return self_copy((const char *)s + so[0] * es, (char *)r + ro[0] * es, sn[0] * es);
}

static int self_broadcast(comm_backend *b, void *buf, size_t n, int t, int root)
{
    (void)b, (void)buf, (void)n, (void)t, (void)root;
    return 0;
}

static int self_barrier(comm_backend *b)
{
    (void)b;
    return 0;
}

static void self_close(comm_backend *b)
{
    (void)b;
}

int comm_self_open(comm_backend *b)
{
    b->abi = COMM_BACKEND_ABI;
    b->name = "self";
    b->rank = 0, b->world = 1;
    b->allreduce = self_allreduce;
    b->reduce_scatter = self_allreduce;
    b->allgather = self_allgather;
    b->alltoallv = self_alltoallv;
    b->broadcast = self_broadcast;
    b->barrier = self_barrier;
    b->close = self_close;
    return 0;
}

/* ---- open / close ----------------------------------------------------------------------- */

static int open_cpu(comm *c, dsv3_err *e)
{
    if (c->launch.mpi)
        return mpi_open(c, &c->b, e);
    if (c->launch.world > 1) {
        if (comm_tcp_open(&c->b, &c->launch) < 0)
            return err_set(e, "%s", c->b.err);
        return 0;
    }
    return comm_self_open(&c->b);
}

static int open_gpu(comm *c, dsv3_err *e)
{
    comm_backend *boot = NULL;
    if (c->launch.world > 1) {
        if (c->launch.mpi ? mpi_open(c, &c->boot, e) < 0
                          : comm_tcp_open(&c->boot, &c->launch) < 0 && err_set(e, "%s", c->boot.err))
            return -1;
        boot = &c->boot;
    }
    if (comm_nccl_open(&c->b, &c->launch, boot) < 0)
        return err_set(e, "%s", c->b.err);
    return 0;
}

int comm_open_launch(comm **out, comm_device dev, const comm_launch *l, dsv3_err *e)
{
    *out = NULL;
    comm *c = calloc(1, sizeof *c);
    if (!c)
        return err_set(e, "out of memory");
    c->launch = *l;
    c->dev = dev;
    if ((dev == COMM_GPU ? open_gpu(c, e) : open_cpu(c, e)) < 0) {
        err_prefix(e, "rank %d of %d (%s)", l->rank, l->world, l->launcher);
        comm_close(c);
        return -1;
    }
    *out = c;
    return 0;
}

int comm_open(comm **c, comm_device dev, dsv3_err *e)
{
    comm_launch l;
    if (comm_detect_launch(&l, e) < 0)
        return -1;
    return comm_open_launch(c, dev, &l, e);
}

int comm_open_device(comm **out, comm *host, dsv3_err *e)
{
    *out = NULL;
    comm_launch l;
    if (!host && comm_detect_launch(&l, e) < 0)
        return -1;
    comm *c = calloc(1, sizeof *c);
    if (!c)
        return err_set(e, "out of memory");
    c->launch = host ? host->launch : l;
    c->dev = COMM_GPU;
    comm_backend *boot = host && host->b.world > 1 ? &host->b : NULL;
    if (!host && c->launch.world > 1) {
        int w = c->launch.world;
        free(c);
        return err_set(e, "comm_open_device: a job of %d ranks needs the CPU comm to join", w);
    }
    if (comm_nccl_open(&c->b, &c->launch, boot) < 0) {
        err_set(e, "rank %d of %d (%s): %s", c->launch.rank, c->launch.world,
                c->launch.launcher, c->b.err);
        free(c);
        return -1;
    }
    *out = c;
    return 0;
}

void comm_close(comm *c)
{
    if (!c)
        return;
    if (c->b.abi && c->b.close)
        c->b.close(&c->b);
    if (c->boot.abi && c->boot.close)
        c->boot.close(&c->boot);
    /* the plugin stays loaded: Open MPI cannot be unloaded and initialised again */
    free(c);
}

int comm_rank(const comm *c) { return c->b.rank; }
int comm_world(const comm *c) { return c->b.world; }
const comm_launch *comm_launch_info(const comm *c) { return &c->launch; }
const char *comm_backend_name(const comm *c) { return c->b.name; }
void comm_set_stream(comm *c, void *stream) { c->b.stream = stream; }

/* ---- collectives ------------------------------------------------------------------------ */

static int check_type(const comm *c, const char *op, int type, int reduce_op, dsv3_err *e)
{
    if (!comm_type_size(type))
        return err_set(e, "rank %d: %s: unknown element type %d", c->b.rank, op, type);
    if (reduce_op < COMM_SUM || reduce_op > COMM_MIN)
        return err_set(e, "rank %d: %s: unknown reduction %d", c->b.rank, op, reduce_op);
    return 0;
}

static int done(comm *c, const char *op, int rc, dsv3_err *e)
{
    if (rc < 0)
        return err_set(e, "rank %d of %d (%s): %s: %s", c->b.rank, c->b.world, c->b.name, op,
                       c->b.err);
    return 0;
}

int comm_allreduce(comm *c, void *buf, size_t n, int type, int op, dsv3_err *e)
{
    if (check_type(c, "allreduce", type, op, e))
        return -1;
    return done(c, "allreduce", c->b.allreduce(&c->b, buf, buf, n, type, op), e);
}

int comm_reduce_scatter(comm *c, const void *send, void *recv, size_t recv_n, int type,
                        int op, dsv3_err *e)
{
    if (check_type(c, "reduce_scatter", type, op, e))
        return -1;
    return done(c, "reduce_scatter",
                c->b.reduce_scatter(&c->b, send, recv, recv_n, type, op), e);
}

int comm_allgather(comm *c, const void *send, void *recv, size_t send_n, int type,
                   dsv3_err *e)
{
    if (check_type(c, "allgather", type, COMM_SUM, e))
        return -1;
    return done(c, "allgather", c->b.allgather(&c->b, send, recv, send_n, type), e);
}

int comm_alltoallv(comm *c, const void *send, const size_t *send_n, const size_t *send_off,
                   void *recv, const size_t *recv_n, const size_t *recv_off, int type,
                   dsv3_err *e)
{
    if (check_type(c, "alltoallv", type, COMM_SUM, e))
        return -1;
    return done(c, "alltoallv",
                c->b.alltoallv(&c->b, send, send_n, send_off, recv, recv_n, recv_off, type), e);
}

int comm_broadcast(comm *c, void *buf, size_t n, int type, int root, dsv3_err *e)
{
    if (check_type(c, "broadcast", type, COMM_SUM, e))
        return -1;
    if (root < 0 || root >= c->b.world)
        return err_set(e, "rank %d: broadcast: root %d is not a rank of %d", c->b.rank, root,
                       c->b.world);
    return done(c, "broadcast", c->b.broadcast(&c->b, buf, n, type, root), e);
}

int comm_barrier(comm *c, dsv3_err *e)
{
    return done(c, "barrier", c->b.barrier(&c->b), e);
}
