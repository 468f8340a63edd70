#include "bpeio.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outfile.h"

/* ---- a growable token table, the common ground of both importers ---- */

typedef struct table {
    uint32_t n;          /* vocab size */
    uint8_t *kind;
    uint8_t **tok;
    uint32_t *len;
    bpe_merge *merges;
    uint32_t n_merges, cap_merges;
} table;

static int table_init(table *t, uint32_t n)
{
    memset(t, 0, sizeof *t);
    t->n = n;
    t->kind = calloc(n ? n : 1, 1);
    t->tok = calloc(n ? n : 1, sizeof *t->tok);
    t->len = calloc(n ? n : 1, sizeof *t->len);
    return t->kind && t->tok && t->len ? 0 : -1;
}

static void table_free(table *t)
{
    if (t->tok)
        for (uint32_t i = 0; i < t->n; i++)
            free(t->tok[i]);
    free(t->kind);
    free(t->tok);
    free(t->len);
    free(t->merges);
    memset(t, 0, sizeof *t);
}

static int table_merge(table *t, uint32_t l, uint32_t r, uint32_t res, uint32_t rank)
{
    if (t->n_merges == t->cap_merges) {
        uint32_t nc = t->cap_merges ? 2 * t->cap_merges : 1024;
        bpe_merge *q = realloc(t->merges, nc * sizeof *q);
        if (!q)
            return -1;
        t->merges = q;
        t->cap_merges = nc;
    }
    t->merges[t->n_merges++] = (bpe_merge){l, r, res, rank};
    return 0;
}

static uint32_t find_role(const table *t, const char *given, const char *const *known)
{
    for (uint32_t id = 0; id < t->n; id++) {
        if (t->kind[id] != BPE_SPECIAL)
            continue;
        if (given) {
            if (strlen(given) == t->len[id] && memcmp(given, t->tok[id], t->len[id]) == 0)
                return id;
            continue;
        }
        for (size_t k = 0; known[k]; k++)
            if (strlen(known[k]) == t->len[id] && memcmp(known[k], t->tok[id], t->len[id]) == 0)
                return id;
    }
    return BPE_NONE;
}

static const char *const KNOWN_BOS[] = {"<\xef\xbd\x9c" "begin\xe2\x96\x81of\xe2\x96\x81sentence"
                                        "\xef\xbd\x9c>", "<s>", "<|begin_of_text|>",
                                        "<|startoftext|>", NULL};
static const char *const KNOWN_EOS[] = {"<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence"
                                        "\xef\xbd\x9c>", "</s>", "<|endoftext|>",
                                        "<|end_of_text|>", NULL};
static const char *const KNOWN_PAD[] = {"<\xef\xbd\x9c\xe2\x96\x81pad\xe2\x96\x81\xef\xbd\x9c>",
                                        "<pad>", "<|pad|>", NULL};

static int table_build(bpe **b, table *t, const char *const *pats, size_t npat, uint32_t flags,
                       const char *bos, const char *eos, const char *pad, const char *name,
                       dsv3_err *e)
{
    bpe_spec s = {
        .vocab_size = t->n, .kind = t->kind, .tok = (const uint8_t *const *)t->tok,
        .len = t->len, .merges = t->merges, .n_merges = t->n_merges, .patterns = pats,
        .n_patterns = npat, .flags = flags,
        .bos = find_role(t, bos, KNOWN_BOS), .eos = find_role(t, eos, KNOWN_EOS),
        .pad = find_role(t, pad, KNOWN_PAD),
    };
    const char *given[3] = {bos, eos, pad};
    uint32_t got[3] = {s.bos, s.eos, s.pad};
    for (int i = 0; i < 3; i++)
        if (given[i] && got[i] == BPE_NONE)
            return err_set(e, "%s: no special token '%s' for %s", name, given[i],
                           i == 0 ? "BOS" : i == 1 ? "EOS" : "PAD");
    if (bpe_build(b, &s, e))
        return err_prefix(e, "%s", name);
    return 0;
}

/* ---- UTF-8 and the byte-level alphabet ---- */

static size_t put_utf8(uint8_t *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (uint8_t)(0xc0 | cp >> 6);
        o[1] = (uint8_t)(0x80 | (cp & 0x3f));
        return 2;
    }
    o[0] = (uint8_t)(0xe0 | cp >> 12);
    o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3f));
    o[2] = (uint8_t)(0x80 | (cp & 0x3f));
    return 3;
}

/* A vocabulary key in the byte-level alphabet to bytes; -1 if a character is outside it. */
static long bytelevel_decode(const char *s, size_t n, uint8_t *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        uint8_t c = (uint8_t)s[i];
        uint32_t cp;
        if (c < 0x80) {
            cp = c;
            i += 1;
        } else if ((c & 0xe0) == 0xc0 && i + 1 < n) {
            cp = (uint32_t)(c & 0x1f) << 6 | ((uint8_t)s[i + 1] & 0x3f);
            i += 2;
        } else {
            return -1;   /* the alphabet stops at U+0143: two bytes are enough */
        }
        int byte = bpe_char_to_byte(cp);
        if (byte < 0)
            return -1;
        out[o++] = (uint8_t)byte;
    }
    return (long)o;
}

static char *bytelevel_encode(const uint8_t *s, size_t n)
{
    char *o = malloc(2 * n + 1);
    size_t k = 0;
    if (!o)
        return NULL;
    for (size_t i = 0; i < n; i++)
        k += put_utf8((uint8_t *)o + k, bpe_byte_to_char(s[i]));
    o[k] = '\0';
    return o;
}

/* ---- HF tokenizer.json ---- */

/* HF's ByteLevel(use_regex=true) splits with GPT-2's pattern (tokenizers' byte_level.rs). */
static const char HF_BYTELEVEL_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int is_null_or(json_t *v, int (*ok)(json_t *))
{
    return !v || json_is_null(v) || ok(v);
}
static int empty_string(json_t *v) { return json_is_string(v) && json_string_length(v) == 0; }
static int is_false(json_t *v) { return json_is_false(v); }

/* Appends the Split patterns of one pre-tokenizer (recursing into Sequence). */
static int hf_pretok(json_t *pt, char ***pats, size_t *np, int *saw_bytelevel, const char *name,
                     dsv3_err *e)
{
    if (!pt || json_is_null(pt))
        return 0;
    const char *type = json_string_value(json_object_get(pt, "type"));
    if (!type)
        return err_set(e, "%s: pre_tokenizer without a type", name);
    if (strcmp(type, "Sequence") == 0) {
        json_t *arr = json_object_get(pt, "pretokenizers"), *x;
        size_t i;
        if (!json_is_array(arr))
            return err_set(e, "%s: Sequence pre_tokenizer without pretokenizers", name);
        json_array_foreach(arr, i, x) if (hf_pretok(x, pats, np, saw_bytelevel, name, e)) return -1;
        return 0;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        *saw_bytelevel = 1;
        if (json_is_true(json_object_get(pt, "add_prefix_space")))
            return err_set(e, "%s: ByteLevel add_prefix_space=true is not supported", name);
        json_t *ur = json_object_get(pt, "use_regex");
        if (ur && !json_is_true(ur))
            return 0;
        if (*np == PRETOK_MAX_PATTERNS)
            return err_set(e, "%s: too many pre-tokenizer patterns", name);
        (*pats)[(*np)++] = strdup(HF_BYTELEVEL_RE);
        return 0;
    }
    if (strcmp(type, "Split") != 0)
        return err_set(e, "%s: pre_tokenizer '%s' is not supported (Split, ByteLevel and "
                       "Sequence are)", name, type);
    const char *beh = json_string_value(json_object_get(pt, "behavior"));
    if (!beh || strcmp(beh, "Isolated") != 0)
        return err_set(e, "%s: Split behavior '%s' is not supported (Isolated is)", name,
                       beh ? beh : "?");
    if (json_is_true(json_object_get(pt, "invert")))
        return err_set(e, "%s: Split with invert=true is not supported", name);
    json_t *pat = json_object_get(pt, "pattern");
    const char *re = json_string_value(json_object_get(pat, "Regex"));
    const char *lit = json_string_value(json_object_get(pat, "String"));
    if (*np == PRETOK_MAX_PATTERNS)
        return err_set(e, "%s: too many pre-tokenizer patterns", name);
    if (re) {
        (*pats)[(*np)++] = strdup(re);
    } else if (lit) {   /* a literal string: quote it for the regex engine */
        size_t n = strlen(lit);
        char *q = malloc(n + 5);
        if (q)
            sprintf(q, "\\Q%s\\E", lit);
        (*pats)[(*np)++] = q;
    } else {
        return err_set(e, "%s: Split pattern is neither Regex nor String", name);
    }
    return (*pats)[*np - 1] ? 0 : err_set(e, "%s: out of memory", name);
}

static int import_hf_root(bpe **b, json_t *root, const char *path, const char *bos,
                          const char *eos, const char *pad, dsv3_err *e);

int bpeio_import_hf(bpe **b, const char *path, const char *bos, const char *eos,
                    const char *pad, dsv3_err *e)
{
    *b = NULL;
    json_error_t je;
    json_t *root = json_load_file(path, JSON_ALLOW_NUL, &je);
    if (!root)
        return err_set(e, "%s: bad JSON: %s (line %d, column %d)", path, je.text, je.line,
                       je.column);
    int rc = import_hf_root(b, root, path, bos, eos, pad, e);
    json_decref(root);
    return rc;
}

int bpeio_import_hf_mem(bpe **b, const void *data, size_t n, const char *name, dsv3_err *e)
{
    *b = NULL;
    json_error_t je;
    json_t *root = json_loadb(data, n, JSON_ALLOW_NUL, &je);
    if (!root)
        return err_set(e, "%s: bad JSON: %s (line %d, column %d)", name, je.text, je.line,
                       je.column);
    int rc = import_hf_root(b, root, name, NULL, NULL, NULL, e);
    json_decref(root);
    return rc;
}

static int import_hf_root(bpe **b, json_t *root, const char *path, const char *bos,
                          const char *eos, const char *pad, dsv3_err *e)
{
    table t = {0};
    char **pats = calloc(PRETOK_MAX_PATTERNS, sizeof *pats);
    size_t np = 0;
    uint8_t *buf = NULL;
    int rc = -1, saw_bl = 0;
    json_t *model = json_object_get(root, "model");
    json_t *vocab = json_object_get(model, "vocab");
    json_t *merges = json_object_get(model, "merges");
    json_t *added = json_object_get(root, "added_tokens");
    const char *type = json_string_value(json_object_get(model, "type"));
    if (!pats) {
        err_set(e, "%s: out of memory", path);
        goto out;
    }
    if (!json_is_object(vocab) || !json_is_array(merges) || (type && strcmp(type, "BPE"))) {
        err_set(e, "%s: not a BPE tokenizer.json (model.type '%s', vocab and merges expected)",
                path, type ? type : "?");
        goto out;
    }
    if (!is_null_or(json_object_get(model, "dropout"), NULL) ||
        !is_null_or(json_object_get(model, "continuing_subword_prefix"), empty_string) ||
        !is_null_or(json_object_get(model, "end_of_word_suffix"), empty_string) ||
        !is_null_or(json_object_get(model, "byte_fallback"), is_false)) {
        err_set(e, "%s: BPE dropout, subword prefixes/suffixes and byte_fallback are not "
                "supported", path);
        goto out;
    }
    json_t *norm = json_object_get(root, "normalizer");
    if (norm && !json_is_null(norm)) {
        const char *nt = json_string_value(json_object_get(norm, "type"));
        json_t *ns = json_object_get(norm, "normalizers");
        if (!nt || strcmp(nt, "Sequence") || json_array_size(ns) != 0) {
            err_set(e, "%s: normalizer '%s' is not supported (only none)", path, nt ? nt : "?");
            goto out;
        }
    }
    if (hf_pretok(json_object_get(root, "pre_tokenizer"), &pats, &np, &saw_bl, path, e))
        goto out;
    if (!saw_bl) {
        err_set(e, "%s: no ByteLevel pre-tokenizer: only byte-level BPE is supported", path);
        goto out;
    }
    if (np == 0) {   /* ByteLevel without its regex: the whole text is one piece */
        pats[np++] = strdup("(?s:.+)");
    }
    /* vocabulary size: the largest id in the vocab or the added tokens */
    uint64_t n = 0;
    const char *key;
    json_t *val;
    size_t i;
    json_object_foreach(vocab, key, val) {
        json_int_t id = json_integer_value(val);
        if (!json_is_integer(val) || id < 0 || id >= (1 << 30)) {
            err_set(e, "%s: vocab entry '%s' has a bad id", path, key);
            goto out;
        }
        if ((uint64_t)id + 1 > n)
            n = (uint64_t)id + 1;
    }
    json_array_foreach(added, i, val) {
        json_int_t id = json_integer_value(json_object_get(val, "id"));
        if (!json_is_string(json_object_get(val, "content")) || id < 0 || id >= (1 << 30)) {
            err_set(e, "%s: added_tokens[%zu]: needs a content string and an id", path, i);
            goto out;
        }
        if ((uint64_t)id + 1 > n)
            n = (uint64_t)id + 1;
    }
    /* ids may leave holes, but a few entries naming huge ids are a damaged file, not a
     * reason to allocate gigabytes */
    if (n > 2 * (json_object_size(vocab) + json_array_size(added)) + 65536) {
        err_set(e, "%s: ids up to %llu for %zu tokens: too sparse", path,
                (unsigned long long)n - 1, json_object_size(vocab) + json_array_size(added));
        goto out;
    }
    if (table_init(&t, (uint32_t)n) || !(buf = malloc(1 << 16))) {
        err_set(e, "%s: out of memory", path);
        goto out;
    }
    json_array_foreach(added, i, val) {
        uint32_t id = (uint32_t)json_integer_value(json_object_get(val, "id"));
        json_t *c = json_object_get(val, "content");
        size_t len = json_string_length(c);
        if (t.kind[id] || len == 0) {
            err_set(e, "%s: added_tokens[%zu]: id %u repeated or content empty", path, i, id);
            goto out;
        }
        t.kind[id] = BPE_SPECIAL;
        t.len[id] = (uint32_t)len;
        t.tok[id] = malloc(len);
        if (!t.tok[id]) {
            err_set(e, "%s: out of memory", path);
            goto out;
        }
        memcpy(t.tok[id], json_string_value(c), len);
    }
    json_object_foreach(vocab, key, val) {
        uint32_t id = (uint32_t)json_integer_value(val);
        size_t kl = strlen(key);
        if (t.kind[id] == BPE_SPECIAL)
            continue;   /* an added token also listed in the vocab */
        if (t.kind[id]) {
            err_set(e, "%s: vocab id %u appears twice", path, id);
            goto out;
        }
        if (kl == 0 || kl > (1 << 15)) {
            err_set(e, "%s: vocab entry %u: bad length", path, id);
            goto out;
        }
        long bl = bytelevel_decode(key, kl, buf);
        if (bl < 0) {
            err_set(e, "%s: vocab entry '%s' (id %u) is not in the byte-level alphabet", path,
                    key, id);
            goto out;
        }
        t.kind[id] = bl == 1 ? BPE_BYTE : BPE_PLAIN;
        t.len[id] = (uint32_t)bl;
        t.tok[id] = malloc((size_t)bl);
        if (!t.tok[id]) {
            err_set(e, "%s: out of memory", path);
            goto out;
        }
        memcpy(t.tok[id], buf, (size_t)bl);
    }
    json_array_foreach(merges, i, val) {
        const char *a, *bb;
        size_t la, lb;
        char tmp[1024];
        if (json_is_string(val)) {   /* "a b": the space separates (no token holds U+0020) */
            const char *s = json_string_value(val), *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ') || json_string_length(val) >= sizeof tmp) {
                err_set(e, "%s: merges[%zu] '%s' is not two tokens", path, i, s);
                goto out;
            }
            memcpy(tmp, s, json_string_length(val) + 1);
            tmp[sp - s] = '\0';
            a = tmp;
            la = (size_t)(sp - s);
            bb = tmp + la + 1;
            lb = strlen(bb);
        } else if (json_is_array(val) && json_array_size(val) == 2 &&
                   json_is_string(json_array_get(val, 0)) &&
                   json_is_string(json_array_get(val, 1))) {
            a = json_string_value(json_array_get(val, 0));
            la = json_string_length(json_array_get(val, 0));
            bb = json_string_value(json_array_get(val, 1));
            lb = json_string_length(json_array_get(val, 1));
        } else {
            err_set(e, "%s: merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", path, i);
            goto out;
        }
        json_t *ia = json_object_getn(vocab, a, la), *ib = json_object_getn(vocab, bb, lb);
        char *cat = malloc(la + lb + 1);
        if (!cat) {
            err_set(e, "%s: out of memory", path);
            goto out;
        }
        memcpy(cat, a, la);
        memcpy(cat + la, bb, lb);
        json_t *ic = json_object_getn(vocab, cat, la + lb);
        free(cat);
        if (!ia || !ib || !ic) {
            err_set(e, "%s: merges[%zu]: '%.*s' + '%.*s' names a token not in the vocab", path,
                    i, (int)la, a, (int)lb, bb);
            goto out;
        }
        uint32_t res = (uint32_t)json_integer_value(ic);
        if (t.kind[res] == BPE_PLAIN)
            t.kind[res] = BPE_MERGED;
        if (table_merge(&t, (uint32_t)json_integer_value(ia), (uint32_t)json_integer_value(ib),
                        res, (uint32_t)i)) {
            err_set(e, "%s: out of memory", path);
            goto out;
        }
    }
    uint32_t flags = json_is_true(json_object_get(model, "ignore_merges")) ? BPE_FLAG_WHOLE_PIECE
                                                                          : 0;
    rc = table_build(b, &t, (const char *const *)pats, np, flags, bos, eos, pad, path, e);
out:
    for (size_t k = 0; pats && k < np; k++)
        free(pats[k]);
    free(pats);
    free(buf);
    table_free(&t);
    return rc;
}

static int cmp_rank(const void *x, const void *y)
{
    const bpe_merge *a = *(const bpe_merge *const *)x, *b = *(const bpe_merge *const *)y;
    if (a->rank != b->rank)
        return a->rank < b->rank ? -1 : 1;
    return a < b ? -1 : a > b;
}

int bpeio_export_hf(const bpe *b, const char *path, dsv3_err *e)
{
    json_t *root = json_object(), *added = json_array(), *vocab = json_object(),
           *merges = json_array(), *seq = json_array();
    const bpe_merge **order = malloc(((size_t)bpe_n_merges(b) + 1) * sizeof *order);
    int rc = -1;
    if (!root || !added || !vocab || !merges || !seq || !order) {
        err_set(e, "%s: out of memory", path);
        goto out;
    }
    for (uint32_t id = 0; id < bpe_vocab_size(b); id++) {
        size_t len;
        const uint8_t *s = bpe_token(b, id, &len);
        bpe_kind k = bpe_token_kind(b, id);
        if (k == BPE_UNUSED)
            continue;
        if (k == BPE_SPECIAL) {
            json_t *c = json_stringn((const char *)s, len);
            if (!c) {
                err_set(e, "%s: special token %u is not valid UTF-8 (JSON cannot hold it)",
                        path, id);
                goto out;
            }
            json_array_append_new(added, json_pack("{s:i,s:o,s:b,s:b,s:b,s:b,s:b}", "id",
                                                   (json_int_t)id, "content", c, "single_word",
                                                   0, "lstrip", 0, "rstrip", 0, "normalized", 0,
                                                   "special", 1));
            json_object_setn_new(vocab, (const char *)s, len, json_integer(id));
            continue;
        }
        char *key = bytelevel_encode(s, len);
        if (!key) {
            err_set(e, "%s: out of memory", path);
            goto out;
        }
        json_object_set_new(vocab, key, json_integer(id));
        free(key);
    }
    const bpe_merge *m = bpe_merges(b);
    for (uint32_t i = 0; i < bpe_n_merges(b); i++)
        order[i] = &m[i];
    qsort(order, bpe_n_merges(b), sizeof *order, cmp_rank);
    for (uint32_t i = 0; i < bpe_n_merges(b); i++) {
        size_t la, lb;
        const uint8_t *a = bpe_token(b, order[i]->left, &la), *c = bpe_token(b, order[i]->right, &lb);
        char *ka = bytelevel_encode(a, la), *kb = bytelevel_encode(c, lb);
        if (!ka || !kb) {
            free(ka);
            free(kb);
            err_set(e, "%s: out of memory", path);
            goto out;
        }
        json_array_append_new(merges, json_pack("[s,s]", ka, kb));
        free(ka);
        free(kb);
    }
    const pretok *pt = bpe_pretok(b);
    for (size_t i = 0; i < pretok_count(pt); i++)
        json_array_append_new(seq, json_pack("{s:s,s:{s:s},s:s,s:b}", "type", "Split", "pattern",
                                             "Regex", pretok_pattern(pt, i), "behavior",
                                             "Isolated", "invert", 0));
    json_array_append_new(seq, json_pack("{s:s,s:b,s:b,s:b}", "type", "ByteLevel",
                                         "add_prefix_space", 0, "trim_offsets", 1, "use_regex",
                                         0));
    json_object_set_new(root, "version", json_string("1.0"));
    json_object_set_new(root, "truncation", json_null());
    json_object_set_new(root, "padding", json_null());
    json_object_set(root, "added_tokens", added);
    json_object_set_new(root, "normalizer", json_null());
    json_object_set_new(root, "pre_tokenizer",
                        json_pack("{s:s,s:O}", "type", "Sequence", "pretokenizers", seq));
    json_object_set_new(root, "post_processor", json_null());
    json_object_set_new(root, "decoder", json_pack("{s:s,s:b,s:b,s:b}", "type", "ByteLevel",
                                                   "add_prefix_space", 1, "trim_offsets", 1,
                                                   "use_regex", 1));
    json_object_set_new(
        root, "model",
        json_pack("{s:s,s:n,s:n,s:n,s:n,s:b,s:b,s:b,s:O,s:O}", "type", "BPE", "dropout",
                  "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", 0,
                  "byte_fallback", 0, "ignore_merges",
                  (bpe_flags(b) & BPE_FLAG_WHOLE_PIECE) != 0, "vocab", vocab, "merges", merges));
    outfile o;
    if (outfile_open(&o, path, e))
        goto out;
    if (json_dumpf(root, o.f, JSON_INDENT(2)) != 0 ||
        fputc('\n', o.f) == EOF) {
        err_errno(e, "%s: write failed", outfile_name(&o));
        outfile_abort(&o);
        goto out;
    }
    rc = outfile_commit(&o, e);
out:
    free(order);
    json_decref(seq);
    json_decref(merges);
    json_decref(vocab);
    json_decref(added);
    json_decref(root);
    return rc;
}

/* ---- tiktoken rank files ---- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static long b64_decode(const char *s, size_t n, uint8_t *out)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0, i = 0;
    for (; i < n && s[i] != '='; i++) {
        const char *p = memchr(B64, s[i], 64);
        if (!p || !s[i])
            return -1;
        acc = acc << 6 | (uint32_t)(p - B64);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    for (; i < n; i++)
        if (s[i] != '=')
            return -1;
    if (n % 4 != 0 || (acc & ((1u << bits) - 1)) != 0)
        return -1;
    return (long)o;
}

static void b64_encode(const uint8_t *s, size_t n, FILE *f)
{
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        fputc(B64[v >> 18], f);
        fputc(B64[(v >> 12) & 63], f);
        fputc(B64[(v >> 6) & 63], f);
        fputc(B64[v & 63], f);
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)s[i] << 16;
        fprintf(f, "%c%c==", B64[v >> 18], B64[(v >> 12) & 63]);
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8;
        fprintf(f, "%c%c%c=", B64[v >> 18], B64[(v >> 12) & 63], B64[(v >> 6) & 63]);
    }
}

static const bpeio_special TT_GPT2[] = {{"<|endoftext|>", 50256}};
static const bpeio_special TT_CL100K[] = {{"<|endoftext|>", 100257},
                                          {"<|fim_prefix|>", 100258},
                                          {"<|fim_middle|>", 100259},
                                          {"<|fim_suffix|>", 100260},
                                          {"<|endofprompt|>", 100276}};
static const bpeio_special TT_O200K[] = {{"<|endoftext|>", 199999}, {"<|endofprompt|>", 200018}};

size_t bpeio_tiktoken_specials(const char *name, const bpeio_special **out)
{
    if (strcmp(name, "gpt2") == 0)
        return *out = TT_GPT2, 1;
    if (strcmp(name, "cl100k") == 0)
        return *out = TT_CL100K, 5;
    if (strcmp(name, "o200k") == 0)
        return *out = TT_O200K, 2;
    return 0;
}

int bpeio_import_tiktoken(bpe **b, const char *path, const char *const *patterns,
                          size_t n_patterns, const bpeio_special *specials, size_t n_specials,
                          const char *bos, const char *eos, const char *pad, dsv3_err *e)
{
    *b = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return err_errno(e, "%s: cannot open", path);
    table t = {0};
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    uint64_t lineno = 0;
    uint8_t *buf = NULL;
    bpe *first = NULL;
    int rc = -1;
    /* pass 1: the largest id, so the table is allocated once */
    uint64_t n = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        char *sp = memchr(line, ' ', (size_t)len);
        char *end;
        if (len <= 1 && (len == 0 || line[0] == '\n'))
            continue;
        errno = 0;
        unsigned long long r = sp ? strtoull(sp + 1, &end, 10) : 0;
        if (!sp || end == sp + 1 || errno || r >= (1u << 30) ||
            (*end != '\n' && *end != '\0' && *end != '\r')) {
            err_set(e, "%s:%llu: expected 'BASE64 RANK'", path, (unsigned long long)lineno);
            goto out;
        }
        if (r + 1 > n)
            n = r + 1;
    }
    for (size_t i = 0; i < n_specials; i++)
        if ((uint64_t)specials[i].id + 1 > n)
            n = (uint64_t)specials[i].id + 1;
    if (n > 2 * (lineno + n_specials) + 65536) {
        err_set(e, "%s: ranks up to %llu for %llu lines: too sparse", path,
                (unsigned long long)n - 1, (unsigned long long)lineno);
        goto out;
    }
    if (ferror(f) || fseek(f, 0, SEEK_SET) != 0) {
        err_errno(e, "%s: read failed (a rank file must be a regular file)", path);
        goto out;
    }
    if (table_init(&t, (uint32_t)n) || !(buf = malloc(1 << 16))) {
        err_set(e, "%s: out of memory", path);
        goto out;
    }
    lineno = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (len <= 1 && (len == 0 || line[0] == '\n'))
            continue;
        char *sp = memchr(line, ' ', (size_t)len);
        uint32_t r = (uint32_t)strtoull(sp + 1, NULL, 10);
        size_t bl = (size_t)(sp - line);
        long got = bl < (1 << 16) ? b64_decode(line, bl, buf) : -1;
        if (got <= 0) {
            err_set(e, "%s:%llu: bad base64 token", path, (unsigned long long)lineno);
            goto out;
        }
        if (t.kind[r]) {
            err_set(e, "%s:%llu: rank %u appears twice", path, (unsigned long long)lineno, r);
            goto out;
        }
        t.kind[r] = got == 1 ? BPE_BYTE : BPE_PLAIN;
        t.len[r] = (uint32_t)got;
        if (!(t.tok[r] = malloc((size_t)got))) {
            err_set(e, "%s: out of memory", path);
            goto out;
        }
        memcpy(t.tok[r], buf, (size_t)got);
    }
    for (size_t i = 0; i < n_specials; i++) {
        uint32_t id = specials[i].id;
        size_t sl = strlen(specials[i].text);
        if (t.kind[id] || sl == 0) {
            err_set(e, "%s: special token '%s' has id %u, which is taken", path,
                    specials[i].text, id);
            goto out;
        }
        t.kind[id] = BPE_SPECIAL;
        t.len[id] = (uint32_t)sl;
        if (!(t.tok[id] = malloc(sl))) {
            err_set(e, "%s: out of memory", path);
            goto out;
        }
        memcpy(t.tok[id], specials[i].text, sl);
    }
    /* tiktoken merges the adjacent pair whose concatenation has the lowest rank, whichever
     * way that token splits; so every split of a token into two tokens is a merge, ranked
     * by the token. */
    if (table_build(&first, &t, patterns, n_patterns, BPE_FLAG_WHOLE_PIECE, NULL, NULL, NULL,
                    path, e))
        goto out;
    for (uint32_t id = 0; id < t.n; id++) {
        if (t.kind[id] != BPE_PLAIN)
            continue;
        for (uint32_t k = 1; k < t.len[id]; k++) {
            uint32_t l = bpe_lookup(first, t.tok[id], k);
            uint32_t r = bpe_lookup(first, t.tok[id] + k, t.len[id] - k);
            if (l == BPE_NONE || r == BPE_NONE)
                continue;
            if (table_merge(&t, l, r, id, id)) {
                err_set(e, "%s: out of memory", path);
                goto out;
            }
        }
    }
    for (uint32_t i = 0; i < t.n_merges; i++)
        t.kind[t.merges[i].result] = BPE_MERGED;
    rc = table_build(b, &t, patterns, n_patterns, BPE_FLAG_WHOLE_PIECE, bos, eos, pad, path, e);
out:
    bpe_free(first);
    free(line);
    free(buf);
    table_free(&t);
    fclose(f);
    return rc;
}

int bpeio_export_tiktoken(const bpe *b, const char *path, dsv3_err *e)
{
    outfile o;
    if (outfile_open(&o, path, e))
        return -1;
    for (uint32_t id = 0; id < bpe_vocab_size(b); id++) {
        bpe_kind k = bpe_token_kind(b, id);
        if (k == BPE_UNUSED || k == BPE_SPECIAL)
            continue;
        size_t len;
        const uint8_t *s = bpe_token(b, id, &len);
        b64_encode(s, len, o.f);
        fprintf(o.f, " %u\n", id);
    }
    if (ferror(o.f)) {
        err_errno(e, "%s: write failed", outfile_name(&o));
        outfile_abort(&o);
        return -1;
    }
    return outfile_commit(&o, e);
}
