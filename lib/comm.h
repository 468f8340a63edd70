/* comm: collectives between the ranks of one training job, and how the job was launched.
 *
 * Owns finding this process's place in the job from the launcher's environment (mpirun,
 * srun, torchrun-style RANK/WORLD_SIZE), choosing a backend and the collectives on it:
 *   - CPU buffers: MPI when an MPI launcher started the job (the comm-mpi.so plugin, so
 *     programs need libmpi only then), TCP through the rank-0 hub for torchrun/srun
 *     launches without MPI, "self" for a single process;
 *   - GPU buffers: NCCL (libnccl.so.2 opened at run time), its unique id passed from rank 0
 *     through MPI or the TCP hub.
 * Every call is collective: all ranks make it in the same order with matching sizes. A
 * failure names the rank and the operation. */
#ifndef DSV3_COMM_H
#define DSV3_COMM_H

#include <stddef.h>

#include "comm_backend.h"
#include "err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { COMM_CPU, COMM_GPU } comm_device;

/* The process's place in the job, as the launcher's environment gives it. */
typedef struct comm_launch {
    int rank, world;
    int local_rank, local_world;  /* on this node; local_world 0 when the launcher omits it */
    char launcher[16];            /* "single", "mpirun", "mpi", "srun", "torchrun" */
    int mpi;                      /* started by an MPI launcher: use MPI for the bootstrap */
    char master_addr[256];        /* torchrun/srun: rank 0's host (MASTER_ADDR) */
    int master_port;              /* MASTER_PORT, 29500 when unset */
} comm_launch;

/* Reads the environment: OMPI_COMM_WORLD_*, PMIX_RANK / PMI_RANK / PMI_SIZE, RANK /
 * WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, SLURM_PROCID /
 * SLURM_NTASKS / SLURM_LOCALID. Values that are not numbers or out of range are errors
 * naming the variable. */
int comm_detect_launch(comm_launch *l, dsv3_err *e);

typedef struct comm comm;

/* Joins the job: every rank calls it. dev picks the memory the collectives work on. */
int comm_open(comm **c, comm_device dev, dsv3_err *e);
/* As comm_open with a launch the caller filled (tests, programs that take --rank). */
int comm_open_launch(comm **c, comm_device dev, const comm_launch *l, dsv3_err *e);
/* A GPU (NCCL) comm beside the CPU one `host` of the same job (NULL: this process alone):
 * NCCL's unique id goes through host, which must outlive the new comm. */
int comm_open_device(comm **c, comm *host, dsv3_err *e);
void comm_close(comm *c);

int comm_rank(const comm *c);
int comm_world(const comm *c);
const comm_launch *comm_launch_info(const comm *c);
const char *comm_backend_name(const comm *c);
/* GPU: the cudaStream_t the collectives are queued on (default stream when unset). */
void comm_set_stream(comm *c, void *stream);

size_t comm_type_size(int type);

/* In place: buf holds this rank's n values before and the reduction over ranks after. */
int comm_allreduce(comm *c, void *buf, size_t n, int type, int op, dsv3_err *e);
/* send holds world * recv_n values; rank r receives the reduction of block r. */
int comm_reduce_scatter(comm *c, const void *send, void *recv, size_t recv_n, int type,
                        int op, dsv3_err *e);
/* recv gets world blocks of send_n values, block r from rank r. */
int comm_allgather(comm *c, const void *send, void *recv, size_t send_n, int type,
                   dsv3_err *e);
/* send_n[r] values at send + send_off[r] go to rank r; recv_n[r] values from rank r land
 * at recv + recv_off[r] (offsets in elements). */
int comm_alltoallv(comm *c, const void *send, const size_t *send_n, const size_t *send_off,
                   void *recv, const size_t *recv_n, const size_t *recv_off, int type,
                   dsv3_err *e);
int comm_broadcast(comm *c, void *buf, size_t n, int type, int root, dsv3_err *e);
int comm_barrier(comm *c, dsv3_err *e);

/* Backends, for lib/comm.c only. Each fills b or writes b->err and returns -1. */
int comm_self_open(comm_backend *b);
int comm_tcp_open(comm_backend *b, const comm_launch *l);
int comm_nccl_open(comm_backend *b, const comm_launch *l, comm_backend *bootstrap);

#ifdef __cplusplus
}
#endif

#endif
