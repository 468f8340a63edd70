/* libFuzzer targets for the tokenizer loaders: the dsv3 tokenizer file (bpe_load_mem) and
 * HF tokenizer.json (bpeio_import_hf_mem). Whatever the bytes, a loader returns a tokenizer
 * or a message; one it accepts must encode and decode a sample without fault.
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -DFUZZ_TARGET=1 \
 *       -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION \
 *       tests/fuzz/fuzz_tok.c lib/bpe.c lib/bpeio.c lib/pretok.c lib/err.c lib/outfile.c \
 *       -lxxhash -ljansson -lpcre2-8 -o fuzz_tok && ./fuzz_tok -max_total_time=600
 * FUZZ_TARGET=1: tokenizer file; 2: tokenizer.json. The unsafe-mode macro skips the file's
 * checksum, which random mutations would otherwise never get past. Seeds: tests/fixtures/tok/, and files
 * written by `dsv3-tok train`. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../lib/bpe.h"
#include "../../lib/bpeio.h"

#ifndef FUZZ_TARGET
#define FUZZ_TARGET 1
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bpe *b;
    dsv3_err e;
    int rc = FUZZ_TARGET == 1 ? bpe_load_mem(&b, data, size, "fuzz", &e)
                              : bpeio_import_hf_mem(&b, data, size, "fuzz", &e);
    if (rc)
        return 0;
    static const uint8_t sample[] = "Hello, world! 12345 \xe4\xb8\xad\xe6\x96\x87 \xff\xfe\n\n";
    bpe_encoder *enc;
    if (bpe_encoder_new(&enc, b, &e) == 0) {
        bpe_ids ids = {0};
        bpe_bytes back = {0};
        /* without special tokens every loaded tokenizer must give the bytes back */
        if (bpe_encode(enc, sample, sizeof sample - 1, NULL, &ids, &e) == 0 &&
            bpe_decode(b, ids.v, ids.n, 0, &back, &e) == 0 &&
            (back.n != sizeof sample - 1 || memcmp(back.v, sample, back.n) != 0))
            abort();
        bpe_ids_free(&ids);
        bpe_bytes_free(&back);
        bpe_encoder_free(enc);
    }
    bpe_free(b);
    return 0;
}
