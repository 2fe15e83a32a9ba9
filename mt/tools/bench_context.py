"""`mt bench context`: what one decoding step costs as the generated sequence grows, per token mixer.

Full attention reads every cached key and value at every step, so its step time and cache grow with
the length; a sliding window reads W slots, linear attention and the state-space layer a fixed-size
state. One generation of the longest length per batch size: the time of every step is recorded, and
the table reports the median step time around each asked length and the state the cache holds
there. Random weights of the recipe's shape: speed does not depend on training.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from mt.errors import MTError
from mt.models import build_model
from mt.tokenizer import BOS


def step_times(model, batch: int, length: int, vocab: int) -> list[float]:
    """Seconds of each of `length` decoding steps from an empty prompt."""
    cache = model.new_cache(torch.zeros(batch, 0, dtype=torch.long), length)
    tokens = torch.full((batch, 1), BOS)
    gen = torch.Generator().manual_seed(0)
    times = []
    with torch.inference_mode():
        for _ in range(length):
            start = time.perf_counter()
            model.step(tokens, cache)
            times.append(time.perf_counter() - start)
            tokens = torch.randint(4, vocab, (batch, 1), generator=gen)  # what is fed does not change the cost
    return times


VARIANTS = {  # the long-context comparison's models (docs/long_context.md)
    "full": ["model.mixer=softmax", "model.positions=rotary"],
    "window 128": ["model.mixer=sliding_window", "model.window=128", "model.positions=rotary"],
    "window 32": ["model.mixer=sliding_window", "model.window=32", "model.positions=rotary"],
    "linear": ["model.mixer=linear", "model.positions=sinusoidal"],
    "gated linear": ["model.mixer=linear", "model.linear_gate=true", "model.positions=sinusoidal"],
    "ssm": ["model.mixer=ssm", "model.positions=none"],
}


def bench_context(recipe, overrides=(), *, variants=VARIANTS, lengths=(256, 1024, 4096, 8192), batches=(1, 16),
                  vocab: int = 68, window: int = 64) -> list[dict]:
    """One row per (variant, batch, length): ms per step (median of the `window` steps before the
    length), ms per generated token (step / batch), the cache's bytes at that length."""
    from mt import config as config_mod

    longest = max(lengths)
    rows = []
    for name, variant in variants.items():
        cfg = config_mod.load(recipe, [*overrides, *variant])
        cfg.model = replace(cfg.model, max_positions=max(cfg.model.max_positions, longest + 2))
        torch.manual_seed(0)
        model = build_model(cfg.model, vocab).eval()
        if not model.reads_prompts:
            raise MTError(f"{recipe}: mt bench context times language models (a decoder that continues prompts)")
        for batch in batches:
            times = step_times(model, batch, longest, vocab)
            # the asked lengths, and every power of two on the way (the crossover and the plot)
            for L in sorted(set(lengths) | {2 ** i for i in range(6, longest.bit_length())}):
                ms = 1e3 * statistics.median(times[max(L - window, 0):L])
                rows.append({"mixer": name, "batch": batch, "length": L, "ms_per_step": ms,
                             "ms_per_token": ms / batch, "cache_bytes": cache_bytes_at(model, batch, L),
                             "parameters": model.num_parameters(), "asked": L in lengths})
    return rows


def cache_bytes_at(model, batch: int, length: int) -> int:
    """The decoding state's bytes after `length` tokens (a KV cache: its `length` filled columns)."""
    cache = model.new_cache(torch.zeros(batch, 0, dtype=torch.long), 1)
    if hasattr(cache, "self_k"):  # one column of keys and values per token
        return length * sum(k.numel() // k.shape[2] * k.element_size() for k in cache.self_k + cache.self_v)
    return cache.nbytes()


def crossover(rows: list[dict], mixer: str, batch: int, base: str = "full") -> int | None:
    """The shortest measured length from which `mixer`'s step is cheaper than `base`'s."""
    cost = {(r["mixer"], r["length"]): r["ms_per_step"] for r in rows if r["batch"] == batch}
    lengths = sorted({r["length"] for r in rows})
    cheaper = [L for L in lengths if cost[(mixer, L)] < cost[(base, L)]]
    return next((L for L in lengths if all(M in cheaper for M in lengths if M >= L)), None)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MTError("--plot needs matplotlib: pip install 'mt[plot]'") from None
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7), squeeze=False)
    for j, batch in enumerate(batches):
        for mixer in dict.fromkeys(r["mixer"] for r in rows):
            pts = [r for r in rows if r["mixer"] == mixer and r["batch"] == batch]
            x = [r["length"] for r in pts]
            axes[0][j].plot(x, [r["ms_per_token"] for r in pts], marker="o", label=mixer)
            axes[1][j].plot(x, [r["cache_bytes"] / 2**20 for r in pts], marker="o", label=mixer)
        for i, what in enumerate(("ms per generated token", "decoding state (MiB)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("generated length")
            ax.set_ylabel(what)
            ax.set_title(f"batch {batch}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
