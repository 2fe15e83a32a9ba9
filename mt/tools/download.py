"""`mt data multi30k`: fetch Multi30K task 1 (raw) from its public repository, or copy a local copy."""
from __future__ import annotations

import gzip
import shutil
import sys
import urllib.request
from pathlib import Path

from mt.errors import MTError

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/{name}"
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")
MULTI30K_LANGS = ("en", "de", "fr", "cs")


def multi30k(out: str | Path, *, source_dir: str | Path | None = None, langs=MULTI30K_LANGS) -> list[Path]:
    """Write SPLIT.LANG.gz (downloaded, or copied from `source_dir`) and SPLIT.LANG (unpacked) under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split in MULTI30K_SPLITS:
        for lang in langs:
            name = f"{split}.{lang}.gz"
            dest = out / name
            tmp = dest.with_name(name + ".part")
            if source_dir is not None:
                src = Path(source_dir) / name
                if not src.is_file():
                    raise MTError(f"--from: {src} not found")
                shutil.copyfile(src, tmp)
            else:
                url = MULTI30K_URL.format(name=name)
                print(f"mt: downloading {url}", file=sys.stderr)
                try:
                    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                        shutil.copyfileobj(r, f)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise MTError(f"cannot download {url}: {e}; use --from DIR for a local copy") from None
            tmp.replace(dest)
            plain = out / f"{split}.{lang}"  # also unpacked, so `mt translate < DIR/test_2016_flickr.en` works
            with gzip.open(dest, "rb") as f, open(plain.with_name(plain.name + ".part"), "wb") as g:
                shutil.copyfileobj(f, g)
            plain.with_name(plain.name + ".part").replace(plain)
            written += [dest, plain]
    return written


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def tinyshakespeare(out: str | Path, *, source: str | Path | None = None, valid_share: float = 0.1) -> list[Path]:
    """Write input.txt, train.txt (the first 90% of the characters) and valid.txt (the last 10%): the
    customary split (nanoGPT's shakespeare_char). `source`: a local input.txt or input.txt.gz."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        path = Path(source)
        if not path.is_file():
            raise MTError(f"--from: {path} not found")
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    else:
        print(f"mt: downloading {TINYSHAKESPEARE_URL}", file=sys.stderr)
        try:
            with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as r:
                raw = r.read()
        except OSError as e:
            raise MTError(f"cannot download {TINYSHAKESPEARE_URL}: {e}; use --from FILE for a local copy") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MTError(f"{source or TINYSHAKESPEARE_URL}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    cut = int(len(text) * (1 - valid_share))
    written = []
    for name, part in (("input.txt", text), ("train.txt", text[:cut]), ("valid.txt", text[cut:])):
        tmp = out / (name + ".part")
        tmp.write_text(part, encoding="utf-8")
        tmp.replace(out / name)
        written.append(out / name)
    return written
