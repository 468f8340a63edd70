/* pretok: the pre-tokenizer, which cuts text into the pieces that BPE merges within.
 *
 * A pre-tokenizer is a sequence of regular expressions applied as HF tokenizers' Sequence
 * of Split(behavior Isolated): the first pattern cuts the text into matches and the gaps
 * between them; each later pattern cuts every piece of the previous stage the same way. Every
 * byte of the text lands in exactly one piece, so decode(encode(x)) == x. Patterns run on
 * PCRE2 with JIT, with Unicode properties from PCRE2's tables; "\s" is read as Unicode
 * White_Space (as in Rust's regex and Oniguruma, which tiktoken and HF use), "$" as
 * the end of the subject. Invalid UTF-8 bytes never match a pattern item: they fall in gaps.
 * Built-in pattern sets: "deepseek-v3" (the default), "gpt2", "cl100k", "o200k". */
#ifndef DSV3_PRETOK_H
#define DSV3_PRETOK_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

enum { PRETOK_MAX_PATTERNS = 8 };

/* The patterns of a built-in set; returns the count, 0 for an unknown name. */
size_t pretok_builtin(const char *name, const char *const **patterns);
/* The names of the built-in sets, NULL-terminated. */
const char *const *pretok_builtin_names(void);

/* Compiled patterns: read-only after pretok_create, shared by every thread. */
typedef struct pretok pretok;

int pretok_create(pretok **p, const char *const *patterns, size_t n, dsv3_err *e);
void pretok_free(pretok *p);
size_t pretok_count(const pretok *p);
const char *pretok_pattern(const pretok *p, size_t i);

/* Per-thread match state and the piece boundaries of the last split. */
typedef struct pretok_state pretok_state;

int pretok_state_new(pretok_state **s, const pretok *p, dsv3_err *e);
void pretok_state_free(pretok_state *s);

/* Cuts text[0..n) into pieces: on success *ends holds the end offset of each piece (the
 * first starts at 0, the last ends at n; none is empty) and the count is returned; -1 on a
 * regex engine failure. *ends stays valid until the next call on s. */
long pretok_split(pretok_state *s, const uint8_t *text, size_t n, const size_t **ends,
                  dsv3_err *e);

#endif
