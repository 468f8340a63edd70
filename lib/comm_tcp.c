/* comm_tcp: collectives over TCP through rank 0, for jobs started without MPI
 * (torchrun-style RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, or srun). It also carries NCCL's
 * unique id to every rank.
 *
 * Rank 0 listens on MASTER_PORT; every other rank connects (retrying until
 * DSV3_COMM_TIMEOUT seconds, default 300) and says its rank. Data moves through rank 0:
 * simple, and reductions happen in rank order so every run gives the same bits. It is
 * meant for the CPU backend's small models and for bootstrapping, not for bandwidth. */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "comm.h"

#define HELLO_MAGIC 0x64737633u /* "dsv3" */

typedef struct tcp_state {
    int *fd;          /* rank 0: fd[r] for r >= 1; others: fd[0], the link to rank 0 */
    char *scratch;    /* rank 0's staging buffer */
    size_t scratch_n;
} tcp_state;

static int bad(comm_backend *b, const char *fmt, const char *arg, int err)
{
    char m[300];
    snprintf(m, sizeof m, fmt, arg);
    if (err)
        snprintf(b->err, sizeof b->err, "%s: %s", m, strerror(err));
    else
        snprintf(b->err, sizeof b->err, "%s", m);
    return -1;
}

static int put(comm_backend *b, int fd, const void *p, size_t n, int peer)
{
    const char *s = p;
    while (n) {
        ssize_t k = send(fd, s, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            char r[32];
            snprintf(r, sizeof r, "%d", peer);
            return bad(b, "sending to rank %s", r, errno);
        }
        s += k, n -= (size_t)k;
    }
    return 0;
}

static int get(comm_backend *b, int fd, void *p, size_t n, int peer)
{
    char *s = p;
    while (n) {
        ssize_t k = recv(fd, s, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            char r[32];
            snprintf(r, sizeof r, "%d", peer);
            return bad(b, k == 0 ? "rank %s closed the connection" : "receiving from rank %s",
                       r, k == 0 ? 0 : errno);
        }
        s += k, n -= (size_t)k;
    }
    return 0;
}

static char *scratch(comm_backend *b, size_t n)
{
    tcp_state *st = b->state;
    if (n > st->scratch_n) {
        char *p = realloc(st->scratch, n);
        if (!p)
            return bad(b, "out of memory for %s bytes of staging", "a collective's", 0), NULL;
        st->scratch = p, st->scratch_n = n;
    }
    return st->scratch;
}

/* ---- reductions in rank order ---------------------------------------------------------- */

#define REDUCE_LOOP(T)                                                                     \
    do {                                                                                   \
        T *d = acc;                                                                        \
        const T *s = in;                                                                   \
        for (size_t i = 0; i < n; i++)                                                     \
            d[i] = op == COMM_SUM ? d[i] + s[i] : op == COMM_MAX ? (s[i] > d[i] ? s[i] : d[i]) \
                                                                 : (s[i] < d[i] ? s[i] : d[i]); \
    } while (0)

static int reduce_into(comm_backend *b, void *acc, const void *in, size_t n, int type, int op)
{
    switch (type) {
    case COMM_F32: REDUCE_LOOP(float); return 0;
    case COMM_F64: REDUCE_LOOP(double); return 0;
    case COMM_I32: REDUCE_LOOP(int32_t); return 0;
    case COMM_I64: REDUCE_LOOP(int64_t); return 0;
    case COMM_U8: REDUCE_LOOP(uint8_t); return 0;
    default: return bad(b, "%s: 16-bit floats cannot be reduced here (convert to f32)",
                        "reduction", 0);
    }
}

/* ---- collectives ----------------------------------------------------------------------- */

/* Rank 0 ends with the reduction of every rank's n values in acc (rank order). */
static int gather_reduce(comm_backend *b, const void *send, void *acc, size_t n, int type,
                         int op)
{
    tcp_state *st = b->state;
    size_t bytes = n * comm_type_size(type);
    if (b->rank)
        return put(b, st->fd[0], send, bytes, 0);
    if (send != acc)
        memcpy(acc, send, bytes);
    char *tmp = scratch(b, bytes);
    if (!tmp)
        return -1;
    for (int r = 1; r < b->world; r++)
        if (get(b, st->fd[r], tmp, bytes, r) || reduce_into(b, acc, tmp, n, type, op))
            return -1;
    return 0;
}

static int tcp_allreduce(comm_backend *b, const void *send, void *recv, size_t n, int type,
                         int op)
{
    tcp_state *st = b->state;
    size_t bytes = n * comm_type_size(type);
    if (type == COMM_BF16 || type == COMM_F16)
        return reduce_into(b, NULL, NULL, 0, type, op);
    if (gather_reduce(b, send, recv, n, type, op))
        return -1;
    if (b->rank)
        return get(b, st->fd[0], recv, bytes, 0);
    for (int r = 1; r < b->world; r++)
        if (put(b, st->fd[r], recv, bytes, r))
            return -1;
    return 0;
}

static int tcp_reduce_scatter(comm_backend *b, const void *send, void *recv, size_t recv_n,
                              int type, int op)
{
    tcp_state *st = b->state;
    size_t block = recv_n * comm_type_size(type), n = recv_n * (size_t)b->world;
    if (type == COMM_BF16 || type == COMM_F16)
        return reduce_into(b, NULL, NULL, 0, type, op);
    if (b->rank) {
        if (gather_reduce(b, send, NULL, n, type, op))
            return -1;
        return get(b, st->fd[0], recv, block, 0);
    }
    char *acc = malloc(n * comm_type_size(type) + 1);
    if (!acc)
        return bad(b, "%s: out of memory", "reduce_scatter", 0);
    int rc = gather_reduce(b, send, acc, n, type, op);
    for (int r = 1; !rc && r < b->world; r++)
        rc = put(b, st->fd[r], acc + (size_t)r * block, block, r);
    if (!rc)
        memcpy(recv, acc, block);
    free(acc);
    return rc;
}

static int tcp_allgather(comm_backend *b, const void *send, void *recv, size_t send_n, int type)
{
    tcp_state *st = b->state;
    size_t block = send_n * comm_type_size(type), all = block * (size_t)b->world;
    if (b->rank)
        return put(b, st->fd[0], send, block, 0) || get(b, st->fd[0], recv, all, 0) ? -1 : 0;
    memmove(recv, send, block);
    for (int r = 1; r < b->world; r++)
        if (get(b, st->fd[r], (char *)recv + (size_t)r * block, block, r))
            return -1;
    for (int r = 1; r < b->world; r++)
        if (put(b, st->fd[r], recv, all, r))
            return -1;
    return 0;
}

static int tcp_broadcast(comm_backend *b, void *buf, size_t n, int type, int root)
{
    tcp_state *st = b->state;
    size_t bytes = n * comm_type_size(type);
    if (root != 0) {   /* the root's data goes to the hub first */
        if (b->rank == root && put(b, st->fd[0], buf, bytes, 0))
            return -1;
        if (b->rank == 0 && get(b, st->fd[root], buf, bytes, root))
            return -1;
    }
    if (b->rank)
        return b->rank == root ? 0 : get(b, st->fd[0], buf, bytes, 0);
    for (int r = 1; r < b->world; r++)
        if (r != root && put(b, st->fd[r], buf, bytes, r))
            return -1;
    return 0;
}

/* Each rank sends the hub its count row and its data in destination order; the hub checks
 * every count against the receiver's and forwards. */
static int tcp_alltoallv(comm_backend *b, const void *send, const size_t *send_n,
                         const size_t *send_off, void *recv, const size_t *recv_n,
                         const size_t *recv_off, int type)
{
    tcp_state *st = b->state;
    int w = b->world;
    size_t es = comm_type_size(type);
    uint64_t *rows = calloc((size_t)w * w, sizeof *rows);  /* rows[s*w+d]: s sends d */
    char **data = calloc((size_t)w, sizeof *data);
    int rc = -1;
    if (!rows || !data)
        goto out;
    for (int d = 0; d < w; d++)
        rows[(size_t)b->rank * w + d] = send_n[d];
    if (b->rank) {
        if (put(b, st->fd[0], rows + (size_t)b->rank * w, (size_t)w * sizeof *rows, 0))
            goto out;
        for (int d = 0; d < w; d++)
            if (put(b, st->fd[0], (const char *)send + send_off[d] * es, send_n[d] * es, 0))
                goto out;
        uint64_t got[1];
        for (int s = 0; s < w; s++) {
            if (get(b, st->fd[0], got, sizeof got, 0))
                goto out;
            if (got[0] != recv_n[s]) {
                char m[96];
                snprintf(m, sizeof m, "rank %d sends %llu values, this rank expects %zu", s,
                         (unsigned long long)got[0], recv_n[s]);
                bad(b, "%s", m, 0);
                goto out;
            }
            if (get(b, st->fd[0], (char *)recv + recv_off[s] * es, recv_n[s] * es, 0))
                goto out;
        }
        rc = 0;
        goto out;
    }
    for (int s = 1; s < w; s++) {
        if (get(b, st->fd[s], rows + (size_t)s * w, (size_t)w * sizeof *rows, s))
            goto out;
        size_t tot = 0;
        for (int d = 0; d < w; d++)
            tot += rows[(size_t)s * w + d];
        if (!(data[s] = malloc(tot * es + 1)) || get(b, st->fd[s], data[s], tot * es, s))
            goto out;
    }
    for (int d = 0; d < w; d++)
        for (int s = 0; s < w; s++) {
            uint64_t n = rows[(size_t)s * w + d];
            size_t at = 0;
            for (int k = 0; k < d; k++)
                at += rows[(size_t)s * w + k];
            const char *src = s == 0 ? (const char *)send + send_off[d] * es : data[s] + at * es;
            if (d == 0) {
                if (n != recv_n[s]) {
                    char m[96];
                    snprintf(m, sizeof m, "rank %d sends %llu values, rank 0 expects %zu", s,
                             (unsigned long long)n, recv_n[s]);
                    bad(b, "%s", m, 0);
                    goto out;
                }
                memmove((char *)recv + recv_off[s] * es, src, n * es);
            } else if (put(b, st->fd[d], &n, sizeof n, d) || put(b, st->fd[d], src, n * es, d)) {
                goto out;
            }
        }
    rc = 0;
out:
    if (!rows || !data)
        bad(b, "%s: out of memory", "alltoallv", 0);
    if (data)
        for (int s = 0; s < w; s++)
            free(data[s]);
    free(data);
    free(rows);
    return rc;
}

static int tcp_barrier(comm_backend *b)
{
    uint8_t x = 0;
    return tcp_allreduce(b, &x, &x, 1, COMM_U8, COMM_MAX);
}

static void tcp_close(comm_backend *b)
{
    tcp_state *st = b->state;
    if (!st)
        return;
    int n = b->rank ? 1 : b->world;
    for (int r = 0; r < n; r++)
        if (st->fd[r] >= 0)
            close(st->fd[r]);
    free(st->fd);
    free(st->scratch);
    free(st);
    b->state = NULL;
}

/* ---- joining --------------------------------------------------------------------------- */

static double timeout_s(void)
{
    const char *s = getenv("DSV3_COMM_TIMEOUT");
    double t = s ? atof(s) : 0;
    return t > 0 ? t : 300;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int hub_accept(comm_backend *b, const comm_launch *l, tcp_state *st)
{
    int ls = socket(AF_INET6, SOCK_STREAM, 0), one = 1, zero = 0;
    int v6 = ls >= 0;
    if (!v6)
        ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0)
        return bad(b, "%s", "socket", errno);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage sa = {0};
    socklen_t len;
    if (v6) {   /* one socket for IPv4 and IPv6 peers */
        setsockopt(ls, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&sa;
        a->sin6_family = AF_INET6, a->sin6_port = htons((uint16_t)l->master_port);
        a->sin6_addr = in6addr_any, len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&sa;
        a->sin_family = AF_INET, a->sin_port = htons((uint16_t)l->master_port);
        a->sin_addr.s_addr = htonl(INADDR_ANY), len = sizeof *a;
    }
    char port[16];
    snprintf(port, sizeof port, "%d", l->master_port);
    if (bind(ls, (struct sockaddr *)&sa, len) < 0 || listen(ls, l->world) < 0) {
        bad(b, "rank 0 cannot listen on MASTER_PORT=%s", port, errno);
        close(ls);
        return -1;
    }
    int rc = 0;
    for (int k = 1; k < l->world && !rc; k++) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR) { k--; continue; }
            rc = bad(b, "%s", "accept", errno);
            break;
        }
        nodelay(fd);
        uint32_t hello[3], ok = HELLO_MAGIC;
        if (get(b, fd, hello, sizeof hello, -1)) {
            close(fd);
            rc = -1;
        } else if (hello[0] != HELLO_MAGIC || hello[2] != (uint32_t)l->world || hello[1] == 0 ||
                   hello[1] >= (uint32_t)l->world || st->fd[hello[1]] >= 0) {
            char m[120];
            snprintf(m, sizeof m, "a peer said rank %u of %u (this job: %d ranks)", hello[1],
                     hello[2], l->world);
            close(fd);
            rc = bad(b, "%s: a wrong MASTER_PORT, or two jobs on one port?", m, 0);
        } else {
            st->fd[hello[1]] = fd;
            rc = put(b, fd, &ok, sizeof ok, (int)hello[1]);
        }
    }
    close(ls);
    return rc;
}

static int peer_connect(comm_backend *b, const comm_launch *l, tcp_state *st)
{
    char port[16];
    snprintf(port, sizeof port, "%d", l->master_port);
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC, hints.ai_socktype = SOCK_STREAM;
    int g = getaddrinfo(l->master_addr, port, &hints, &ai);
    if (g)
        return bad(b, "MASTER_ADDR=%s: cannot resolve", l->master_addr, 0);
    double until = now() + timeout_s();
    int fd = -1, last = 0;
    while (fd < 0) {
        for (struct addrinfo *p = ai; p && fd < 0; p = p->ai_next) {
            fd = socket(p->ai_family, p->ai_socktype, p->ai_protocol);
            if (fd >= 0 && connect(fd, p->ai_addr, p->ai_addrlen) < 0) {
                last = errno;
                close(fd);
                fd = -1;
            }
        }
        if (fd < 0) {
            if (now() > until) {
                freeaddrinfo(ai);
                char m[400];
                snprintf(m, sizeof m, "no rank 0 at %.256s:%d after %.0f s (DSV3_COMM_TIMEOUT)",
                         l->master_addr, l->master_port, timeout_s());
                return bad(b, "%s", m, last);
            }
            nanosleep(&(struct timespec){0, 100 * 1000 * 1000}, NULL);
        }
    }
    freeaddrinfo(ai);
    nodelay(fd);
    st->fd[0] = fd;
    uint32_t hello[3] = {HELLO_MAGIC, (uint32_t)l->rank, (uint32_t)l->world}, ok = 0;
    if (put(b, fd, hello, sizeof hello, 0) || get(b, fd, &ok, sizeof ok, 0))
        return -1;
    if (ok != HELLO_MAGIC)
        return bad(b, "%s: rank 0 refused this rank", l->master_addr, 0);
    return 0;
}

int comm_tcp_open(comm_backend *b, const comm_launch *l)
{
    tcp_state *st = calloc(1, sizeof *st);
    int *fd = st ? malloc((size_t)l->world * sizeof *fd) : NULL;
    if (!fd) {
        free(st);
        return bad(b, "%s: out of memory", "tcp", 0);
    }
    for (int r = 0; r < l->world; r++)
        fd[r] = -1;
    st->fd = fd;
    b->abi = COMM_BACKEND_ABI;
    b->name = "tcp";
    b->state = st;
    b->rank = l->rank, b->world = l->world;
    b->allreduce = tcp_allreduce;
    b->reduce_scatter = tcp_reduce_scatter;
    b->allgather = tcp_allgather;
    b->alltoallv = tcp_alltoallv;
    b->broadcast = tcp_broadcast;
    b->barrier = tcp_barrier;
    b->close = tcp_close;
    if ((l->rank == 0 ? hub_accept(b, l, st) : peer_connect(b, l, st)) < 0) {
        char m[sizeof b->err];
        memcpy(m, b->err, sizeof m);
        tcp_close(b);
        b->abi = 0;
        snprintf(b->err, sizeof b->err, "%s", m);
        return -1;
    }
    return 0;
}
