/* comm_nccl: the GPU backend of lib/comm, on NCCL opened at run time (libnccl.so.2, or the
 * file DSV3_NCCL names), so the library builds and the CPU programs run where NCCL is
 * absent. Buffers are device pointers; collectives are queued on the stream set with
 * comm_set_stream and return before they finish, as NCCL's do. The caller picks the GPU
 * (cudaSetDevice, usually to the local rank) before comm_open.
 *
 * NCCL's C ABI is stable across 2.x: the handful of entry points and enum values used here
 * are declared below rather than taken from nccl.h, which machines without CUDA lack. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"

typedef struct { char internal[128]; } nccl_id;
typedef void *nccl_comm;
enum { NCCL_I8 = 0, NCCL_U8 = 1, NCCL_I32 = 2, NCCL_I64 = 4, NCCL_F16 = 6, NCCL_F32 = 7,
       NCCL_F64 = 8, NCCL_BF16 = 9 };
enum { NCCL_SUM = 0, NCCL_MAX = 2, NCCL_MIN = 3 };

typedef struct nccl_api {
    void *lib;
    int (*get_version)(int *);
    const char *(*error_string)(int);
    int (*get_unique_id)(nccl_id *);
    int (*init_rank)(nccl_comm *, int, nccl_id, int);
    int (*destroy)(nccl_comm);
    int (*allreduce)(const void *, void *, size_t, int, int, nccl_comm, void *);
    int (*reduce_scatter)(const void *, void *, size_t, int, int, nccl_comm, void *);
    int (*allgather)(const void *, void *, size_t, int, nccl_comm, void *);
    int (*broadcast)(const void *, void *, size_t, int, int, nccl_comm, void *);
    int (*send)(const void *, size_t, int, int, nccl_comm, void *);
    int (*recv)(void *, size_t, int, int, nccl_comm, void *);
    int (*group_start)(void);
    int (*group_end)(void);
} nccl_api;

typedef struct nccl_state {
    nccl_api api;
    nccl_comm comm;
    comm_backend *boot;   /* for barrier; NULL for one rank */
} nccl_state;

static int load_api(comm_backend *b, nccl_api *a)
{
    const char *path = getenv("DSV3_NCCL");
    if (!path || !*path)
        path = "libnccl.so.2";
    a->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!a->lib) {
        snprintf(b->err, sizeof b->err,
                 "NCCL not found (%s); install NCCL or point DSV3_NCCL at libnccl.so.2",
                 dlerror());
        return -1;
    }
    struct { const char *name; void **fn; } sym[] = {
        {"ncclGetVersion", (void **)&a->get_version},
        {"ncclGetErrorString", (void **)&a->error_string},
        {"ncclGetUniqueId", (void **)&a->get_unique_id},
        {"ncclCommInitRank", (void **)&a->init_rank},
        {"ncclCommDestroy", (void **)&a->destroy},
        {"ncclAllReduce", (void **)&a->allreduce},
        {"ncclReduceScatter", (void **)&a->reduce_scatter},
        {"ncclAllGather", (void **)&a->allgather},
        {"ncclBroadcast", (void **)&a->broadcast},
        {"ncclSend", (void **)&a->send},
        {"ncclRecv", (void **)&a->recv},
        {"ncclGroupStart", (void **)&a->group_start},
        {"ncclGroupEnd", (void **)&a->group_end},
    };
    for (size_t i = 0; i < sizeof sym / sizeof *sym; i++) {
        *sym[i].fn = dlsym(a->lib, sym[i].name);
        if (!*sym[i].fn) {
            snprintf(b->err, sizeof b->err, "%s: no symbol %s (NCCL older than 2.7?)", path,
                     sym[i].name);
            return -1;
        }
    }
    int v = 0;
    if (a->get_version(&v) || v < 20700) {
        snprintf(b->err, sizeof b->err, "%s: NCCL version %d, need 2.7 or newer", path, v);
        return -1;
    }
    return 0;
}

static int nccl_type(int t)
{
    static const int map[COMM_NTYPES] = {NCCL_F32, NCCL_F64, NCCL_BF16, NCCL_F16,
                                         NCCL_I32, NCCL_I64, NCCL_U8};
    return map[t];
}

static int nccl_op(int op)
{
    return op == COMM_MAX ? NCCL_MAX : op == COMM_MIN ? NCCL_MIN : NCCL_SUM;
}

static int check(comm_backend *b, const char *what, int rc)
{
    if (!rc)
        return 0;
    nccl_state *st = b->state;
    snprintf(b->err, sizeof b->err, "%s: %s", what, st->api.error_string(rc));
    return -1;
}

static int n_allreduce(comm_backend *b, const void *s, void *r, size_t n, int t, int op)
{
    nccl_state *st = b->state;
    return check(b, "ncclAllReduce",
                 st->api.allreduce(s, r, n, nccl_type(t), nccl_op(op), st->comm, b->stream));
}

static int n_reduce_scatter(comm_backend *b, const void *s, void *r, size_t n, int t, int op)
{
    nccl_state *st = b->state;
    return check(b, "ncclReduceScatter",
                 st->api.reduce_scatter(s, r, n, nccl_type(t), nccl_op(op), st->comm,
                                        b->stream));
}

static int n_allgather(comm_backend *b, const void *s, void *r, size_t n, int t)
{
    nccl_state *st = b->state;
    return check(b, "ncclAllGather",
                 st->api.allgather(s, r, n, nccl_type(t), st->comm, b->stream));
}

static int n_broadcast(comm_backend *b, void *buf, size_t n, int t, int root)
{
    nccl_state *st = b->state;
    return check(b, "ncclBroadcast",
                 st->api.broadcast(buf, buf, n, nccl_type(t), root, st->comm, b->stream));
}

/* All-to-all(v) as NCCL documents it: one send and one receive per peer in a group. */
static int n_alltoallv(comm_backend *b, const void *s, const size_t *sn, const size_t *so,
                       void *r, const size_t *rn, const size_t *ro, int t)
{
    nccl_state *st = b->state;
    size_t es = comm_type_size(t);
    int nt = nccl_type(t);
    if (check(b, "ncclGroupStart", st->api.group_start()))
        return -1;
    int rc = 0;
    for (int p = 0; p < b->world && !rc; p++) {
        if (sn[p])
            rc = check(b, "ncclSend", st->api.send((const char *)s + so[p] * es, sn[p], nt, p,
                                                   st->comm, b->stream));
        if (!rc && rn[p])
            rc = check(b, "ncclRecv", st->api.recv((char *)r + ro[p] * es, rn[p], nt, p,
                                                   st->comm, b->stream));
    }
    int end = st->api.group_end();
    return rc ? rc : check(b, "ncclGroupEnd", end);
}

/* A host-side barrier through the bootstrap: what callers mean by "all ranks got here". */
static int n_barrier(comm_backend *b)
{
    nccl_state *st = b->state;
    if (!st->boot)
        return 0;
    if (st->boot->barrier(st->boot) < 0) {
        snprintf(b->err, sizeof b->err, "bootstrap barrier: %.400s", st->boot->err);
        return -1;
    }
    return 0;
}

static void n_close(comm_backend *b)
{
    nccl_state *st = b->state;
    if (!st)
        return;
    if (st->comm)
        st->api.destroy(st->comm);
    /* libnccl stays loaded: its threads may outlive the communicator briefly */
    free(st);
    b->state = NULL;
}

int comm_nccl_open(comm_backend *b, const comm_launch *l, comm_backend *boot)
{
    nccl_state *st = calloc(1, sizeof *st);
    if (!st) {
        snprintf(b->err, sizeof b->err, "out of memory");
        return -1;
    }
    b->state = st;
    st->boot = boot;
    if (load_api(b, &st->api) < 0) {
        free(st);
        b->state = NULL;
        return -1;
    }
    nccl_id id;
    memset(&id, 0, sizeof id);
    if (l->rank == 0 && check(b, "ncclGetUniqueId", st->api.get_unique_id(&id)))
        goto fail;
    if (boot && boot->broadcast(boot, &id, sizeof id, COMM_U8, 0) < 0) {
        snprintf(b->err, sizeof b->err, "passing NCCL's id from rank 0: %.400s", boot->err);
        goto fail;
    }
    if (check(b, "ncclCommInitRank", st->api.init_rank(&st->comm, l->world, id, l->rank)))
        goto fail;
    b->abi = COMM_BACKEND_ABI;
    b->name = "nccl";
    b->rank = l->rank, b->world = l->world;
    b->allreduce = n_allreduce;
    b->reduce_scatter = n_reduce_scatter;
    b->allgather = n_allgather;
    b->alltoallv = n_alltoallv;
    b->broadcast = n_broadcast;
    b->barrier = n_barrier;
    b->close = n_close;
    return 0;
fail:
    free(st);
    b->state = NULL;
    return -1;
}
