/* comm_mpi: the MPI backend of lib/comm, built as a shared object (comm-mpi.so) that
 * lib/comm.c opens only when a program was started by an MPI launcher. Collectives run on
 * host memory (the CPU backend's), on MPI_COMM_WORLD.
 *
 * MPI takes int counts: transfers above INT_MAX elements are sent in pieces where the
 * operation allows it (allreduce, broadcast) and refused where it does not. */
#include <limits.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../comm_backend.h"

#define PIECE ((size_t)1 << 30)

static size_t type_size(int t)
{
    static const size_t sz[COMM_NTYPES] = {4, 8, 2, 2, 4, 8, 1};
    return sz[t];
}

/* bf16/f16 have no MPI type: they move as 16-bit integers and cannot be reduced here. */
static MPI_Datatype mpi_type(int t)
{
    switch (t) {
    case COMM_F32: return MPI_FLOAT;
    case COMM_F64: return MPI_DOUBLE;
    case COMM_BF16: case COMM_F16: return MPI_UINT16_T;
    case COMM_I32: return MPI_INT32_T;
    case COMM_I64: return MPI_INT64_T;
    default: return MPI_UINT8_T;
    }
}

static MPI_Op mpi_op(int op)
{
    return op == COMM_MAX ? MPI_MAX : op == COMM_MIN ? MPI_MIN : MPI_SUM;
}

static int fail(comm_backend *b, const char *what, int rc)
{
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, s, &n) != MPI_SUCCESS)
        snprintf(s, sizeof s, "error %d", rc);
    snprintf(b->err, sizeof b->err, "%s: %s", what, s);
    return -1;
}

static int refuse(comm_backend *b, const char *what, const char *why)
{
    snprintf(b->err, sizeof b->err, "%s: %s", what, why);
    return -1;
}

static int reducible(comm_backend *b, const char *what, int type)
{
    if (type == COMM_BF16 || type == COMM_F16)
        return refuse(b, what, "MPI cannot reduce 16-bit floats (convert to f32 first)");
    return 0;
}

static int mpi_allreduce(comm_backend *b, const void *send, void *recv, size_t n, int type,
                         int op)
{
    if (reducible(b, "MPI_Allreduce", type))
        return -1;
    size_t es = type_size(type);
    for (size_t at = 0; at < n; at += PIECE) {
        size_t k = n - at < PIECE ? n - at : PIECE;
        const void *s = send == recv ? MPI_IN_PLACE : (const char *)send + at * es;
        int rc = MPI_Allreduce(s, (char *)recv + at * es, (int)k, mpi_type(type), mpi_op(op),
                               MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS)
            return fail(b, "MPI_Allreduce", rc);
    }
    return 0;
}

static int mpi_reduce_scatter(comm_backend *b, const void *send, void *recv, size_t recv_n,
                              int type, int op)
{
    if (reducible(b, "MPI_Reduce_scatter_block", type))
        return -1;
    if (recv_n > INT_MAX)
        return refuse(b, "MPI_Reduce_scatter_block", "more than INT_MAX elements per rank");
    int rc = MPI_Reduce_scatter_block(send, recv, (int)recv_n, mpi_type(type), mpi_op(op),
                                      MPI_COMM_WORLD);
    return rc == MPI_SUCCESS ? 0 : fail(b, "MPI_Reduce_scatter_block", rc);
}

static int mpi_allgather(comm_backend *b, const void *send, void *recv, size_t send_n,
                         int type)
{
    if (send_n > INT_MAX)
        return refuse(b, "MPI_Allgather", "more than INT_MAX elements per rank");
    int rc = MPI_Allgather(send, (int)send_n, mpi_type(type), recv, (int)send_n,
                           mpi_type(type), MPI_COMM_WORLD);
    return rc == MPI_SUCCESS ? 0 : fail(b, "MPI_Allgather", rc);
}

static int to_ints(comm_backend *b, const size_t *v, int n, int *out)
{
    for (int i = 0; i < n; i++) {
        if (v[i] > INT_MAX)
            return refuse(b, "MPI_Alltoallv", "a count or offset above INT_MAX elements");
        out[i] = (int)v[i];
    }
    return 0;
}

static int mpi_alltoallv(comm_backend *b, const void *send, const size_t *send_n,
                         const size_t *send_off, void *recv, const size_t *recv_n,
                         const size_t *recv_off, int type)
{
    int w = b->world, rc = -1;
    int *v = malloc(4 * (size_t)w * sizeof *v);
    if (!v)
        return refuse(b, "MPI_Alltoallv", "out of memory");
    if (!to_ints(b, send_n, w, v) && !to_ints(b, send_off, w, v + w) &&
        !to_ints(b, recv_n, w, v + 2 * w) && !to_ints(b, recv_off, w, v + 3 * w)) {
        rc = MPI_Alltoallv(send, v, v + w, mpi_type(type), recv, v + 2 * w, v + 3 * w,
                           mpi_type(type), MPI_COMM_WORLD);
        rc = rc == MPI_SUCCESS ? 0 : fail(b, "MPI_Alltoallv", rc);
    }
    free(v);
    return rc;
}

static int mpi_broadcast(comm_backend *b, void *buf, size_t n, int type, int root)
{
    size_t es = type_size(type);
    for (size_t at = 0; at < n; at += PIECE) {
        size_t k = n - at < PIECE ? n - at : PIECE;
        int rc = MPI_Bcast((char *)buf + at * es, (int)k, mpi_type(type), root, MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS)
            return fail(b, "MPI_Bcast", rc);
    }
    return 0;
}

static int mpi_barrier(comm_backend *b)
{
    int rc = MPI_Barrier(MPI_COMM_WORLD);
    return rc == MPI_SUCCESS ? 0 : fail(b, "MPI_Barrier", rc);
}

static void mpi_close(comm_backend *b)
{
    (void)b;
    int done = 0;
    MPI_Finalized(&done);
    if (!done)
        MPI_Finalize();
}

int dsv3_comm_mpi_open(comm_backend *b)
{
    int inited = 0, provided = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS)
            return fail(b, "MPI_Init_thread", rc);
    }
    /* errors come back as return codes, to be reported with the rank, not abort the job */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &b->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &b->world);
    b->abi = COMM_BACKEND_ABI;
    b->name = "mpi";
    b->allreduce = mpi_allreduce;
    b->reduce_scatter = mpi_reduce_scatter;
    b->allgather = mpi_allgather;
    b->alltoallv = mpi_alltoallv;
    b->broadcast = mpi_broadcast;
    b->barrier = mpi_barrier;
    b->close = mpi_close;
    return 0;
}
