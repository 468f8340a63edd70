#!/bin/sh
# Stages issue 10's many-seed FP8 check for a lent GPU machine: into DIR (default
# .stage-fp8seeds; replaced) the stripped dsv3-train of BUILD (the only program the sweep runs;
# it needs the machine's CUDA libraries, cuBLAS and cuBLASLt, as every staged build does),
# scripts/fp8-train-compare.sh, the tokenizer, packed data and config made here with its --prep
# (CORPUS, default vim's help and /usr/share/common-licenses as in docs/PARITY.md; VAL 0.0501;
# L 512), the commit, and scripts/fp8-seeds-run.sh as DIR/run.sh. There, from the repository
# root: `sh DIR/run.sh` with DIR carried (see that script).
# Usage: scripts/fp8-seeds-stage.sh [DIR]   (env BUILD, CORPUS, CONFIG, VAL)
set -eu
BUILD=${BUILD:-build}
DIR=${1:-.stage-fp8seeds}
CORPUS=${CORPUS:-/usr/share/vim/vim90/doc /usr/share/common-licenses}
VAL=${VAL:-0.0501}
for p in dsv3-train dsv3-tok dsv3-pack; do
    [ -x "$BUILD/bin/$p" ] || { echo "fp8-seeds-stage: $BUILD/bin/$p: not built (make)" >&2; exit 1; }
done
rm -rf "$DIR"
mkdir -p "$DIR/build/bin" "$DIR/scripts"
cp "$BUILD/bin/dsv3-train" "$DIR/build/bin/"
strip --strip-debug "$DIR/build/bin/dsv3-train" 2>/dev/null || true
cp scripts/fp8-train-compare.sh "$DIR/scripts/"
cp scripts/fp8-seeds-run.sh "$DIR/run.sh"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit+changes"
echo "$commit" >"$DIR/COMMIT"
CORPUS=$CORPUS VAL=$VAL BUILD=$BUILD sh scripts/fp8-train-compare.sh --prep "$DIR/prep" 512
echo "staged: $DIR ($(du -sm "$DIR" | cut -f1) MiB), commit $commit; there: sh $DIR/run.sh"
