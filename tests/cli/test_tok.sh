#!/bin/sh
# CLI tests of dsv3-tok: train/encode/decode round trips, conventions (--help, --version,
# usage errors, bad input messages, no half-written output), determinism across thread
# counts, JSONL handling, import/export round trips, a 100 MB line. Prints ok/not ok lines.
set -u
T="$DSV3_BIN/dsv3-tok"
S="$DSV3_BIN/dsv3-shard"
FIX="$(pwd)/tests/fixtures/tok"
W=$(mktemp -d) && trap 'rm -rf "$W"' EXIT
cd "$W" || exit 1

ok() { echo "ok $1"; }
no() { echo "not ok $1${2:+: $2}"; }
check() { name=$1; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else no "$name"; fi; }

# a corpus: licenses (prose), our C sources (code), some CJK and emoji
cat /usr/share/common-licenses/* > corpus.txt 2>/dev/null
cat "$FIX/../../../lib/"*.c >> corpus.txt
printf '中文文本和日本語のテキスト。😀👍🏽 Привет мир 12345\n' >> corpus.txt

check help "$T" --help
"$T" --version | grep -q '^dsv3-tok ' && ok version || no version
"$T" frobnicate >/dev/null 2>&1; [ $? -eq 2 ] && ok usage_unknown_command || no usage_unknown_command
"$T" encode corpus.txt >/dev/null 2>&1; [ $? -eq 2 ] && ok usage_missing_tokenizer || no usage_missing_tokenizer

"$T" train --quiet --merges 1500 -j 1 -o tok1.tok corpus.txt && ok train || no train
"$T" train --quiet --merges 1500 -j 2 -o tok2.tok corpus.txt
cmp -s tok1.tok tok2.tok && ok train_same_bytes_any_threads || no train_same_bytes_any_threads
"$T" info tok1.tok | grep -q 'merges:       1500' && ok info || no info
"$T" info tok1.tok | grep -q 'begin▁of▁sentence' && ok default_specials || no default_specials

"$T" encode --quiet -t tok1.tok corpus.txt -o c.shard && "$T" decode -t tok1.tok c.shard > back.txt
cmp -s back.txt corpus.txt && ok roundtrip_text || no roundtrip_text
"$S" verify --quiet c.shard && ok shard_valid || no shard_valid

# lines mode, threads: same shard bytes with 1 and 2 threads, one record per line
"$T" encode --quiet -t tok1.tok -i lines -j 1 corpus.txt -o l1.shard
"$T" encode --quiet -t tok1.tok -i lines -j 2 corpus.txt -o l2.shard
cmp -s l1.shard l2.shard && ok encode_same_bytes_any_threads || no encode_same_bytes_any_threads
n=$("$S" dump l1.shard | wc -l); [ "$n" -eq "$(wc -l < corpus.txt)" ] && ok lines_records || no lines_records "$n"
"$T" decode -t tok1.tok --sep '\n' l1.shard | cmp -s - corpus.txt && ok roundtrip_lines || no roundtrip_lines

# --bos/--eos and --ids
ids=$("$T" encode -t tok1.tok --ids --bos --eos -e "hello")
case "$ids" in "0 "*" 1") ok bos_eos ;; *) no bos_eos "$ids" ;; esac
echo "$ids" | "$T" decode -t tok1.tok --skip-special | grep -qx hello && ok decode_ids || no decode_ids

# special strings in user text stay text unless --allow-special
sp='<｜end▁of▁sentence｜>'
plain=$("$T" encode -t tok1.tok --ids -e "a${sp}b")
allow=$("$T" encode -t tok1.tok --ids --allow-special -e "a${sp}b")
case " $plain " in *" 1 "*) no special_not_injected "$plain" ;; *) ok special_not_injected ;; esac
case " $allow " in *" 1 "*) ok allow_special ;; *) no allow_special "$allow" ;; esac

# --split-combined: seeded, and still decodes to the text
"$T" encode --quiet -t tok1.tok --split-combined 0.5 --seed 7 corpus.txt -o s1.shard
"$T" encode --quiet -t tok1.tok --split-combined 0.5 --seed 7 -j 1 corpus.txt -o s2.shard
cmp -s s1.shard s2.shard && ok split_combined_seeded || no split_combined_seeded
"$T" decode -t tok1.tok s1.shard | cmp -s - corpus.txt && ok split_combined_roundtrip || no split_combined_roundtrip
cmp -s s1.shard c.shard && no split_combined_changes || ok split_combined_changes

# JSONL: a bad record names file and line, writes nothing; --skip-bad counts
printf '{"text":"one"}\n{"text":"two"}\n{"txt":"x"}\n{"text":"three"}\n' > d.jsonl
"$T" encode -t tok1.tok d.jsonl -o bad.shard 2> err.txt; rc=$?
[ $rc -eq 1 ] && grep -q 'd.jsonl, line 3' err.txt && [ ! -e bad.shard ] && ok jsonl_bad_record || no jsonl_bad_record "rc=$rc $(cat err.txt)"
"$T" encode -t tok1.tok --skip-bad d.jsonl -o good.shard 2> err.txt
grep -q 'skipped 1 bad' err.txt && [ "$("$T" decode -t tok1.tok --sep ' ' good.shard)" = "one two three " ] \
    && ok jsonl_skip_bad || no jsonl_skip_bad
printf '{"body":"field"}\n' | "$T" encode -t tok1.tok -f body --ids | "$T" decode -t tok1.tok | grep -qx field \
    && ok jsonl_field || no jsonl_field

# a damaged tokenizer file is refused with a message
head -c 200 tok1.tok > cut.tok
"$T" encode -t cut.tok -e x --ids 2> err.txt; rc=$?
[ $rc -eq 1 ] && grep -q '^dsv3-tok: cut.tok: ' err.txt && ok damaged_tokenizer || no damaged_tokenizer "$(cat err.txt)"

# empty input: one empty document
: > empty.txt
"$T" encode --quiet -t tok1.tok empty.txt -o e.shard && [ "$("$S" dump e.shard)" = "" ] && ok empty_input || no empty_input

# import HF tokenizer.json, export it again, import that: same ids
"$T" import --quiet -o hf.tok "$FIX/hf-deepseek.json" && "$T" export --quiet -t hf.tok -o hf2.json \
    && "$T" import --quiet -o hf2.tok hf2.json && ok hf_import_export || no hf_import_export
a=$("$T" encode -t hf.tok --ids corpus.txt | md5sum); b=$("$T" encode -t hf2.tok --ids corpus.txt | md5sum)
[ "$a" = "$b" ] && ok hf_export_same_ids || no hf_export_same_ids
"$T" export --quiet -t tok1.tok --to tiktoken -o t.tiktoken && "$T" import --quiet -p deepseek-v3 -o tt.tok t.tiktoken \
    && "$T" encode -t tt.tok --ids -e "héllo wörld 12345" | "$T" decode -t tt.tok | grep -qx "héllo wörld 12345" \
    && ok tiktoken_export_import || no tiktoken_export_import
"$T" import -o x.tok t.tiktoken >/dev/null 2>&1; [ $? -eq 2 ] && ok tiktoken_needs_pattern || no tiktoken_needs_pattern

# random bytes (invalid UTF-8) round trip
head -c 300000 /dev/urandom > rnd.bin
"$T" encode --quiet -t hf.tok rnd.bin -o r.shard && "$T" decode -t hf.tok r.shard | cmp -s - rnd.bin \
    && ok roundtrip_random_bytes || no roundtrip_random_bytes

# one 100 MB line without a newline
yes 'Words, numbers 1234567 and 中文 text; emoji 😀 — ' | tr -d '\n' | head -c 100000000 > big.txt
"$T" encode --quiet -t tok1.tok big.txt -o big.shard && "$T" decode -t tok1.tok big.shard | cmp -s - big.txt \
    && ok huge_line || no huge_line
# training reads a 100 MB line in pieces (memory bounded by the piece, not the file)
"$T" train --merges 300 -j 2 -o big.tok big.txt 2> err.txt && grep -q ' 2[0-9] documents or pieces' err.txt \
    && ok train_huge_line_in_pieces || no train_huge_line_in_pieces "$(cat err.txt)"

# training input forms: standard input is a document like a file; a JSONL field like lines
cat corpus.txt | "$T" train --quiet --merges 1500 -j 1 -o stdin.tok - && cmp -s stdin.tok tok1.tok \
    && ok train_stdin_same_as_file || no train_stdin_same_as_file
head -n 400 corpus.txt | tr -d '\f\r\t' > part.txt
sed 's/\\/\\\\/g; s/"/\\"/g; s/^/{"body": "/; s/$/"}/' part.txt > part.jsonl
"$T" train --quiet --merges 400 -i lines -o pl.tok part.txt && "$T" train --quiet --merges 400 -f body -o pj.tok part.jsonl \
    && cmp -s pl.tok pj.tok && ok train_jsonl_field_same_as_lines || no train_jsonl_field_same_as_lines

# --max-words caps the distinct pre-tokens held, says how many it dropped, and the result
# still encodes every byte; the summary reports the tables' size and peak memory
"$T" train --merges 500 --max-words 1000 -o mw.tok corpus.txt 2> err.txt
d=$(sed -n 's/.* \([0-9]*\) distinct pre-tokens (\([0-9]*\) dropped by --max-words).*/\1 \2/p' err.txt)
set -- $d
[ "${1:-0}" -gt 0 ] && [ "$1" -le 1000 ] && [ "${2:-0}" -gt 0 ] && grep -q 'peak RSS [0-9.]* MiB' err.txt \
    && ok train_max_words_reported || no train_max_words_reported "$(cat err.txt)"
"$T" encode --quiet -t mw.tok corpus.txt | "$T" decode -t mw.tok | cmp -s - corpus.txt \
    && ok train_max_words_roundtrip || no train_max_words_roundtrip
"$T" train --quiet --merges 500 -o nomw.tok corpus.txt && ! cmp -s mw.tok nomw.tok \
    && ok train_max_words_changes_counts || no train_max_words_changes_counts
"$T" train --progress --merges 500 -o pr.tok corpus.txt 2>&1 | tr '\r' '\n' | grep -q 'merges/s' \
    && ok train_progress_rate || no train_progress_rate

# --split-combined: another seed draws other splits; P=0 is plain encoding
"$T" encode --quiet -t tok1.tok --split-combined 0.5 --seed 8 corpus.txt -o s3.shard
cmp -s s1.shard s3.shard && no split_combined_seed_matters || ok split_combined_seed_matters
"$T" encode --quiet -t tok1.tok --split-combined 0 --seed 8 corpus.txt -o s0.shard
cmp -s s0.shard c.shard && ok split_combined_zero_is_plain || no split_combined_zero_is_plain
# --split-combined 1 splits every punctuation+line-break piece: ".\n" is one token of this
# vocabulary, and becomes "." then "\n"
n0=$("$T" encode -t tok1.tok --ids --split-combined 0 -e "end.
next" | wc -w)
"$T" encode -t tok1.tok --ids --split-combined 1 -e "end.
next" > one.ids
n1=$(wc -w < one.ids)
tr ' ' '\n' < one.ids | while read -r id; do echo "$id" | "$T" decode -t tok1.tok; echo; done > pieces.txt
[ "$n1" -eq $((n0 + 1)) ] && grep -q '^\.$' pieces.txt && ok split_combined_one_splits_all \
    || no split_combined_one_splits_all "$n0 $n1 $(cat pieces.txt)"

# JSONL records are parsed on several threads: escapes decode the same on any thread count,
# the first bad record (by line) is the one reported, and a batch of nothing but bad records
# (17 MB, more than one batch) does not end the input early under --skip-bad
awk 'BEGIN { for (i = 1; i <= 20000; i++)
    printf "{\"id\": %d, \"text\": \"rec %d: caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\\\ tab\\tend\\nnext\"}\n", i, i }' > many.jsonl
awk 'BEGIN { for (i = 1; i <= 20000; i++) printf "rec %d: café 😀 \"q\" \\ tab\tend\nnext\n", i }' > many.txt
"$T" encode --quiet -t tok1.tok -j 1 many.jsonl -o m1.shard && "$T" encode --quiet -t tok1.tok -j 2 many.jsonl -o m2.shard \
    && cmp -s m1.shard m2.shard && ok jsonl_threads_same_bytes || no jsonl_threads_same_bytes
"$T" decode -t tok1.tok --sep '\n' m2.shard | cmp -s - many.txt && ok jsonl_escapes_decoded || no jsonl_escapes_decoded
sed -e '12345s/.*/{"text": 5}/' -e '17000s/.*/{"text": "unterminated/' many.jsonl > twobad.jsonl
"$T" encode -t tok1.tok -j 2 twobad.jsonl -o tb.shard 2> err.txt; rc=$?
[ $rc -eq 1 ] && grep -q 'no string field "text" (twobad.jsonl, line 12345)' err.txt && [ ! -e tb.shard ] \
    && ok jsonl_first_bad_line_threads || no jsonl_first_bad_line_threads "$(cat err.txt)"
sed -e '12345d' twobad.jsonl | "$T" encode -t tok1.tok -j 2 -i jsonl - -o tb.shard 2> err.txt
grep -q 'bad JSON: .*<stdin>, line 16999)' err.txt && ok jsonl_bad_json_message || no jsonl_bad_json_message "$(cat err.txt)"
{ yes '{"txt": "not the field"}' | head -n 700000; echo '{"text": "after"}'; } > allbad.jsonl
"$T" encode -t tok1.tok -j 2 --skip-bad allbad.jsonl -o ab.shard 2> err.txt \
    && grep -q 'skipped 700000 bad' err.txt && [ "$("$T" decode -t tok1.tok ab.shard)" = after ] \
    && ok jsonl_skip_whole_batch || no jsonl_skip_whole_batch "$(cat err.txt)"

# --ids goes to standard output only: -o FILE with it is a usage error, and nothing is written
"$T" encode -t tok1.tok --ids -e hi -o ids.out >/dev/null 2>&1; rc=$?
[ $rc -eq 2 ] && [ ! -e ids.out ] && ok ids_with_output_is_usage_error || no ids_with_output_is_usage_error "rc=$rc"

# The output of the encode pipeline is the same bytes as before it (SHA-256 of what commit
# 80b737e's dsv3-tok wrote for these inputs), for any thread count: 3.5 MB (fixture cases
# eight times: more batches than threads), JSONL with split-combined; lines; --ids; and bad
# records skipped before split-combined documents (their seeds count written documents).
"$T" import --quiet -o g.tok "$FIX/hf-deepseek.json"
for i in 1 2 3 4 5 6 7 8; do cat "$FIX/cases.jsonl"; done > g.jsonl
awk 'NR%97==5{print "{bad json"} NR%89==3{print "{\"x\": 1}"} {print}' g.jsonl > gb.jsonl
golden() {   # name sha256 encode-arguments...
    name=$1 want=$2; shift 2
    for j in 1 3 7; do
        got=$("$T" encode --quiet -j $j -t g.tok "$@" | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || { no "$name" "-j $j: $got"; return; }
    done
    ok "$name"
}
golden golden_jsonl_split d9e6996b480ad866f4a1cc7df5546c0a06172a944021e345a6afc8cb7353c699 \
    -i jsonl --split-combined 0.3 --seed 5 -o - g.jsonl
golden golden_lines 1f0fcb148e43e29ae352f10dbd5d1897ead4575f03756fd18d7c63e0badd6e18 -i lines -o - g.jsonl
golden golden_ids c4477c21d5dd4e7b5304a56e08f06b65a67ab5daa21edc815399d329ee5a1b4b -i jsonl --ids g.jsonl
golden golden_skip_bad_split 604cf4fa484248eec88c843bfea844cd2d546d8358049ff1c251d9b7e6a84319 \
    -i jsonl --skip-bad --split-combined 0.4 --seed 9 -o - gb.jsonl
"$T" encode --stats -j 3 -t g.tok -o /dev/null g.jsonl 2> err.txt
grep -q 'stats: wall .* encode .* on 3 threads' err.txt && ok encode_stats || no encode_stats "$(cat err.txt)"
