/* convert: checkpoint folders from one layout and dtype to another, one tensor at a time.
 *
 * Reads any HF folder lib/hfdir opens: dsv3's (ckpt_save, dsv3-train's step folders, whose
 * optimizer files are not read), transformers' save_pretrained, DeepSeek's release (FP8
 * linear weights with a float32 weight_scale_inv per 128x128 block, dequantized as
 * DeepSeek does: f32(q) * scale, then rounded to the output dtype). Writes:
 *   - HF folders (convert_hf): config.json, generation_config.json, the tensors of the
 *     config's layout (lib/layout) in its order, in BF16 or F32 (the router's
 *     e_score_correction_bias always F32, as DeepSeek stores it), in one model.safetensors
 *     or model-0000k-of-0000n.safetensors shards of at most max_shard_bytes with
 *     model.safetensors.index.json; optionally without the MTP modules;
 *   - DeepSeek's reference inference layout (convert_deepseek): its tensor names
 *     (embed, layers.N.attn.wq_b, ffn.experts.X.w1, ...) split across mp model-parallel
 *     files model{i}-mp{mp}.safetensors as its inference/convert.py does (routed experts
 *     dealt out whole, column-parallel weights split on dim 0, row-parallel on dim 1, MTP
 *     layers left out), plus inference-config.json with its ModelArgs fields.
 * Every output goes through lib/ststream into a lib/outdir folder: peak memory is a few
 * copies of the largest tensor, and an interrupted run leaves no complete-looking folder.
 *
 * convert_check is the --verify of dsv3-convert and the first step of every conversion:
 * the folder's tensors against its config (every tensor of the layout present with its
 * shape, a float dtype or FP8 with a weight_scale_inv of the block grid's shape, nothing
 * else, the MTP copies of the embedding and head optional). A folder with no MTP tensors
 * at all is read as D = 0, as transformers' save_pretrained writes them. */
#ifndef DSV3_CONVERT_H
#define DSV3_CONVERT_H

#include <stdint.h>
#include <stdio.h>

#include "cli.h"
#include "hfdir.h"
#include "layout.h"
#include "ststream.h"

typedef struct conv_opts {
    st_dtype dtype;            /* ST_BF16 (default) or ST_F32 */
    int keep_dtype;            /* convert_deepseek: write tensors as stored (FP8 stays FP8) */
    int no_mtp;                /* leave out layers >= num_hidden_layers */
    uint64_t max_shard_bytes;  /* 0: one model.safetensors */
    int mp;                    /* convert_deepseek: model-parallel ranks */
    int force;                 /* replace an existing output folder */
    int threads;               /* <= 0: all processors */
    const char *tokenizer;     /* copied (tokenizer.json) or exported (dsv3-tok file), or NULL */
    cli_progress_mode progress;
} conv_opts;

typedef struct conv_stats {
    uint64_t in_bytes;    /* tensor bytes read */
    uint64_t out_bytes;   /* tensor bytes written */
    int n_tensors;        /* tensors written (checked, for verify) */
    int n_files;          /* safetensors files written (read, for verify) */
    int mtp_layers;       /* MTP modules found in the input */
    int fp8;              /* FP8 tensors in the input */
} conv_stats;

int convert_hf(const char *in, const char *out, const conv_opts *o, conv_stats *st,
               dsv3_err *e);
int convert_deepseek(const char *in, const char *out, const conv_opts *o, conv_stats *st,
                     dsv3_err *e);

/* Checks DIR (hfdir_open, then convert_check, and that config.json has a quantization_config
 * exactly when there are FP8 weights). With sums, also reads every tensor, checks
 * its values are finite and prints "XXH3-64  dtype  shape  name" lines to sums in
 * name order (equal folders print equal lines). */
int convert_verify(const char *dir, FILE *sums, int threads, conv_stats *st, dsv3_err *e);

/* DeepSeek's inference name of HF tensor hf (as its convert.py renames it) and the
 * dimension split across model-parallel ranks (-1: whole on every rank). -1 if unknown. */
int convert_ds_name(const char *hf, char *out, size_t n, int *dim);

/* ---- pieces lib/quant shares ---- */

/* The folder's tensors against its config; *mtp gets the MTP modules it holds (0 or
 * num_nextn_predict_layers). */
int convert_check(const hfdir *h, int *mtp, conv_stats *st, dsv3_err *e);

/* Tensor t of h as float32 (FP8 dequantized with its weight_scale_inv). */
int convert_read_f32(const hfdir *h, const st_tensor *t, float *out, int threads,
                     dsv3_err *e);

/* fp8_dequant_weight's result (each element f32(q) * its block's scale, the same float
 * products), with f32(q) from a 256-entry table of fp8_e4m3_to_f32: nine times faster. */
void convert_dequant(const uint8_t *q, const float *scale, int64_t rows, int64_t cols,
                     float *out, int threads);

/* Drops the pages of a tensor read (and of an FP8 tensor's scale) from the process's
 * mapping, so the resident size stays that of one tensor; they stay in the page cache. */
void convert_release(const st_tensor *t);
void convert_release_scale(const hfdir *h, const st_tensor *t);

/* An error naming the tensor and element if x holds a NaN or infinity. cols > 0 gives the
 * position as row and column. */
int convert_finite(const char *name, const float *x, int64_t n, int64_t cols, dsv3_err *e);

/* Appends n floats to s as dtype (F32 or BF16, round to nearest even). */
int convert_put(ststream *s, const char *name, st_dtype dtype, const float *x, int64_t n,
                int threads, dsv3_err *e);

/* Copies generation_config.json, tokenizer.json, tokenizer_config.json,
 * special_tokens_map.json, chat_template.jinja and tokenizer.model from folder in, where
 * present, into the output folder tmp; with want_generation, writes a generation config
 * from c's token ids when there is none (a training checkpoint has none). Nothing else is
 * copied: a training checkpoint's optimizer and state files stay behind. */
int convert_copy_extras(const char *in, const char *outdir_tmp, int want_generation,
                        const dsv3_config *c, dsv3_err *e);

/* Writes model.safetensors.index.json: names[i] in files[i], total_size the data bytes. */
int convert_write_index(const char *path, char *const *names, char *const *files, int n,
                        uint64_t total, dsv3_err *e);

#endif
