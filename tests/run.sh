#!/bin/sh
# Runs every test: unit and GPU test programs in $BUILD/tests, then the CLI scripts in
# tests/cli. Each prints "ok NAME" / "not ok NAME" / "skip NAME: why" lines; a program that
# crashes or exits non-zero without saying "not ok" counts as one more failure.
# Last line: "N passed, N failed, N skipped". Exit status 1 if anything failed.
set -u
BUILD=${BUILD:-build}
export DSV3_BIN="$(cd "$BUILD/bin" && pwd)"
TIMEOUT=${TEST_TIMEOUT:-600}
pass=0 fail=0 skip=0
log=$(mktemp) && trap 'rm -f "$log"' EXIT

run_one() {   # $1: display name; the rest: the command
    name=$1; shift
    timeout "$TIMEOUT" "$@" >"$log" 2>&1
    status=$?
    p=$(grep -c '^ok ' "$log"); f=$(grep -c '^not ok ' "$log"); s=$(grep -c '^skip ' "$log")
    if [ "$status" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1; echo "not ok $name: exited with status $status" >>"$log"
    fi
    pass=$((pass + p)); fail=$((fail + f)); skip=$((skip + s))
    if [ "$f" -gt 0 ]; then
        echo "FAIL $name ($p passed, $f failed)"; sed 's/^/    /' "$log"
    else
        echo "ok   $name ($p passed${s:+, $s skipped})" | sed 's/, 0 skipped//'
        grep '^skip ' "$log" | sed 's/^/    /'
    fi
}

for t in "$BUILD"/tests/unit/test_* "$BUILD"/tests/gpu/test_*; do
    case $t in *.d|*.o) continue;; esac
    [ -x "$t" ] && run_one "${t#$BUILD/tests/}" "$t"
done
for t in tests/cli/test_*.sh; do
    [ -f "$t" ] && run_one "$t" sh "$t"
done
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
