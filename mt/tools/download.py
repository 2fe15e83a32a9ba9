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
