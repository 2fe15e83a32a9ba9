"""Every numeric config key and every numeric CLI option, fed 0, -1, nan, inf and a huge number:
where the value is outside the key's valid range, one line on stderr naming it, exit code 2, no
traceback; the run directory is never created."""
from __future__ import annotations

import math
import typing

import click
import pytest
from click.testing import CliRunner

from conftest import REPO
from mt import config
from mt.cli import main
from mt.cli.common import Bounded
from test_reliability import assert_one_line_error

BAD = {"0": 0, "-1": -1, ".nan": math.nan, ".inf": math.inf, "1e30": 1e30}  # YAML text -> the number it is
HUGE_INT = 10**30


def numeric_keys() -> list[tuple[str, type]]:
    keys = []
    for section in ("data", "model", "train", "decode"):
        cls = type(getattr(config.Config(), section))
        for name, typ in typing.get_type_hints(cls).items():
            if typ in (int, float) or name == "betas":
                keys.append((f"{section}.{name}", float if name == "betas" else typ))
    return keys


def config_cases():
    for key, typ in numeric_keys():
        for text, number in BAD.items():
            if typ is int and text == "1e30":
                text, number = str(HUGE_INT), HUGE_INT
            if not (math.isfinite(number) and number in config.RANGES[key]):
                yield key, text


def test_every_numeric_key_has_a_range():
    assert {k for k, _ in numeric_keys()} == set(config.RANGES)


@pytest.mark.parametrize("key,text", list(config_cases()))
def test_bad_config_value_is_one_line(key, text, tmp_path):
    value = f"[{text}, 0.98]" if key == "train.betas" else text
    result = CliRunner().invoke(main, ["train", str(REPO / "recipes/tiny.yaml"), "--set", f"{key}={value}",
                                       "--set", f"train.out_dir={tmp_path / 'run'}"])
    assert_one_line_error(result, key)
    assert not (tmp_path / "run").exists()


def numeric_options():
    """(command path, option name, Bounded type) for every numeric option of the CLI."""
    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, path + [name])
            return
        for p in command.params:
            if isinstance(p, click.Option):
                yield path, p
    for path, option in walk(main, []):
        assert not isinstance(option.type, (click.types.IntParamType, click.types.FloatParamType)) \
            or isinstance(option.type, Bounded), f"mt {' '.join(path)} {option.opts[0]}: a number without a range"
        if isinstance(option.type, Bounded):
            yield path, option.opts[0], option.type


def option_cases():
    for path, name, typ in numeric_options():
        for text, number in BAD.items():
            if typ.kind is int and text == "1e30":
                text, number = str(HUGE_INT), HUGE_INT
            text = text.lstrip(".")  # nan, inf: as a user types them
            if not (math.isfinite(number) and number in typ.valid):
                yield " ".join(path), name, text


@pytest.fixture(scope="module")
def required(random_run, tmp_path_factory):
    """What each command needs besides the option under test."""
    src = tmp_path_factory.mktemp("src") / "src.en"
    src.write_text("a dog\n")
    return {"translate": ["-m", random_run], "eval": ["-m", random_run, "--src", src, "--ref", src],
            "score": ["-m", random_run], "sample": ["-m", random_run], "average": [random_run],
            "bench train": [REPO / "recipes/tiny.yaml"], "bench translate": ["-m", random_run, "--src", src],
            "scaling fit": [tmp_path_factory.mktemp("sweep")]}


def test_options_cover_the_commands_that_take_numbers():
    commands = {path for path, _, _ in option_cases()}
    assert {"translate", "eval", "score", "sample", "average", "bench train", "bench translate", "scaling fit"} <= commands


@pytest.mark.parametrize("command,option,text", list(option_cases()))
def test_bad_option_value_is_one_line(command, option, text, required):
    args = command.split() + [str(a) for a in required.get(command, [])] + [f"{option}={text}"]
    result = CliRunner().invoke(main, args, input="a dog\n")
    assert_one_line_error(result, option)


def test_library_decode_options_are_checked(random_run):
    from mt.errors import MTError
    from mt.translate import Translator

    t = Translator.load(random_run)
    for bad in (dict(beam_size=0), dict(top_p=math.nan), dict(temperature=-1.0), dict(max_len_a=math.inf)):
        with pytest.raises(MTError, match=f"decode.{next(iter(bad))}"):
            t.translate_batch(["a dog"], **bad)
