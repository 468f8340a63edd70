# Helpers for the CLI tests: each check prints "ok NAME" or "not ok NAME" (run.sh counts them).
# $DSV3_BIN is the directory of the built programs; T is a scratch directory removed at exit.
set -u
: "${DSV3_BIN:=$(cd "$(dirname "$0")/../../build/bin" && pwd)}"
PATH="$DSV3_BIN:$PATH"
T=$(mktemp -d /tmp/dsv3-cli-XXXXXX)
trap 'rm -rf "$T"' EXIT

ok() { echo "ok $1"; }
not_ok() { echo "not ok $1"; shift; [ $# -gt 0 ] && echo "    $*"; return 0; }

# expect NAME STATUS CMD...: runs CMD (stdout to $T/out, stderr to $T/err), checks its status.
expect() {
    name=$1 want=$2; shift 2
    "$@" >"$T/out" 2>"$T/err"
    got=$?
    if [ "$got" -eq "$want" ]; then ok "$name"; else
        not_ok "$name" "exit $got, expected $want; stderr: $(head -c 400 "$T/err")"; fi
}

# expect_err NAME STATUS PATTERN CMD...: as expect, and stderr must match the grep PATTERN.
expect_err() {
    name=$1 want=$2 pat=$3; shift 3
    "$@" >"$T/out" 2>"$T/err"
    got=$?
    if [ "$got" -eq "$want" ] && grep -q -- "$pat" "$T/err"; then ok "$name"; else
        not_ok "$name" "exit $got (expected $want), stderr: $(head -c 400 "$T/err")"; fi
}

# check NAME CONDITION...: the condition is a command; ok if it succeeds.
check() {
    name=$1; shift
    if "$@"; then ok "$name"; else not_ok "$name" "failed: $*"; fi
}
