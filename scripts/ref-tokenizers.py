#!/usr/bin/env python3
"""Regenerates the tokenizer parity fixtures in tests/fixtures/tok/ from the reference
implementations (HF tokenizers, tiktoken). CI has neither, so the fixtures are committed and
tests/unit/test_tok_parity.c compares dsv3-tok's ids with the ids recorded here.

    python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install tokenizers tiktoken
    PYTHON=/tmp/tokvenv/bin/python scripts/ref-tokenizers.py [--bin build/bin]
(with PYTHON set, the script runs itself again under that interpreter). The whole-corpus
comparison and the timings are scripts/bench-tok.sh.

Writes:
  hf-deepseek.json     a byte-level BPE trained by HF tokenizers with DeepSeek-V3's
                       pre_tokenizer (three Split regexes, then ByteLevel without regex)
  hf-gpt2.json         the same trainer with HF's ByteLevel(use_regex=True) pre-tokenizer
                       and merges written in the "a b" string form
  tt.tiktoken          a tiktoken rank file (bytes by value, then the HF merges' tokens)
  cases.jsonl          {"text", "hf-deepseek", "hf-gpt2", "tt-cl100k", "tt-o200k", "tt-gpt2"}
                       ids per reference for every test text
With --bin, it also exports dsv3-tok's import of hf-deepseek.json back to tokenizer.json,
loads that in HF tokenizers and checks it encodes every case identically.
"""
import argparse, base64, glob, json, os, random, subprocess, sys, tempfile

if os.environ.get("PYTHON") and os.path.abspath(os.environ["PYTHON"]) != os.path.abspath(sys.executable):
    os.execv(os.environ["PYTHON"], [os.environ["PYTHON"]] + sys.argv)

from tokenizers import Tokenizer, Regex, models, pre_tokenizers, trainers, decoders
import tiktoken

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "tok")

DS_SPLITS = [
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]

# tiktoken's patterns, as in tiktoken_ext/openai_public.py
PAT_GPT2 = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
PAT_CL100K = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
              r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PAT_O200K = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""",
    r"""\s+""",
])

MULTI = [
    "DeepSeek-V3 是一个强大的混合专家语言模型，总参数量为 671B。",
    "東京は日本の首都です。ひらがなとカタカナ、漢字を混ぜて書きます。",
    "한국어 문장도 토큰화해야 합니다. 서울은 대한민국의 수도입니다.",
    "Привет, мир! Это тест токенизатора: 12345 рублей.",
    "مرحبا بالعالم، هذا اختبار ٠١٢٣٤٥٦٧٨٩",
    "नमस्ते दुनिया। यह एक परीक्षण है। १२३४५",
    "Γειά σου Κόσμε! Ελληνικά γράμματα: αβγδε.",
    "Emoji: 😀😃😄 👩‍👩‍👧‍👦 👍🏽 🇯🇵🇫🇷 ❤️ ✨🎉",
    "Combining: e\u0301 a\u0300\u0301 n\u0303 x\u0308\u0308y \u0301abc",
    "Numbers: 1 12 123 1234 12345 1234567890 ３４５ ①②③ Ⅳ ² ³ ½ 3.14159 1e-9 0x1F",
    "Whitespace: a\u00a0b\u2003c\u3000d\u2028e\u0085f\tg\u000bh\u000ci   j\n\n\n  k\r\n\r\nl",
    "NEL is White_Space: end\u0085\nline\u0085\u0085 x\u0085 \u0085\r\n!\u0085\n",
    "U+180E is not: a\u180eb c \u180e d\u180e\u180e e  \u180e\n",
    "Punctuation+newlines: end.\nnext;\r\n}\n\n)\n\t];\n!!!\n\n... ?!\n",
    "It's we're they'll I'd you've she'S IT'LL don't 'tis",
    "Mixed: hello世界world123abc！＠＃ｆｕｌｌｗｉｄｔｈ （括弧） 「引用」",
    "Code: for (int i = 0; i < n; i++) { x[i] = y[i] * 2; }\n",
    "URL https://example.com/path?q=1&r=2#frag email a.b@c.de",
    "    indented\n        more\n\ttab\n",
    "",
    " ",
    "\n",
    "a",
]

RANGES = [(0x20, 0x7e), (0x20, 0x7e), (0x20, 0x7e), (0xa0, 0xff), (0x100, 0x17f),
          (0x370, 0x3ff), (0x400, 0x4ff), (0x4e00, 0x4fff), (0x3040, 0x30ff), (0xac00, 0xad00),
          (0x300, 0x36f), (0x2000, 0x206f), (0x660, 0x669), (0x966, 0x96f), (0xff01, 0xff5e),
          (0x1f600, 0x1f64f), (0x2190, 0x21ff), (0x5d0, 0x5ea), (0xe00, 0xe5b)]
SPACES = [" ", " ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\u0085", "\u2028", "  ", "\n\n"]


def random_text(rng, n):
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            out.append(rng.choice(SPACES))
        elif r < 0.25:
            out.append(str(rng.randrange(10 ** rng.randrange(1, 9))))
        else:
            lo, hi = rng.choice(RANGES)
            k = rng.randrange(1, 8)
            out.append("".join(chr(rng.randrange(lo, hi + 1)) for _ in range(k)))
    return "".join(out)


def corpus_files():
    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    files += sorted(glob.glob("/usr/share/doc/*/copyright"))[:300]
    files += sorted(glob.glob(os.path.join(HERE, "..", "lib", "*.[ch]")))
    return [f for f in files if os.path.isfile(f)]


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", help="dsv3-tok's directory, to check export -> HF")
    ap.add_argument("--vocab", type=int, default=3000)
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(20250101)
    files = corpus_files()
    train_texts = [read_text(f) for f in files] + MULTI * 20 + [random_text(rng, 400) for _ in range(50)]

    def train(pre, path, legacy_merges):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIALS, show_progress=False,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(train_texts, tr)
        tok.save(path)
        if legacy_merges:   # the older "a b" string form of merges
            d = json.load(open(path, encoding="utf-8"))
            d["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in d["model"]["merges"]]
            json.dump(d, open(path, "w", encoding="utf-8"), ensure_ascii=False)
        return Tokenizer.from_file(path)

    ds_pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in DS_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf_ds = train(ds_pre, os.path.join(OUT, "hf-deepseek.json"), False)
    hf_g2 = train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                  os.path.join(OUT, "hf-gpt2.json"), True)

    # tiktoken ranks: the 256 bytes by value, then every merged token of the HF vocabulary
    # in merge order
    d = json.load(open(os.path.join(OUT, "hf-deepseek.json"), encoding="utf-8"))
    b2u = {b: c for b, c in zip(range(256), pre_tokenizers.ByteLevel.alphabet())}
    bl = {}
    for b in range(256):
        cp = b if (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255) else None
        bl[b] = cp
    n = 0
    u2b = {}
    for b in range(256):
        if bl[b] is not None:
            u2b[chr(b)] = b
        else:
            u2b[chr(256 + n)] = b
            n += 1
    ranks = {bytes([b]): b for b in range(256)}
    for m in d["model"]["merges"]:
        a, c = m if isinstance(m, list) else m.split(" ")
        tokb = bytes(u2b[ch] for ch in a + c)
        if tokb not in ranks:
            ranks[tokb] = len(ranks)
    with open(os.path.join(OUT, "tt.tiktoken"), "w") as f:
        for t, r in sorted(ranks.items(), key=lambda x: x[1]):
            f.write(base64.b64encode(t).decode() + " " + str(r) + "\n")
    tts = {name: tiktoken.Encoding(name="t-" + name, pat_str=pat, mergeable_ranks=ranks,
                                   special_tokens={})
           for name, pat in (("cl100k", PAT_CL100K), ("o200k", PAT_O200K), ("gpt2", PAT_GPT2))}

    cases = list(MULTI)
    for f in files[::12]:
        t = read_text(f)
        for _ in range(2):
            a = rng.randrange(max(1, len(t)))
            cases.append(t[a:a + rng.randrange(20, 300)])
    cases += [random_text(rng, rng.randrange(1, 50)) for _ in range(90)]
    with open(os.path.join(OUT, "cases.jsonl"), "w", encoding="utf-8") as f:
        for t in cases:
            rec = {"text": t,
                   "hf-deepseek": hf_ds.encode(t, add_special_tokens=False).ids,
                   "hf-gpt2": hf_g2.encode(t, add_special_tokens=False).ids}
            for name, enc in tts.items():
                rec["tt-" + name] = enc.encode_ordinary(t)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases, vocab {args.vocab}, {len(ranks)} tiktoken ranks")

    if args.bin:
        exe = os.path.join(args.bin, "dsv3-tok")
        with tempfile.TemporaryDirectory() as tmp:
            tokp, outp = os.path.join(tmp, "t.tok"), os.path.join(tmp, "t.json")
            subprocess.run([exe, "import", "--quiet", "-o", tokp, os.path.join(OUT, "hf-deepseek.json")], check=True)
            subprocess.run([exe, "export", "--quiet", "-t", tokp, "-o", outp], check=True)
            back = Tokenizer.from_file(outp)
            bad = sum(back.encode(t, add_special_tokens=False).ids != hf_ds.encode(t, add_special_tokens=False).ids
                      for t in cases)
            print(f"export -> HF tokenizers: {len(cases) - bad}/{len(cases)} cases identical")
            if bad:
                sys.exit(1)


if __name__ == "__main__":
    main()
