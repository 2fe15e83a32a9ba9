"""Sequence-level knowledge distillation (Kim & Rush 2016): a teacher's translations of a training
corpus become the targets a student trains on (`data.train` pointing at the new files).

`distill(translator, prefix, src_lang, tgt_lang, out)` reads PREFIX.SRC[.gz] and writes
OUT.SRC (the sources, copied) and OUT.TGT (the teacher's best translation of each), streaming a
window of lines at a time. It is resumable: lines already in OUT.TGT.partial are kept and their
sources skipped; the finished files replace the partial ones in one rename each.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm import tqdm

from mt.data import corpus_file, read_lines
from mt.errors import MTError


def _keep_whole_lines(path: Path, n: int | None = None) -> int:
    """Cut `path` after its last complete line (or after line n); returns the lines kept."""
    if not path.exists():
        path.touch()
        return 0
    kept, offset = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n") or (n is not None and kept == n):
                break
            kept, offset = kept + 1, offset + len(line)
    os.truncate(path, offset)
    return kept


def distill(translator, prefix: str, src_lang: str, tgt_lang: str, out: str | Path, *, beam_size: int = 5,
            window: int = 1000, progress: bool = True) -> tuple[Path, Path]:
    """Translate PREFIX.SRC with `translator` (beam_size) into OUT.TGT beside a copy OUT.SRC; returns both."""
    source = corpus_file(prefix, src_lang)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    final_src, final_tgt = Path(f"{out}.{src_lang}"), Path(f"{out}.{tgt_lang}")
    if final_tgt.exists():
        raise MTError(f"{final_tgt} exists: distillation into {out} is finished (remove it to distil again)")
    part_src, part_tgt = Path(f"{final_src}.partial"), Path(f"{final_tgt}.partial")
    # a kill can leave one file a window ahead of the other, or a torn last line: keep what both hold
    done = min(_keep_whole_lines(part_src), _keep_whole_lines(part_tgt))
    _keep_whole_lines(part_src, done), _keep_whole_lines(part_tgt, done)
    total = sum(1 for _ in read_lines(source, on_cut=lambda *a: None))
    lines = read_lines(source)
    for _ in range(done):  # resume: these lines are translated already
        next(lines)
    bar = tqdm(total=total, initial=done, unit="line", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with open(part_src, "a", encoding="utf-8") as fs, open(part_tgt, "a", encoding="utf-8") as ft:
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) == window:
                _write(translator, chunk, fs, ft, beam_size)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            _write(translator, chunk, fs, ft, beam_size)
            bar.update(len(chunk))
    bar.close()
    os.replace(part_src, final_src)
    os.replace(part_tgt, final_tgt)
    return final_src, final_tgt


def _write(translator, chunk: list[str], fs, ft, beam_size: int) -> None:
    """One window: translated first, then written to both files and flushed (a resume keeps only
    the lines both files hold whole)."""
    texts = translator.translate(chunk, beam_size=beam_size)
    fs.write("".join(" ".join(s.split("\n")) + "\n" for s in chunk))
    ft.write("".join(" ".join(t.splitlines()) + "\n" for t in texts))
    fs.flush()
    ft.flush()
    os.fsync(fs.fileno())
    os.fsync(ft.fileno())
