/* dsv3-train: pre-training and fine-tuning of a DeepSeek-V3-architecture model. */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../kernels/gpu.h"
#include "../lib/cli.h"
#include "../lib/comm.h"
#include "../lib/config.h"
#include "../lib/train.h"

static const cli_program PROG = {
    "dsv3-train",
    "Usage: dsv3-train -c CONFIG -d DATA -o RUN --steps N|--tokens N [OPTION]...\n"
    "Train a DeepSeek-V3-architecture model on a folder packed by dsv3-pack. RUN gets\n"
    "checkpoints step-NNNNNN/ (HF weights, optimizer state, state.json), `latest`,\n"
    "metrics.jsonl, config.json and command.txt (docs/train-format.md).\n"
    "\n"
    "Model and data:\n"
    "  -c, --config=FILE        model config.json (HF DeepseekV3Config fields); with\n"
    "                           --init-from or --resume, checked against the model's\n"
    "  -d, --data=DIR           packed folder (dsv3-pack -o DIR)\n"
    "  -o, --output=DIR         run folder; must be new or empty unless --resume or --force\n"
    "      --init-from=DIR      start from a converted HF checkpoint (config.json +\n"
    "                           model.safetensors) instead of a random initialisation\n"
    "      --init-std=X         std of the random initialisation (default: the config's\n"
    "                           initializer_range; DeepSeek-V3 used 0.006)\n"
    "      --device=cpu|cuda    where forward and backward run (default: $DSV3_DEVICE if\n"
    "                           set, else cuda when this build has CUDA and a GPU is\n"
    "                           present, else cpu)\n"
    "      --fp8                with --device cuda: attention projections, dense MLPs,\n"
    "                           shared and routed experts in FP8 as DeepSeek-V3\n"
    "                           (1x128 / 128x128 block scales, fp32 accumulation, also\n"
    "                           the held experts under --ep); the step line says fp8\n"
    "      --fp8-min-dim=N      with --fp8: only layers whose smaller dimension is at least\n"
    "                           N run in FP8, the rest bf16 (default 1536, below which\n"
    "                           FP8 measured slower; 0: every layer)\n"
    "      --recompute          with --device cuda: keep no RMSNorm outputs or MLA\n"
    "                           up-projections for backward, make them again there (less\n"
    "                           activation memory, the same gradients, a little slower)\n"
    "      --nondeterministic   with --device cuda and masked documents (--doc-mask,\n"
    "                           --sft): faster kernels whose sums vary run to run (the\n"
    "                           fused attention backward); runs and resumes then do not\n"
    "                           repeat bit for bit (default: they do)\n"
    "\n"
    "Batch and length of the run:\n"
    "  -b, --batch=N            sequences per forward (micro-batch, default 4)\n"
    "  -g, --global-batch=N     sequences per update, a multiple of --batch x ranks; the\n"
    "                           rest is gradient accumulation (default: --batch x ranks)\n"
    "      --global-batch-tokens=N  the same in tokens, rounded down to whole micro-batches\n"
    "      --batch-ramp=FIRST:SPAN  start with FIRST sequences per update, growing linearly to\n"
    "                           the global batch over SPAN (in --unit)\n"
    "      --steps=N            stop after N updates\n"
    "      --tokens=N           stop once N tokens are consumed\n"
    "\n"
    "Optimizer and schedules (positions in --unit):\n"
    "      --unit=steps|tokens  unit of the positions below (default steps)\n"
    "      --lr=X               peak learning rate (default 1e-3)\n"
    "      --warmup=N           linear warm-up length (default 0)\n"
    "      --decay-start=N      cosine decay from the peak starts here (default: no decay)\n"
    "      --decay-end=N        ... and reaches --final-lr here\n"
    "      --final-lr=X         rate after the decay (default: lr/10)\n"
    "      --tail-start=N, --tail-lr=X  a last constant rate from N on\n"
    "      --weight-decay=X     AdamW decay of 2-D tensors (default 0.1; never on norms)\n"
    "      --beta1=X, --beta2=X AdamW betas (default 0.9, 0.95); moments kept in BF16\n"
    "      --clip=X             global gradient-norm limit (default 1.0; 0: none)\n"
    "      --gamma=X            expert-bias update speed (default 0.001)\n"
    "      --gamma-until=N      gamma is 0 from N on (default: never)\n"
    "      --mtp-weight=A[,B]   MTP loss weight lambda, B from --mtp-switch on (0.3,0.1)\n"
    "      --mtp-switch=N       where lambda changes to B (default: never)\n"
    "      --balance-alpha=X    sequence-wise balance loss weight (default 0.0001)\n"
    "      --peak-tflops=R      the GPU's BF16 peak for the MFU column (default: 989.4 on an\n"
    "                           H100 or H200, else no MFU)\n"
    "      --skip-nonfinite     skip an update whose loss or gradient is NaN or infinite\n"
    "                           (counted) instead of stopping with status 1\n"
    "\n"
    "Evaluation, checkpoints, resume:\n"
    "      --eval-every=N       mean loss on the val split every N updates\n"
    "      --eval-batches=N     micro-batches per evaluation (default 4)\n"
    "      --save-every=N       checkpoint every N updates (and always at the end)\n"
    "      --keep=K             keep the newest K checkpoints (default 3; 0: all)\n"
    "      --resume             continue from RUN's newest checkpoint (start fresh when it\n"
    "                           has none), bit for bit as if never interrupted\n"
    "      --force              start over in a RUN that holds another run\n"
    "  -s, --seed=N             seed of the initialisation and the data order (default 0)\n"
    "\n"
    "Fine-tuning:\n"
    "      --sft                supervised fine-tuning: loss only on response tokens, and no\n"
    "                           attention across the documents packed in a record\n"
    "      --sft-assistant-id=N token that starts a response (required with --sft)\n"
    "      --sft-user-id=N      token that starts a user turn (ends a response)\n"
    "      --doc-mask           pre-training too: no attention (and no target) across the\n"
    "                           documents packed in a record (V3 does not; SFT always does)\n"
    "\n"
    "      --quiet              no per-step lines\n"
    "      --help, --version\n"
    "\n"
    "SIGTERM or SIGUSR1 (Slurm's notice before preemption): the current update finishes, a\n"
    "checkpoint is written and the program exits 0; run again with --resume.\n"
    "\n"
    "Under mpirun, srun or torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR...) the\n"
    "ranks train with data parallelism: each reads its share of the global batch, the\n"
    "optimizer state is sharded (ZeRO-1), rank 0 logs and writes the model; a signal to any\n"
    "rank stops them all with a checkpoint. See docs/DISTRIBUTED.md.\n"
    "\n"
    "Expert parallelism (docs/cluster.md):\n"
    "      --ep=N               spread every MoE layer's routed experts over N ranks (N\n"
    "                           divides the ranks and the experts; rank r holds group r mod\n"
    "                           N); the rest stays data-parallel (default 1: off)\n"
    "      --route-nodes=M      node-limited routing: a token's experts on at most M nodes\n"
    "                           (V3: 4), nodes scored by their top k/M affinities\n"
    "      --route-groups=G     the nodes the experts are cut into for --route-nodes\n"
    "                           (default: the EP layout, N over the launcher's ranks a node)\n"
    "                           --resume takes both from the checkpoint (others refused)\n"
    "Numbers take k, M, G (1000s). Exit status: 0 ok, 1 failure, 2 usage error.\n"
    "See dsv3-train(1).\n",
};

enum {
    OPT_DEVICE = 0x2000, OPT_FP8, OPT_FP8_MIN_DIM, OPT_RECOMPUTE, OPT_NONDET, OPT_INIT_FROM,
    OPT_INIT_STD,
    OPT_GB_TOKENS, OPT_RAMP, OPT_STEPS,
    OPT_TOKENS, OPT_UNIT, OPT_LR, OPT_WARMUP, OPT_DECAY_START, OPT_DECAY_END, OPT_FINAL_LR,
    OPT_TAIL_START, OPT_TAIL_LR, OPT_WD, OPT_BETA1, OPT_BETA2, OPT_CLIP, OPT_GAMMA,
    OPT_GAMMA_UNTIL, OPT_MTP, OPT_MTP_SWITCH, OPT_ALPHA, OPT_PEAK, OPT_SKIP, OPT_EVAL_EVERY,
    OPT_EVAL_BATCHES, OPT_SAVE_EVERY, OPT_KEEP, OPT_RESUME, OPT_FORCE, OPT_SFT, OPT_SFT_ASSIST,
    OPT_SFT_USER, OPT_DOC_MASK, OPT_EP, OPT_ROUTE_NODES, OPT_ROUTE_GROUPS,
};

/* Set by SIGTERM/SIGUSR1; the trainer checks it after each update. */
static volatile sig_atomic_t stop_requested;

static void on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static uint64_t parse_u64(const char *opt, const char *s, uint64_t min, uint64_t max)
{
    dsv3_err e;
    uint64_t v;
    if (cli_parse_u64(opt, s, min, max, &v, &e))
        cli_usage(&PROG, "%s", e.msg);
    return v;
}

static double parse_double(const char *opt, const char *s, double min, double max)
{
    dsv3_err e;
    double v;
    if (cli_parse_double(opt, s, min, max, &v, &e))
        cli_usage(&PROG, "%s", e.msg);
    return v;
}

/* --ep against the job and the config (a usage error, exit 2, on every rank alike);
 * with --init-from or --resume alone the expert count is checked once the model is read. */
static void check_ep(const train_opts *o, int world)
{
    if (o->route_groups && !o->route_nodes)
        cli_usage(&PROG, "--route-groups needs --route-nodes");
    if (o->ep <= 1)
        return;
    if (world % o->ep)
        cli_usage(&PROG, "--ep %d does not divide the %d ranks of the job", o->ep, world);
    dsv3_config c;
    dsv3_err e;
    if (!o->config || config_load(&c, o->config, &e))
        return;  /* a bad config is reported where it is read */
    int E = c.n_routed_experts;
    config_free(&c);
    if (E <= 0 || E % o->ep)
        cli_usage(&PROG, "--ep %d does not divide the %d routed experts of %s", o->ep, E,
                  o->config);
}

/* The command line as one shell-readable line, for RUN/command.txt. */
/* 0 cpu, 1 cuda, -1 for NULL (not given: cuda when a GPU is present). */
static int parse_device(const char *s, const char *what)
{
    if (!s)
        return -1;
    if (strcmp(s, "cpu") == 0)
        return 0;
    if (strcmp(s, "cuda") == 0)
        return 1;
    cli_usage(&PROG, "%s: expected cpu or cuda, got '%s'", what, s);
    return -1;
}

static char *join_args(int argc, char **argv)
{
    size_t n = 1;
    for (int i = 0; i < argc; i++)
        n += 4 * strlen(argv[i]) + 3;
    char *s = malloc(n), *p = s;
    if (!s)
        return NULL;
    for (int i = 0; i < argc; i++) {
        int plain = argv[i][0] && !argv[i][strcspn(argv[i], " \t\n'\"\\$`*?&;|<>()")];
        if (i)
            *p++ = ' ';
        if (plain) {
            p = stpcpy(p, argv[i]);
            continue;
        }
        *p++ = '\'';
        for (const char *c = argv[i]; *c; c++)
            p = *c == '\'' ? stpcpy(p, "'\\''") : (*p = *c, p + 1);
        *p++ = '\'';
    }
    *p = 0;
    return s;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"data", required_argument, NULL, 'd'},
        {"output", required_argument, NULL, 'o'},
        {"batch", required_argument, NULL, 'b'},
        {"global-batch", required_argument, NULL, 'g'},
        {"seed", required_argument, NULL, 's'},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"fp8", no_argument, NULL, OPT_FP8},
        {"fp8-min-dim", required_argument, NULL, OPT_FP8_MIN_DIM},
        {"recompute", no_argument, NULL, OPT_RECOMPUTE},
        {"nondeterministic", no_argument, NULL, OPT_NONDET},
        {"init-from", required_argument, NULL, OPT_INIT_FROM},
        {"init-std", required_argument, NULL, OPT_INIT_STD},
        {"global-batch-tokens", required_argument, NULL, OPT_GB_TOKENS},
        {"batch-ramp", required_argument, NULL, OPT_RAMP},
        {"steps", required_argument, NULL, OPT_STEPS},
        {"tokens", required_argument, NULL, OPT_TOKENS},
        {"unit", required_argument, NULL, OPT_UNIT},
        {"lr", required_argument, NULL, OPT_LR},
        {"warmup", required_argument, NULL, OPT_WARMUP},
        {"decay-start", required_argument, NULL, OPT_DECAY_START},
        {"decay-end", required_argument, NULL, OPT_DECAY_END},
        {"final-lr", required_argument, NULL, OPT_FINAL_LR},
        {"tail-start", required_argument, NULL, OPT_TAIL_START},
        {"tail-lr", required_argument, NULL, OPT_TAIL_LR},
        {"weight-decay", required_argument, NULL, OPT_WD},
        {"beta1", required_argument, NULL, OPT_BETA1},
        {"beta2", required_argument, NULL, OPT_BETA2},
        {"clip", required_argument, NULL, OPT_CLIP},
        {"gamma", required_argument, NULL, OPT_GAMMA},
        {"gamma-until", required_argument, NULL, OPT_GAMMA_UNTIL},
        {"mtp-weight", required_argument, NULL, OPT_MTP},
        {"mtp-switch", required_argument, NULL, OPT_MTP_SWITCH},
        {"balance-alpha", required_argument, NULL, OPT_ALPHA},
        {"peak-tflops", required_argument, NULL, OPT_PEAK},
        {"skip-nonfinite", no_argument, NULL, OPT_SKIP},
        {"eval-every", required_argument, NULL, OPT_EVAL_EVERY},
        {"eval-batches", required_argument, NULL, OPT_EVAL_BATCHES},
        {"save-every", required_argument, NULL, OPT_SAVE_EVERY},
        {"keep", required_argument, NULL, OPT_KEEP},
        {"resume", no_argument, NULL, OPT_RESUME},
        {"force", no_argument, NULL, OPT_FORCE},
        {"sft", no_argument, NULL, OPT_SFT},
        {"sft-assistant-id", required_argument, NULL, OPT_SFT_ASSIST},
        {"sft-user-id", required_argument, NULL, OPT_SFT_USER},
        {"doc-mask", no_argument, NULL, OPT_DOC_MASK},
        {"ep", required_argument, NULL, OPT_EP},
        {"route-nodes", required_argument, NULL, OPT_ROUTE_NODES},
        {"route-groups", required_argument, NULL, OPT_ROUTE_GROUPS},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    /* First thing: a SIGTERM or SIGUSR1 that comes while the job starts (loading the GPU
     * runtime, joining the other ranks) still ends in a checkpoint after the first step. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sa.sa_flags = SA_RESTART;  /* I/O in progress completes; the flag is read after the step */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    train_opts o;
    train_opts_default(&o);
    cli_common common = {PROGRESS_AUTO, 0};
    int have_final_lr = 0, unit_tokens = 0;
    int device = parse_device(getenv("DSV3_DEVICE"), "DSV3_DEVICE");  /* -1: cuda if a GPU */
    const char *ramp = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "c:d:o:b:g:s:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &common))
            continue;
        switch (c) {
        case 'c': o.config = optarg; break;
        case 'd': o.data = optarg; break;
        case 'o': o.run = optarg; break;
        case 'b': o.micro_batch = (uint32_t)parse_u64("--batch", optarg, 1, 1u << 20); break;
        case 'g': o.global_batch = parse_u64("--global-batch", optarg, 1, 1ull << 40); break;
        case 's': o.seed = parse_u64("--seed", optarg, 0, INT64_MAX); break;
        case OPT_DEVICE: device = parse_device(optarg, "--device"); break;
        case OPT_FP8: o.fp8 = 1; break;
        case OPT_FP8_MIN_DIM:
            o.fp8_min_dim = (int)parse_u64("--fp8-min-dim", optarg, 0, 1 << 20);
            break;
        case OPT_RECOMPUTE: o.recompute = 1; break;
        case OPT_NONDET: o.nondet = 1; break;
        case OPT_INIT_FROM: o.init_from = optarg; break;
        case OPT_INIT_STD: o.init_std = parse_double("--init-std", optarg, 0, 10); break;
        case OPT_GB_TOKENS:
            o.global_tokens = parse_u64("--global-batch-tokens", optarg, 1, 1ull << 50);
            break;
        case OPT_RAMP: ramp = optarg; break;
        case OPT_STEPS: o.max_steps = parse_u64("--steps", optarg, 1, INT64_MAX); break;
        case OPT_TOKENS: o.max_tokens = parse_u64("--tokens", optarg, 1, INT64_MAX); break;
        case OPT_UNIT:
            if (strcmp(optarg, "steps") && strcmp(optarg, "tokens"))
                cli_usage(&PROG, "--unit: expected steps or tokens, got '%s'", optarg);
            unit_tokens = strcmp(optarg, "tokens") == 0;
            break;
        case OPT_LR: o.lr.peak = parse_double("--lr", optarg, 0, 1e6); break;
        case OPT_WARMUP: o.lr.warmup = (double)parse_u64("--warmup", optarg, 0, INT64_MAX); break;
        case OPT_DECAY_START:
            o.lr.decay_start = (double)parse_u64("--decay-start", optarg, 0, INT64_MAX);
            break;
        case OPT_DECAY_END:
            o.lr.decay_end = (double)parse_u64("--decay-end", optarg, 1, INT64_MAX);
            break;
        case OPT_FINAL_LR:
            o.lr.final = parse_double("--final-lr", optarg, 0, 10);
            have_final_lr = 1;
            break;
        case OPT_TAIL_START:
            o.lr.tail_start = (double)parse_u64("--tail-start", optarg, 1, INT64_MAX);
            break;
        case OPT_TAIL_LR: o.lr.tail = parse_double("--tail-lr", optarg, 0, 10); break;
        case OPT_WD: o.adam.weight_decay = parse_double("--weight-decay", optarg, 0, 10); break;
        case OPT_BETA1: o.adam.beta1 = parse_double("--beta1", optarg, 0, 0.999999); break;
        case OPT_BETA2: o.adam.beta2 = parse_double("--beta2", optarg, 0, 0.999999); break;
        case OPT_CLIP: o.clip = parse_double("--clip", optarg, 0, 1e9); break;
        case OPT_GAMMA: o.gamma.before = parse_double("--gamma", optarg, 0, 1); break;
        case OPT_GAMMA_UNTIL:
            o.gamma.at = (double)parse_u64("--gamma-until", optarg, 1, INT64_MAX);
            break;
        case OPT_MTP: {
            char *comma = strchr(optarg, ',');
            if (comma)
                *comma = 0;
            o.mtp_weight.before = parse_double("--mtp-weight", optarg, 0, 100);
            o.mtp_weight.after = comma ? parse_double("--mtp-weight", comma + 1, 0, 100)
                                       : o.mtp_weight.before;
            break;
        }
        case OPT_MTP_SWITCH:
            o.mtp_weight.at = (double)parse_u64("--mtp-switch", optarg, 1, INT64_MAX);
            break;
        case OPT_ALPHA: o.alpha = parse_double("--balance-alpha", optarg, 0, 100); break;
        case OPT_PEAK: o.peak_tflops = parse_double("--peak-tflops", optarg, 0, 1e6); break;
        case OPT_SKIP: o.skip_nonfinite = 1; break;
        case OPT_EVAL_EVERY: o.eval_every = parse_u64("--eval-every", optarg, 1, INT64_MAX); break;
        case OPT_EVAL_BATCHES:
            o.eval_batches = parse_u64("--eval-batches", optarg, 1, 1u << 30);
            break;
        case OPT_SAVE_EVERY: o.save_every = parse_u64("--save-every", optarg, 1, INT64_MAX); break;
        case OPT_KEEP: o.keep = (int)parse_u64("--keep", optarg, 0, 1000000); break;
        case OPT_RESUME: o.resume = 1; break;
        case OPT_FORCE: o.force = 1; break;
        case OPT_SFT: o.sft = 1; break;
        case OPT_DOC_MASK: o.doc_mask = 1; break;
        case OPT_EP: o.ep = (int)parse_u64("--ep", optarg, 1, 1u << 20); break;
        case OPT_ROUTE_NODES:
            o.route_nodes = (int)parse_u64("--route-nodes", optarg, 1, 1u << 20);
            break;
        case OPT_ROUTE_GROUPS:
            o.route_groups = (int)parse_u64("--route-groups", optarg, 1, 1u << 20);
            break;
        case OPT_SFT_ASSIST:
            o.sft_assistant_id = (int64_t)parse_u64("--sft-assistant-id", optarg, 0, UINT32_MAX);
            break;
        case OPT_SFT_USER:
            o.sft_user_id = (int64_t)parse_u64("--sft-user-id", optarg, 0, UINT32_MAX);
            break;
        default:
            cli_usage(&PROG, "unexpected option");
        }
    }
    if (optind < argc)
        cli_usage(&PROG, "unexpected argument '%s'", argv[optind]);
    if (!o.data)
        cli_usage(&PROG, "missing --data DIR");
    if (!o.run)
        cli_usage(&PROG, "missing --output DIR");
    if (!o.config && !o.init_from && !o.resume)
        cli_usage(&PROG, "missing --config FILE (or --init-from DIR, or --resume)");
    o.cuda = device < 0 ? gpu_count() > 0 : device;
    if (o.fp8 && !o.cuda)
        cli_usage(&PROG, "--fp8 needs --device cuda");
    if (o.fp8_min_dim >= 0 && !o.fp8)
        cli_usage(&PROG, "--fp8-min-dim needs --fp8");
    if (o.recompute && !o.cuda)
        cli_usage(&PROG, "--recompute needs --device cuda (the CPU backend keeps every "
                         "activation)");
    if (o.cuda && gpu_count() <= 0)
        cli_failf(&PROG, "--device cuda: no GPU found for the GPU backend%s; use --device cpu",
                  gpu_compiled() ? "" : " (this dsv3 was built without CUDA)");
    if (!o.max_steps && !o.max_tokens)
        cli_usage(&PROG, "missing --steps N or --tokens N");
    if (o.global_batch && o.global_tokens)
        cli_usage(&PROG, "--global-batch and --global-batch-tokens exclude each other");
    if (o.global_batch && o.global_batch % o.micro_batch)
        cli_usage(&PROG, "--global-batch %" PRIu64 " is not a multiple of --batch %u",
                  o.global_batch, o.micro_batch);
    if (o.sft && o.sft_assistant_id < 0)
        cli_usage(&PROG, "--sft needs --sft-assistant-id");
    if (!o.sft && (o.sft_assistant_id >= 0 || o.sft_user_id >= 0))
        cli_usage(&PROG, "--sft-assistant-id and --sft-user-id need --sft");
    if (o.init_from && o.resume)
        cli_usage(&PROG, "--init-from and --resume exclude each other (a resume takes the "
                  "checkpoint's weights)");
    sched_unit u = unit_tokens ? SCHED_TOKENS : SCHED_STEPS;
    o.lr.unit = o.gamma.unit = o.mtp_weight.unit = o.ramp_unit = u;
    if (!have_final_lr)
        o.lr.final = o.lr.peak / 10;
    if (o.lr.decay_end > 0 && o.lr.decay_start == 0)
        o.lr.decay_start = o.lr.warmup;
    char why[200];
    if (sched_lr_check(&o.lr, why, sizeof why))
        cli_usage(&PROG, "learning-rate schedule: %s", why);
    if (ramp) {
        char *colon = strchr(ramp, ':');
        if (!colon)
            cli_usage(&PROG, "--batch-ramp: expected FIRST:SPAN, got '%s'", ramp);
        *colon = 0;
        o.ramp_first = parse_u64("--batch-ramp", ramp, 1, 1ull << 40);
        o.ramp_span = (double)parse_u64("--batch-ramp", colon + 1, 1, INT64_MAX);
    }
    const char *epfail = getenv("DSV3_TRAIN_EP_FAIL");  /* test aid "RANK:N", see train.h */
    if (epfail && sscanf(epfail, "%d:%d", &o.ep_fail_rank, &o.ep_fail_at) != 2)
        o.ep_fail_at = 0;
    const char *crash = getenv("DSV3_TRAIN_CRASH_IN_SAVE");  /* test aid, see train.h */
    if (crash)
        o.crash_in_save = atoi(crash);
    /* Joins the job the launcher started (mpirun, srun, torchrun-style variables; alone
     * otherwise): every rank parsed the same arguments, so usage errors stop them all
     * before this point. */
    dsv3_err e;
    comm *job;
    if (comm_open(&job, COMM_CPU, &e))
        cli_fail(&PROG, &e);
    int rank = comm_rank(job), world = comm_world(job);
    check_ep(&o, world);
    o.comm = job;
    o.log = common.quiet ? NULL : stderr;
    o.out = common.quiet ? NULL : stdout;
    char *command = join_args(argc, argv);
    o.command = command;
    o.stop = &stop_requested;

    train_result r;
    int rc = train_run(&o, &r, &e);
    free(command);
    comm_close(job);
    if (rc) {
        if (world > 1)
            err_prefix(&e, "rank %d of %d", rank, world);
        /* Launchers (mpirun, srun, torchrun) kill the job at the first failed exit: a rank
         * that only stopped for another's failure says so at once, then leaves last, so
         * the failing rank's own message reaches the log too. */
        if (world > 1 && strstr(e.msg, MODEL_EP_PEER_FAILED)) {
            fprintf(stderr, "%s: %s\n", PROG.name, e.msg);
            fflush(stderr);
            sleep(3);
            return CLI_EXIT_FAILURE;
        }
        cli_fail(&PROG, &e);
    }
    if (!common.quiet && rank == 0)
        fprintf(stderr, "dsv3-train: %s after step %" PRIu64 " (%" PRIu64 " tokens), loss %.6f; "
                "checkpoint %s/%s\n", r.stopped ? "stopped by a signal" : "done", r.step,
                r.tokens, r.loss, o.run, r.checkpoint[0] ? r.checkpoint : "(none)");
    return CLI_EXIT_OK;
}
