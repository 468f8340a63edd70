#include "fim.h"

#include <string.h>

#include "pack.h"

#define FW "\xef\xbd\x9c"   /* U+FF5C FULLWIDTH VERTICAL LINE, as in DeepSeek's tokens */
#define SP "\xe2\x96\x81"   /* U+2581 LOWER ONE EIGHTH BLOCK, their word separator */
const char *const FIM_TOKEN_NAMES[3] = {"<" FW "fim" SP "begin" FW ">",
                                        "<" FW "fim" SP "hole" FW ">",
                                        "<" FW "fim" SP "end" FW ">"};

void fim_token_ids(const bpe *b, uint32_t ids[3])
{
    for (int i = 0; i < 3; i++)
        ids[i] = bpe_lookup_special(b, (const uint8_t *)FIM_TOKEN_NAMES[i],
                                    strlen(FIM_TOKEN_NAMES[i]));
}

int fim_text_new(fim_text *f, const bpe *b, dsv3_err *e)
{
    memset(f, 0, sizeof *f);
    f->b = b;
    return bpe_encoder_new(&f->enc, b, e);
}

void fim_text_free(fim_text *f)
{
    bpe_encoder_free(f->enc);
    bpe_bytes_free(&f->text);
    bpe_ids_free(&f->out);
    memset(f, 0, sizeof *f);
}

static int is_boundary(const uint8_t *s, size_t len, size_t i)
{
    return i == 0 || i == len || (s[i] & 0xc0) != 0x80;
}

/* The byte offset of boundary k (0: the start). */
static size_t nth_boundary(const uint8_t *s, size_t len, uint64_t k)
{
    for (size_t i = 0;; i++)
        if (is_boundary(s, len, i) && k-- == 0)
            return i;
}

static int encode_part(fim_text *f, const uint8_t *s, size_t n, dsv3_err *e)
{
    bpe_encode_opts o = {0, 0, 0};   /* no special tokens from text: none can be injected */
    return n ? bpe_encode(f->enc, s, n, &o, &f->out, e) : 0;
}

int fim_text_apply(fim_text *f, const uint32_t *t, uint64_t n, int spm, const uint32_t ids[3],
                   uint64_t *rng, dsv3_err *e)
{
    for (uint64_t i = 0; i < n; i++)
        if (t[i] < bpe_vocab_size(f->b) && bpe_token_kind(f->b, t[i]) == BPE_SPECIAL)
            return 0;
    f->text.n = 0;
    if (bpe_decode(f->b, t, n, 0, &f->text, e))
        return -1;
    const uint8_t *s = f->text.v;
    size_t len = f->text.n;
    uint64_t m = 0;
    for (size_t i = 0; i <= len; i++)
        m += (uint64_t)is_boundary(s, len, i);
    uint64_t ka = pack_rand_below(rng, m), kb = pack_rand_below(rng, m);
    if (ka > kb) {
        uint64_t x = ka;
        ka = kb;
        kb = x;
    }
    size_t a = nth_boundary(s, len, ka), b = nth_boundary(s, len, kb);
    f->out.n = 0;
    e->msg[0] = 0;   /* set below only by a failed encode: otherwise it was a push */
    int rc = bpe_ids_push(&f->out, ids[0]);
    if (!spm) {
        rc = rc || encode_part(f, s, a, e) || bpe_ids_push(&f->out, ids[1]) ||
             encode_part(f, s + b, len - b, e) || bpe_ids_push(&f->out, ids[2]);
    } else {
        rc = rc || bpe_ids_push(&f->out, ids[1]) || encode_part(f, s + b, len - b, e) ||
             bpe_ids_push(&f->out, ids[2]) || encode_part(f, s, a, e);
    }
    rc = rc || encode_part(f, s + a, b - a, e);
    if (rc)
        return e->msg[0] ? -1 : err_set(e, "out of memory");
    return 1;
}
