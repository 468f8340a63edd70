#!/bin/sh
# dsv3-tok against tiktoken and HF tokenizers on the same vocabulary, the same text and the
# same machine, in one run: training time and peak memory, identical ids document by
# document, encode MB/s per thread count. Not part of `make test`; needs python3 with
# tokenizers and tiktoken (no network: the vocabulary is trained here).
#
#   PYTHON=/tmp/tokvenv/bin/python scripts/bench-tok.sh
#
# Environment (defaults):
#   PYTHON=python3      the interpreter with tokenizers and tiktoken
#   CORPUS_MB=100       size of the mixed corpus (scripts/bench-tok.py corpus): C headers and
#                       Python source, /usr/share/doc text, gettext translations (many
#                       scripts), and seeded generated text (mixed scripts, NFD combining
#                       marks, emoji sequences); one JSONL record per file, cut at 64 KB
#   MERGES=32000        merges learned by both trainers on the whole corpus
#   THREADS="1 NPROC"   thread counts for the encode rates
#   PARITY="hf tiktoken-cl100k tiktoken-o200k export"   which comparisons the parity step runs
#   SPEED_MB=all        time encoding on the first documents of the corpus, about this many MB
#   STEPS="train parity speed"   which parts to run (train is needed for the vocabulary)
#   SHARD=PATH          also encode the corpus with dsv3-tok's trained vocabulary into this
#                       shard (for scripts/bench-shard.sh PATH: the ratio on real tokens)
#   WORK=DIR            keep the corpus and vocabularies there (default: a temporary folder)
#   BUILD=build         where bin/dsv3-tok is
#   OLD=PATH            speed: also time this other dsv3-tok binary (e.g. an older build) on
#                       the one-file-per-document row, for a before/after comparison
#   STATS=1             speed: print dsv3-tok's --stats line (seconds per stage) for each cell
#   PEERS="hf tiktoken" speed: which Python rows to time (PEERS= none: only dsv3-tok)
set -eu
PY=${PYTHON:-python3}
MB=${CORPUS_MB:-100}
MERGES=${MERGES:-32000}
NT=$(nproc)
THREADS=${THREADS:-"1 $NT"}
STEPS=${STEPS:-"train parity speed"}
BUILD=${BUILD:-build}
T="$(cd "$BUILD/bin" && pwd)/dsv3-tok"
BT="$(cd "$(dirname "$0")" && pwd)/bench-tok.py"
if [ -n "${WORK:-}" ]; then W=$WORK; mkdir -p "$W"; else W=$(mktemp -d); trap 'rm -rf "$W"' EXIT; fi
has() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# wall seconds, CPU seconds and peak RSS (MiB) of a command, its stdout in $W/out.txt
timed() {
    "$PY" "$BT" time "$W/out.txt" "$@" 2> "$W/time.txt" || { cat "$W/time.txt" >&2; exit 1; }
    set -- $(tail -n 1 "$W/time.txt")
    wall=$1 cpu=$2 rss=$3
}

echo "# $(date -u '+%F %H:%M') UTC, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $NT threads, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $("$PY" -c 'import tiktoken, tokenizers; print("tiktoken", tiktoken.__version__, "tokenizers", tokenizers.__version__)')"
[ -s "$W/corpus.jsonl" ] || "$PY" "$BT" corpus "$W" "$MB"
bytes=$(( $(wc -c < "$W/corpus.txt") - $(wc -l < "$W/corpus.jsonl") + 1 ))
echo "corpus: $(wc -l < "$W/corpus.jsonl") documents, $bytes bytes of text"

# ---- training: the same text, the same number of merges, all threads
if has train || [ ! -s "$W/hf.json" ]; then
    timed "$PY" "$BT" hf-train "$W/corpus.txt" "$MERGES" "$W/hf.json"
    echo "train $MERGES merges: HF tokenizers BpeTrainer $wall s (CPU $cpu s), peak RSS $rss MiB ($(cat "$W/out.txt"))"
    timed "$T" train --merges "$MERGES" --min-frequency 1 --no-default-specials -i text -o "$W/ds.tok" "$W/corpus.txt"
    echo "train $MERGES merges: dsv3-tok train $wall s (CPU $cpu s), peak RSS $rss MiB"
    grep 'dsv3-tok:' "$W/time.txt" | sed 's/^/  /' || true
fi
if [ -n "${SHARD:-}" ]; then
    "$T" encode -i jsonl -t "$W/ds.tok" -o "$SHARD" "$W/corpus.jsonl"
fi

# ---- the vocabularies: HF's as tokenizer.json and as tiktoken ranks (rank = HF id)
"$T" import --quiet -o "$W/hf.tok" "$W/hf.json"
"$PY" "$BT" ranks "$W/hf.json" "$W/tt.tiktoken"
"$T" import --quiet -p cl100k --no-default-specials -o "$W/cl100k.tok" "$W/tt.tiktoken"
"$T" import --quiet -p o200k --no-default-specials -o "$W/o200k.tok" "$W/tt.tiktoken"

# ---- identical ids, every document: dsv3-tok writes a line of ids per document
if has parity; then
    fail=0
    for k in "hf hf.json hf.tok" "tiktoken-cl100k tt.tiktoken cl100k.tok" "tiktoken-o200k tt.tiktoken o200k.tok"; do
        set -- $k
        case " ${PARITY:-hf tiktoken-cl100k tiktoken-o200k export} " in *" $1 "*) ;; *) continue ;; esac
        "$T" encode --quiet -i jsonl --ids -t "$W/$3" "$W/corpus.jsonl" > "$W/ids.txt"
        "$PY" "$BT" parity "$1" "$W/$2" "$W/corpus.jsonl" "$W/ids.txt" || fail=1
    done
    [ -s "$W/ds.tok" ] && case " ${PARITY:-export} " in *" export "*)
        # dsv3-tok's own vocabulary, exported, loaded by HF tokenizers
        "$T" export --quiet -t "$W/ds.tok" -o "$W/ds.json"
        "$T" encode --quiet -i jsonl --ids -t "$W/ds.tok" "$W/corpus.jsonl" > "$W/ids.txt"
        printf 'dsv3-tok train -> export -> '
        "$PY" "$BT" parity hf "$W/ds.json" "$W/corpus.jsonl" "$W/ids.txt" || fail=1
    esac
    rm -f "$W/ids.txt"
    [ $fail -eq 0 ] || echo "PARITY FAILED (the script exits 1 at the end)"
fi

# ---- encode MB/s (dsv3-tok: the whole program, JSONL in, compressed shard out). Each cell:
# wall-clock MB/s, and in brackets MB per CPU second (user + system, all threads): on a
# shared machine the second is the fairer per-thread figure.
if has speed; then
    if [ -n "${SPEED_MB:-}" ]; then
        LC_ALL=C awk -v max="${SPEED_MB}000000" '{ n += length($0) } n > max { exit } { print }' "$W/corpus.jsonl" > "$W/speed.jsonl"
    else
        cp "$W/corpus.jsonl" "$W/speed.jsonl"
    fi
    bytes=$("$PY" -c 'import json, sys; print(sum(len(json.loads(l)["text"].encode()) for l in open(sys.argv[1], encoding="utf-8")))' "$W/speed.jsonl")
    echo "encode: $(wc -l < "$W/speed.jsonl") documents, $bytes bytes of text"
    # the same documents as files, so a row of dsv3-tok does no JSON parsing (neither do the
    # Python rows: their documents are parsed before the clock starts)
    rm -rf "$W/speed-docs" && mkdir "$W/speed-docs"
    "$PY" -c 'import json, sys
for i, l in enumerate(open(sys.argv[1], encoding="utf-8")):
    open("%s/%06d.txt" % (sys.argv[2], i), "w", encoding="utf-8", newline="").write(json.loads(l)["text"])' "$W/speed.jsonl" "$W/speed-docs"
    printf '%-38s' "encode MB/s (MB/CPU-s), threads:"; for t in $THREADS; do printf '%16s' "$t"; done; echo
    cell() { printf '%16s' "$(echo "$1 $2" | awk '{ printf "%.1f (%.1f)", $1, $2 }')"; }
    rows="$T|hf.tok|DeepSeek-V3|jsonl $T|hf.tok|DeepSeek-V3|files $T|cl100k.tok|cl100k|files"
    [ -n "${OLD:-}" ] && rows="$rows $OLD|hf.tok|DeepSeek-V3|files-OLD"
    : > "$W/stats.txt"
    for k in $rows; do
        IFS='|'; set -- $k; unset IFS
        printf '%-38s' "dsv3-tok ($3 pattern, $4)"
        for t in $THREADS; do
            st=; [ -n "${STATS:-}" ] && [ "$4" != files-OLD ] && st=--stats
            if [ "$4" = jsonl ]; then
                timed "$1" encode --quiet $st -i jsonl -j "$t" -t "$W/$2" -o - "$W/speed.jsonl"
            else
                timed "$1" encode --quiet $st -i text -j "$t" -t "$W/$2" -o - "$W"/speed-docs/*
            fi
            cell $(echo "$bytes $wall $cpu" | awk '{ print $1 / 1e6 / $2, $1 / 1e6 / $3 }')
            [ -n "$st" ] && sed -n "s/^dsv3-tok: stats: /  $3 $4 -j $t: /p" "$W/time.txt" >> "$W/stats.txt"
        done; echo
    done
    cat "$W/stats.txt"
    case " ${PEERS-hf tiktoken} " in *" hf "*)
        printf '%-38s' "HF tokenizers (DeepSeek-V3 pattern)"
        for t in $THREADS; do cell $(RAYON_NUM_THREADS=$t "$PY" "$BT" speed hf "$W/hf.json" "$W/speed.jsonl" "$t"); done; echo
    esac
    case " ${PEERS-hf tiktoken} " in *" tiktoken "*)
        printf '%-38s' "tiktoken (cl100k pattern)"
        for t in $THREADS; do cell $("$PY" "$BT" speed tiktoken-cl100k "$W/tt.tiktoken" "$W/speed.jsonl" "$t"); done; echo
    esac
fi
[ "${fail:-0}" -eq 0 ]
