# The format document is complete: scripts/dsv3_shard.py, written from docs/formats.md alone,
# reads what the C library writes and writes what the C library reads.
. "$(dirname "$0")/lib.sh"
PY=/usr/bin/python3
S=$(cd "$(dirname "$0")/../.." && pwd)/scripts/dsv3_shard.py

awk 'BEGIN { srand(11); for (i = 0; i < 2000; i++) { n = int(rand() * 30); s = "";
     for (j = 0; j < n; j++) s = s (j ? " " : "") int(rand() * 129280); print s } }' >"$T/ids.txt"
dsv3-shard make --chunk-tokens 999 -o "$T/a.shard" "$T/ids.txt"
expect py_reads_c_file 0 $PY "$S" dump "$T/a.shard"
check py_reads_c_file_same cmp -s "$T/out" "$T/ids.txt"
dsv3-shard make --no-shuffle --chunk-tokens 7 <"$T/ids.txt" >"$T/pipe.shard"
expect py_reads_c_pipe_unshuffled 0 $PY "$S" dump "$T/pipe.shard"
check py_reads_c_pipe_same cmp -s "$T/out" "$T/ids.txt"
printf '1 2 3\n4 5 6\n' | dsv3-shard make -k packed -L 3 -o "$T/p.shard"
expect py_reads_packed 0 $PY "$S" dump "$T/p.shard"
expect py_writes_c_reads 0 sh -c "$PY '$S' make '$T/py.shard' <'$T/ids.txt'"
expect c_verifies_py_file 0 dsv3-shard verify "$T/py.shard"
dsv3-shard dump "$T/py.shard" >"$T/out"
check c_reads_py_file_same cmp -s "$T/out" "$T/ids.txt"
head -c 3000 "$T/a.shard" >"$T/trunc.shard"
expect_err py_refuses_truncated 1 "file ends inside" $PY "$S" dump "$T/trunc.shard"
