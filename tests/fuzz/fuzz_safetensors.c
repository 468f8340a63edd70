/* libFuzzer target for the safetensors header parser (lib/safetensors.c: st_parse).
 * Any input must either be refused with a message or yield tensors whose every byte lies
 * inside the input; the loop below reads them all so ASan catches a pointer that escapes.
 * Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -std=c11 \
 *        tests/fuzz/fuzz_safetensors.c lib/safetensors.c lib/err.c lib/outfile.c -ljansson */
#include <stdint.h>
#include <string.h>

#include "../../lib/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file f;
    dsv3_err e;
    if (st_parse(&f, data, size, "fuzz", &e))
        return 0;
    unsigned sum = 0;
    for (int i = 0; i < f.n; i++) {
        const unsigned char *p = f.t[i].data;
        for (uint64_t j = 0; j < f.t[i].nbytes; j++)
            sum += p[j];
        if (st_find(&f, f.t[i].name) == NULL)
            __builtin_trap();
    }
    st_close(&f);
    return (int)(sum & 0);
}
