"""Typed configuration: the dataclasses below are the single source of defaults.

A recipe (YAML) only overrides them, section by section (`data`, `model`, `train`, `decode`), and
`--set section.key=value` overrides the recipe. Unknown keys, wrong types and malformed YAML are
reported as one `MTError` line naming the key or file.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mt.errors import MTError


SCHEDULES = ("inverse_sqrt", "cosine", "linear")
ARCHS = ("transformer", "diffusion", "prefix_lm", "decoder_only", "linear")
LM_ARCHS = ("decoder_only", "linear")   # model P(x) of monolingual text; the others model P(y | x)
MIXERS = ("softmax", "sliding_window", "linear", "ssm")  # a decoder-only layer's token mixer
POSITIONS = ("sinusoidal", "rotary", "none")


@dataclass
class DataConfig:
    src_lang: str = "en"                # source language code: suffix of local files / key in HF rows
    tgt_lang: str = "de"                # target language code
    train: str = ""                     # local training files: PREFIX.{src,tgt}[.gz]
    valid: str = ""                     # local validation files: PREFIX.{src,tgt}[.gz]
    hf_dataset: str = ""                # instead of local files: a `datasets` hub name or save_to_disk dir
    hf_config: str = ""                 # hub config name, e.g. "de-en" for wmt14
    hf_train_split: str = "train"       # split used for training
    hf_valid_split: str = "validation"  # split used for validation
    hf_field: str = "translation"       # column holding {lang: text} dicts
    hf_text_field: str = "text"         # language models: column holding plain text
    pack: bool = False                  # language models: pack the text stream into fixed windows
    context: int = 256                  # window length (tokens) when data.pack is on
    max_sentences: int = 0              # keep only the first N training pairs (0: all)
    max_valid_sentences: int = 0        # keep only the first N validation pairs (0: all)
    max_len: int = 250                  # drop training pairs with more tokens than this on either side
    max_len_ratio: float = 3.0          # drop training pairs whose token-length ratio exceeds this
    vocab_size: int = 8000              # joint SentencePiece vocabulary size
    spm_model_type: str = "bpe"         # "bpe", "unigram" or "char" (one piece per character, text kept
                                        # exactly: every character and space; vocab_size is then a cap)
    spm_character_coverage: float = 1.0  # share of characters SentencePiece must cover
    spm_max_sentences: int = 2_000_000  # sample at most this many sentences to train SentencePiece
    spm_alpha: float = 0.0              # subword regularisation: re-segment the training data every epoch,
                                        # BPE-dropout p (bpe) or sampling smoothing (unigram); 0: off
    lowercase: bool = False             # lowercase all text before SentencePiece (training and decoding);
                                        # outputs are then lowercase: for lowercased metrics (mt eval --lc-tok)


@dataclass
class ModelConfig:
    arch: str = "transformer"           # transformer (encoder-decoder), diffusion (masked-diffusion
                                        # encoder-decoder), prefix_lm, decoder_only, linear
    enc_layers: int = 3                 # encoder layers
    dec_layers: int = 3                 # decoder layers
    d_model: int = 256                  # width of every residual stream
    heads: int = 4                      # attention heads (d_model must divide by it)
    ffn: int = 1024                     # hidden width of the feed-forward blocks
    dropout: float = 0.1                # dropout on embeddings and residual branches
    attn_dropout: float = 0.0           # dropout on attention weights
    activation_dropout: float = 0.0     # dropout on the FFN hidden units
    max_positions: int = 1024           # longest sequence the sinusoidal table covers
    tie_embeddings: bool = True         # share source/target/output embeddings (joint vocabulary)
    mixer: str = "softmax"              # decoder_only: softmax (full causal attention), sliding_window,
                                        # linear (kernelised linear attention) or ssm (selective state space)
    window: int = 128                   # sliding_window: positions each query sees (itself included)
    linear_gate: bool = False           # linear: a learned per-head decay gate on the state
    state_size: int = 0                 # ssm: state width N per head (0: d_model / 2, ~attention's params)
    chunk: int = 64                     # linear / ssm: chunk length of the training-time parallel scan
    positions: str = "sinusoidal"       # sinusoidal (added to embeddings), rotary (queries and keys of
                                        # softmax / sliding_window attention; decoder_only) or none

    @property
    def language_model(self) -> bool:
        """Whether the model is P(x) of monolingual text (trained on one side of a corpus)."""
        return self.arch in LM_ARCHS


@dataclass
class TrainConfig:
    out_dir: str = "runs/model"         # run directory: weights, config, tokenizer, metrics, state
    seed: int = 1                       # seeds parameters, data order and dropout
    batch_tokens: int = 2300            # batch size: sentences x max(source, target) padded length (per process)
    accum_steps: int = 1                # batches accumulated into one update
    lr: float = 7e-4                    # peak learning rate
    warmup_steps: int = 200             # linear warm-up to lr, then the schedule's decay
    schedule: str = "inverse_sqrt"      # inverse_sqrt, cosine or linear (these two decay to lr_end over
                                        # the budget: max_steps, max_tokens, max_minutes or max_epochs,
                                        # whichever ends first)
    lr_end: float = 0.0                 # cosine / linear: learning rate at the end of the budget
    betas: list = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    weight_decay: float = 0.0           # AdamW decoupled weight decay
    label_smoothing: float = 0.1        # label-smoothing epsilon of the cross-entropy
    rdrop_alpha: float = 0.0            # R-Drop (Liang et al. 2021): each batch runs twice under different
                                        # dropout, + alpha/2 x their symmetric KL per token; 0: off
    clip_norm: float = 1.0              # gradient norm clipping (0: off)
    max_steps: int = 0                  # stop after this many updates (0: no limit)
    max_epochs: int = 0                 # stop after this many epochs (0: no limit)
    max_tokens: int = 0                 # stop after this many target tokens (0: no limit)
    max_minutes: float = 0.0            # stop after this much training wall time, resumes included (0: none)
    valid_every: int = 500              # validate (loss, perplexity, greedy BLEU) every N updates
    save_every: int = 500               # write the resumable state every N updates
    log_every: int = 50                 # append metrics to metrics.jsonl every N updates
    max_bad_steps: int = 5              # stop (state saved) after this many non-finite losses in a row
    best_metric: str = "bleu"           # "bleu" or "loss": which validation score picks the best weights
    patience: int = 0                   # early stopping: stop after N validations without a new best (0: off)
    average_last: int = 0               # keep the last N saved weights (every save_every) and, at the end,
                                        # use their average when it validates at least as well (0: off)
    compile: bool = False               # torch.compile the model (pays on GPUs; the first steps compile)
    precision: str = "no"               # "no" (fp32), "bf16" or "fp16": Accelerate mixed precision
    threads: int = 0                    # torch CPU threads (0: all cores)
    progress: bool = True               # progress bar on stderr


@dataclass
class DecodeConfig:
    beam_size: int = 5                  # beam width (1: greedy)
    length_penalty: float = 1.0         # hypothesis score = log P / length ** length_penalty
    max_len_a: float = 1.5              # longest output = a * source length + b
    max_len_b: int = 10
    batch_tokens: int = 6000            # source tokens x beam per translation batch
    max_batch_sentences: int = 128      # and at most this many sentences per batch
    sample: bool = False                # ancestral sampling instead of search
    temperature: float = 1.0            # sampling: divide the logits by this
    top_k: int = 0                      # sampling: among the k best tokens only (0: all)
    top_p: float = 1.0                  # sampling: among the smallest set with this much mass (1: all)
    seed: int = 0                       # sampling: draws are keyed by (seed, sentence, step)
    steps: int = 10                     # diffusion: denoising steps (passes of the decoder per length)
    length_beam: int = 3                # diffusion: candidate lengths decoded, the best kept
    bound_samples: int = 8              # diffusion: timesteps per sentence of the score's NELBO estimate


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of valid values for a numeric key."""
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        return ((value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"
        return f"{'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"


BIG = 10**12   # "no practical limit" for counts and budgets (still a number a run can hold)
# Every numeric key's valid values. A value outside is one line naming the key and the range; a size
# of 0, a negative count, nan, inf or an absurd number never reaches the model or the search.
RANGES = {
    "data.context": Range(1, 2**20),
    "data.max_sentences": Range(0, BIG), "data.max_valid_sentences": Range(0, BIG),
    "data.max_len": Range(1, 2**20), "data.max_len_ratio": Range(0, 1e6),
    "data.vocab_size": Range(8, 2**20), "data.spm_character_coverage": Range(0, 1, low_open=True),
    "data.spm_max_sentences": Range(1, BIG), "data.spm_alpha": Range(0, 1, high_open=True),
    "model.enc_layers": Range(1, 256), "model.dec_layers": Range(1, 256),
    "model.d_model": Range(1, 2**16), "model.heads": Range(1, 2**12), "model.ffn": Range(1, 2**20),
    "model.dropout": Range(0, 1, high_open=True), "model.attn_dropout": Range(0, 1, high_open=True),
    "model.activation_dropout": Range(0, 1, high_open=True),
    "model.max_positions": Range(4, 2**20), "model.window": Range(1, 2**20),
    "model.state_size": Range(0, 2**16), "model.chunk": Range(1, 4096),
    "train.seed": Range(0, 2**32 - 1), "train.batch_tokens": Range(1, 2**32), "train.accum_steps": Range(1, 2**16),
    "train.lr": Range(0, 10), "train.warmup_steps": Range(0, BIG), "train.lr_end": Range(0, 10),
    "train.betas": Range(0, 1, high_open=True), "train.weight_decay": Range(0, 1e3),
    "train.label_smoothing": Range(0, 1, high_open=True),
    "train.rdrop_alpha": Range(0, 1e3), "train.clip_norm": Range(0, 1e6),
    "train.max_steps": Range(0, BIG), "train.max_epochs": Range(0, BIG), "train.max_tokens": Range(0, BIG * 1000),
    "train.max_minutes": Range(0, 1e7), "train.valid_every": Range(1, BIG), "train.save_every": Range(1, BIG),
    "train.log_every": Range(1, BIG), "train.max_bad_steps": Range(1, 10**6), "train.patience": Range(0, 10**6),
    "train.average_last": Range(0, 10**4), "train.threads": Range(0, 4096),
    "decode.beam_size": Range(1, 1024), "decode.length_penalty": Range(0, 100), "decode.max_len_a": Range(0, 1e4),
    "decode.max_len_b": Range(0, 2**20), "decode.batch_tokens": Range(1, 2**32),
    "decode.max_batch_sentences": Range(1, 2**20), "decode.temperature": Range(0, 1e4),
    "decode.top_k": Range(0, 2**20), "decode.top_p": Range(0, 1, low_open=True), "decode.seed": Range(0, 2**63 - 1),
    "decode.steps": Range(1, 1024), "decode.length_beam": Range(1, 64), "decode.bound_samples": Range(1, 10**4),
}


def check_range(name: str, value, valid: Range, what: str = "") -> None:
    """Raise MTError naming `name` (a key or an option) unless `value` is a finite number in `valid`."""
    if not (math.isfinite(value) and value in valid):
        raise MTError(f"{what + ': ' if what else ''}{name} must be in {valid}, got {value!r}")


def _check_type(name: str, value, typ):
    """Return `value` converted to `typ`, or raise MTError naming the key."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise MTError(f"config key {name}: must be an integer in {RANGES.get(name, '')}, got {value!r}")
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    raise MTError(f"config key {name}: expected {typ.__name__}, got {value!r}")


def check_numbers(section_obj, section: str, source: str = "config") -> None:
    """Every numeric key of one section (a list: each of its numbers) within RANGES."""
    for key, value in vars(section_obj).items():
        name = f"{section}.{key}"
        if name not in RANGES:
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise MTError(f"{source}: {name} must be numbers, got {value!r}")
            check_range(name, v, RANGES[name], source)


def _apply(section_obj, section: str, values: dict, source: str):
    if not isinstance(values, dict):
        raise MTError(f"{source}: section '{section}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(section_obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(hints)
            raise MTError(f"{source}: unknown key {section}.{key} (known: {known})")
        setattr(section_obj, key, _check_type(f"{section}.{key}", value, hints[key]))


def from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config from nested dicts, validating every key and type."""
    cfg = Config()
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise MTError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if section not in ("data", "model", "train", "decode"):
            raise MTError(f"{source}: unknown section '{section}' (known: data, model, train, decode)")
        _apply(getattr(cfg, section), section, values or {}, source)
    validate(cfg, source)
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.lr=1e-3' -> ('train', 'lr', 0.001); the value is parsed as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise MTError(f"--set {text!r}: expected section.key=value, e.g. model.enc_layers=4")
    key, value = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return section, name, parsed


def load(path: str | Path | None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML recipe (or nothing: all defaults) and apply `section.key=value` overrides."""
    raw: dict = {}
    source = str(path) if path else "defaults"
    if path:
        path = Path(path)
        if not path.is_file():
            raise MTError(f"recipe not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise MTError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise MTError(f"{path}: expected a mapping of sections at the top level")
    raw = {k: {} if v is None else dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        section, name, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise MTError(f"--set {text}: section '{section}' is not a mapping")
        raw[section][name] = value
    return from_dict(raw, source)


def validate(cfg: Config, source: str = "config") -> None:
    """Check values that have a valid range or set of choices."""
    m, t, d = cfg.model, cfg.train, cfg.data
    for section in ("data", "model", "train", "decode"):
        check_numbers(getattr(cfg, section), section, source)
    if not t.out_dir.strip():
        raise MTError(f"{source}: train.out_dir is empty (name the run directory, e.g. runs/model)")
    if m.arch not in ARCHS:
        raise MTError(f"{source}: model.arch must be one of {', '.join(ARCHS)}, got {m.arch!r}")
    if d.pack and m.arch not in LM_ARCHS:
        raise MTError(f"{source}: data.pack applies to language models (model.arch decoder_only or linear)")
    if m.d_model % m.heads:
        raise MTError(f"{source}: model.d_model ({m.d_model}) must be divisible by model.heads ({m.heads})")
    if d.spm_model_type not in ("bpe", "unigram", "char"):
        raise MTError(f"{source}: data.spm_model_type must be 'bpe', 'unigram' or 'char', got {d.spm_model_type!r}")
    if m.mixer not in MIXERS:
        raise MTError(f"{source}: model.mixer must be one of {', '.join(MIXERS)}, got {m.mixer!r}")
    if m.positions not in POSITIONS:
        raise MTError(f"{source}: model.positions must be one of {', '.join(POSITIONS)}, got {m.positions!r}")
    if m.mixer != "softmax" and m.arch != "decoder_only":
        raise MTError(f"{source}: model.mixer {m.mixer} applies to model.arch decoder_only (got {m.arch})")
    if m.positions != "sinusoidal" and m.arch != "decoder_only":
        raise MTError(f"{source}: model.positions {m.positions} applies to model.arch decoder_only (got {m.arch})")
    if m.positions == "rotary" and m.mixer not in ("softmax", "sliding_window"):
        raise MTError(f"{source}: model.positions rotary applies to softmax and sliding_window attention, "
                      f"not model.mixer {m.mixer} (use sinusoidal or none)")
    if m.positions == "rotary" and (m.d_model // m.heads) % 2:
        raise MTError(f"{source}: model.positions rotary needs an even head width (d_model / heads = {m.d_model // m.heads})")
    if t.precision not in ("no", "bf16", "fp16"):
        raise MTError(f"{source}: train.precision must be 'no', 'bf16' or 'fp16', got {t.precision!r}")
    if t.best_metric not in ("bleu", "loss"):
        raise MTError(f"{source}: train.best_metric must be 'bleu' or 'loss', got {t.best_metric!r}")
    if t.schedule not in SCHEDULES:
        raise MTError(f"{source}: train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
    if t.schedule != "inverse_sqrt" and not (t.max_steps or t.max_minutes or t.max_epochs or t.max_tokens):
        raise MTError(f"{source}: train.schedule={t.schedule} decays over the budget: "
                      "set train.max_steps, train.max_tokens, train.max_minutes or train.max_epochs")
    if m.arch == "diffusion" and t.rdrop_alpha:
        raise MTError(f"{source}: train.rdrop_alpha (R-Drop) applies to autoregressive models, not model.arch diffusion")
    if len(t.betas) != 2:
        raise MTError(f"{source}: train.betas must be a list of two floats")
