"""Config: dataclass defaults, YAML recipes, --set overrides and their errors."""
import re
from pathlib import Path

import pytest

from mt import config
from mt.errors import MTError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_load():
    """No recipe and no overrides gives exactly the dataclass defaults."""
    assert config.load(None) == config.Config()
    assert config.from_dict(None) == config.Config()
    assert config.load(None).model.d_model == config.ModelConfig().d_model


def test_recipe_overrides_apply(tmp_path):
    """A recipe changes the keys it names and leaves every other key at its default."""
    cfg = config.load(write(tmp_path, "model:\n  d_model: 64\n  heads: 2\ntrain:\n  seed: 7\n"))
    assert (cfg.model.d_model, cfg.model.heads, cfg.train.seed) == (64, 2, 7)
    assert cfg.model.ffn == config.ModelConfig().ffn
    assert cfg.data == config.DataConfig() and cfg.decode == config.DecodeConfig()


@pytest.mark.parametrize("text, section, key, value", [
    ("model.enc_layers=4", "model", "enc_layers", 4),
    ("train.lr=0.003", "train", "lr", 0.003),
    ("train.max_minutes=5", "train", "max_minutes", 5.0),
    ("train.progress=false", "train", "progress", False),
    ("train.betas=[0.9, 0.99]", "train", "betas", [0.9, 0.99]),
    ("data.src_lang=fr", "data", "src_lang", "fr"),
    ("data.train=/some/path", "data", "train", "/some/path"),
])
def test_set_override_parses_types(text, section, key, value):
    """`--set section.key=value` parses the value as YAML and stores it with the field's type."""
    got = getattr(getattr(config.load(None, [text]), section), key)
    assert got == value and type(got) is type(value)


def test_set_overrides_beat_recipe(tmp_path):
    """--set wins over the recipe, and later --set wins over earlier ones."""
    path = write(tmp_path, "model:\n  enc_layers: 2\n")
    cfg = config.load(path, ["model.enc_layers=5", "model.dec_layers=1", "model.dec_layers=6"])
    assert (cfg.model.enc_layers, cfg.model.dec_layers) == (5, 6)


def test_set_override_exponent_float():
    """`--set train.lr=1e-3` gives the float 0.001, as parse_override's docstring promises."""
    assert config.load(None, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_set_into_empty_recipe_section(tmp_path):
    """--set works for a section the recipe names but leaves empty (`decode:`)."""
    cfg = config.load(write(tmp_path, "model:\n  d_model: 64\ndecode:\n"), ["decode.beam_size=3"])
    assert cfg.decode.beam_size == 3


@pytest.mark.parametrize("recipe, overrides, key", [
    ("model:\n  enc_layerz: 2\n", [], "model.enc_layerz"),
    ("", ["train.learning_rate=0.1"], "train.learning_rate"),
    ("", ["optim.lr=0.1"], "optim"),
])
def test_unknown_key_names_the_key(tmp_path, recipe, overrides, key):
    """An unknown key or section (in a recipe or --set) is an MTError naming it."""
    with pytest.raises(MTError, match=re.escape(key)):
        config.load(write(tmp_path, recipe), overrides)


@pytest.mark.parametrize("recipe, overrides, key", [
    ("model:\n  enc_layers: two\n", [], "model.enc_layers"),
    ("", ["model.enc_layers=abc"], "model.enc_layers"),
    ("", ["model.enc_layers=2.5"], "model.enc_layers"),
    ("", ["model.tie_embeddings=1"], "model.tie_embeddings"),
    ("", ["train.lr=fast"], "train.lr"),
    ("", ["train.betas=0.9"], "train.betas"),
])
def test_wrong_type_names_the_key(tmp_path, recipe, overrides, key):
    """A value of the wrong type is an MTError naming the key (no silent coercion of bools/floats to int)."""
    with pytest.raises(MTError, match=re.escape(key)):
        config.load(write(tmp_path, recipe), overrides)


def test_missing_recipe_file(tmp_path):
    """A recipe path that does not exist is an MTError naming the path."""
    with pytest.raises(MTError, match="nope.yaml"):
        config.load(tmp_path / "nope.yaml")


def test_malformed_inputs(tmp_path):
    """Invalid YAML, a non-mapping recipe and a --set without '=' are MTErrors, not tracebacks."""
    with pytest.raises(MTError, match=r"r\.yaml line \d+: invalid YAML"):
        config.load(write(tmp_path, "model:\n  d_model: [64\n"))
    with pytest.raises(MTError):
        config.load(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(MTError, match="section.key=value"):
        config.load(None, ["model.enc_layers"])


def test_value_ranges_are_validated():
    """Values outside their range (heads not dividing d_model, beam 0) are MTErrors naming the key."""
    with pytest.raises(MTError, match="model.heads"):
        config.load(None, ["model.d_model=30", "model.heads=4"])
    with pytest.raises(MTError, match="decode.beam_size"):
        config.load(None, ["decode.beam_size=0"])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    """Every shipped recipe loads and validates; a scaling sweep, every run of it."""
    if recipe.name.startswith("scaling"):
        from mt.tools import scaling
        sweep = scaling.read_sweep(recipe)
        assert all(isinstance(scaling.run_config(sweep, e)[0], config.Config) for e in sweep["runs"])
    else:
        assert isinstance(config.load(recipe), config.Config)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_key_lines_are_commented(recipe):
    """Every `key: value` line of a recipe carries a `#` comment explaining it."""
    for line in recipe.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s+\w+:\s*\S", line):
            assert "#" in line, f"{recipe.name}: no comment on {line.strip()!r}"
