"""Hostile input to `mt translate` and `mt score`: one output line per input line, exit 0, nothing else on stdout."""
from __future__ import annotations

import re

from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from mt.cli import main

NASTY = [
    b"A dog runs in the park.",
    b"",
    b"   \t  ",
    b"Ein Hund l\xc3\xa4uft. " * 6250,                       # 100,000 characters
    b"caf\xe9 \xff\xfe\xc3 broken UTF-8 \xed\xa0\x80",       # invalid UTF-8, a lone surrogate
    b"nul\x00in\x00the\x00middle",
    b"Two men talk.\r",                                        # CRLF line end
    b"\r",
    b"\x01\x02\x1b[31mred\x1b[0m\x7f\x0b\x0c\x1c\x1d\x1e tab\there",
    b"\xc2\x85 next line \xe2\x80\xa8 line sep \xe2\x80\xa9 para sep",  # Unicode line breaks inside a line
    "สวัสดีครับ 🐕🚀👍🏽 مرحبا".encode(),
    b"\xef\xbb\xbfBOM first",
    b"no final newline",
]


def input_lines(data: bytes) -> int:
    """Lines as `for line in sys.stdin.buffer` sees them: split on b'\\n', a last piece counts if non-empty."""
    pieces = data.split(b"\n")
    return len(pieces) - (pieces[-1] == b"")


def output_lines(stdout: str) -> list[str]:
    assert stdout == "" or stdout.endswith("\n")
    return stdout.split("\n")[:-1]


def invoke(*args, input: bytes):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_translate_nasty_input_keeps_line_count(trained_run):
    """Empty, blank, huge, invalid-UTF-8, NUL, CRLF, control, unseen-script lines: one output line each, in place."""
    data = b"\n".join(NASTY)
    result = invoke("translate", "-m", trained_run, input=data)
    assert result.exit_code == 0, result.output
    out = output_lines(result.stdout)
    assert len(out) == input_lines(data) == len(NASTY)
    assert out[1] == out[2] == out[7] == ""  # blank inputs give blank outputs
    assert not any(line.startswith("mt:") for line in out) and "truncated" in result.stderr


def test_score_nasty_input_keeps_line_count(trained_run):
    """`mt score` on the same lines as TSV pairs: one 'logP<TAB>tokens<TAB>nll' line per input line."""
    data = b"\n".join(line + b"\t" + line[:50] for line in NASTY[:-1]) + b"\n" + NASTY[-1]
    result = invoke("score", "-m", trained_run, input=data)
    assert result.exit_code == 0, result.output
    out = output_lines(result.stdout)
    assert len(out) == input_lines(data) == len(NASTY)
    # the 100,000-character line is longer than a line is read: not scored, and said so
    assert out[3] == "nan\t0\tnan" and "stdin line 4 has 100,048 characters" in result.stderr
    assert all(re.fullmatch(r"-?\d+\.\d{4}\t\d+\t\d+\.\d{4}", line) for line in out[:3] + out[4:]), out


def test_translate_random_bytes_keeps_line_count(trained_run):
    """Hypothesis: >= 1,000 random byte strings (40 stdins of 25) through `mt translate`: line count preserved."""
    ran = []

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.lists(st.one_of(st.binary(max_size=80), st.text(max_size=40).map(str.encode)), min_size=25, max_size=25))
    def check(strings):
        data = b"\n".join(strings)
        result = invoke("translate", "-m", trained_run, "--greedy", "--max-len-a", "0", "--max-len-b", "5", input=data)
        assert result.exit_code == 0, (data, result.output)
        out = output_lines(result.stdout)
        assert len(out) == input_lines(data), data
        assert not any(line.startswith("mt:") for line in out)
        ran.extend(strings)

    check()
    print(f"\nfuzz: {len(ran)} byte strings translated without a failure")
    assert len(ran) >= 1000


def test_a_state_space_lm_continues_nasty_prompts_one_line_each(char_lm_run, tmp_path):
    """The same contract for a decoder-only model with a fixed-size state (prompts of every shape
    through the padded prefill), `mt translate` continuing each line and `mt score --text` scoring it."""
    data = b"\n".join(NASTY)
    result = invoke("translate", "-m", char_lm_run, "--greedy", "--max-len-b", "20", input=data)
    assert result.exit_code == 0, result.output
    out = output_lines(result.stdout)
    assert len(out) == input_lines(data) == len(NASTY)
    assert not any(line.startswith("mt:") for line in out)
    (tmp_path / "nasty.txt").write_bytes(data)
    result = invoke("score", "-m", char_lm_run, "--text", tmp_path / "nasty.txt", input=b"")
    assert result.exit_code == 0, result.output
    assert len(output_lines(result.stdout)) == len(NASTY)
