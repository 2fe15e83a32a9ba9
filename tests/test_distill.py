"""mt distill: the teacher's translations of a corpus, line for line; a killed distillation resumes."""
from __future__ import annotations

from click.testing import CliRunner

from mt.cli import main
from mt.translate import Translator


def test_distill_writes_the_teachers_translations_and_resumes(random_run, tiny_corpus, tmp_path, monkeypatch):
    prefix = tiny_corpus["data.train"]
    sources = open(prefix + ".en", encoding="utf-8").read().splitlines()
    want = Translator.load(random_run).translate(sources, beam_size=2)
    import mt.tools.distill as distill_mod

    real_write, windows = distill_mod._write, []

    def dying(translator, chunk, fs, ft, beam_size):  # killed after two windows, mid-way through a third
        if len(windows) == 2:
            fs.write(chunk[0] + "\n")  # one file a line ahead, the other torn
            ft.write("half a li")
            fs.flush(), ft.flush()
            raise KeyboardInterrupt
        windows.append(len(chunk))
        real_write(translator, chunk, fs, ft, beam_size)

    monkeypatch.setattr(distill_mod, "_write", dying)
    out = tmp_path / "kd" / "train"
    args = ["distill", "-m", str(random_run), "--train", prefix, "--out", str(out), "--beam", "2", "--window", "50"]
    assert CliRunner().invoke(main, args).exit_code != 0
    monkeypatch.setattr(distill_mod, "_write", real_write)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "kd" / "train.en").read_text(encoding="utf-8").splitlines() == sources
    assert (tmp_path / "kd" / "train.de").read_text(encoding="utf-8").splitlines() == want
    assert sorted(p.name for p in (tmp_path / "kd").iterdir()) == ["train.de", "train.en"]
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "finished" in again.stderr
