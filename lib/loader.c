#include "loader.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "pack.h"
#include "shard.h"

typedef struct lshard {
    shard_reader *r, *b;  /* records and their boundary records */
    uint64_t first;       /* number of the first record in the split */
} lshard;

struct loader {
    loader_params p;
    char *dir;
    uint32_t L;           /* records hold L+1 tokens */
    lshard *sh;
    uint64_t n_shards, n_records, per_rank;
    uint64_t *perm, perm_epoch;
    int perm_valid;
    loader_pos pos;
    loader_batch batch;
};

uint64_t loader_records(const loader *l) { return l->n_records; }
uint64_t loader_records_per_rank(const loader *l) { return l->per_rank; }
uint32_t loader_seq_len(const loader *l) { return l->L; }
loader_pos loader_tell(const loader *l) { return l->pos; }

void loader_close(loader *l)
{
    if (!l)
        return;
    for (uint64_t i = 0; i < l->n_shards; i++) {
        shard_close(l->sh[i].r);
        shard_close(l->sh[i].b);
    }
    free(l->sh);
    free(l->dir);
    free(l->perm);
    free(l->batch.tokens);
    free(l->batch.targets);
    free(l->batch.mask);
    free(l->batch.segment);
    free(l->batch.record);
    free(l);
}

static char *join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "%s/%s", dir, name);
    return s;
}

static int get_u64(json_t *o, const char *key, uint64_t *v, const char *where, dsv3_err *e)
{
    json_t *x = json_object_get(o, key);
    if (!json_is_integer(x) || json_integer_value(x) < 0)
        return err_set(e, "%s: \"%s\" missing or not a count", where, key);
    *v = (uint64_t)json_integer_value(x);
    return 0;
}

/* Opens one file of a manifest entry and checks it against the entry and the folder. */
static int open_checked(loader *l, json_t *ent, const char *fkey, const char *bkey,
                        const char *hkey, shard_reader **r, uint64_t n_expect,
                        const shard_info *want, dsv3_err *e)
{
    json_t *f = json_object_get(ent, fkey), *h = json_object_get(ent, hkey);
    uint64_t bytes;
    if (!json_is_string(f) || !json_is_string(h) || strchr(json_string_value(f), '/'))
        return err_set(e, "%s/manifest.json: entry without a plain \"%s\" or \"%s\"", l->dir,
                       fkey, hkey);
    char *path = join(l->dir, json_string_value(f));
    if (!path)
        return err_set(e, "out of memory");
    int rc = get_u64(ent, bkey, &bytes, path, e);
    struct stat st;
    if (rc == 0 && stat(path, &st) != 0)
        rc = err_errno(e, "%s: cannot open", path);
    else if (rc == 0 && (uint64_t)st.st_size != bytes)
        rc = err_set(e, "%s: %lld bytes, the manifest says %" PRIu64, path,
                     (long long)st.st_size, bytes);
    if (rc == 0 && l->p.verify) {
        uint64_t hash, size;
        char hx[17];
        if (pack_file_hash(path, &hash, &size, e))
            rc = -1;
        else if (snprintf(hx, sizeof hx, "%016" PRIx64, hash),
                 strcmp(hx, json_string_value(h)) != 0)
            rc = err_set(e, "%s: xxh3 %s, the manifest says %s", path, hx, json_string_value(h));
    }
    if (rc == 0 && shard_open(r, path, e) == 0) {
        const shard_info *in = shard_get_info(*r);
        if (!in->index_known)
            rc = err_set(e, "%s: not a regular file", path);
        else if (in->n_records != n_expect)
            rc = err_set(e, "%s: %" PRIu64 " records, the manifest says %" PRIu64, path,
                         in->n_records, n_expect);
        else if (in->kind != want->kind || in->seq_len != want->seq_len ||
                 (want->kind == SHARD_PACKED && (in->vocab_size != want->vocab_size ||
                                                 in->tokenizer_id != want->tokenizer_id)))
            rc = err_set(e, "%s: kind, seq_len, vocab_size or tokenizer differ from the manifest",
                         path);
    } else if (rc == 0) {
        rc = -1;
    }
    free(path);
    return rc;
}

int loader_open(loader **lp, const char *dir, const loader_params *p, dsv3_err *e)
{
    *lp = NULL;
    if (p->batch == 0 || p->world == 0 || p->rank >= p->world)
        return err_set(e, "loader: batch %u, rank %u of %u: out of range", p->batch, p->rank,
                       p->world);
    loader *l = calloc(1, sizeof *l);
    if (!l || !(l->dir = strdup(dir))) {
        free(l);
        return err_set(e, "out of memory");
    }
    l->p = *p;
    const char *split = p->split ? p->split : "train";
    l->p.split = NULL;   /* the caller's string is not kept */
    char *mpath = join(dir, "manifest.json");
    json_error_t je;
    json_t *m = mpath ? json_load_file(mpath, 0, &je) : NULL;
    int rc = 0;
    uint64_t seq_len = 0, rtok = 0, vocab = 0;
    if (!m) {
        rc = err_set(e, "%s: %s (line %d)", mpath ? mpath : dir, je.text, je.line);
        goto out;
    }
    json_t *fmt = json_object_get(m, "format"), *ver = json_object_get(m, "version");
    json_t *tid = json_object_get(m, "tokenizer_id"), *list = json_object_get(m, split);
    if (!json_is_string(fmt) || strcmp(json_string_value(fmt), "dsv3-pack") != 0 ||
        !json_is_integer(ver) || json_integer_value(ver) != 1) {
        rc = err_set(e, "%s: not a dsv3-pack manifest of version 1", mpath);
        goto out;
    }
    if (get_u64(m, "seq_len", &seq_len, mpath, e) || get_u64(m, "record_tokens", &rtok, mpath, e) ||
        get_u64(m, "vocab_size", &vocab, mpath, e)) {
        rc = -1;
        goto out;
    }
    if (seq_len == 0 || rtok != seq_len + 1 || seq_len >= (1u << 28) || vocab > UINT32_MAX ||
        !json_is_string(tid) || !json_is_array(list)) {
        rc = err_set(e, "%s: bad seq_len, record_tokens, vocab_size, tokenizer_id or \"%s\"",
                     mpath, split);
        goto out;
    }
    l->L = (uint32_t)seq_len;
    shard_info want = {0}, bwant = {0};
    want.kind = SHARD_PACKED;
    want.seq_len = (uint32_t)rtok;
    want.vocab_size = (uint32_t)vocab;
    want.tokenizer_id = strtoull(json_string_value(tid), NULL, 16);
    bwant.kind = SHARD_DOCS;
    size_t n = json_array_size(list);
    l->sh = calloc(n ? n : 1, sizeof *l->sh);
    if (!l->sh) {
        rc = err_set(e, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n && rc == 0; i++) {
        json_t *ent = json_array_get(list, i);
        uint64_t cnt;
        if (get_u64(ent, "sequences", &cnt, mpath, e)) {
            rc = -1;
            break;
        }
        l->sh[i].first = l->n_records;
        l->n_shards = i + 1;
        rc = open_checked(l, ent, "file", "bytes", "xxh3", &l->sh[i].r, cnt, &want, e);
        if (rc == 0)
            rc = open_checked(l, ent, "bounds", "bounds_bytes", "bounds_xxh3", &l->sh[i].b, cnt,
                              &bwant, e);
        l->n_records += cnt;
    }
    if (rc)
        goto out;
    l->per_rank = l->n_records / p->world;
    if (l->per_rank == 0) {
        rc = err_set(e, "%s: %" PRIu64 " %s records cannot be shared by %u ranks", dir,
                     l->n_records, split, p->world);
        goto out;
    }
    size_t bt = (size_t)p->batch * l->L;
    l->batch.rows = p->batch;
    l->batch.cols = l->L;
    l->batch.tokens = malloc(bt * sizeof *l->batch.tokens);
    l->batch.targets = malloc(bt * sizeof *l->batch.targets);
    l->batch.mask = malloc(bt);
    l->batch.segment = malloc(bt * sizeof *l->batch.segment);
    l->batch.record = malloc(p->batch * sizeof *l->batch.record);
    l->perm = malloc(l->n_records * sizeof *l->perm);
    if (!l->batch.tokens || !l->batch.targets || !l->batch.mask || !l->batch.segment ||
        !l->batch.record || !l->perm)
        rc = err_set(e, "out of memory");
out:
    json_decref(m);
    free(mpath);
    if (rc)
        loader_close(l);
    else
        *lp = l;
    return rc;
}

/* Epoch e's order: a permutation seeded by a mix of (seed, e), so epochs differ and any
 * epoch can be rebuilt alone on resume. */
static void ensure_perm(loader *l, uint64_t epoch)
{
    if (l->perm_valid && l->perm_epoch == epoch)
        return;
    uint64_t s = l->p.seed ^ 0x6c6f61646572ULL;          /* "loader" */
    uint64_t mix = pack_rand_below(&s, UINT64_MAX) ^ (epoch * 0x9e3779b97f4a7c15ULL);
    pack_permutation(l->perm, l->n_records, mix);
    l->perm_epoch = epoch;
    l->perm_valid = 1;
}

static int read_row(loader *l, uint64_t rec, uint32_t row, dsv3_err *e)
{
    uint64_t lo = 0, hi = l->n_shards;
    while (hi - lo > 1) {   /* the last shard whose first record is <= rec */
        uint64_t mid = lo + (hi - lo) / 2;
        if (l->sh[mid].first <= rec)
            lo = mid;
        else
            hi = mid;
    }
    lshard *s = &l->sh[lo];
    uint64_t k = rec - s->first;
    shard_record r, b;
    if (shard_seek(s->r, k, e) || shard_next(s->r, &r, e) != 1 || shard_seek(s->b, k, e))
        return -1;
    uint32_t L = l->L, *tok = l->batch.tokens + (size_t)row * L;
    uint32_t *tgt = l->batch.targets + (size_t)row * L, *seg = l->batch.segment + (size_t)row * L;
    uint8_t *mask = l->batch.mask + (size_t)row * L;
    memcpy(tok, r.tokens, L * sizeof *tok);
    memcpy(tgt, r.tokens + 1, L * sizeof *tgt);
    if (shard_next(s->b, &b, e) != 1)
        return -1;
    if (b.n_tokens < 1 || b.tokens[0] > L + 1)
        return err_set(e, "record %" PRIu64 ": bad boundary record", rec);
    uint32_t n_valid = b.tokens[0];
    uint64_t next = 1;
    int32_t cur = -1;
    for (uint32_t i = 0; i < L; i++) {
        while (next < b.n_tokens && (b.tokens[next] & ~PACK_BOUND_CONT) <= i) {
            cur++;
            next++;
        }
        seg[i] = cur < 0 ? 0 : (uint32_t)cur;
        mask[i] = i + 1 < n_valid;
    }
    l->batch.record[row] = rec;
    return 0;
}

int loader_next(loader *l, const loader_batch **out, dsv3_err *e)
{
    l->batch.pos = l->pos;
    for (uint32_t row = 0; row < l->p.batch; row++) {
        ensure_perm(l, l->pos.epoch);
        uint64_t rec = l->perm[l->pos.index * l->p.world + l->p.rank];
        if (read_row(l, rec, row, e))
            return -1;
        if (++l->pos.index == l->per_rank) {
            l->pos.index = 0;
            l->pos.epoch++;
        }
    }
    *out = &l->batch;
    return 0;
}

int loader_seek(loader *l, loader_pos pos, dsv3_err *e)
{
    if (pos.index >= l->per_rank)
        return err_set(e, "loader: position %" PRIu64 " past the %" PRIu64
                       " records of a rank's epoch", pos.index, l->per_rank);
    l->pos = pos;
    return 0;
}
