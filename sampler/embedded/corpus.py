"""The embedded backbone's language corpus: Debian's `fortunes` (real English that installs offline).

Records are `%`-separated plain text under /usr/share/games/fortunes. We undo terminal overstriking,
collapse whitespace to single spaces (the model sees one line per record), drop ASCII art and
non-English files, de-duplicate, and split train / validation by a hash of the record text so that
the split does not depend on file order or on which fortune packages are installed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# not prose: pictures, and a file of untranslated foreign-language records
EXCLUDED_FILES = {"ascii-art", "translate-me"}
MIN_CHARS, MAX_CHARS = 20, 400
VAL_PERCENT = 5

_OVERSTRIKE = re.compile(r".\x08")
_SPACE = re.compile(r"\s+")


class CorpusMissing(FileNotFoundError):
    """The fortunes data is not installed."""


def normalise(text: str) -> str:
    """One line of plain ASCII text: overstrikes removed, whitespace collapsed."""
    text = _OVERSTRIKE.sub("", text)
    text = _SPACE.sub(" ", text).strip()
    return text


def _is_prose(text: str) -> bool:
    if not text.isascii() or not (MIN_CHARS <= len(text) <= MAX_CHARS):
        return False
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    # ASCII art and tables are mostly punctuation; prose is mostly letters
    return letters >= 0.6 * len(visible)


def read_records(directory: Path = FORTUNE_DIR) -> list[str]:
    """All usable records, de-duplicated, in a fixed order (sorted by file name, then file order)."""
    if not directory.is_dir():
        raise CorpusMissing(f"{directory} not found: install the Debian package `fortunes` "
                            "(apt-get install -y fortunes)")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and not p.suffix and not p.is_symlink() and p.name not in EXCLUDED_FILES)
    seen: set[str] = set()
    out: list[str] = []
    for f in files:
        raw = f.read_bytes().decode("latin-1")
        for rec in re.split(r"^%$", raw, flags=re.M):
            text = normalise(rec)
            if _is_prose(text) and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def split_of(text: str) -> str:
    """'val' for about VAL_PERCENT % of records, chosen by a hash of the text; else 'train'."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return "val" if h % 100 < VAL_PERCENT else "train"


def load_corpus(directory: Path = FORTUNE_DIR) -> dict[str, list[str]]:
    """{'train': [...], 'val': [...]} records."""
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for text in read_records(directory):
        splits[split_of(text)].append(text)
    return splits
