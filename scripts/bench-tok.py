#!/usr/bin/env python3
"""The Python half of scripts/bench-tok.sh: builds the offline corpus, trains with HF
tokenizers, compares ids with HF tokenizers and tiktoken document by document, and times
their encoding. Run through bench-tok.sh; each step is a subcommand:

  corpus OUT MB            mixed corpus from files every Debian machine has (stdlib only)
  hf-train TEXT MERGES OUT train HF tokenizers' BpeTrainer (DeepSeek-V3 pre-tokenizer)
  ranks HF_JSON OUT        the HF vocabulary as a tiktoken rank file (rank = HF id)
  parity KIND VOCAB JSONL IDS   compare dsv3-tok's ids (a line per document) with KIND:
                           hf (tokenizer.json) or tiktoken-cl100k / tiktoken-o200k
  time OUT CMD...           run CMD (stdout to OUT), print "wall_s cpu_s peak_rss_mib" to
                           stderr's last line (machines without GNU time)
  speed KIND VOCAB JSONL THREADS  encode MB/s of KIND on the documents (not counting the
                           JSON parse), THREADS threads: wall-clock MB/s and MB per CPU second
"""
import base64, glob, gzip, json, os, random, struct, sys, time, unicodedata

DOC_MAX = 64 << 10   # documents longer than this are cut at line boundaries
BATCH = 2000         # documents per reference call (bounds the references' memory)

DS = [r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
      " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"]
PAT = {
    "cl100k": (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
               r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""),
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""",
        r"""\s+"""]),
}

# ---------------------------------------------------------------- corpus


def text_of(path):
    """A file's text (gunzipped), None for binary files; invalid UTF-8 becomes U+FFFD so
    the references (which take str) see the same bytes as dsv3-tok."""
    try:
        raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    except (OSError, EOFError):
        return None
    if b"\0" in raw[:8192]:
        return None
    return raw.decode("utf-8", errors="replace").replace("\0", "")


def mo_strings(path):
    """The translated strings of a gettext .mo file (real text in many scripts)."""
    try:
        raw = open(path, "rb").read()
        magic = struct.unpack("<I", raw[:4])[0]
        end = "<" if magic == 0x950412de else ">"
        n, _, toff = struct.unpack(end + "III", raw[8:20])
        out = []
        for i in range(n):
            ln, off = struct.unpack(end + "II", raw[toff + 8 * i:toff + 8 * i + 8])
            out.append(raw[off:off + ln])
    except (OSError, struct.error):
        return None
    if not out or b"charset=UTF-8" not in out[0] and b"charset=utf-8" not in out[0]:
        return None
    return "\n".join(s.decode("utf-8", errors="replace").replace("\0", "\n") for s in out[1:])


def cut(text):
    """Documents of at most DOC_MAX characters, cut after a line break where there is one."""
    while len(text) > DOC_MAX:
        k = text.rfind("\n", 0, DOC_MAX) + 1 or DOC_MAX
        yield text[:k]
        text = text[k:]
    if text:
        yield text


EMOJI = ["😀", "😂", "🥲", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇫🇷", "❤️", "✨", "🎉", "1️⃣",
         "🧑🏿‍🚀", "🐍", "🚀", "☕", "©️", "™"]


def generated(rng, lines, n_chars):
    """Seeded mixed text: translated sentences of different scripts side by side, some in
    NFD (combining marks), with emoji sequences (ZWJ, skin tones, flags, keycaps), numbers
    and bits of code between them."""
    out, size = [], 0
    while size < n_chars:
        para = []
        for _ in range(rng.randrange(3, 12)):
            s = rng.choice(lines)
            r = rng.random()
            if r < 0.3:
                s = unicodedata.normalize("NFD", s)
            if r > 0.6:
                s += " " + "".join(rng.choice(EMOJI) for _ in range(rng.randrange(1, 4)))
            if rng.random() < 0.2:
                s += f" {rng.randrange(10 ** rng.randrange(1, 9))} x[{rng.randrange(99)}] = f(y);"
            para.append(s)
        t = rng.choice([" ", "\n", "  ", "\t", "。", "! "]).join(para) + "\n"
        out.append(t)
        size += len(t)
    return "".join(out)


def corpus(out, mb):
    rng = random.Random(1)
    budget = int(mb * 1e6)
    share = {"code": 0.35, "prose": 0.35, "translations": 0.2, "generated": 0.1}
    pools = {
        "code": sorted(glob.glob("/usr/include/**/*.h", recursive=True)
                       + glob.glob("/usr/lib/python3*/**/*.py", recursive=True)),
        "prose": sorted(f for f in glob.glob("/usr/share/doc/**/*", recursive=True)
                        if os.path.isfile(f) and not f.endswith((".html", ".htm", ".png", ".svg", ".pdf"))),
        "translations": sorted(glob.glob("/usr/share/locale/**/*.mo", recursive=True)),
    }
    stats, docs, trans_lines = {}, [], []
    for kind in ("code", "prose", "translations"):
        files = pools[kind]
        rng.shuffle(files)
        got = nf = 0
        for f in files:
            if got >= share[kind] * budget:
                break
            t = mo_strings(f) if kind == "translations" else text_of(f)
            if not t:
                continue
            if kind == "translations":
                trans_lines += [l for l in t.split("\n") if len(l) > 8]
            for d in cut(t):
                docs.append(d)
                got += len(d.encode())
            nf += 1
        stats[kind] = (nf, got)
    if not trans_lines:   # a machine without translations: still mixed scripts
        trans_lines = ["中文文本和日本語のテキスト。", "Привет мир, как дела?", "한국어 문장입니다.",
                       "مرحبا بالعالم", "नमस्ते दुनिया", "Ελληνικά γράμματα", "Tiếng Việt có dấu"]
    left = max(budget - sum(s[1] for s in stats.values()), int(share["generated"] * budget))
    g = generated(rng, trans_lines, left // 2)
    n0 = len(docs)
    docs += list(cut(g))
    stats["generated"] = (len(docs) - n0, len(g.encode()))
    rng.shuffle(docs)
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(docs))
    total = sum(s[1] for s in stats.values())
    desc = ", ".join(f"{k} {v[1] / 1e6:.1f} MB ({v[0]} {'docs' if k == 'generated' else 'files'})"
                     for k, v in stats.items())
    print(f"corpus: {len(docs)} documents, {total / 1e6:.1f} MB: {desc}")

# ---------------------------------------------------------------- vocabularies


def hf_train(text, merges, out):
    from tokenizers import Tokenizer, Regex, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=int(merges) + 256, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t0 = time.time()
    tok.train([text], tr)
    print(f"HF tokenizers trained {tok.get_vocab_size()} tokens in {time.time() - t0:.1f} s")
    tok.save(out)


def ranks(hf_json, out):
    d = json.load(open(hf_json, encoding="utf-8"))
    u2b, n = {}, 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            u2b[chr(b)] = b
        else:
            u2b[chr(256 + n)] = b
            n += 1
    with open(out, "w") as f:
        for k, v in sorted(d["model"]["vocab"].items(), key=lambda x: x[1]):
            f.write(base64.b64encode(bytes(u2b[c] for c in k)).decode() + f" {v}\n")


def load_ranks(path):
    r = {}
    for line in open(path):
        t, v = line.split()
        r[base64.b64decode(t)] = int(v)
    return r


def encoder(kind, vocab, threads):
    """A function from a list of documents to their lists of ids."""
    if kind == "hf":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(vocab)
        if threads == 1:
            return lambda docs: [tok.encode(d, add_special_tokens=False).ids for d in docs]
        return lambda docs: [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
    import tiktoken
    enc = tiktoken.Encoding(name="bench", pat_str=PAT[kind.split("-")[1]],
                            mergeable_ranks=load_ranks(vocab), special_tokens={})
    if threads == 1:
        return lambda docs: [enc.encode_ordinary(d) for d in docs]
    return lambda docs: enc.encode_ordinary_batch(docs, num_threads=threads)


def documents(jsonl):
    return [json.loads(l)["text"] for l in open(jsonl, encoding="utf-8")]


def parity(kind, vocab, jsonl, ids_path):
    enc = encoder(kind, vocab, os.cpu_count())
    docs = documents(jsonl)
    mine = open(ids_path)
    bad = toks = 0
    for i in range(0, len(docs), BATCH):
        ref = enc(docs[i:i + BATCH])
        for k, r in enumerate(ref):
            m = [int(x) for x in mine.readline().split()]
            toks += len(r)
            if m != r:
                if bad < 3:
                    j = next((j for j, (a, b) in enumerate(zip(m, r)) if a != b), min(len(m), len(r)))
                    print(f"  document {i + k}: first difference at id {j}: {m[j:j + 5]} vs {r[j:j + 5]}; "
                          f"text {docs[i + k][:60]!r}")
                bad += 1
    extra = mine.readline() != ""
    print(f"{kind}: {len(docs)} documents, {toks} tokens, {bad} documents differ"
          + (" (and dsv3-tok wrote more lines)" if extra else ""))
    sys.exit(1 if bad or extra else 0)


def speed(kind, vocab, jsonl, threads):
    threads = int(threads)
    enc = encoder(kind, vocab, threads)
    docs = documents(jsonl)
    size = sum(len(d.encode()) for d in docs)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(docs), BATCH * threads):
        enc(docs[i:i + BATCH * threads])
    t, c = time.perf_counter() - t0, time.process_time() - c0
    print(f"{size / 1e6 / t:.2f} {size / 1e6 / c:.2f}")


def timed(out, *cmd):
    import resource, subprocess
    t0 = time.perf_counter()
    with open(out, "wb") as f:
        rc = subprocess.run(cmd, stdout=f).returncode
    t = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{t:.3f} {ru.ru_utime + ru.ru_stime:.3f} {ru.ru_maxrss / 1024:.0f}", file=sys.stderr)
    sys.exit(rc)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"time": timed, "corpus": lambda o, mb: corpus(o, float(mb)), "hf-train": hf_train, "ranks": ranks,
     "parity": parity, "speed": speed}[cmd](*args)
