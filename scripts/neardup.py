#!/usr/bin/env python3
"""Planted near-duplicates for measuring dsv3-pack --near-dedup (standard library only).

  neardup.py gen DIR [--unrelated N] [--pairs N] [--clusters N] [--len N] [--seed N]
      writes DIR/ids.txt (one document per line, token ids; dsv3-shard make reads it) and
      DIR/truth.tsv (per document: family, kind, rate, true Jaccard with the family's
      original over token n-grams).
  neardup.py score DIR PACKED_DIR [--ngram 5 --bands 14 --rows 8] [--min-precision P
      --min-recall-high R --max-fp N]
      reads PACKED_DIR/removed.tsv (dsv3-pack --log-removed) and prints precision and
      recall against the planted truth and against true Jaccard; with the --min-* bounds,
      exits 1 when they are not met (the CLI test's check).

Documents are Zipf(1.1)-distributed ids over a 50000-token vocabulary in paragraphs (id 1
ends a paragraph). Every planted pair is an original and one variant of it, made by one
kind of change at one rate:
  edit     each token substituted, deleted or followed by an inserted token, each with
           probability rate/3
  reorder  paragraphs shuffled, then `edit` at the rate
  insert   a span of rate*len fresh tokens inserted at a random place
  delete   a span of rate*len tokens removed at a random place
Clusters are an original and four `edit` variants at rate 0.01. Unrelated documents are
fresh. All documents are shuffled together; ids 0 (EOS) and 1 are reserved.
"""
import argparse
import itertools
import os
import random
import sys

VOCAB = 50000
PARA = 1
KINDS = ("edit", "reorder", "insert", "delete")
RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def zipf_table(vocab, s=1.1):
    w = [1.0 / (k ** s) for k in range(1, vocab - 1)]
    return list(itertools.accumulate(w))


def fresh(rng, cum, n):
    toks = rng.choices(range(2, VOCAB), cum_weights=cum, k=n)
    # Paragraph breaks every 30-90 tokens.
    out, i = [], 0
    while i < n:
        k = rng.randint(30, 90)
        out.extend(toks[i:i + k])
        out.append(PARA)
        i += k
    return out


def edit(rng, cum, doc, rate):
    out = []
    for t in doc:
        u = rng.random()
        if u < rate / 3:
            out.append(rng.choices(range(2, VOCAB), cum_weights=cum)[0])
        elif u < 2 * rate / 3:
            continue
        elif u < rate:
            out.append(t)
            out.append(rng.choices(range(2, VOCAB), cum_weights=cum)[0])
        else:
            out.append(t)
    return out


def paragraphs(doc):
    paras, cur = [], []
    for t in doc:
        cur.append(t)
        if t == PARA:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    return paras


def variant(rng, cum, doc, kind, rate):
    if kind == "edit":
        return edit(rng, cum, doc, rate)
    if kind == "reorder":
        p = paragraphs(doc)
        rng.shuffle(p)
        return edit(rng, cum, [t for q in p for t in q], rate)
    k = max(1, int(rate * len(doc)))
    at = rng.randint(0, len(doc))
    if kind == "insert":
        return doc[:at] + fresh(rng, cum, k)[:k] + doc[at:]
    at = min(at, len(doc) - k)
    return doc[:at] + doc[at + k:]


def grams(doc, n):
    if len(doc) < n:
        return {tuple(doc)} if doc else set()
    return {tuple(doc[i:i + n]) for i in range(len(doc) - n + 1)}


def jaccard(a, b, n):
    ga, gb = grams(a, n), grams(b, n)
    return len(ga & gb) / len(ga | gb) if ga or gb else 1.0


def gen(args):
    rng = random.Random(args.seed)
    cum = zipf_table(VOCAB)
    docs = []   # (tokens, family, kind, rate, jaccard with the original)
    fam = 0

    def length():
        return max(20, int(rng.lognormvariate(0, 0.5) * args.len))

    for _ in range(args.unrelated):
        docs.append((fresh(rng, cum, length()), -1, "unrelated", 0.0, 0.0))
    for kind in KINDS:
        for rate in RATES:
            for _ in range(args.pairs):
                orig = fresh(rng, cum, length())
                v = variant(rng, cum, orig, kind, rate)
                docs.append((orig, fam, "original", 0.0, 1.0))
                docs.append((v, fam, kind, rate, jaccard(orig, v, args.ngram)))
                fam += 1
    for _ in range(args.clusters):
        orig = fresh(rng, cum, length())
        docs.append((orig, fam, "original", 0.0, 1.0))
        for _ in range(4):
            v = edit(rng, cum, orig, 0.01)
            docs.append((v, fam, "cluster", 0.01, jaccard(orig, v, args.ngram)))
        fam += 1
    rng.shuffle(docs)
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "ids.txt"), "w") as f:
        for d in docs:
            f.write(" ".join(map(str, d[0])) + "\n")
    with open(os.path.join(args.dir, "truth.tsv"), "w") as f:
        f.write("document\tfamily\tkind\trate\tjaccard\n")
        for i, d in enumerate(docs):
            f.write(f"{i}\t{d[1]}\t{d[2]}\t{d[3]}\t{d[4]:.4f}\n")
    print(f"neardup: {len(docs)} documents, {sum(len(d[0]) for d in docs)} tokens, "
          f"{fam} families in {args.dir}", file=sys.stderr)


def s_curve(j, bands, rows):
    return 1 - (1 - j ** rows) ** bands


def score(args):
    truth, docs = [], []
    with open(os.path.join(args.dir, "truth.tsv")) as f:
        next(f)
        for line in f:
            d, fam, kind, rate, jac = line.split("\t")
            truth.append((int(fam), kind, float(rate), float(jac)))
    with open(os.path.join(args.dir, "ids.txt")) as f:
        docs = [list(map(int, line.split())) for line in f]
    kept = list(range(len(truth)))
    removed, exact = {}, []
    with open(os.path.join(args.packed, "removed.tsv")) as f:
        next(f)
        for line in f:
            d, reason, k = line.rstrip("\n").split("\t")
            if reason == "near":
                removed[int(d)] = int(k)
                kept[int(d)] = int(k)
            else:
                exact.append(int(d))
    # An exact repeat stands for the first document with its tokens (then maybe near-removed).
    first = {}
    for i, d in enumerate(docs):
        first.setdefault(tuple(d), i)
    for d in exact:
        k = first[tuple(docs[d])]
        kept[d] = kept[k]
    n = args.ngram
    # Precision against the planted truth: the kept document is of the same family.
    tp = sum(1 for d, k in removed.items() if truth[d][0] >= 0 and truth[d][0] == truth[k][0])
    fp = len(removed) - tp
    prec = tp / len(removed) if removed else 1.0
    # Against true Jaccard: the removed document and the one kept in its place.
    jr = sorted(jaccard(docs[d], docs[k], n) for d, k in removed.items())
    print(f"near-duplicates removed: {len(removed)}; planted precision {prec:.4f} "
          f"({tp} right, {fp} wrong)")
    if jr:
        lo = sum(1 for j in jr if j < 0.5)
        print(f"true {n}-gram Jaccard of removed vs kept: min {jr[0]:.3f}, median "
              f"{jr[len(jr) // 2]:.3f}; below 0.5: {lo}")
    # Recall: a variant is found when it and its original end in the same cluster.
    orig = {}
    for i, t in enumerate(truth):
        if t[1] == "original":
            orig[t[0]] = i
    rows = {}
    jbins = {}
    for i, (fam, kind, rate, jac) in enumerate(truth):
        if fam < 0 or kind == "original":
            continue
        found = kept[i] == kept[orig[fam]]
        r = rows.setdefault((kind, rate), [0, 0, 0.0])
        r[0] += found
        r[1] += 1
        r[2] += jac
        b = min(int(jac * 10), 9)
        jb = jbins.setdefault(b, [0, 0, 0.0])
        jb[0] += found
        jb[1] += 1
        jb[2] += s_curve(jac, args.bands, args.rows)
    print("recall by planted change (found / planted, mean true Jaccard):")
    for kind in KINDS + ("cluster",):
        cells = []
        for rate in RATES:
            r = rows.get((kind, rate))
            if r:
                cells.append(f"{rate:g}: {r[0]}/{r[1]} (J {r[2] / r[1]:.2f})")
        if cells:
            print(f"  {kind:8s} " + ", ".join(cells))
    print(f"recall by true Jaccard (found / pairs, expected from 1-(1-J^{args.rows})^{args.bands}):")
    for b in sorted(jbins):
        jb = jbins[b]
        print(f"  J {b / 10:.1f}-{(b + 1) / 10:.1f}: {jb[0]}/{jb[1]} = {jb[0] / jb[1]:.3f}, "
              f"expected {jb[2] / jb[1]:.3f}")
    hi = [jbins[b] for b in jbins if b >= 8]
    rec_hi = sum(x[0] for x in hi) / max(1, sum(x[1] for x in hi))
    print(f"recall at true Jaccard >= 0.8: {rec_hi:.4f}")
    ok = True
    if args.min_precision is not None and prec < args.min_precision:
        print(f"FAIL: precision {prec:.4f} < {args.min_precision}")
        ok = False
    if args.min_recall_high is not None and rec_hi < args.min_recall_high:
        print(f"FAIL: recall at J >= 0.8 {rec_hi:.4f} < {args.min_recall_high}")
        ok = False
    if args.max_fp is not None and fp > args.max_fp:
        print(f"FAIL: {fp} wrong removals > {args.max_fp}")
        ok = False
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("dir")
    g.add_argument("--unrelated", type=int, default=2000)
    g.add_argument("--pairs", type=int, default=20, help="pairs per (kind, rate)")
    g.add_argument("--clusters", type=int, default=20)
    g.add_argument("--len", type=int, default=300, help="median document length in tokens")
    g.add_argument("--ngram", type=int, default=5)
    g.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("score")
    s.add_argument("dir")
    s.add_argument("packed")
    s.add_argument("--ngram", type=int, default=5)
    s.add_argument("--bands", type=int, default=14)
    s.add_argument("--rows", type=int, default=8)
    s.add_argument("--min-precision", type=float)
    s.add_argument("--min-recall-high", type=float)
    s.add_argument("--max-fp", type=int)
    args = ap.parse_args()
    if args.cmd == "gen":
        gen(args)
        return 0
    return score(args)


if __name__ == "__main__":
    sys.exit(main())
