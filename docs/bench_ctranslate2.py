"""Decode test_2016_flickr with an mt run exported to CTranslate2 (`mt export RUN --out DIR`), timed like
../shared/peers/ct2_decode.py (sentences sorted by source length, batches of N, cap 1.5 * S + 10): the
same-model side-by-side of issue 5. Usage:
    OMP_NUM_THREADS=2 python docs/bench_ctranslate2.py DIR [--compute-type float32|int8] [--beam 5,1] [--batch 32]
"""
import argparse
import os
import time

import ctranslate2
import sentencepiece as spm

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--src", default="data/multi30k/test_2016_flickr.en")
p.add_argument("--compute-type", default="float32")
p.add_argument("--beam", default="5,1")
p.add_argument("--batch", type=int, default=32, help="sentences per translate_batch call")
p.add_argument("--length-penalty", type=float, default=1.0)
p.add_argument("--out", default=None, help="write hypotheses to OUT.bK")
a = p.parse_args()
sp = spm.SentencePieceProcessor(model_file=os.path.join(a.model, "spm.model"))
src = [line.rstrip("\n") for line in open(a.src, encoding="utf-8")]
toks = [sp.encode(s, out_type=str) + ["</s>"] for s in src]
order = sorted(range(len(src)), key=lambda i: len(toks[i]))
tr = ctranslate2.Translator(a.model, device="cpu", compute_type=a.compute_type, inter_threads=1,
                            intra_threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
for beam in map(int, a.beam.split(",")):
    for rep in range(2):  # the first pass warms up
        hyps, ntok = [None] * len(src), 0
        t0 = time.perf_counter()
        for k in range(0, len(order), a.batch):
            ids = order[k:k + a.batch]
            S = max(len(toks[i]) for i in ids) - 1
            res = tr.translate_batch([toks[i] for i in ids], beam_size=beam, max_batch_size=a.batch,
                                     max_decoding_length=int(1.5 * S + 10), length_penalty=a.length_penalty,
                                     suppress_sequences=[["<pad>"], ["<s>"]])
            for i, r in zip(ids, res):
                ntok += len(r.hypotheses[0]) + 1
                hyps[i] = sp.decode(r.hypotheses[0])
        dt = time.perf_counter() - t0
    if a.out:
        open(f"{a.out}.b{beam}", "w", encoding="utf-8").write("\n".join(hyps) + "\n")
    print(f"CTranslate2 {a.compute_type} beam {beam} batch {a.batch}: {len(src) / dt:.1f} sentences/s, "
          f"{ntok / dt:.0f} tokens/s (EOS counted), {ntok / len(src):.2f} tokens a sentence", flush=True)
