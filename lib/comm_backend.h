/* comm_backend: the table of operations one collective backend provides, shared by
 * lib/comm.c and the backends (self, TCP and NCCL in the library; MPI as a plugin that
 * lib/comm.c loads at run time, so programs do not need libmpi unless launched by MPI).
 *
 * The plugin is built separately against mpi.h, so this header depends on nothing else of
 * dsv3: errors come back as a message in the backend's err buffer and a return of -1.
 * Counts are elements; `send == recv` in allreduce means in place. */
#ifndef DSV3_COMM_BACKEND_H
#define DSV3_COMM_BACKEND_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types and reductions (the values are part of the plugin ABI). */
enum { COMM_F32 = 0, COMM_F64 = 1, COMM_BF16 = 2, COMM_F16 = 3, COMM_I32 = 4, COMM_I64 = 5,
       COMM_U8 = 6, COMM_NTYPES = 7 };
enum { COMM_SUM = 0, COMM_MAX = 1, COMM_MIN = 2 };

#define COMM_BACKEND_ABI 1

typedef struct comm_backend comm_backend;
struct comm_backend {
    int abi;             /* COMM_BACKEND_ABI */
    const char *name;
    void *state;
    int rank, world;
    void *stream;        /* cudaStream_t for NCCL; unused on the CPU */
    char err[512];
    int (*allreduce)(comm_backend *b, const void *send, void *recv, size_t n, int type, int op);
    int (*reduce_scatter)(comm_backend *b, const void *send, void *recv, size_t recv_n,
                          int type, int op);
    int (*allgather)(comm_backend *b, const void *send, void *recv, size_t send_n, int type);
    int (*alltoallv)(comm_backend *b, const void *send, const size_t *send_n,
                     const size_t *send_off, void *recv, const size_t *recv_n,
                     const size_t *recv_off, int type);
    int (*broadcast)(comm_backend *b, void *buf, size_t n, int type, int root);
    int (*barrier)(comm_backend *b);
    void (*close)(comm_backend *b);
};

/* The one symbol the MPI plugin exports: initialises MPI (MPI_THREAD_FUNNELED) and fills b,
 * or writes b->err and returns -1. */
typedef int (*comm_plugin_open_fn)(comm_backend *b);
#define COMM_PLUGIN_SYMBOL "dsv3_comm_mpi_open"

#ifdef __cplusplus
}
#endif

#endif
