#include "pretok.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* DeepSeek-V3's tokenizer.json pre_tokenizer: three Splits (Isolated) before ByteLevel with
 * use_regex false. Digits go in groups of up to three; runs of CJK ideographs, Hiragana and
 * Katakana stand alone; the third joins a word with one leading ASCII punctuation mark, and
 * keeps a run of punctuation together with the line breaks after it. */
static const char *const DEEPSEEK_V3[] = {
    "\\p{N}{1,3}",
    "[\xe4\xb8\x80-\xe9\xbe\xa5\xe3\x81\x80-\xe3\x82\x9f\xe3\x82\xa0-\xe3\x83\xbf]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

/* tiktoken's patterns (openai_public.py): r50k/p50k ("gpt2"), cl100k_base, o200k_base. */
static const char *const GPT2[] = {
    "'(?:[sdmt]|ll|ve|re)| ?\\p{L}++| ?\\p{N}++| ?[^\\s\\p{L}\\p{N}]++|\\s++$|\\s+(?!\\S)|\\s",
};
static const char *const CL100K[] = {
    "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++"
    "[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s",
};
static const char *const O200K[] = {
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

static const struct {
    const char *name;
    const char *const *pats;
    size_t n;
} BUILTIN[] = {
    {"deepseek-v3", DEEPSEEK_V3, 3},
    {"gpt2", GPT2, 1},
    {"cl100k", CL100K, 1},
    {"o200k", O200K, 1},
};
static const char *const BUILTIN_NAMES[] = {"deepseek-v3", "gpt2", "cl100k", "o200k", NULL};

size_t pretok_builtin(const char *name, const char *const **patterns)
{
    for (size_t i = 0; i < sizeof BUILTIN / sizeof BUILTIN[0]; i++)
        if (strcmp(name, BUILTIN[i].name) == 0) {
            *patterns = BUILTIN[i].pats;
            return BUILTIN[i].n;
        }
    return 0;
}

const char *const *pretok_builtin_names(void)
{
    return BUILTIN_NAMES;
}

struct pretok {
    size_t n;
    char *src[PRETOK_MAX_PATTERNS];
    pcre2_code *code[PRETOK_MAX_PATTERNS];
    int jit[PRETOK_MAX_PATTERNS];   /* JIT-compiled: matched through pcre2_jit_match */
};

/* PCRE2's \s under UCP is its own list (it still holds U+180E, which left White_Space in
 * Unicode 6.3); Oniguruma and Rust's regex (HF, tiktoken) use the White_Space property.
 * Rewriting \s and \S to the property keeps our splits identical to theirs (the fixture
 * cases hold U+180E). Inside a class \p{..} and \P{..} are both allowed. */
static char *rewrite_space(const char *pat)
{
    size_t n = strlen(pat), cap = n * 8 + 1, o = 0;
    char *out = malloc(cap);
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (pat[i] == '\\' && i + 1 < n) {
            char c = pat[i + 1];
            if (c == 's' || c == 'S') {
                o += (size_t)sprintf(out + o, "\\%c{White_Space}", c == 's' ? 'p' : 'P');
            } else {
                out[o++] = pat[i];
                out[o++] = c;
            }
            i++;
            continue;
        }
        out[o++] = pat[i];
    }
    out[o] = '\0';
    return out;
}

int pretok_create(pretok **pp, const char *const *patterns, size_t n, dsv3_err *e)
{
    *pp = NULL;
    if (n == 0 || n > PRETOK_MAX_PATTERNS)
        return err_set(e, "pre-tokenizer: %zu patterns (expected 1 to %d)", n,
                       PRETOK_MAX_PATTERNS);
    pretok *p = calloc(1, sizeof *p);
    if (!p)
        return err_set(e, "pre-tokenizer: out of memory");
    for (size_t i = 0; i < n; i++) {
        p->src[i] = strdup(patterns[i]);
        char *rw = rewrite_space(patterns[i]);
        if (!p->src[i] || !rw) {
            free(rw);
            p->n = i + 1;
            pretok_free(p);
            return err_set(e, "pre-tokenizer: out of memory");
        }
        int code;
        PCRE2_SIZE off;
        p->code[i] = pcre2_compile((PCRE2_SPTR)rw, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF |
                                       PCRE2_DOLLAR_ENDONLY,
                                   &code, &off, NULL);
        free(rw);
        p->n = i + 1;
        if (!p->code[i]) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(code, msg, sizeof msg);
            pretok_free(p);
            return err_set(e, "pre-tokenizer pattern %zu: %s (near offset %zu of '%s')", i + 1,
                           (char *)msg, (size_t)off, patterns[i]);
        }
        /* JIT is an optimisation: where it is unavailable the interpreter gives the same
         * matches, so a failure here is not an error. */
        p->jit[i] = pcre2_jit_compile(p->code[i], PCRE2_JIT_COMPLETE) == 0;
    }
    *pp = p;
    return 0;
}

void pretok_free(pretok *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->n; i++) {
        free(p->src[i]);
        pcre2_code_free(p->code[i]);
    }
    free(p);
}

size_t pretok_count(const pretok *p)
{
    return p->n;
}

const char *pretok_pattern(const pretok *p, size_t i)
{
    return i < p->n ? p->src[i] : NULL;
}

struct pretok_state {
    const pretok *p;
    pcre2_match_data *md[PRETOK_MAX_PATTERNS];
    pcre2_match_context *mctx;
    pcre2_jit_stack *jstack;
    size_t *ends[2];
    size_t cap[2];
};

int pretok_state_new(pretok_state **ps, const pretok *p, dsv3_err *e)
{
    pretok_state *s = calloc(1, sizeof *s);
    *ps = NULL;
    if (!s)
        return err_set(e, "pre-tokenizer: out of memory");
    s->p = p;
    s->mctx = pcre2_match_context_create(NULL);
    /* A long run of one class (100 MB of spaces) backtracks through the lookahead of
     * \s+(?!\S); the default 32 KiB JIT stack is too small for some of those. */
    s->jstack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, NULL);
    int ok = s->mctx && s->jstack;
    for (size_t i = 0; ok && i < p->n; i++)
        ok = (s->md[i] = pcre2_match_data_create_from_pattern(p->code[i], NULL)) != NULL;
    if (!ok) {
        pretok_state_free(s);
        return err_set(e, "pre-tokenizer: out of memory");
    }
    pcre2_jit_stack_assign(s->mctx, NULL, s->jstack);
    *ps = s;
    return 0;
}

void pretok_state_free(pretok_state *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->p->n; i++)
        pcre2_match_data_free(s->md[i]);
    pcre2_match_context_free(s->mctx);
    pcre2_jit_stack_free(s->jstack);
    free(s->ends[0]);
    free(s->ends[1]);
    free(s);
}

static int push_end(pretok_state *s, int b, size_t *n, size_t v)
{
    if (*n == s->cap[b]) {
        size_t nc = s->cap[b] ? 2 * s->cap[b] : 1024;
        size_t *q = realloc(s->ends[b], nc * sizeof *q);
        if (!q)
            return -1;
        s->ends[b] = q;
        s->cap[b] = nc;
    }
    s->ends[b][(*n)++] = v;
    return 0;
}

long pretok_split(pretok_state *s, const uint8_t *text, size_t n, const size_t **ends,
                  dsv3_err *e)
{
    int cur = 0;
    size_t ncur = 0;
    if (n > 0 && push_end(s, cur, &ncur, n))
        return err_set(e, "pre-tokenizer: out of memory");
    for (size_t k = 0; k < s->p->n; k++) {
        int nxt = 1 - cur;
        size_t nn = 0, start = 0;
        pcre2_code *code = s->p->code[k];
        pcre2_match_data *md = s->md[k];
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        for (size_t i = 0; i < ncur; i++) {
            size_t end = s->ends[cur][i], len = end - start, pos = 0;
            const uint8_t *sub = text + start;
            while (pos < len) {
                /* pcre2_jit_match skips pcre2_match's argument checks: a call per piece
                 * per stage makes that overhead a tenth of the encoding time */
                int rc = s->p->jit[k] ? pcre2_jit_match(code, (PCRE2_SPTR)sub, len, pos,
                                                        PCRE2_NOTEMPTY, md, s->mctx)
                                      : pcre2_match(code, (PCRE2_SPTR)sub, len, pos,
                                                    PCRE2_NOTEMPTY, md, s->mctx);
                if (rc == PCRE2_ERROR_NOMATCH)
                    break;
                if (rc < 0) {
                    PCRE2_UCHAR msg[256];
                    pcre2_get_error_message(rc, msg, sizeof msg);
                    return err_set(e, "pre-tokenizer pattern %zu at byte %zu: %s", k + 1,
                                   start + pos, (char *)msg);
                }
                size_t ms = ov[0], me = ov[1];
                if ((ms > pos && push_end(s, nxt, &nn, start + ms)) ||
                    push_end(s, nxt, &nn, start + me))
                    return err_set(e, "pre-tokenizer: out of memory");
                pos = me;
            }
            if (pos < len && push_end(s, nxt, &nn, end))
                return err_set(e, "pre-tokenizer: out of memory");
            start = end;
        }
        cur = nxt;
        ncur = nn;
    }
    *ends = s->ends[cur];
    return (long)ncur;
}
