#!/usr/bin/env python3
"""Time datatrove's four MinHash stages on the documents of a neardup.py corpus (for
scripts/bench-pack.sh; run with the python of a venv that has `pip install datatrove xxhash`).

  bench_datatrove.py IDS_TXT WORKDIR

Each document (a line of token ids) becomes a text of one word per token (the id in base 26,
written with the letters a-z, since datatrove's text normalisation maps digits to 0), and
datatrove's word
tokenizer is replaced by a whitespace split, so its 5-grams are exactly dsv3-pack's token
5-grams and no spaCy/NLTK time is counted (the comparison favours datatrove). MinhashConfig is
datatrove's default (5-grams, 14 buckets x 8 hashes, 64-bit xxhash). All stages run in this
one process, one rank each (buckets: one rank per bucket, run one after another), so the
times are CPU time of one core. Prints one line per stage and the totals.
"""
import os
import sys
import time

from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
                                              MinhashDedupCluster, MinhashDedupFilter,
                                              MinhashDedupSignature)
from datatrove.utils.word_tokenizers import WordTokenizer


def word(t):
    s = ""
    t = int(t)
    while True:
        s += chr(97 + t % 26)
        t //= 26
        if not t:
            return s


class Whitespace(WordTokenizer):
    def word_tokenize(self, text):
        return text.split()

    def sent_tokenize(self, text):
        return [text]

    def span_tokenize(self, text):
        raise NotImplementedError


def drain(x):
    if x is not None and hasattr(x, "__iter__"):
        return sum(1 for _ in x)
    return 0


def main():
    ids, work = sys.argv[1], sys.argv[2]
    with open(ids) as f:
        texts = [" ".join(word(t) for t in line.split()) for line in f]
    docs = lambda: (Document(text=t, id=str(i)) for i, t in enumerate(texts))
    cfg = MinhashConfig()
    sig, buckets, clusters = (os.path.join(work, d) for d in ("sigs", "buckets", "remove"))
    times = {}
    t = time.process_time()
    drain(MinhashDedupSignature(output_folder=sig, config=cfg, language=Whitespace()).run(docs(), 0, 1))
    times["signature"] = time.process_time() - t
    t = time.process_time()
    for b in range(cfg.num_buckets):
        drain(MinhashDedupBuckets(input_folder=sig, output_folder=buckets, config=cfg)
              .run(None, b, cfg.num_buckets))
    times["buckets"] = time.process_time() - t
    t = time.process_time()
    drain(MinhashDedupCluster(input_folder=buckets, output_folder=clusters, config=cfg).run(None, 0, 1))
    times["cluster"] = time.process_time() - t
    t = time.process_time()
    kept = drain(MinhashDedupFilter(input_folder=clusters).run(docs(), 0, 1))
    times["filter"] = time.process_time() - t
    n = len(texts)
    total = sum(times.values())
    for k, v in times.items():
        print(f"datatrove {k:9s} {v:8.2f} s CPU  {n / v if v else 0:10.0f} documents/s")
    print(f"datatrove total     {total:8.2f} s CPU  {n / total:10.0f} documents/s; "
          f"{n} documents, {n - kept} removed")


if __name__ == "__main__":
    main()
