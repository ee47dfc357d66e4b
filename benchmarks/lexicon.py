"""Pronunciation lexicon cost: compiling a lexicon (once per worker and lexicon) and applying it to a chunk of text
(once per chunk), ours against the pattern it replaced, in the same run.

Ours: `jobs.lexicon`'s matcher (one alternation, each boundary written once per run of entries that share it).
Baseline: the same alternation with each entry's boundaries written around it (what the module compiled before:
the boundary classes made the pattern ~4x longer and sre's compile ~80x slower). Both are checked to give the same
text and the same entries on every chunk before anything is timed.

Random lexicons of `--sizes` entries (Latin words of 3-10 letters, a fifth of them two-word phrases, a tenth with a
CJK side, mixed case rules) applied to 300-character chunks of text that holds some of their words. Prints one JSON
line last: per size, compile seconds and ms per chunk for both, and their ratios (baseline / ours).

    python benchmarks/lexicon.py [--sizes 200,2000,8000] [--chunks 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_lexicon(n: int, rng: random.Random):
    from jobs.lexicon import Entry

    def word() -> str:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10)))
        return w.upper() if rng.random() < 0.2 else w

    out: dict[str, Entry] = {}
    while len(out) < n:
        w = word() + (" " + word() if rng.random() < 0.2 else "") + ("猫" if rng.random() < 0.1 else "")
        out.setdefault(w.lower(), Entry(w, "x" + word().lower(), rng.choice(["auto", "exact", "ignore"]), len(out)))
    return tuple(out.values())


def chunks_for(entries, count: int, rng: random.Random) -> list[str]:
    words = [e.word for e in entries]
    out = []
    for _ in range(count):
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < 300:
            parts.append(rng.choice(words) if rng.random() < 0.3 else "".join(
                rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))))
        out.append(" ".join(parts)[:300])
    return out


def baseline_pattern(entries) -> re.Pattern[str]:
    """The alternation as it was: every entry with its own boundary classes."""
    from jobs.lexicon import _WORD, UNBOUNDED, in_blocks

    order = sorted(range(len(entries)), key=lambda i: (-len(entries[i].word), not entries[i].exact))
    alts = []
    for i in order:
        e = entries[i]
        body = r"\s+".join(re.escape(w) for w in e.word.split())
        body = body if e.exact else f"(?i:{body})"
        left = "" if in_blocks(e.word[0], UNBOUNDED) else rf"(?<!{_WORD})"
        right = "" if in_blocks(e.word[-1], UNBOUNDED) else rf"(?!{_WORD})"
        alts.append(f"{left}{body}{right}")
    return re.compile("|".join(alts))


def bench(n: int, count: int) -> dict:
    from jobs import lexicon as L

    rng = random.Random(n)
    entries = random_lexicon(n, rng)
    texts = chunks_for(entries, count, rng)
    lx = L.Lexicon(entries)
    L._CACHE.clear()
    re.purge()
    t = time.perf_counter()
    ours = L._compiled(entries)
    ours_compile = time.perf_counter() - t
    re.purge()
    t = time.perf_counter()
    base = baseline_pattern(entries)
    base_compile = time.perf_counter() - t
    for text in texts:  # the same matches, or the timing means nothing
        assert [m.span() for m in ours.pattern.finditer(text)] == [m.span() for m in base.finditer(text)], text
    lx.apply(texts[0])
    t = time.perf_counter()
    for text in texts:
        lx.apply(text)
    ours_ms = (time.perf_counter() - t) * 1000 / count
    original = ours.pattern
    try:  # the same apply() (boundary check for marks, which entry, respelling) over the baseline pattern
        ours.pattern = base
        t = time.perf_counter()
        for text in texts:
            lx.apply(text)
        base_ms = (time.perf_counter() - t) * 1000 / count
    finally:
        ours.pattern = original
    return {"entries": n, "compile_s": round(ours_compile, 3), "baseline_compile_s": round(base_compile, 3),
            "compile_ratio": round(base_compile / ours_compile, 1), "ms_per_chunk": round(ours_ms, 2),
            "baseline_ms_per_chunk": round(base_ms, 2), "apply_ratio": round(base_ms / ours_ms, 2),
            "pattern_chars": len(original.pattern), "baseline_pattern_chars": len(base.pattern)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="200,2000,8000", help="lexicon sizes, comma-separated (default 200,2000,8000)")
    p.add_argument("--chunks", type=int, default=20, help="300-character chunks applied per size (default 20)")
    args = p.parse_args(argv)
    rows = [bench(int(s), args.chunks) for s in args.sizes.split(",")]
    for r in rows:
        print(r, file=sys.stderr)
    print(json.dumps({"bench": "lexicon", "host": platform.processor() or platform.machine(), "sizes": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
