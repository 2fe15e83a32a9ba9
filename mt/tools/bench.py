"""`mt bench`: throughput and memory of the hot paths, measured the way users run them.

Training: the real update (`mt.train.update`) on the recipe's model and batches; warm-up steps are
excluded, the median over repeats is reported, achieved FLOP/s (6 x parameters x target tokens/s) is
set against this machine's measured matmul FLOP/s. Decoding: `Translator.translate_batch` over a file,
as `mt translate` runs it. Peak RSS (and peak GPU memory on a GPU) for each. A benchmark, not a test.
"""
from __future__ import annotations

import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mt import data as data_mod
from mt.config import Config
from mt.tokenizer import PAD


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _median_seconds(fn, reps: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over reps calls, after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops(device: torch.device, dtype=torch.float32, n: int = 2048, reps: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul: the machine's practical ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1  # a GPU product is too short to time alone

    def products():
        for _ in range(inner):
            a @ b
        sync(device)

    sync(device)
    return 2 * n ** 3 * inner / _median_seconds(products, reps, warmup=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_data(vocab_size: int, mean_len: int, n: int = 20_000, seed: int = 0) -> data_mod.ParallelData:
    """Random token ids, lengths uniform in [mean/2, 3 mean/2]: model speed without a corpus or tokenizer."""
    rng = np.random.default_rng(seed)

    def side():
        lens = rng.integers(max(1, mean_len // 2), mean_len * 3 // 2 + 1, n)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return data_mod.TokenArray(rng.integers(4, vocab_size, int(offsets[-1])).astype(np.int32), offsets)

    return data_mod.ParallelData(side(), side())


def bench_train(cfg: Config, *, steps: int, warmup: int = 3, repeats: int = 3, synthetic: int = 0) -> dict:
    """Time `steps` updates after `warmup`, `repeats` times; report the median window. synthetic > 0:
    random sentences of about that many tokens over data.vocab_size ids instead of the recipe's corpus."""
    from mt.schedule import lr_at
    from mt.train import build_training, new_accelerator, update
    from mt.train_data import load_data

    accelerator = new_accelerator(cfg)
    if synthetic:
        vocab, data = cfg.data.vocab_size, synthetic_data(cfg.data.vocab_size, synthetic)
    else:
        run = Path(tempfile.mkdtemp(prefix="mt-bench-"))  # reuse the recipe run's tokenizer if there is one
        if (Path(cfg.train.out_dir) / "spm.model").is_file():
            shutil.copy(Path(cfg.train.out_dir) / "spm.model", run / "spm.model")
        tok, data, _, _ = load_data(cfg, run, accelerator)
        vocab = len(tok)
    need = (warmup + steps * repeats) * cfg.train.accum_steps
    batches = data_mod.token_batches(data.src.lengths(), data.tgt.lengths(), cfg.train.batch_tokens,
                                     seed=cfg.train.seed, epoch=0)
    batches = (batches * (need // len(batches) + 1))[:need]
    raw_model, model, optimizer = build_training(cfg, vocab, accelerator)
    model.train()
    params = raw_model.num_parameters()
    it = iter(batches)

    def run(n):
        tgt_tok = src_tok = 0
        sync(accelerator.device)
        t = time.perf_counter()
        for i in range(n):
            micro = [data_mod.collate(data, next(it)) for _ in range(cfg.train.accum_steps)]
            tgt_tok += sum(int((m["tgt_out"] != PAD).sum()) for m in micro)
            src_tok += sum(int((m["src"] != PAD).sum()) for m in micro)
            update(model, optimizer, accelerator, micro, lr=lr_at(i + 1, cfg.train),
                   label_smoothing=cfg.train.label_smoothing, clip_norm=cfg.train.clip_norm,
                   rdrop_alpha=cfg.train.rdrop_alpha)
        sync(accelerator.device)
        return time.perf_counter() - t, tgt_tok, src_tok

    run(warmup)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    # the ceiling is probed before and after the timed windows and the higher reading kept: a probe
    # that meets a busy moment on a shared host reads low and would inflate the utilisation
    ceiling = matmul_flops(accelerator.device, dtype)
    windows = [run(steps) for _ in range(repeats)]
    dt, tgt_tok, src_tok = sorted(windows, key=lambda w: w[1] / w[0])[len(windows) // 2]
    ceiling = max(ceiling, matmul_flops(accelerator.device, dtype))
    achieved = 6 * params * tgt_tok / dt
    return {"device": str(accelerator.device), "threads": torch.get_num_threads(), "parameters": params,
            "precision": cfg.train.precision, "compile": cfg.train.compile, "synthetic": synthetic,
            "steps": steps, "repeats": repeats, "tgt_tokens_per_step": tgt_tok / steps,
            "tgt_tokens_per_s": tgt_tok / dt, "src_tgt_tokens_per_s": (tgt_tok + src_tok) / dt,
            "steps_per_s": steps / dt, "achieved_flops": achieved, "matmul_flops": ceiling,
            "utilisation": achieved / ceiling, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}


def bench_translate(translator, sources: list[str], *, beam_size: int, repeats: int = 3, sample: bool | None = None,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                    seed: int | None = None, steps: int | None = None, length_beam: int | None = None) -> dict:
    """Decode `sources` `repeats` times after one warm-up batch; report the median run (steps,
    length_beam: a diffusion model's passes and candidate lengths)."""
    options = dict(sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, steps=steps,
                   length_beam=length_beam)
    translator.translate_batch(sources[:32], beam_size=beam_size, **options)
    runs = []
    for _ in range(repeats):
        sync(translator.device)
        t = time.perf_counter()
        hyps = translator.translate_batch(sources, beam_size=beam_size, **options)
        sync(translator.device)
        runs.append((time.perf_counter() - t, sum(len(h[0].tokens) + 1 for h in hyps if h)))
    dt, gen = sorted(runs)[len(runs) // 2]
    used = translator.options(beam_size=beam_size, **options)
    search = ({"steps": used.steps, "length_beam": used.length_beam} if translator.model.parallel_decoding
              else {"beam_size": beam_size})
    return {"device": str(translator.device), "threads": torch.get_num_threads(), "sentences": len(sources),
            **search, "sample": used.sample, "top_k": used.top_k, "top_p": used.top_p, "seconds": dt,
            "sentences_per_s": len(sources) / dt,
            "generated_tokens_per_s": gen / dt, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}


def memory_bandwidth(n_bytes: int = 2**29, reps: int = 5) -> float:
    """Measured bytes/s of a large CPU tensor copy (bytes read + bytes written), median of reps: the
    main-memory rate, for a working set (1 GiB) larger than the caches."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _median_seconds(lambda: dst.copy_(src), reps)


def read_bandwidth(n_bytes: int, reps: int = 30) -> float:
    """Measured bytes/s of reading (summing) a float32 tensor of n_bytes again and again, median of reps:
    the rate at which a working set of that size streams from wherever it stays. Where the caches hold a
    step's weights (a large L3), this, not main memory, bounds a decoding step."""
    buf = torch.ones(max(n_bytes // 4, 1))
    return buf.numel() * 4 / _median_seconds(buf.sum, reps)


def _weight_bytes(module, skip: str = "") -> int:
    """Bytes of a module's weights, dynamic-int8 packed linear layers included (1 byte a weight)."""
    total = 0
    for name, mod in module.named_modules():
        if skip and skip in name:
            continue
        total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
        if isinstance(mod, torch.ao.nn.quantized.dynamic.Linear):  # int8 weights, packed
            w = mod.weight()
            total += w.numel() * w.element_size() + (mod.bias().numel() * 4 if mod.bias() is not None else 0)
    return total


def decode_step_bytes(model) -> int:
    """Bytes of weights one decoding step must read: the decoder-side layers and the full output
    projection, less what a step does not touch (the encoder, the cross-attention key/value
    projections, which run once per sentence, and all but one row per token of the input embedding)."""
    total = 0
    for m in getattr(model, "members", [model]):
        total += _weight_bytes(m.decoder if hasattr(m, "decoder") else m.layers, skip="cross_attn.kv")
        total += _weight_bytes(m.output)  # the vocabulary projection (a tied one reads the embedding)
    return total


def bench_latency(translator, sources: list[str], *, beam_size: int = 1, n: int = 100, steps: int | None = None,
                  length_beam: int | None = None) -> dict:
    """One sentence at a time (batch 1): milliseconds per sentence and per generated token, against the
    memory-bandwidth bound (weights read per step / measured main-memory copy bandwidth) and against the
    time to read the step's weights at the rate a working set of their size streams (the stricter bound
    where the caches hold them); encoding is included in the time. Decoder passes per sentence: output
    length + 1 left to right; a diffusion model's `steps` (its candidate lengths share each pass)."""
    sources = [s for s in sources if s.strip()][:n]
    options = dict(steps=steps, length_beam=length_beam)
    for s in sources[:3]:  # warm-up, one sentence at a time as timed (--aot: the batch-1 step compiles here)
        translator.translate_batch([s], beam_size=beam_size, **options)
    t, gen = time.perf_counter(), 0
    for s in sources:
        hyps = translator.translate_batch([s], beam_size=beam_size, **options)
        gen += len(hyps[0][0].tokens) + 1
    dt = time.perf_counter() - t
    used = translator.options(beam_size=beam_size, **options)
    parallel = translator.model.parallel_decoding
    search = {"steps": used.steps, "length_beam": used.length_beam} if parallel else {"beam_size": beam_size}
    step_bytes, bandwidth = decode_step_bytes(translator.model), memory_bandwidth()
    resident = read_bandwidth(step_bytes)  # the weights' own working set: from the cache if it fits
    bound_ms, resident_ms, ms = 1000 * step_bytes / bandwidth, 1000 * step_bytes / resident, 1000 * dt / gen
    return {"device": str(translator.device), "threads": torch.get_num_threads(), "sentences": len(sources),
            **search, "ms_per_sentence": 1000 * dt / len(sources), "ms_per_token": ms,
            "decoder_passes_per_sentence": used.steps if parallel else gen / len(sources),
            "weights_mb_per_step": step_bytes / 2**20,
            "memory_gb_per_s": bandwidth / 1e9, "bound_ms_per_token": bound_ms, "ratio_to_bound": ms / bound_ms,
            "weights_read_gb_per_s": resident / 1e9, "weights_read_bound_ms_per_token": resident_ms,
            "ratio_to_weights_read_bound": ms / resident_ms, "peak_rss_mb": peak_rss_mb()}


def print_table(title: str, result: dict) -> None:
    print(title)
    width = max(map(len, result), default=0)
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        print(f"  {k:{width}s} {v}")
    sys.stdout.flush()
