# CLI tests of dsv3-shard: conventions, round trips through files and pipes, damaged input.
. "$(dirname "$0")/lib.sh"

# Conventions: --help, --version, usage errors exit 2, run-time errors exit 1.
expect help 0 dsv3-shard --help
check help_mentions_commands grep -q "verify FILE" "$T/out"
expect version 0 dsv3-shard --version
check version_line grep -q "^dsv3-shard [0-9]" "$T/out"
expect_err no_command 2 "missing command" dsv3-shard
expect_err unknown_command 2 "unknown command" dsv3-shard frobnicate x
expect_err unknown_option 2 "Try 'dsv3-shard --help'" dsv3-shard info --bogus x
expect_err bad_number 2 "seq-len" dsv3-shard make -k packed -L 12x
expect_err packed_needs_len 2 "needs --seq-len" dsv3-shard make -k packed
expect_err missing_file 1 "nope.shard: cannot open" dsv3-shard verify "$T/nope.shard"

# Round trip: text -> shard -> text, through a file and through pipes.
awk 'BEGIN { srand(7); for (i = 0; i < 3000; i++) { n = int(rand() * 40); s = "";
     for (j = 0; j < n; j++) s = s (j ? " " : "") int(rand() * 129280); print s } }' >"$T/ids.txt"
expect make_file 0 dsv3-shard make --chunk-tokens 1000 -o "$T/a.shard" "$T/ids.txt"
expect dump_file 0 dsv3-shard dump "$T/a.shard"
check roundtrip_file cmp -s "$T/out" "$T/ids.txt"
dsv3-shard make --chunk-tokens 777 <"$T/ids.txt" | dsv3-shard dump - >"$T/piped.txt" 2>"$T/err"
check roundtrip_pipe cmp -s "$T/piped.txt" "$T/ids.txt"
expect verify_ok 0 dsv3-shard verify "$T/a.shard"
check verify_line grep -q "ok, 3000 records" "$T/out"
expect info 0 dsv3-shard info --chunks "$T/a.shard"
check info_records grep -q "^records: *3000" "$T/out"
check info_chunk_table grep -q "^0 80 0 0" "$T/out"

# Random access: --records A:B equals lines A+1..B of the text.
expect dump_range 0 dsv3-shard dump -r 1234:1240 "$T/a.shard"
sed -n '1235,1240p' "$T/ids.txt" >"$T/want.txt"
check dump_range_matches cmp -s "$T/out" "$T/want.txt"
dsv3-shard make <"$T/ids.txt" | dsv3-shard dump -r 5:7 - >"$T/out" 2>"$T/err"
check dump_range_pipe_needs_file grep -q "needs a regular file" "$T/err"

# Flags survive the round trip with -F.
printf '1\t5 6 7\n0\t\n3\t9\n' >"$T/flags.txt"
dsv3-shard make -F -o "$T/f.shard" "$T/flags.txt" && dsv3-shard dump -F "$T/f.shard" >"$T/out"
check flags_roundtrip cmp -s "$T/out" "$T/flags.txt"

# Packed kind.
printf '1 2 3\n4 5 6\n' | dsv3-shard make -k packed -L 3 -o "$T/p.shard"
check packed_info sh -c "dsv3-shard info '$T/p.shard' | grep -q 'seq_len: *3'"
expect_err packed_wrong_len 1 "sequence length 3" sh -c "printf '1 2 3\n4 5\n' | dsv3-shard make -k packed -L 3 -o '$T/p2.shard'"
check packed_wrong_len_no_output test ! -e "$T/p2.shard"

# Bad input to make: error names file:line:column, exit 1, no output file.
printf '1 2\n3 x 4\n' >"$T/bad.txt"
expect_err make_bad_text 1 "bad.txt:2:3: expected a token id" dsv3-shard make -o "$T/bad.shard" "$T/bad.txt"
check make_bad_no_output test ! -e "$T/bad.shard"
expect_err make_vocab 1 "not below the vocabulary size" dsv3-shard make --vocab-size 100 -o "$T/v.shard" "$T/ids.txt"
check make_vocab_no_output test ! -e "$T/v.shard"

# Damaged shards: exit 1, a message naming the file and an offset, nothing else on stdout.
size=$(wc -c <"$T/a.shard")
head -c $((size / 2)) "$T/a.shard" >"$T/trunc.shard"
expect_err truncated 1 "trunc.shard: .*offset" dsv3-shard verify "$T/trunc.shard"
expect_err truncated_pipe 1 "<stdin>: .*truncated.*offset" sh -c "dsv3-shard dump - <'$T/trunc.shard' >/dev/null"
cp "$T/a.shard" "$T/flip.shard"
printf '\377' | dd of="$T/flip.shard" bs=1 seek=2000 conv=notrunc 2>/dev/null
expect_err flipped_byte 1 "flip.shard: chunk 0: checksum mismatch (offset 144)" dsv3-shard verify "$T/flip.shard"
expect_err flipped_byte_pipe 1 "checksum mismatch" sh -c "cat '$T/flip.shard' | dsv3-shard verify -"
: >"$T/zero.shard"
expect_err zero_length 1 "zero.shard: file ends inside the header" dsv3-shard info "$T/zero.shard"
expect_err wrong_magic 1 "not a dsv3 shard" dsv3-shard info "$T/ids.txt"
expect_err verify_continues 1 "trunc.shard" dsv3-shard verify "$T/trunc.shard" "$T/a.shard"
check verify_continues_reports_good grep -q "a.shard: ok" "$T/out"

# --bytes: a file's bytes as one document of byte tokens.
printf 'hello\n' >"$T/h.txt"
dsv3-shard make --bytes "$T/h.txt" | dsv3-shard dump - >"$T/out"
check bytes_mode sh -c "test \"\$(cat '$T/out')\" = '104 101 108 108 111 10'"

# Determinism: the same input gives the same bytes.
dsv3-shard make -o "$T/d1.shard" "$T/ids.txt"; dsv3-shard make -o "$T/d2.shard" "$T/ids.txt"
check deterministic cmp -s "$T/d1.shard" "$T/d2.shard"

# --progress forces whole progress lines into a non-terminal stderr; --quiet silences verify.
expect progress_forced 0 dsv3-shard verify --progress "$T/a.shard"
check progress_line grep -q "tokens" "$T/err"
expect quiet 0 dsv3-shard verify --quiet "$T/a.shard"
check quiet_is_silent test ! -s "$T/out"
