#include "bpe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "outfile.h"

static const char MAGIC[8] = {'D', 'S', 'V', '3', 'T', 'O', 'K', '\n'};
enum { HEADER_BYTES = 64 };

struct bpe {
    uint32_t vocab_size, n_merges, n_patterns, flags, bos, eos, pad;
    uint8_t *kind;
    uint64_t *off;           /* token id's bytes are bytes[off[id] .. off[id+1]) */
    uint8_t *bytes;
    uint32_t byte_id[256];
    bpe_merge *merges;
    /* (left, right) -> merge index: open addressing, EMPTY_KEY marks a free slot */
    uint64_t *pkey;
    uint32_t *pval;
    size_t pmask;
    /* bytes -> id for regular and for special tokens: slots hold id + 1, 0 is free */
    uint32_t *tslot, *sslot;
    size_t tmask, smask;
    uint32_t *special;       /* special ids, longest first, for matching in text */
    size_t n_special;
    uint8_t special_first[256];
    char **patterns;
    pretok *pt;
    uint8_t *image;          /* the file, as loaded or built */
    size_t image_len;
    uint64_t id;
};

#define EMPTY_KEY UINT64_MAX

/* The checksum covers the whole file but its own 8 bytes (offset 56), so a flipped bit in a
 * header field (a role id, a flag) is caught as surely as one in the payload. */
static uint64_t image_sum(const uint8_t *img, size_t n)
{
    return XXH3_64bits_withSeed(img + HEADER_BYTES, n - HEADER_BYTES, XXH3_64bits(img, 56));
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd64(const uint8_t *p)
{
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}
static void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static void wr64(uint8_t *p, uint64_t v)
{
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

static inline size_t mix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return (size_t)k;
}

static inline size_t pair_find(const bpe *b, uint32_t l, uint32_t r)
{
    uint64_t k = (uint64_t)l << 32 | r;
    for (size_t i = mix64(k) & b->pmask;; i = (i + 1) & b->pmask) {
        if (b->pkey[i] == k)
            return b->pval[i];
        if (b->pkey[i] == EMPTY_KEY)
            return SIZE_MAX;
    }
}

static uint32_t str_find(const bpe *b, const uint32_t *slots, size_t mask, const uint8_t *s,
                         size_t n)
{
    for (size_t i = XXH3_64bits(s, n) & mask;; i = (i + 1) & mask) {
        uint32_t v = slots[i];
        if (v == 0)
            return BPE_NONE;
        uint32_t id = v - 1;
        if (b->off[id + 1] - b->off[id] == n && memcmp(b->bytes + b->off[id], s, n) == 0)
            return id;
    }
}

/* Inserts id; returns the id already there with the same bytes, or BPE_NONE. */
static uint32_t str_insert(const bpe *b, uint32_t *slots, size_t mask, uint32_t id)
{
    const uint8_t *s = b->bytes + b->off[id];
    size_t n = b->off[id + 1] - b->off[id];
    size_t i = XXH3_64bits(s, n) & mask;
    for (;; i = (i + 1) & mask) {
        uint32_t v = slots[i];
        if (v == 0)
            break;
        uint32_t o = v - 1;
        if (b->off[o + 1] - b->off[o] == n && memcmp(b->bytes + b->off[o], s, n) == 0)
            return o;
    }
    slots[i] = id + 1;
    return BPE_NONE;
}

void bpe_free(bpe *b)
{
    if (!b)
        return;
    free(b->kind);
    free(b->off);
    free(b->bytes);
    free(b->merges);
    free(b->pkey);
    free(b->pval);
    free(b->tslot);
    free(b->sslot);
    free(b->special);
    if (b->patterns)
        for (uint32_t i = 0; i < b->n_patterns; i++)
            free(b->patterns[i]);
    free(b->patterns);
    pretok_free(b->pt);
    free(b->image);
    free(b);
}

static int cmp_special_len(const void *x, const void *y, void *ctx)
{
    const bpe *b = ctx;
    uint32_t i = *(const uint32_t *)x, j = *(const uint32_t *)y;
    uint64_t li = b->off[i + 1] - b->off[i], lj = b->off[j + 1] - b->off[j];
    if (li != lj)
        return li > lj ? -1 : 1;
    return i < j ? -1 : i > j;
}

#define BAD(...) (err_set(e, __VA_ARGS__), err_prefix(e, "%s", name), -1)

/* Parses and checks a whole file image (which b takes over). Every count and length is
 * checked against the bytes that remain before it is used, so a damaged or hostile file
 * gives a message and never a read out of bounds. */
static int parse_image(bpe *b, const char *name, dsv3_err *e)
{
    const uint8_t *p = b->image;
    size_t n = b->image_len;
    if (n < HEADER_BYTES || memcmp(p, MAGIC, 8) != 0)
        return BAD("not a dsv3 tokenizer file: bad magic (offset 0)");
    uint32_t version = rd32(p + 8), hsize = rd32(p + 12);
    if (rd32(p + 44) != 0)
        return BAD("reserved header field is not zero (offset 44)");
    if (version != BPE_VERSION)
        return BAD("tokenizer format version %u is not supported (this program reads %d) "
                   "(offset 8)", version, BPE_VERSION);
    if (hsize != HEADER_BYTES)
        return BAD("header size %u, expected %d (offset 12)", hsize, HEADER_BYTES);
    b->flags = rd32(p + 16);
    b->vocab_size = rd32(p + 20);
    b->n_merges = rd32(p + 24);
    b->n_patterns = rd32(p + 28);
    b->bos = rd32(p + 32);
    b->eos = rd32(p + 36);
    b->pad = rd32(p + 40);
    uint64_t plen = rd64(p + 48), sum = rd64(p + 56);
    if (plen != n - HEADER_BYTES)
        return BAD("payload is %zu bytes, the header says %llu (truncated or extended file) "
                   "(offset 48)", n - HEADER_BYTES, (unsigned long long)plen);
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION   /* lets a fuzzer reach the checks below */
    if (image_sum(p, n) != sum)
        return BAD("checksum mismatch: the file is damaged (offset 56)");
#endif
    if (b->flags & ~(uint32_t)BPE_FLAG_WHOLE_PIECE)
        return BAD("unknown flags 0x%x (offset 16)", b->flags);
    if (b->vocab_size < 256 || b->vocab_size > (1u << 30))
        return BAD("vocabulary size %u out of range (offset 20)", b->vocab_size);
    if (b->n_patterns < 1 || b->n_patterns > PRETOK_MAX_PATTERNS)
        return BAD("%u pre-tokenizer patterns (expected 1 to %d) (offset 28)", b->n_patterns,
                   PRETOK_MAX_PATTERNS);
    b->id = sum ? sum : 1;

    size_t at = HEADER_BYTES;
    /* merges */
    if ((n - at) / 16 < b->n_merges)
        return BAD("%u merges do not fit the file (offset %zu)", b->n_merges, at);
    if ((n - at - 16 * (size_t)b->n_merges) / 5 < b->vocab_size)   /* 5: a token's least */
        return BAD("%u tokens do not fit the file (offset 20)", b->vocab_size);
    b->merges = malloc((size_t)b->n_merges * sizeof *b->merges + 1);
    b->kind = calloc(b->vocab_size, 1);
    b->off = malloc(((size_t)b->vocab_size + 1) * sizeof *b->off);
    if (!b->merges || !b->kind || !b->off)
        return BAD("out of memory");
    for (uint32_t i = 0; i < b->n_merges; i++, at += 16) {
        bpe_merge *m = &b->merges[i];
        m->left = rd32(p + at);
        m->right = rd32(p + at + 4);
        m->result = rd32(p + at + 8);
        m->rank = rd32(p + at + 12);
        if (m->left >= b->vocab_size || m->right >= b->vocab_size ||
            m->result >= b->vocab_size)
            return BAD("merge %u names an id beyond the vocabulary (offset %zu)", i, at);
    }
    /* tokens: kind, length, bytes */
    size_t tok_at = at;
    uint64_t total = 0;
    for (uint32_t id = 0; id < b->vocab_size; id++) {
        if (n - at < 5)
            return BAD("token %u: file ends early (offset %zu)", id, at);
        uint8_t k = p[at];
        uint32_t len = rd32(p + at + 1);
        if (k > BPE_PLAIN)
            return BAD("token %u: unknown kind %u (offset %zu)", id, k, at);
        if (n - at - 5 < len)
            return BAD("token %u: %u bytes do not fit the file (offset %zu)", id, len, at);
        if ((k == BPE_UNUSED) != (len == 0) || (k == BPE_BYTE && len != 1) ||
            (k == BPE_MERGED && len < 2))
            return BAD("token %u: kind %u with %u bytes (offset %zu)", id, k, len, at);
        b->kind[id] = k;
        total += len;
        at += 5 + (size_t)len;
    }
    b->bytes = malloc(total + 1);
    if (!b->bytes)
        return BAD("out of memory");
    at = tok_at;
    total = 0;
    for (uint32_t id = 0; id < b->vocab_size; id++) {
        uint32_t len = rd32(p + at + 1);
        b->off[id] = total;
        memcpy(b->bytes + total, p + at + 5, len);
        total += len;
        at += 5 + (size_t)len;
    }
    b->off[b->vocab_size] = total;
    /* patterns */
    b->patterns = calloc(b->n_patterns, sizeof *b->patterns);
    if (!b->patterns)
        return BAD("out of memory");
    for (uint32_t i = 0; i < b->n_patterns; i++) {
        if (n - at < 4 || n - at - 4 < rd32(p + at))
            return BAD("pattern %u: file ends early (offset %zu)", i + 1, at);
        uint32_t len = rd32(p + at);
        if (memchr(p + at + 4, 0, len))
            return BAD("pattern %u holds a NUL byte (offset %zu)", i + 1, at);
        b->patterns[i] = malloc((size_t)len + 1);
        if (!b->patterns[i])
            return BAD("out of memory");
        memcpy(b->patterns[i], p + at + 4, len);
        b->patterns[i][len] = '\0';
        at += 4 + (size_t)len;
    }
    if (at != n)
        return BAD("%zu bytes after the last pattern (offset %zu)", n - at, at);

    /* byte tokens: all 256, once each */
    int seen[256] = {0};
    for (uint32_t id = 0; id < b->vocab_size; id++)
        if (b->kind[id] == BPE_BYTE) {
            uint8_t c = b->bytes[b->off[id]];
            if (seen[c]++)
                return BAD("byte 0x%02x has two tokens (%u and %u)", c, b->byte_id[c], id);
            b->byte_id[c] = id;
        }
    for (int c = 0; c < 256; c++)
        if (!seen[c])
            return BAD("byte 0x%02x has no token: a byte-level vocabulary needs all 256", c);
    /* string maps and specials */
    b->tmask = pow2_at_least(2 * (size_t)b->vocab_size) - 1;
    b->tslot = calloc(b->tmask + 1, sizeof *b->tslot);
    b->special = malloc(((size_t)b->vocab_size + 1) * sizeof *b->special);
    if (!b->tslot || !b->special)
        return BAD("out of memory");
    for (uint32_t id = 0; id < b->vocab_size; id++) {
        if (b->kind[id] == BPE_UNUSED)
            continue;
        if (b->kind[id] == BPE_SPECIAL) {
            b->special[b->n_special++] = id;
            continue;
        }
        uint32_t dup = str_insert(b, b->tslot, b->tmask, id);
        if (dup != BPE_NONE)
            return BAD("tokens %u and %u have the same bytes", dup, id);
    }
    b->smask = pow2_at_least(2 * b->n_special + 2) - 1;
    b->sslot = calloc(b->smask + 1, sizeof *b->sslot);
    if (!b->sslot)
        return BAD("out of memory");
    for (size_t i = 0; i < b->n_special; i++) {
        uint32_t id = b->special[i];
        uint32_t dup = str_insert(b, b->sslot, b->smask, id);
        if (dup != BPE_NONE)
            return BAD("special tokens %u and %u have the same bytes", dup, id);
        b->special_first[b->bytes[b->off[id]]] = 1;
    }
    qsort_r(b->special, b->n_special, sizeof *b->special, cmp_special_len, b);
    uint32_t roles[3] = {b->bos, b->eos, b->pad};
    for (int i = 0; i < 3; i++)
        if (roles[i] != BPE_NONE &&
            (roles[i] >= b->vocab_size || b->kind[roles[i]] == BPE_UNUSED))
            return BAD("%s id %u is not a token (offset %d)",
                       i == 0 ? "BOS" : i == 1 ? "EOS" : "PAD", roles[i], 32 + 4 * i);
    /* merges: each must join its two tokens' bytes into its result, each pair once */
    b->pmask = pow2_at_least(2 * (size_t)b->n_merges + 2) - 1;
    b->pkey = malloc((b->pmask + 1) * sizeof *b->pkey);
    b->pval = malloc((b->pmask + 1) * sizeof *b->pval);
    if (!b->pkey || !b->pval)
        return BAD("out of memory");
    memset(b->pkey, 0xff, (b->pmask + 1) * sizeof *b->pkey);
    for (uint32_t i = 0; i < b->n_merges; i++) {
        const bpe_merge *m = &b->merges[i];
        size_t ll = b->off[m->left + 1] - b->off[m->left];
        size_t lr = b->off[m->right + 1] - b->off[m->right];
        int reg_l = b->kind[m->left] != BPE_UNUSED && b->kind[m->left] != BPE_SPECIAL;
        int reg_r = b->kind[m->right] != BPE_UNUSED && b->kind[m->right] != BPE_SPECIAL;
        if (!reg_l || !reg_r || b->kind[m->result] != BPE_MERGED ||
            b->off[m->result + 1] - b->off[m->result] != ll + lr ||
            memcmp(b->bytes + b->off[m->result], b->bytes + b->off[m->left], ll) != 0 ||
            memcmp(b->bytes + b->off[m->result] + ll, b->bytes + b->off[m->right], lr) != 0)
            return BAD("merge %u (%u + %u -> %u) does not join its tokens' bytes (offset %zu)",
                       i, m->left, m->right, m->result, (size_t)HEADER_BYTES + 16 * (size_t)i);
        uint64_t k = (uint64_t)m->left << 32 | m->right;
        size_t s = mix64(k) & b->pmask;
        while (b->pkey[s] != EMPTY_KEY && b->pkey[s] != k)
            s = (s + 1) & b->pmask;
        if (b->pkey[s] == k)
            return BAD("merge %u repeats the pair %u + %u", i, m->left, m->right);
        b->pkey[s] = k;
        b->pval[s] = i;
    }
    if (pretok_create(&b->pt, (const char *const *)b->patterns, b->n_patterns, e))
        return err_prefix(e, "%s", name);
    return 0;
}

static int load_owned(bpe **out, uint8_t *image, size_t n, const char *name, dsv3_err *e)
{
    *out = NULL;
    bpe *b = calloc(1, sizeof *b);
    if (!b) {
        free(image);
        return err_set(e, "%s: out of memory", name);
    }
    b->image = image;
    b->image_len = n;
    if (parse_image(b, name, e)) {
        bpe_free(b);
        return -1;
    }
    *out = b;
    return 0;
}

int bpe_load_mem(bpe **b, const void *data, size_t n, const char *name, dsv3_err *e)
{
    uint8_t *img = malloc(n + 1);
    if (!img)
        return err_set(e, "%s: out of memory", name);
    memcpy(img, data, n);
    return load_owned(b, img, n, name, e);
}

int bpe_load(bpe **b, const char *path, dsv3_err *e)
{
    *b = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return err_errno(e, "%s: cannot open", path);
    uint8_t *img = NULL;
    size_t n = 0, cap = 0;
    for (;;) {   /* one read for a regular file; a pipe grows the buffer */
        if (n == cap) {
            long sz = -1;
            if (cap == 0 && fseek(f, 0, SEEK_END) == 0) {
                sz = ftell(f);
                rewind(f);
            }
            cap = sz > 0 ? (size_t)sz + 1 : cap ? 2 * cap : 1 << 20;
            uint8_t *q = realloc(img, cap);
            if (!q) {
                free(img);
                fclose(f);
                return err_set(e, "%s: out of memory", path);
            }
            img = q;
        }
        size_t got = fread(img + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(img);
        return err_errno(e, "%s: read failed", path);
    }
    return load_owned(b, img, n, path, e);
}

int bpe_build(bpe **b, const bpe_spec *s, dsv3_err *e)
{
    *b = NULL;
    size_t n = HEADER_BYTES + (size_t)s->n_merges * 16;
    for (uint32_t i = 0; i < s->vocab_size; i++)
        n += 5 + (size_t)s->len[i];
    for (size_t i = 0; i < s->n_patterns; i++)
        n += 4 + strlen(s->patterns[i]);
    uint8_t *img = calloc(1, n + 1);
    if (!img)
        return err_set(e, "tokenizer: out of memory");
    memcpy(img, MAGIC, 8);
    wr32(img + 8, BPE_VERSION);
    wr32(img + 12, HEADER_BYTES);
    wr32(img + 16, s->flags);
    wr32(img + 20, s->vocab_size);
    wr32(img + 24, s->n_merges);
    wr32(img + 28, (uint32_t)s->n_patterns);
    wr32(img + 32, s->bos);
    wr32(img + 36, s->eos);
    wr32(img + 40, s->pad);
    wr64(img + 48, n - HEADER_BYTES);
    size_t at = HEADER_BYTES;
    for (uint32_t i = 0; i < s->n_merges; i++, at += 16) {
        wr32(img + at, s->merges[i].left);
        wr32(img + at + 4, s->merges[i].right);
        wr32(img + at + 8, s->merges[i].result);
        wr32(img + at + 12, s->merges[i].rank);
    }
    for (uint32_t i = 0; i < s->vocab_size; i++) {
        img[at] = s->kind[i];
        wr32(img + at + 1, s->len[i]);
        if (s->len[i])
            memcpy(img + at + 5, s->tok[i], s->len[i]);
        at += 5 + (size_t)s->len[i];
    }
    for (size_t i = 0; i < s->n_patterns; i++) {
        size_t l = strlen(s->patterns[i]);
        wr32(img + at, (uint32_t)l);
        memcpy(img + at + 4, s->patterns[i], l);
        at += 4 + l;
    }
    wr64(img + 56, image_sum(img, n));
    return load_owned(b, img, n, "tokenizer", e);
}

int bpe_save(const bpe *b, const char *path, dsv3_err *e)
{
    outfile o;
    if (outfile_open(&o, path, e))
        return -1;
    if (fwrite(b->image, 1, b->image_len, o.f) != b->image_len) {
        err_errno(e, "%s: write failed", outfile_name(&o));
        outfile_abort(&o);
        return -1;
    }
    return outfile_commit(&o, e);
}

uint32_t bpe_vocab_size(const bpe *b) { return b->vocab_size; }
uint32_t bpe_n_merges(const bpe *b) { return b->n_merges; }
const bpe_merge *bpe_merges(const bpe *b) { return b->merges; }
uint32_t bpe_flags(const bpe *b) { return b->flags; }
uint32_t bpe_bos(const bpe *b) { return b->bos; }
uint32_t bpe_eos(const bpe *b) { return b->eos; }
uint32_t bpe_pad(const bpe *b) { return b->pad; }
const pretok *bpe_pretok(const bpe *b) { return b->pt; }
uint64_t bpe_id(const bpe *b) { return b->id; }
uint32_t bpe_byte_token(const bpe *b, uint8_t c) { return b->byte_id[c]; }

bpe_kind bpe_token_kind(const bpe *b, uint32_t id)
{
    return id < b->vocab_size ? (bpe_kind)b->kind[id] : BPE_UNUSED;
}

const uint8_t *bpe_token(const bpe *b, uint32_t id, size_t *len)
{
    if (id >= b->vocab_size) {
        *len = 0;
        return NULL;
    }
    *len = b->off[id + 1] - b->off[id];
    return b->bytes + b->off[id];
}

uint32_t bpe_lookup(const bpe *b, const uint8_t *s, size_t n)
{
    return str_find(b, b->tslot, b->tmask, s, n);
}

uint32_t bpe_lookup_special(const bpe *b, const uint8_t *s, size_t n)
{
    return str_find(b, b->sslot, b->smask, s, n);
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 take
 * the code points from U+0100 up in byte order. */
static int byte_is_printable(int c)
{
    return (c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255);
}

uint32_t bpe_byte_to_char(uint8_t byte)
{
    if (byte_is_printable(byte))
        return byte;
    uint32_t k = 0;
    for (int c = 0; c < byte; c++)
        k += !byte_is_printable(c);
    return 256 + k;
}

int bpe_char_to_byte(uint32_t cp)
{
    if (cp < 256)
        return byte_is_printable((int)cp) ? (int)cp : -1;
    uint32_t k = 0;
    for (int c = 0; c < 256; c++)
        if (!byte_is_printable(c) && 256 + k++ == cp)
            return c;
    return -1;
}

/* ---- encoding ---- */

int bpe_ids_push(bpe_ids *ids, uint32_t id)
{
    if (ids->n == ids->cap) {
        size_t nc = ids->cap ? 2 * ids->cap : 256;
        uint32_t *q = realloc(ids->v, nc * sizeof *q);
        if (!q)
            return -1;
        ids->v = q;
        ids->cap = nc;
    }
    ids->v[ids->n++] = id;
    return 0;
}

void bpe_ids_free(bpe_ids *ids)
{
    free(ids->v);
    memset(ids, 0, sizeof *ids);
}

/* A direct-mapped cache of short pieces: text repeats its words, and a hit skips the merge
 * loop. Fixed size, so memory per thread is bounded whatever the input. */
enum { CACHE_SLOTS = 1 << 15, CACHE_KEY = 30, CACHE_IDS = 8 };
typedef struct cache_slot {
    uint64_t h;
    uint8_t len, nid;
    uint8_t key[CACHE_KEY];
    uint32_t ids[CACHE_IDS];
} cache_slot;

typedef struct heap_ent {
    uint32_t rank, pos, l, r;   /* l, r: the pair's tokens when pushed, to spot stale ones */
} heap_ent;

struct bpe_encoder {
    const bpe *b;
    pretok_state *ps;
    cache_slot *cache;
    size_t cap;   /* of the scratch arrays below, in symbols */
    uint32_t *sym, *rank, *res, *prev, *next;
    heap_ent *heap;
};

int bpe_encoder_new(bpe_encoder **out, const bpe *b, dsv3_err *e)
{
    bpe_encoder *enc = calloc(1, sizeof *enc);
    *out = NULL;
    if (!enc)
        return err_set(e, "encoder: out of memory");
    enc->b = b;
    enc->cache = calloc(CACHE_SLOTS, sizeof *enc->cache);
    if (!enc->cache) {
        free(enc);
        return err_set(e, "encoder: out of memory");
    }
    if (pretok_state_new(&enc->ps, b->pt, e)) {
        free(enc->cache);
        free(enc);
        return -1;
    }
    *out = enc;
    return 0;
}

void bpe_encoder_free(bpe_encoder *enc)
{
    if (!enc)
        return;
    pretok_state_free(enc->ps);
    free(enc->cache);
    free(enc->sym);
    free(enc->rank);
    free(enc->res);
    free(enc->prev);
    free(enc->next);
    free(enc->heap);
    free(enc);
}

static int grow(bpe_encoder *enc, size_t n)
{
    if (n <= enc->cap)
        return 0;
    size_t c = pow2_at_least(n);
    uint32_t **arr[] = {&enc->sym, &enc->rank, &enc->res, &enc->prev, &enc->next};
    for (size_t i = 0; i < sizeof arr / sizeof arr[0]; i++) {
        uint32_t *q = realloc(*arr[i], c * sizeof *q);
        if (!q)
            return -1;
        *arr[i] = q;
    }
    heap_ent *h = realloc(enc->heap, 2 * c * sizeof *h);
    if (!h)
        return -1;
    enc->heap = h;
    enc->cap = c;
    return 0;
}

static inline void pair_rank(const bpe *b, uint32_t l, uint32_t r, uint32_t *rank,
                             uint32_t *res)
{
    size_t m = pair_find(b, l, r);
    if (m == SIZE_MAX) {
        *rank = UINT32_MAX;
        *res = 0;
        return;
    }
    *rank = b->merges[m].rank;
    *res = b->merges[m].result;
}

/* Short pieces: scan for the lowest rank; O(n^2) but n is a word's length. */
static size_t merge_linear(const bpe *b, uint32_t *sym, uint32_t *rank, uint32_t *res,
                           size_t n)
{
    for (size_t i = 0; i + 1 < n; i++)
        pair_rank(b, sym[i], sym[i + 1], &rank[i], &res[i]);
    while (n > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < n; i++)
            if (rank[i] < rank[best])
                best = i;
        if (rank[best] == UINT32_MAX)
            break;
        sym[best] = res[best];
        memmove(sym + best + 1, sym + best + 2, (n - best - 2) * sizeof *sym);
        memmove(rank + best + 1, rank + best + 2, (n - best - 2) * sizeof *rank);
        memmove(res + best + 1, res + best + 2, (n - best - 2) * sizeof *res);
        n--;
        if (best > 0)
            pair_rank(b, sym[best - 1], sym[best], &rank[best - 1], &res[best - 1]);
        if (best + 1 < n)
            pair_rank(b, sym[best], sym[best + 1], &rank[best], &res[best]);
        else
            rank[best] = UINT32_MAX;
    }
    return n;
}

static inline int heap_less(const heap_ent *a, const heap_ent *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(heap_ent *h, size_t *n, heap_ent x)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&x, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

static heap_ent heap_pop(heap_ent *h, size_t *n)
{
    heap_ent top = h[0], x = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n)
            break;
        if (c + 1 < *n && heap_less(&h[c + 1], &h[c]))
            c++;
        if (!heap_less(&h[c], &x))
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
    return top;
}

/* Long pieces (a 100 MB run of one letter is one piece): a linked list of symbols and a
 * heap of candidate pairs ordered by (rank, position), so the leftmost lowest pair merges
 * first as in the linear scan, in O(n log n). Entries made stale by a neighbour's merge are
 * recognised by the tokens they recorded and dropped. */
static size_t merge_heap(bpe_encoder *enc, size_t n)
{
    const bpe *b = enc->b;
    uint32_t *sym = enc->sym, *prev = enc->prev, *next = enc->next;
    heap_ent *h = enc->heap;
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        prev[i] = i ? (uint32_t)i - 1 : UINT32_MAX;
        next[i] = i + 1 < n ? (uint32_t)i + 1 : UINT32_MAX;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        uint32_t rk, rs;
        pair_rank(b, sym[i], sym[i + 1], &rk, &rs);
        if (rk != UINT32_MAX)
            heap_push(h, &hn, (heap_ent){rk, (uint32_t)i, sym[i], sym[i + 1]});
    }
    while (hn > 0) {
        heap_ent t = heap_pop(h, &hn);
        uint32_t p = t.pos, q = next[p];
        if (sym[p] == UINT32_MAX || q == UINT32_MAX || sym[p] != t.l || sym[q] != t.r)
            continue;
        uint32_t rk, rs;
        pair_rank(b, t.l, t.r, &rk, &rs);
        sym[p] = rs;
        sym[q] = UINT32_MAX;   /* dead */
        next[p] = next[q];
        if (next[q] != UINT32_MAX)
            prev[next[q]] = p;
        if (prev[p] != UINT32_MAX) {
            uint32_t a = prev[p];
            pair_rank(b, sym[a], sym[p], &rk, &rs);
            if (rk != UINT32_MAX)
                heap_push(h, &hn, (heap_ent){rk, a, sym[a], sym[p]});
        }
        if (next[p] != UINT32_MAX) {
            uint32_t c = next[p];
            pair_rank(b, sym[p], sym[c], &rk, &rs);
            if (rk != UINT32_MAX)
                heap_push(h, &hn, (heap_ent){rk, p, sym[p], sym[c]});
        }
    }
    size_t m = 0;
    for (uint32_t i = 0; i != UINT32_MAX; i = next[i])
        sym[m++] = sym[i];
    return m;
}

int bpe_encode_piece(bpe_encoder *enc, const uint8_t *s, size_t n, bpe_ids *out, dsv3_err *e)
{
    const bpe *b = enc->b;
    if (n == 0)
        return 0;
    if (n == 1)
        return bpe_ids_push(out, b->byte_id[s[0]]) ? err_set(e, "encode: out of memory") : 0;
    cache_slot *slot = NULL;
    uint64_t h = 0;
    if (n <= CACHE_KEY) {
        h = XXH3_64bits(s, n);
        slot = &enc->cache[h & (CACHE_SLOTS - 1)];
        if (slot->h == h && slot->len == n && memcmp(slot->key, s, n) == 0) {
            for (size_t i = 0; i < slot->nid; i++)
                if (bpe_ids_push(out, slot->ids[i]))
                    return err_set(e, "encode: out of memory");
            return 0;
        }
    }
    size_t m;
    if (b->flags & BPE_FLAG_WHOLE_PIECE) {
        uint32_t id = bpe_lookup(b, s, n);
        if (id != BPE_NONE) {
            if (grow(enc, 1))
                return err_set(e, "encode: out of memory");
            enc->sym[0] = id;
            m = 1;
            goto done;
        }
    }
    if (grow(enc, n))
        return err_set(e, "encode: out of memory for a piece of %zu bytes", n);
    for (size_t i = 0; i < n; i++)
        enc->sym[i] = b->byte_id[s[i]];
    m = n <= 128 ? merge_linear(b, enc->sym, enc->rank, enc->res, n) : merge_heap(enc, n);
done:
    if (slot && m <= CACHE_IDS) {
        slot->h = h;
        slot->len = (uint8_t)n;
        slot->nid = (uint8_t)m;
        memcpy(slot->key, s, n);
        memcpy(slot->ids, enc->sym, m * sizeof *enc->sym);
    }
    if (out->cap - out->n < m) {
        size_t nc = out->cap ? out->cap : 256;
        while (nc - out->n < m)
            nc *= 2;
        uint32_t *q = realloc(out->v, nc * sizeof *q);
        if (!q)
            return err_set(e, "encode: out of memory");
        out->v = q;
        out->cap = nc;
    }
    memcpy(out->v + out->n, enc->sym, m * sizeof *enc->sym);
    out->n += m;
    return 0;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The length of the part before a piece's trailing line breaks when the piece is
 * punctuation joined with line breaks (DeepSeek-V3's combined tokens), else 0. */
static size_t combined_cut(const uint8_t *s, size_t n)
{
    size_t t = n;
    while (t > 0 && (s[t - 1] == '\n' || s[t - 1] == '\r'))
        t--;
    if (t == 0 || t == n)
        return 0;
    for (size_t i = 0; i < t; i++)
        if (s[i] != ' ' && s[i] != '\t')
            return t;
    return 0;
}

static int encode_plain(bpe_encoder *enc, const uint8_t *text, size_t n,
                        const bpe_encode_opts *o, uint64_t *rng, bpe_ids *out, dsv3_err *e)
{
    if (n == 0)
        return 0;
    const size_t *ends;
    long np = pretok_split(enc->ps, text, n, &ends, e);
    if (np < 0)
        return -1;
    size_t start = 0;
    for (long i = 0; i < np; i++) {
        const uint8_t *s = text + start;
        size_t len = ends[i] - start;
        size_t cut = o && o->split_combined > 0 ? combined_cut(s, len) : 0;
        if (cut && (double)(splitmix(rng) >> 11) * 0x1.0p-53 < o->split_combined) {
            if (bpe_encode_piece(enc, s, cut, out, e) ||
                bpe_encode_piece(enc, s + cut, len - cut, out, e))
                return -1;
        } else if (bpe_encode_piece(enc, s, len, out, e)) {
            return -1;
        }
        start = ends[i];
    }
    return 0;
}

int bpe_encode(bpe_encoder *enc, const uint8_t *text, size_t n, const bpe_encode_opts *o,
               bpe_ids *out, dsv3_err *e)
{
    const bpe *b = enc->b;
    uint64_t rng = o ? o->seed : 0;
    if (!o || !o->allow_special || b->n_special == 0)
        return encode_plain(enc, text, n, o, &rng, out, e);
    /* Leftmost, then longest special token, as HF tokenizers' added-token matching. */
    size_t seg = 0;
    for (size_t i = 0; i < n; i++) {
        if (!b->special_first[text[i]])
            continue;
        for (size_t k = 0; k < b->n_special; k++) {
            uint32_t id = b->special[k];
            size_t len = b->off[id + 1] - b->off[id];
            if (len <= n - i && memcmp(text + i, b->bytes + b->off[id], len) == 0) {
                if (encode_plain(enc, text + seg, i - seg, o, &rng, out, e))
                    return -1;
                if (bpe_ids_push(out, id))
                    return err_set(e, "encode: out of memory");
                i += len - 1;
                seg = i + 1;
                break;
            }
        }
    }
    return encode_plain(enc, text + seg, n - seg, o, &rng, out, e);
}

/* ---- decoding ---- */

int bpe_bytes_append(bpe_bytes *o, const void *s, size_t n)
{
    if (o->cap - o->n < n) {
        size_t nc = o->cap ? o->cap : 4096;
        while (nc - o->n < n)
            nc *= 2;
        uint8_t *q = realloc(o->v, nc);
        if (!q)
            return -1;
        o->v = q;
        o->cap = nc;
    }
    memcpy(o->v + o->n, s, n);
    o->n += n;
    return 0;
}

void bpe_bytes_free(bpe_bytes *o)
{
    free(o->v);
    memset(o, 0, sizeof *o);
}

int bpe_decode(const bpe *b, const uint32_t *ids, size_t n, int skip_special, bpe_bytes *out,
               dsv3_err *e)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t id = ids[i];
        if (id >= b->vocab_size || b->kind[id] == BPE_UNUSED)
            return err_set(e, "token %zu: id %u is not in the vocabulary (size %u)", i, id,
                           b->vocab_size);
        if (skip_special && b->kind[id] == BPE_SPECIAL)
            continue;
        if (bpe_bytes_append(out, b->bytes + b->off[id], b->off[id + 1] - b->off[id]))
            return err_set(e, "decode: out of memory");
    }
    return 0;
}

uint64_t bpe_doc_seed(uint64_t seed, uint64_t doc)
{
    uint64_t s = seed ^ doc * 0x9e3779b97f4a7c15ULL;
    return splitmix(&s);
}
