#!/bin/sh
# Encode and train benchmarks of dsv3-tok against tiktoken and HF tokenizers on the same
# vocabulary, the same text and the same machine. Needs python3 with tokenizers and tiktoken
# (PYTHON=/path/to/venv/bin/python). Not part of `make test`.
#
#   PYTHON=/tmp/venv/bin/python scripts/bench-tok.sh [MB_PER_CORPUS] [MERGES]
#
# Corpora: Python source (the interpreter's standard library) and English prose (license
# texts), MB_PER_CORPUS each (default 20). A vocabulary of MERGES merges (default 32000) is
# trained by HF tokenizers with DeepSeek-V3's pre-tokenizer; dsv3-tok imports it, tiktoken
# gets the same tokens as ranks with the cl100k pattern. Prints MB/s per thread and with all
# threads, checks that the ids agree, then times training (dsv3-tok vs HF's trainer) and
# reports peak memory.
set -eu
PY=${PYTHON:-python3}
MB=${1:-20}
MERGES=${2:-32000}
BUILD=${BUILD:-build}
T="$(cd "$BUILD/bin" && pwd)/dsv3-tok"
W=$(mktemp -d) && trap 'rm -rf "$W"' EXIT
NT=$(nproc)
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $NT threads"
# What the threads are worth here: a busy loop on 1 and on $NT threads.
printf 'int main(void){volatile unsigned long x=0;for(unsigned long i=0;i<400000000UL;i++)x+=i;return 0;}\n' > "$W/spin.c"
if cc -O2 -o "$W/spin" "$W/spin.c" 2>/dev/null; then
    t1=$( { /usr/bin/time -f %e "$W/spin"; } 2>&1 )
    tn=$( { /usr/bin/time -f %e sh -c "for i in \$(seq $NT); do \"$W/spin\" & done; wait"; } 2>&1 )
    echo "cpu check: one busy loop ${t1} s, $NT at once ${tn} s (equal times: $NT real cores; $NT times longer: one core shared)"
fi

# corpora (lines longer than 10 kB are dropped: the per-line tools would be timing one line)
find /usr/lib/python3* -name '*.py' -size -200k 2>/dev/null | sort | xargs cat 2>/dev/null \
    | awk 'length($0) < 10000' | head -c "${MB}000000" > "$W/code.txt"
{ for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30; do
    cat /usr/share/common-licenses/* /usr/share/doc/*/copyright 2>/dev/null; done; } \
    | awk 'length($0) < 10000' | head -c "${MB}000000" > "$W/prose.txt"

"$PY" - "$W" "$MERGES" "$T" "$NT" <<'PYEOF'
import base64, json, os, resource, subprocess, sys, time
from tokenizers import Tokenizer, Regex, models, pre_tokenizers, trainers, decoders
import tiktoken

W, MERGES, T, NT = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
DS = [r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
      " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"]
CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
          r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

def hf_train(files):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=MERGES + 256, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, tr)
    return tok

files = [os.path.join(W, "code.txt"), os.path.join(W, "prose.txt")]
mb = sum(os.path.getsize(f) for f in files) / 1e6

# ---- training: HF in a child process (for its own peak RSS), then dsv3-tok ----
code = ("import sys,time,resource;sys.argv=['x'];exec(open(sys.argv[0]).read()) if False else None\n")
t0 = time.time()
r = subprocess.run([sys.executable, "-c",
    "import sys, resource, time\n"
    "from tokenizers import Tokenizer, Regex, models, pre_tokenizers, trainers\n"
    f"DS={DS!r}\n"
    "tok = Tokenizer(models.BPE())\n"
    "tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior='isolated') for p in DS]"
    " + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])\n"
    f"tr = trainers.BpeTrainer(vocab_size={MERGES + 256}, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())\n"
    f"tok.train({files!r}, tr)\n"
    f"tok.save({os.path.join(W, 'hf.json')!r})\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"], capture_output=True, text=True, check=True)
t_hf = time.time() - t0
rss_hf = int(r.stdout.split()[-1]) / 1024
t0 = time.time()
r = subprocess.run(["/usr/bin/time", "-f", "%M", T, "train", "--merges", str(MERGES), "--min-frequency", "1",
                    "--no-default-specials", "-i", "text", "-o", os.path.join(W, "ds.tok")] + files,
                   capture_output=True, text=True, check=True)
t_ds = time.time() - t0
rss_ds = int(r.stderr.strip().split("\n")[-1]) / 1024
print(f"train {MERGES} merges on {mb:.0f} MB: HF tokenizers {t_hf:.1f} s, peak {rss_hf:.0f} MiB; "
      f"dsv3-tok {t_ds:.1f} s, peak {rss_ds:.0f} MiB ({NT} threads)")

# ---- encode: the HF vocabulary in all three ----
hf = Tokenizer.from_file(os.path.join(W, "hf.json"))
subprocess.run([T, "import", "--quiet", "-o", os.path.join(W, "hf.tok"), os.path.join(W, "hf.json")], check=True)
d = json.load(open(os.path.join(W, "hf.json"), encoding="utf-8"))
u2b, n = {}, 0
for b in range(256):
    if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
        u2b[chr(b)] = b
    else:
        u2b[chr(256 + n)] = b
        n += 1
ranks = {}
for k, v in sorted(d["model"]["vocab"].items(), key=lambda x: x[1]):
    ranks[bytes(u2b[c] for c in k)] = v
with open(os.path.join(W, "tt.tiktoken"), "w") as f:
    for t, r in sorted(ranks.items(), key=lambda x: x[1]):
        f.write(base64.b64encode(t).decode() + f" {r}\n")
subprocess.run([T, "import", "--quiet", "-p", "cl100k", "-o", os.path.join(W, "tt.tok"),
                os.path.join(W, "tt.tiktoken")], check=True)
tt = tiktoken.Encoding(name="bench", pat_str=CL100K, mergeable_ranks=ranks, special_tokens={})

def best(fn, reps=3):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return min(ts)

def dsv3(tok, path, threads):
    subprocess.run([T, "encode", "--quiet", "-i", "lines", "-j", str(threads), "-t", tok, "-o",
                    "/dev/null", path], check=True)

def dsv3_ids(tok, path):
    out = subprocess.run([T, "encode", "-i", "lines", "--ids", "-t", tok, path], check=True,
                         capture_output=True).stdout.decode().split("\n")
    return [list(map(int, l.split())) for l in out[:-1]]

for name in ("code", "prose"):
    path = os.path.join(W, name + ".txt")
    raw = open(path, "rb").read()
    lines = [l.decode("utf-8", "surrogateescape") for l in raw.split(b"\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if any("\udc80" <= c <= "\udcff" for l in lines for c in l):
        lines = [l.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for l in lines]
    size = len(raw) / 1e6
    # identical ids (tiktoken pattern and HF's) on every line
    mine_tt = dsv3_ids(os.path.join(W, "tt.tok"), path)
    ref_tt = tt.encode_ordinary_batch(lines, num_threads=NT)
    same_tt = sum(a == b for a, b in zip(mine_tt, ref_tt)) if len(mine_tt) == len(ref_tt) else -1
    mine_hf = dsv3_ids(os.path.join(W, "hf.tok"), path)
    ref_hf = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    same_hf = sum(a == b for a, b in zip(mine_hf, ref_hf)) if len(mine_hf) == len(ref_hf) else -1
    print(f"{name}: {size:.1f} MB, {len(lines)} lines; ids identical to tiktoken {same_tt}/{len(lines)}, "
          f"to HF {same_hf}/{len(lines)}")
    # tiktoken at its best: the whole text in one call (one thread), and NT*4 slices of whole
    # lines through its thread pool
    text = "\n".join(lines)
    step = max(1, len(lines) // (NT * 4))
    slices = ["\n".join(lines[i:i + step]) for i in range(0, len(lines), step)]
    t_tt1 = best(lambda: tt.encode_ordinary(text))
    t_ttn = best(lambda: tt.encode_ordinary_batch(slices, num_threads=NT))
    os.environ["RAYON_NUM_THREADS"] = "1"
    t_hf1 = float(subprocess.run([sys.executable, "-c",
        "import time,sys;from tokenizers import Tokenizer\n"
        f"hf=Tokenizer.from_file({os.path.join(W, 'hf.json')!r});L=open({path!r},encoding='utf-8',errors='replace').read().split('\\n')\n"
        "t=time.perf_counter();hf.encode_batch(L,add_special_tokens=False);print(time.perf_counter()-t)"],
        capture_output=True, text=True, check=True, env=dict(os.environ)).stdout)
    del os.environ["RAYON_NUM_THREADS"]
    t_hfn = best(lambda: hf.encode_batch(lines, add_special_tokens=False), 1)
    t_ds1 = best(lambda: dsv3(os.path.join(W, "hf.tok"), path, 1))
    t_dsn = best(lambda: dsv3(os.path.join(W, "hf.tok"), path, NT))
    t_dt1 = best(lambda: dsv3(os.path.join(W, "tt.tok"), path, 1))
    print(f"  encode MB/s   1 thread   {NT} threads")
    for label, a, b in (("tiktoken", t_tt1, t_ttn), ("HF tokenizers", t_hf1, t_hfn),
                        ("dsv3-tok (DeepSeek-V3 pattern)", t_ds1, t_dsn),
                        ("dsv3-tok (cl100k pattern)", t_dt1, None)):
        print(f"  {label:32s} {size / a:7.1f}   " + (f"{size / b:7.1f}" if b else "      -"))
PYEOF
