#!/usr/bin/python3
"""Read and write dsv3 shards from Python, written from docs/formats.md alone.

It is the proof that the format document is complete (tests/cli/test_shard_python.sh runs
it against the C library both ways), and a reader for Python tools (a PyTorch data loader,
a notebook). Needs python3-zstandard and python3-xxhash (Debian), nothing else.

    python3 scripts/dsv3_shard.py dump FILE         # same text as `dsv3-shard dump`
    python3 scripts/dsv3_shard.py make OUT < ids    # same input as `dsv3-shard make`
"""
import struct
import sys
from array import array

import xxhash
import zstandard

FILE_MAGIC, FOOTER_MAGIC = b"DSV3SHRD", b"DSV3END\n"
CHUNK_MAGIC, INDEX_MAGIC = b"DSVC", b"DSVI"
HEADER, CHUNK_HEADER, FOOTER = 80, 64, 32


class ShardError(Exception):
    pass


def _h(b):
    return xxhash.xxh3_64_intdigest(b)


def _unshuffle(raw, n):
    """Undo the byte-plane shuffle: byte k of token i is at k*n + i."""
    out = bytearray(4 * n)
    for k in range(4):
        out[k::4] = raw[k * n:(k + 1) * n]
    return bytes(out)


def read_records(f, name="<shard>"):
    """Yields (tokens: array('I'), flags) front to back, checking everything the spec lists."""
    def need(n, what):
        b = f.read(n)
        if len(b) != n:
            raise ShardError(f"{name}: file ends inside {what}")
        return b

    h = need(HEADER, "the header")
    if h[:8] != FILE_MAGIC:
        raise ShardError(f"{name}: not a dsv3 shard")
    (version, kind, token_bytes, seq_len, vocab, _chunk_tokens, flags, _r, _tok_id,
     n_rec, n_tok, _r2, hh) = struct.unpack_from("<7II QQQQQ", h, 8)
    if version != 1 or token_bytes != 4 or hh != _h(h[:72]) or kind not in (1, 2):
        raise ShardError(f"{name}: bad header")
    dctx = zstandard.ZstdDecompressor()
    records = tokens = pos = 0
    offsets, pending = [], array("I")
    pos = HEADER
    while True:
        magic = need(4, "a chunk or the index")
        if magic == INDEX_MAGIC:
            break
        if magic != CHUNK_MAGIC:
            raise ShardError(f"{name}: bad chunk magic at {pos}")
        ch = magic + need(CHUNK_HEADER - 4, "a chunk header")
        (cflags, nt, ne, raw_bytes, zbytes, first_rec, first_tok, zhash, _res,
         chh) = struct.unpack_from("<IIIIIQQQQQ", ch, 4)
        if chh != _h(ch[:56]) or raw_bytes != 4 * nt + 8 * ne or (nt == 0 and ne == 0):
            raise ShardError(f"{name}: bad chunk header at {pos}")
        if (first_rec, first_tok) != (records, tokens):
            raise ShardError(f"{name}: chunk at {pos} out of sequence")
        z = need(zbytes, "a chunk")
        if _h(z) != zhash:
            raise ShardError(f"{name}: chunk checksum mismatch at {pos}")
        raw = dctx.decompress(z, max_output_size=raw_bytes)
        if len(raw) != raw_bytes:
            raise ShardError(f"{name}: chunk at {pos} has the wrong size")
        tb = _unshuffle(raw[:4 * nt], nt) if cflags & 1 else raw[:4 * nt]
        toks = array("I", tb)
        if sys.byteorder == "big":
            toks.byteswap()
        offsets.append((pos, first_rec, first_tok))
        at = 0
        for i in range(ne):
            end, rflags = struct.unpack_from("<II", raw, 4 * nt + 8 * i)
            if end < at or end > nt:
                raise ShardError(f"{name}: record end out of order at {pos}")
            rec = pending + toks[at:end]
            pending = array("I")
            if vocab and any(t >= vocab for t in rec):
                raise ShardError(f"{name}: token not below vocab_size {vocab}")
            if kind == 2 and len(rec) != seq_len:
                raise ShardError(f"{name}: packed record of {len(rec)} tokens")
            yield rec, rflags
            at = end
        pending += toks[at:]
        records += ne
        tokens += nt
        pos += CHUNK_HEADER + zbytes
    if pending:
        raise ShardError(f"{name}: last record has no end")
    head = magic + need(28, "the index")
    n_chunks, i_rec, i_tok = struct.unpack_from("<QQQ", head, 8)
    body = need(24 * n_chunks + 8, "the index")
    index = head + body
    if struct.unpack_from("<Q", index, len(index) - 8)[0] != _h(index[:-8]):
        raise ShardError(f"{name}: index checksum mismatch")
    entries = [struct.unpack_from("<QQQ", index, 32 + 24 * i) for i in range(n_chunks)]
    if entries != offsets or (i_rec, i_tok) != (records, tokens):
        raise ShardError(f"{name}: index disagrees with the chunks")
    if flags & 1 and (n_rec, n_tok) != (records, tokens):
        raise ShardError(f"{name}: header counts disagree with the index")
    foot = need(FOOTER, "the footer")
    ioff, ibytes, fh = struct.unpack_from("<QQQ", foot)
    if foot[24:] != FOOTER_MAGIC or fh != _h(foot[:16]) or (ioff, ibytes) != (pos, len(index)):
        raise ShardError(f"{name}: bad footer")
    if f.read(1):
        raise ShardError(f"{name}: data after the footer")


def write_shard(f, records, chunk_tokens=1 << 20, level=3, seq_len=0):
    """Writes (tokens, flags) records as one shard to a binary stream (counts left out of
    the header, as a writer on a pipe does)."""
    kind = 2 if seq_len else 1
    h = FILE_MAGIC + struct.pack("<7II QQQQ", 1, kind, 4, seq_len, 0, chunk_tokens, 0, 0, 0,
                                 0, 0, 0)
    f.write(h + struct.pack("<Q", _h(h)))
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    pos, index = HEADER, []
    records_done = tokens_done = 0
    buf, ends = array("I"), []
    chunk_rec, chunk_tok = 0, 0

    def flush():
        nonlocal pos, chunk_rec, chunk_tok, buf, ends
        if not buf and not ends:
            return
        tb = buf.tobytes() if sys.byteorder == "little" else _swapped(buf)
        raw = tb + b"".join(struct.pack("<II", e, fl) for e, fl in ends)
        z = cctx.compress(raw)
        ch = CHUNK_MAGIC + struct.pack("<IIIIIQQQQ", 0, len(buf), len(ends), len(raw), len(z),
                                       chunk_rec, chunk_tok, _h(z), 0)
        f.write(ch + struct.pack("<Q", _h(ch)) + z)
        index.append((pos, chunk_rec, chunk_tok))
        pos += CHUNK_HEADER + len(z)
        chunk_rec, chunk_tok = records_done, tokens_done
        buf, ends = array("I"), []

    for toks, fl in records:
        toks = array("I", toks)
        i = 0
        while True:
            take = min(len(toks) - i, chunk_tokens - len(buf))
            buf += toks[i:i + take]
            i += take
            tokens_done += take
            if i == len(toks):
                break
            flush()
        ends.append((len(buf), fl))
        records_done += 1
        if len(buf) == chunk_tokens:
            flush()
    flush()
    ix = INDEX_MAGIC + struct.pack("<IQQQ", 0, len(index), records_done, tokens_done)
    ix += b"".join(struct.pack("<QQQ", *e) for e in index)
    ix += struct.pack("<Q", _h(ix))
    foot = struct.pack("<QQ", pos, len(ix))
    f.write(ix + foot + struct.pack("<Q", _h(foot)) + FOOTER_MAGIC)


def _swapped(a):
    b = array("I", a)
    b.byteswap()
    return b.tobytes()


def main(argv):
    if len(argv) == 3 and argv[1] == "dump":
        with (sys.stdin.buffer if argv[2] == "-" else open(argv[2], "rb")) as f:
            out = sys.stdout
            for toks, _flags in read_records(f, argv[2]):
                out.write(" ".join(map(str, toks)) + "\n")
        return 0
    if len(argv) == 3 and argv[1] == "make":
        recs = (([int(x) for x in line.split()], 0) for line in sys.stdin)
        with open(argv[2], "wb") as f:
            write_shard(f, recs, chunk_tokens=1000)
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except ShardError as e:
        sys.stderr.write(f"dsv3_shard.py: {e}\n")
        sys.exit(1)
