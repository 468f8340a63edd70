# CLI tests of dsv3-pack: conventions, a folder from files and pipes, determinism, dedup
# counts, and bad input that must leave no output folder behind.
. "$(dirname "$0")/lib.sh"

expect help 0 dsv3-pack --help
check help_mentions_best_fit grep -q -- "--best-fit" "$T/out"
check help_mentions_near_dedup grep -q -- "--near-dedup" "$T/out"
check help_mentions_tokenizer grep -q -- "--tokenizer" "$T/out"
expect version 0 dsv3-pack --version
check version_line grep -q "^dsv3-pack [0-9]" "$T/out"
expect_err no_output 2 "missing --output" dsv3-pack --eos-id 0
expect_err no_eos 2 "missing --eos-id" dsv3-pack -o "$T/x"
expect_err bad_seq_len 2 "seq-len" dsv3-pack -o "$T/x" --eos-id 0 -L 0
expect_err bad_val 2 "val" dsv3-pack -o "$T/x" --eos-id 0 --val 1.5
expect_err unknown_option 2 "Try 'dsv3-pack --help'" dsv3-pack --bogus
check usage_no_output test ! -e "$T/x"

# A corpus of random documents, with every 7th line a repeat of an earlier one.
awk -v seed="$$" 'BEGIN { srand(seed); for (i = 0; i < 2000; i++) {
     if (i > 10 && i % 7 == 0) { print line[int(rand() * i)]; line[i] = ""; continue }
     n = int(rand() * 60); s = ""; for (j = 0; j < n; j++) s = s (j ? " " : "") int(rand() * 999);
     line[i] = s; print s } }' >"$T/ids.txt"
dsv3-shard make --vocab-size 1000 -o "$T/a.shard" "$T/ids.txt"
head -n 500 "$T/ids.txt" | dsv3-shard make --vocab-size 1000 -o "$T/b.shard"

expect pack_ok 0 dsv3-pack -o "$T/p1" --eos-id 999 -L 64 --val 0.1 --shard-tokens 2000 -s 5 "$T/a.shard" "$T/b.shard"
check pack_summary grep -q "2500 documents" "$T/err"
check manifest_exists test -f "$T/p1/manifest.json"
check shards_verify sh -c "dsv3-shard verify '$T/p1'/*.shard >/dev/null"
check several_shards test -f "$T/p1/train-00001.shard"
check val_shard test -f "$T/p1/val-00000.shard"
n_rec=$(for f in "$T"/p1/*-0*[0-9].shard; do dsv3-shard info "$f"; done | awk '/^records:/ { s += $2 } END { print s }')
check records_match_manifest grep -q "\"sequences\": $n_rec," "$T/p1/manifest.json"
# Token count: every input token plus one EOS per document is a new token somewhere.
in_tok=$(awk '{ s += NF } END { print s + NR }' "$T/ids.txt"); in_tok=$((in_tok + $(head -n 500 "$T/ids.txt" | awk '{ s += NF } END { print s + NR }')))
check tokens_in_manifest grep -q "\"tokens\": $in_tok," "$T/p1/manifest.json"

# Same seed, same bytes, through a pipe as well; another seed, another order.
dsv3-pack --quiet -o "$T/p2" --eos-id 999 -L 64 --val 0.1 --shard-tokens 2000 -s 5 - "$T/b.shard" <"$T/a.shard"
check same_seed_same_bytes cmp -s "$T/p1/train-00000.shard" "$T/p2/train-00000.shard"
dsv3-pack --quiet -o "$T/p3" --eos-id 999 -L 64 --val 0.1 --shard-tokens 2000 -s 6 "$T/a.shard" "$T/b.shard"
check other_seed_other_bytes sh -c "! cmp -s '$T/p1/train-00000.shard' '$T/p3/train-00000.shard'"

# Dedup: b.shard repeats a.shard's first 500 lines, and a.shard repeats itself.
dups=$(cat "$T/ids.txt" "$T/ids.txt" | head -n 2500 | awk '{ if (seen[$0]++) n++ } END { print n }')
expect dedup 0 dsv3-pack -o "$T/d" --eos-id 999 -L 64 --dedup "$T/a.shard" "$T/b.shard"
check dedup_stderr grep -q "dedup removed $dups documents" "$T/err"
check dedup_manifest grep -q "\"duplicate_documents\": $dups," "$T/d/manifest.json"
expect best_fit 0 dsv3-pack -o "$T/bf" --eos-id 999 --pad-id 998 -L 64 --best-fit "$T/a.shard"
check best_fit_manifest grep -q '"packing": "best-fit"' "$T/bf/manifest.json"

# Bad input: exit 1, 'dsv3-pack: message', no output folder, no temporary folder.
head -n 100 "$T/ids.txt" | dsv3-shard make --vocab-size 2000 -o "$T/v.shard"
expect_err vocab_mismatch 1 "^dsv3-pack: .*v.shard: .*vocabulary 2000 differs from .*a.shard" dsv3-pack -o "$T/bad" --eos-id 0 "$T/a.shard" "$T/v.shard"
check vocab_mismatch_no_folder test ! -e "$T/bad"
size=$(wc -c <"$T/a.shard")
head -c $((size / 2)) "$T/a.shard" >"$T/trunc.shard"
expect_err damaged 1 "^dsv3-pack: .*trunc.shard" dsv3-pack -o "$T/bad" --eos-id 0 "$T/trunc.shard"
check damaged_no_folder test ! -e "$T/bad"
expect_err damaged_pipe 1 "^dsv3-pack: <stdin>: .*truncated" sh -c "dsv3-pack -o '$T/bad' --eos-id 0 <'$T/trunc.shard'"
check damaged_pipe_no_folder test ! -e "$T/bad"
: | dsv3-shard make -o "$T/empty.shard"
expect_err empty 1 "^dsv3-pack: no documents" dsv3-pack -o "$T/bad" --eos-id 0 "$T/empty.shard"
check empty_no_folder test ! -e "$T/bad"
expect_err eos_outside_vocab 1 "EOS id 1000 is not below" dsv3-pack -o "$T/bad" --eos-id 1000 "$T/a.shard"
expect_err packed_input 1 "reads document streams" dsv3-pack -o "$T/bad" --eos-id 0 "$T/p1/train-00000.shard"
expect_err exists 1 "already exists" dsv3-pack -o "$T/p1" --eos-id 0 "$T/a.shard"
expect_err missing 1 "nope.shard: cannot open" dsv3-pack -o "$T/bad" --eos-id 0 "$T/nope.shard"
check no_folder_at_all test ! -e "$T/bad"
check no_temporary_folders sh -c "! ls -a '$T' | grep -q '\.tmp\.'"

# Fill-in-the-Middle: ids required, must be in the vocabulary, counts in the manifest.
expect_err fim_needs_ids 2 "need --fim-ids" dsv3-pack -o "$T/bad" --eos-id 0 --fim 0.1 "$T/a.shard"
expect_err fim_bad_ids 2 "fim-ids" dsv3-pack -o "$T/bad" --eos-id 0 --fim 0.1 --fim-ids 1,2 "$T/a.shard"
expect_err fim_rates 2 "exceed 1" dsv3-pack -o "$T/bad" --eos-id 0 --fim 0.6 --fim-spm 0.6 --fim-ids 1,2,3 "$T/a.shard"
expect_err fim_not_in_vocab 1 "FIM token 1000 is not in the vocabulary" dsv3-pack -o "$T/bad" --eos-id 0 --fim 0.1 --fim-ids 997,998,1000 "$T/a.shard"
check fim_no_folder test ! -e "$T/bad"
expect fim 0 dsv3-pack -o "$T/fim" --eos-id 999 --fim 0.5 --fim-spm 0.2 --fim-ids 996,997,998 "$T/a.shard"
check fim_counts grep -q '"fim_psm_documents": [1-9]' "$T/fim/manifest.json"
expect fim_code_only 0 dsv3-pack -o "$T/fimc" --eos-id 999 --fim 0.5 --fim-code-only --fim-ids 996,997,998 "$T/a.shard"
check fim_code_only_none grep -q '"fim_psm_documents": 0' "$T/fimc/manifest.json"

# Near-dedup on planted near-duplicates (scripts/neardup.py): counts reported, precision and
# recall within bounds (measured: precision 1.0, recall 0.99+ at Jaccard >= 0.8).
ND="$(dirname "$0")/../../scripts/neardup.py"
if ! command -v python3 >/dev/null 2>&1; then
    echo "skip near_precision_recall: no python3 for scripts/neardup.py"
else
    python3 "$ND" gen "$T/nd" --unrelated 400 --pairs 6 --clusters 10 --len 200 --seed $$ 2>/dev/null
    dsv3-shard make --vocab-size 50000 -o "$T/nd.shard" "$T/nd/ids.txt"
    expect near 0 dsv3-pack -o "$T/ndp" --eos-id 0 -L 256 --dedup --near-dedup --log-removed -j 2 "$T/nd.shard"
    check near_stderr grep -q "near-dedup removed [1-9][0-9]* documents (.*) from [1-9][0-9]* clusters" "$T/err"
    check near_manifest grep -q '"near_duplicate_documents": [1-9]' "$T/ndp/manifest.json"
    check near_removed_list test "$(grep -c near "$T/ndp/removed.tsv")" -eq "$(sed -n 's/.*"near_duplicate_documents": \([0-9]*\).*/\1/p' "$T/ndp/manifest.json")"
    check near_precision_recall sh -c "python3 '$ND' score '$T/nd' '$T/ndp' --min-precision 0.97 --min-recall-high 0.9 >'$T/score' 2>&1 || { cat '$T/score'; false; }"
    expect near_params 0 dsv3-pack -o "$T/ndq" --eos-id 0 -L 256 --near-dedup --ngram 3 --bands 20 --rows 5 "$T/nd.shard"
    check near_params_manifest grep -q '"ngram": 3' "$T/ndq/manifest.json"
    expect_err near_bad_params 2 "exceed 1024 hashes" dsv3-pack -o "$T/bad" --eos-id 0 --near-dedup --bands 200 --rows 8 "$T/nd.shard"
fi

# -t TOKENIZER: EOS and FIM ids come from it, FIM cuts between characters, and streams of
# another tokenizer or a tokenizer without FIM tokens are refused.
{ cat /usr/share/common-licenses/GPL-3 2>/dev/null | head -n 300; printf 'Grüße aus Köln\n東京と大阪\n🙂 emoji line\n'; } >"$T/text.txt"
dsv3-tok train --quiet --merges 300 -j 1 -o "$T/tok.tok" "$T/text.txt"
dsv3-tok train --quiet --merges 200 -j 1 -o "$T/tok2.tok" "$T/text.txt"
dsv3-tok train --quiet --merges 300 -j 1 --no-default-specials -o "$T/plain.tok" "$T/text.txt"
tac "$T/text.txt" | sed 's/e/ee/g' >"$T/text4.txt"
dsv3-tok train --quiet --merges 300 -j 1 -o "$T/tok4.tok" "$T/text4.txt"
dsv3-tok encode --quiet -t "$T/tok.tok" -i lines -o "$T/t.shard" "$T/text.txt"
dsv3-tok encode --quiet -t "$T/tok2.tok" -i lines -o "$T/t2.shard" "$T/text.txt"
dsv3-tok encode --quiet -t "$T/plain.tok" -i lines -o "$T/t3.shard" "$T/text.txt"
dsv3-tok encode --quiet -t "$T/tok4.tok" -i lines -o "$T/t4.shard" "$T/text.txt"
expect tok_fim 0 dsv3-pack -o "$T/tf" -t "$T/tok.tok" --fim 0.5 --fim-spm 0.5 -L 128 "$T/t.shard"
check tok_fim_characters grep -q '"fim_cuts": "characters"' "$T/tf/manifest.json"
ndocs=$(sed -n 's/.*"documents": \([0-9]*\),.*/\1/p' "$T/tf/manifest.json" | head -n 1)
nfim=$(sed -n 's/.*"fim_\(psm\|spm\)_documents": \([0-9]*\).*/\2/p' "$T/tf/manifest.json" | awk '{ s += $1 } END { print s }')
check tok_fim_all_documents test "$ndocs" -eq "$nfim"
expect_err tok_other_vocab 1 "made by another tokenizer" dsv3-pack -o "$T/bad" -t "$T/tok.tok" "$T/t2.shard"
expect_err tok_other_id 1 "t4.shard: made by tokenizer [0-9a-f]*, not by" dsv3-pack -o "$T/bad" -t "$T/tok.tok" "$T/t4.shard"
expect_err tok_no_eos 1 "no end-of-sentence token; give --eos-id" dsv3-pack -o "$T/bad" -t "$T/plain.tok" "$T/t3.shard"
expect_err tok_no_fim 1 "has no <｜fim▁begin｜> token for FIM" dsv3-pack -o "$T/bad" -t "$T/plain.tok" --eos-id 1 --fim 0.1 "$T/t3.shard"
check tok_no_folder test ! -e "$T/bad"
