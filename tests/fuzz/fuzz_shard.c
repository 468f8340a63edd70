/* libFuzzer target for the shard reader: any bytes, read as a regular file (random access
 * through the footer and index, plus a seek) and as a stream. The reader must return an
 * error or the records, never crash, hang, leak or read out of bounds. */
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../lib/shard.h"

static void read_all(shard_reader *r)
{
    shard_record rec;
    dsv3_err e;
    uint64_t sum = 0;
    while (shard_next(r, &rec, &e) == 1)
        for (uint64_t i = 0; i < rec.n_tokens; i++)
            sum += rec.tokens[i];   /* touch every token handed out */
    (void)sum;
}

static void as_file(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz", 0);
    if (fd < 0)
        return;
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return;
    }
    lseek(fd, 0, SEEK_SET);
    FILE *f = fdopen(fd, "rb");
    shard_reader *r;
    dsv3_err e;
    if (shard_open_stream(&r, f, "fuzz", 1, &e) != 0)
        return;
    const shard_info *in = shard_get_info(r);
    if (in->n_records > 0 && in->n_records < UINT64_MAX && size > 0)
        shard_seek(r, data[size - 1] % (in->n_records + 1), &e);
    read_all(r);
    shard_close(r);
}

static void as_stream(const uint8_t *data, size_t size)
{
    if (size == 0)
        return;
    FILE *f = fmemopen((void *)data, size, "rb");
    if (!f)
        return;
    shard_reader *r;
    dsv3_err e;
    if (shard_open_stream(&r, f, "fuzz", 1, &e) != 0)
        return;
    read_all(r);
    shard_close(r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    as_file(data, size);
    as_stream(data, size);
    return 0;
}
