/* lib/comm: launch detection from each launcher's variables, the single-process backend,
 * the TCP backend with several ranks as threads of this process (every collective against
 * exactly known results), and the errors. Started by a launcher (tests/cli/test_comm.sh
 * runs it under mpirun and as torchrun-style processes) it checks that job instead. */
#include <pthread.h>
#include <unistd.h>

#include "../../lib/comm.h"
#include "../comm_check.h"
#include "../test.h"

static void *host_alloc(size_t n) { return malloc(n); }
static void host_free(void *p) { free(p); }
static void host_copy(void *d, const void *s, size_t n) { memcpy(d, s, n); }
static void host_copy_c(void *d, const void *s, size_t n) { memcpy(d, s, n); }
static const comm_mem HOST = {host_alloc, host_free, host_copy, host_copy_c, NULL};

static const char *LAUNCH_VARS[] = {
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_RANK", "PMIX_SIZE", "PMI_RANK", "PMI_SIZE",
    "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "RANK", "WORLD_SIZE", "LOCAL_RANK",
    "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
    "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"};

static void clear_launch_env(void)
{
    for (size_t i = 0; i < sizeof LAUNCH_VARS / sizeof *LAUNCH_VARS; i++)
        unsetenv(LAUNCH_VARS[i]);
}

static void detects_each_launcher(void)
{
    comm_launch l;
    dsv3_err e;
    clear_launch_env();
    REQUIRE(comm_detect_launch(&l, &e) == 0);
    CHECK(l.world == 1 && l.rank == 0 && !strcmp(l.launcher, "single") && !l.mpi);

    setenv("SLURM_PROCID", "5", 1), setenv("SLURM_NTASKS", "16", 1);
    setenv("SLURM_LOCALID", "1", 1), setenv("MASTER_ADDR", "node17", 1);
    REQUIRE(comm_detect_launch(&l, &e) == 0);
    CHECK(l.rank == 5 && l.world == 16 && l.local_rank == 1 && !strcmp(l.launcher, "srun"));
    CHECK(!strcmp(l.master_addr, "node17") && l.master_port == 29500 && !l.mpi);

    /* torchrun's variables win over Slurm's (torchrun inside an allocation) */
    setenv("RANK", "3", 1), setenv("WORLD_SIZE", "4", 1), setenv("LOCAL_RANK", "3", 1);
    setenv("MASTER_PORT", "1234", 1);
    REQUIRE(comm_detect_launch(&l, &e) == 0);
    CHECK(l.rank == 3 && l.world == 4 && l.local_rank == 3 && l.master_port == 1234);
    CHECK(!strcmp(l.launcher, "torchrun"));

    /* an MPI launcher wins over both: srun --mpi=pmix sets PMIX_RANK */
    setenv("PMIX_RANK", "2", 1), setenv("PMIX_SIZE", "16", 1);
    REQUIRE(comm_detect_launch(&l, &e) == 0);
    CHECK(l.rank == 2 && l.world == 16 && l.mpi && !strcmp(l.launcher, "mpi"));
    setenv("OMPI_COMM_WORLD_RANK", "7", 1), setenv("OMPI_COMM_WORLD_SIZE", "8", 1);
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3", 1), setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4", 1);
    REQUIRE(comm_detect_launch(&l, &e) == 0);
    CHECK(l.rank == 7 && l.world == 8 && l.local_rank == 3 && l.local_world == 4);
    CHECK(l.mpi && !strcmp(l.launcher, "mpirun"));
    clear_launch_env();
}

static void refuses_bad_launch_values(void)
{
    comm_launch l;
    dsv3_err e;
    clear_launch_env();
    setenv("RANK", "4", 1), setenv("WORLD_SIZE", "4", 1);
    CHECK(comm_detect_launch(&l, &e) < 0 && strstr(e.msg, "RANK=4") &&
          strstr(e.msg, "WORLD_SIZE=4"));
    setenv("RANK", "x1", 1);
    CHECK(comm_detect_launch(&l, &e) < 0 && strstr(e.msg, "RANK='x1'"));
    setenv("RANK", "0", 1), setenv("MASTER_PORT", "70000", 1);
    CHECK(comm_detect_launch(&l, &e) < 0 && strstr(e.msg, "MASTER_PORT"));
    clear_launch_env();
    setenv("SLURM_PROCID", "0", 1), setenv("SLURM_NTASKS", "0", 1);
    CHECK(comm_detect_launch(&l, &e) < 0 && strstr(e.msg, "SLURM_NTASKS"));
    clear_launch_env();
}

static void single_process_collectives(void)
{
    clear_launch_env();
    comm *c;
    dsv3_err e;
    REQUIRE(comm_open(&c, COMM_CPU, &e) == 0);
    CHECK(comm_world(c) == 1 && comm_rank(c) == 0 && !strcmp(comm_backend_name(c), "self"));
    char why[1100];
    CHECKF(comm_check_all(c, &HOST, test_rand(), why, sizeof why) == 0, "%s", why);
    float x = 1;
    CHECK(comm_broadcast(c, &x, 1, COMM_F32, 1, &e) < 0 && strstr(e.msg, "root 1"));
    CHECK(comm_allreduce(c, &x, 1, 99, COMM_SUM, &e) < 0 && strstr(e.msg, "type"));
    comm_close(c);
}

typedef struct rank_job {
    comm_launch l;
    uint64_t seed;
    int rc;
    char why[1100];
    int bf16_refused;
} rank_job;

static void *run_rank(void *arg)
{
    rank_job *j = arg;
    comm *c;
    dsv3_err e;
    if (comm_open_launch(&c, COMM_CPU, &j->l, &e) < 0) {
        snprintf(j->why, sizeof j->why, "%s", e.msg);
        j->rc = -1;
        return NULL;
    }
    j->rc = comm_check_all(c, &HOST, j->seed, j->why, sizeof j->why);
    uint16_t h[4] = {0};
    j->bf16_refused = comm_allreduce(c, h, 4, COMM_BF16, COMM_SUM, &e) < 0 &&
                      strstr(e.msg, "16-bit") != NULL;
    comm_close(c);
    return NULL;
}

static int test_port(int k)
{
    return 20000 + (int)((getpid() * 7 + k * 131) % 20000);
}

static void tcp_ranks_as_threads(void)
{
    for (int world = 2; world <= 4; world++) {
        rank_job job[4];
        pthread_t th[4];
        uint64_t seed = test_rand();
        for (int r = 0; r < world; r++) {
            memset(&job[r], 0, sizeof job[r]);
            job[r].l.rank = r, job[r].l.world = world;
            strcpy(job[r].l.launcher, "torchrun");
            strcpy(job[r].l.master_addr, "localhost");
            job[r].l.master_port = test_port(world);
            job[r].seed = seed;
        }
        for (int r = 0; r < world; r++)
            pthread_create(&th[r], NULL, run_rank, &job[r]);
        for (int r = 0; r < world; r++) {
            pthread_join(th[r], NULL);
            CHECKF(job[r].rc == 0, "world %d rank %d: %s", world, r, job[r].why);
            /* the hub refuses the reduction; peers learn of it only as a refusal too */
            CHECKF(job[r].bf16_refused, "world %d rank %d: bf16 sum not refused", world, r);
        }
    }
}

static void tcp_errors_name_the_cause(void)
{
    comm_launch l = {0};
    l.rank = 1, l.world = 2, l.master_port = test_port(9);
    strcpy(l.launcher, "torchrun"), strcpy(l.master_addr, "127.0.0.1");
    setenv("DSV3_COMM_TIMEOUT", "0.5", 1);
    comm *c;
    dsv3_err e;
    CHECKF(comm_open_launch(&c, COMM_CPU, &l, &e) < 0 && strstr(e.msg, "no rank 0 at 127.0.0.1") &&
               strstr(e.msg, "rank 1 of 2"),
           "%s", e.msg);
    strcpy(l.master_addr, "no-such-host.invalid");
    CHECKF(comm_open_launch(&c, COMM_CPU, &l, &e) < 0 && strstr(e.msg, "no-such-host.invalid"),
           "%s", e.msg);
    unsetenv("DSV3_COMM_TIMEOUT");
}

static void missing_mpi_plugin_is_explained(void)
{
    comm_launch l = {0};
    l.rank = 0, l.world = 2, l.mpi = 1;
    strcpy(l.launcher, "mpirun");
    setenv("DSV3_COMM_MPI", "/nonexistent/comm-mpi.so", 1);
    comm *c;
    dsv3_err e;
    CHECKF(comm_open_launch(&c, COMM_CPU, &l, &e) < 0 && strstr(e.msg, "MPI backend") &&
               strstr(e.msg, "/nonexistent/comm-mpi.so"),
           "%s", e.msg);
    unsetenv("DSV3_COMM_MPI");
}

/* Under a launcher: one line per rank, "ok rank_R_of_W_BACKEND". */
static int check_launched_job(const comm_launch *l)
{
    comm *c;
    dsv3_err e;
    if (comm_open(&c, COMM_CPU, &e) < 0) {
        printf("not ok rank_%d: %s\n", l->rank, e.msg);
        return 1;
    }
    char why[1100];
    const char *seed = getenv("COMM_TEST_SEED");
    int rc = comm_check_all(c, &HOST, seed ? strtoull(seed, NULL, 10) : 1, why, sizeof why);
    if (rc)
        printf("not ok rank_%d_of_%d_%s: %s\n", comm_rank(c), comm_world(c),
               comm_backend_name(c), why);
    else
        printf("ok rank_%d_of_%d_%s\n", comm_rank(c), comm_world(c), comm_backend_name(c));
    comm_close(c);
    return rc ? 1 : 0;
}

int main(void)
{
    comm_launch l;
    dsv3_err e;
    if (comm_detect_launch(&l, &e) < 0) {
        printf("not ok launch: %s\n", e.msg);
        return 1;
    }
    if (l.world > 1 || l.mpi)
        return check_launched_job(&l);
    test_seed();
    RUN(detects_each_launcher);
    RUN(refuses_bad_launch_values);
    RUN(single_process_collectives);
    RUN(tcp_ranks_as_threads);
    RUN(tcp_errors_name_the_cause);
    RUN(missing_mpi_plugin_is_explained);
    TEST_EXIT();
}
