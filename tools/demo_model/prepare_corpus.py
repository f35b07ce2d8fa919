#!/usr/bin/env python3
"""Build the demo model's training corpus from Debian's King James Bible.

The text comes from the ``bible-kjv-text`` Debian package and is read with the
``bible`` program of the ``bible-kjv`` package (``bible -f Gen1:1-Rev22:21``
prints the whole KJV, one verse per line, each line starting with a reference
such as ``Ge1:1``). The King James Version is in the public domain.

The script is deterministic: it strips the verse references and writes one
verse per line to

    <out>/train.txt   every verse whose index i (0-based, in canonical order)
                      satisfies i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1
    <out>/valid.txt   the held-out verses: every 50th verse (i % 50 == 49)
    <out>/SHA256SUMS  hashes of both files, so a rebuild can be checked

The corpus is not committed to the repository (``.data/`` is git-ignored).

Usage:  python tools/demo_model/prepare_corpus.py [--out .data/demo_corpus]
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

HOLDOUT_EVERY = 50
EXPECTED_VERSES = 31102  # verses in the KJV (Protestant canon) as packaged by Debian
VERSE_SPEC = "Gen1:1-Rev22:21"
# "Ge1:1 In the beginning ...", "1Sam3:10 ...", "SSol2:1 ..."
_LINE_RE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.+)$")

DEFAULT_OUT = Path(__file__).resolve().parents[2] / ".data" / "demo_corpus"


def read_kjv() -> list[str]:
    """Return the KJV verses (text only, canonical order) from the `bible` program."""
    exe = shutil.which("bible")
    if exe is None:
        sys.exit(
            "error: the `bible` program was not found.\n"
            "It comes from Debian's `bible-kjv` package (the text itself is in "
            "`bible-kjv-text`). Install both with:\n"
            "    sudo apt-get update && sudo apt-get install -y bible-kjv bible-kjv-text"
        )
    # -f formats one verse per line; COLUMNS is pinned so the output never depends
    # on the caller's terminal.
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "10000", "LC_ALL": "C"}
    proc = subprocess.run(
        [exe, "-f", VERSE_SPEC], stdin=subprocess.DEVNULL, capture_output=True, env=env, check=False
    )
    if proc.returncode != 0:
        sys.exit(
            f"error: `bible -f {VERSE_SPEC}` failed (exit {proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip()}\n"
            "Is the text package installed?  sudo apt-get install -y bible-kjv-text"
        )
    verses: list[str] = []
    for lineno, raw in enumerate(proc.stdout.decode("ascii").splitlines(), 1):
        if not raw.strip():
            continue
        m = _LINE_RE.match(raw)
        if m is None:
            sys.exit(f"error: unexpected line {lineno} from `bible`: {raw!r}")
        text = " ".join(m.group("text").split())  # normalise whitespace
        verses.append(text)
    if len(verses) != EXPECTED_VERSES:
        sys.exit(f"error: expected {EXPECTED_VERSES} verses from `bible`, got {len(verses)}")
    return verses


def split(verses: list[str]) -> tuple[list[str], list[str]]:
    train = [v for i, v in enumerate(verses) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    valid = [v for i, v in enumerate(verses) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return train, valid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = ap.parse_args()

    verses = read_kjv()
    train, valid = split(verses)
    args.out.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, lines in (("train.txt", train), ("valid.txt", valid)):
        data = ("\n".join(lines) + "\n").encode("ascii")
        (args.out / name).write_bytes(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
        print(f"{args.out / name}: {len(lines)} verses, {len(data)} bytes")
    (args.out / "SHA256SUMS").write_text("".join(sums))
    print("".join(sums), end="")


if __name__ == "__main__":
    main()
