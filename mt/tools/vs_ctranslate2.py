"""mt against CTranslate2 on the same model, side by side (`mt bench translate --vs-ctranslate2`).

The run is exported (mt.tools.export) to a temporary CTranslate2 model; then, for each round, mt
decodes the sources and CTranslate2 decodes them at each of its batch sizes, one after the other, so
that both meet the same machine load. CTranslate2 runs in a child process of its own (`python -m
mt.tools.vs_ctranslate2 DIR ...`) with `intra_threads` = mt's threads and MKL_NUM_THREADS=1, its
fastest setting on 2-core machines; sentences sorted by length, batches of N sentences, the same
length cap as mt (max_len_a * source tokens + max_len_b), pad and BOS suppressed. Reported: medians
over rounds, and mt's speed over CTranslate2's at its best batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from mt.errors import MTError


def ct2_decode(model_dir: str, sources: list[str], *, beam_size: int, batch: int, compute_type: str,
               max_len_a: float, max_len_b: int, threads: int) -> dict:
    """CTranslate2's Translator over `sources`: one warm-up pass, then a timed one."""
    import ctranslate2
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "spm.model"))
    toks = [sp.encode(s, out_type=str) + ["</s>"] for s in sources]
    order = sorted(range(len(sources)), key=lambda i: len(toks[i]))
    tr = ctranslate2.Translator(model_dir, device="cpu", compute_type=compute_type, inter_threads=1,
                                intra_threads=threads)
    for _ in range(2):  # the first pass warms up
        start, generated = time.perf_counter(), 0
        for k in range(0, len(order), batch):
            ids = order[k:k + batch]
            longest = max(len(toks[i]) for i in ids) - 1
            res = tr.translate_batch([toks[i] for i in ids], beam_size=beam_size, max_batch_size=batch,
                                     max_decoding_length=int(max_len_a * longest + max_len_b),
                                     suppress_sequences=[["<pad>"], ["<s>"]])
            generated += sum(len(r.hypotheses[0]) + 1 for r in res)
        seconds = time.perf_counter() - start
    return {"sentences_per_s": len(sources) / seconds, "tokens_per_s": generated / seconds,
            "ms_per_token": 1000 * seconds / generated}


def _ct2_in_child(model_dir: str, src: str, **options) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(options["threads"]), MKL_NUM_THREADS="1")
    args = [sys.executable, "-m", "mt.tools.vs_ctranslate2", model_dir, src]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise MTError(f"--vs-ctranslate2: CTranslate2 failed ({last[:200]})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(translator, run: str, src: str, sources: list[str], *, beam_size: int, batches: list[int],
            rounds: int = 2, compute_type: str = "float32", latency: int = 0) -> dict:
    """Rounds of mt then CTranslate2 at each batch size (or, with latency=N, both one sentence at a
    time over the first N sources); medians and ratios."""
    from mt.tools.bench import bench_latency
    from mt.tools.export import export_ctranslate2

    options = translator.options(beam_size=beam_size)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "ct2")
        export_ctranslate2(run, model_dir)
        if latency:
            sources = [s for s in sources if s.strip()][:latency]
            src = os.path.join(tmp, "first.txt")
            with open(src, "w", encoding="utf-8") as f:
                f.write("\n".join(sources) + "\n")
            batches = [1]
        ours, theirs = [], {b: [] for b in batches}
        translator.translate_batch(sources[:32], beam_size=beam_size)  # warm-up
        for _ in range(rounds):
            if latency:
                ours.append(bench_latency(translator, sources, beam_size=beam_size, n=latency)["ms_per_token"])
            else:
                start = time.perf_counter()
                translator.translate_batch(sources, beam_size=beam_size)
                ours.append(len(sources) / (time.perf_counter() - start))
            for b in batches:
                got = _ct2_in_child(model_dir, src, beam_size=beam_size, batch=b, compute_type=compute_type,
                                    max_len_a=options.max_len_a, max_len_b=options.max_len_b, threads=threads)
                theirs[b].append(got["ms_per_token" if latency else "sentences_per_s"])
    mt_median = statistics.median(ours)
    ct2 = {b: statistics.median(v) for b, v in theirs.items()}
    best = min(ct2, key=ct2.get) if latency else max(ct2, key=ct2.get)
    return {"unit": "ms per token (batch 1)" if latency else "sentences/s", "beam_size": beam_size,
            "threads": threads, "compute_type": compute_type, "rounds": rounds, "mt": ours,
            "ctranslate2": {str(b): v for b, v in theirs.items()}, "mt_median": mt_median,
            "ctranslate2_median": {str(b): v for b, v in ct2.items()}, "ctranslate2_best_batch": best,
            "mt_over_best": (ct2[best] / mt_median) if latency else mt_median / ct2[best]}


def print_comparison(result: dict) -> None:
    unit, lower_wins = result["unit"], result["unit"].startswith("ms")
    print(f"mt vs CTranslate2 ({result['compute_type']}), beam {result['beam_size']}, {result['threads']} threads, "
          f"{result['rounds']} rounds; {unit}, {'lower' if lower_wins else 'higher'} is faster")
    print(f"  {'mt':28} " + " / ".join(f"{v:.2f}" for v in result["mt"]) + f"  (median {result['mt_median']:.2f})")
    for b, values in result["ctranslate2"].items():
        median = result["ctranslate2_median"][b]
        print(f"  {'CTranslate2, batch ' + b:28} " + " / ".join(f"{v:.2f}" for v in values) + f"  (median {median:.2f})")
    print(f"  mt is {result['mt_over_best']:.2f}x CTranslate2's speed at its best batch ({result['ctranslate2_best_batch']})")


if __name__ == "__main__":  # the child process: one CTranslate2 measurement, printed as JSON
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("src")
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--compute-type", default="float32")
    p.add_argument("--max-len-a", type=float, default=1.5)
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    with open(a.src, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    print(json.dumps(ct2_decode(a.model_dir, lines, beam_size=a.beam_size, batch=a.batch,
                                compute_type=a.compute_type, max_len_a=a.max_len_a, max_len_b=a.max_len_b,
                                threads=a.threads)))
