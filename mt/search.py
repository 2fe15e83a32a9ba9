"""Greedy decoding, ancestral sampling and beam search over token ids (no text here).

Every routine drives a model through two calls: `model.new_cache(src, max_len)` (encode once,
preallocate the decoding state) and `model.step(tokens, cache)` -> next-token log-probs (B, V), and
the cache only through its protocol (mt.models.cache.DecodingCache). Finished sentences are dropped
from the batch (`cache.reorder`), so they cost nothing afterwards.
Beam search runs its first step once per sentence and then repeats each row k times (`cache.expand`).
Sampling draws one counter-based uniform per (seed, sentence id, step): the same seed and input give
the same output whatever the batch size or order. A masked-diffusion model decodes in parallel
instead (`mask_predict`): its encoder once, then T passes of its denoiser over all positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mt.tokenizer import BOS, EOS, PAD


@dataclass
class Hypothesis:
    tokens: list[int]                  # output ids, without BOS and EOS
    logprob: float                     # log P(y | x), summed over tokens including EOS
    score: float                       # logprob / len(y + EOS) ** length_penalty
    step_logprobs: list[float] = field(default_factory=list)  # log P of each output token, EOS last


def _finish(tokens: list[int], step_lps: list[float], length_penalty: float) -> Hypothesis:
    logprob = float(sum(step_lps))
    return Hypothesis(tokens, logprob, logprob / len(step_lps) ** length_penalty, step_lps)


def _uniform(seed: int, ids: torch.Tensor, step: int) -> torch.Tensor:
    """A uniform in [0, 1) per id from a hash of (seed, id, step) (murmur3 finaliser, 32 bits)."""
    M = 0xFFFFFFFF
    x = (ids * 0x9E3779B1 + (step + 1) * 0x85EBCA77 + (seed & M) * 0xC2B2AE3D) & M
    for mul in (0x85EBCA6B, 0xC2B2AE35):
        x = ((x ^ (x >> 16)) * mul) & M
    x = (x ^ (x >> 16)) & M
    return (x >> 8).double() / float(1 << 24)


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Apply temperature, then keep the top-k tokens, then the smallest set whose mass reaches top_p."""
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop = mass_before >= top_p  # a token is kept if the mass above it has not yet reached p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_tokens(logprobs, *, ids, step, seed, temperature, top_k, top_p):
    """Draw one token per row by inverse-CDF sampling with counter-based uniforms."""
    probs = filter_logits(logprobs, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1).double()
    cdf = probs.cumsum(-1)
    u = _uniform(seed, ids, step) * cdf[:, -1]
    tok = torch.searchsorted(cdf, u[:, None]).squeeze(1)
    return tok.clamp_(max=probs.shape[-1] - 1)


@torch.inference_mode()
def generate(model, src, max_lens, *, sample: bool = False, ids=None, seed: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             length_penalty: float = 0.0, stop_at_eos: bool = True) -> list[Hypothesis]:
    """Greedy decoding (sample=False) or ancestral sampling, batched on the cache.

    src (B, S); max_lens (B,) longest output per sentence before EOS is forced; ids (B,) sentence ids
    that key the sampling random numbers (default 0..B-1). stop_at_eos=False: EOS is one more token
    (a line break of a packed document model) and every row runs to its max_lens.
    """
    B = src.shape[0]
    max_lens = max_lens.to(torch.long)
    ids = torch.arange(B) if ids is None else torch.as_tensor(ids, dtype=torch.long)
    T = int(max_lens.max()) + 1
    cache = model.new_cache(src, T)
    alive = torch.arange(B)
    out_tok = torch.zeros(B, T, dtype=torch.long)
    out_lp = torch.zeros(B, T)
    lengths = torch.full((B,), T, dtype=torch.long)
    tokens = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)
    lens_alive = max_lens  # max_lens[alive], kept in step with the rows
    for t in range(T):
        lp = model.step(tokens, cache).cpu()  # (b, V)
        if sample:
            nxt = sample_tokens(lp, ids=ids[alive], step=t, seed=seed, temperature=temperature,
                                top_k=top_k, top_p=top_p)
        else:
            nxt = lp.argmax(-1)
        last = lens_alive <= t
        nxt.masked_fill_(last, EOS)
        rows = slice(None) if len(alive) == B else alive  # every row still decoding, in order: no index
        out_tok[rows, t] = nxt
        out_lp[rows, t] = lp.gather(1, nxt[:, None]).squeeze(1)
        done = (nxt == EOS) if stop_at_eos else last
        if done.any():
            lengths[alive[done]] = t + 1
            if done.all():
                break
            keep = _fill_holes(done)
            cache.reorder(keep.to(src.device))
            alive, nxt, lens_alive = alive[keep], nxt[keep], lens_alive[keep]
        tokens = nxt[:, None].to(src.device)
    return [_finish(out_tok[b, :lengths[b] - 1].tolist(), out_lp[b, :lengths[b]].tolist(), length_penalty)
            for b in range(B)]


def _fill_holes(done: torch.Tensor) -> torch.Tensor:
    """Rows to keep, in an order that leaves most of them in place: finished rows among the first n
    (n = rows left) take the unfinished rows from the end, so the cache copies only those rows
    (greedy search and sampling do not care about row order)."""
    n = int((~done).sum())
    index = torch.arange(n)
    index[done[:n].nonzero().squeeze(1)] = (~done[n:]).nonzero().squeeze(1) + n
    return index


@torch.inference_mode()
def beam_search(model, src, max_lens, *, beam_size: int, length_penalty: float = 1.0,
                nbest: int = 1) -> list[list[Hypothesis]]:
    """Batched beam search; returns the `nbest` best finished hypotheses per sentence, best first.

    Each step ranks 2k candidates per sentence: EOS candidates among the top k are set aside as
    finished, the best k others continue, so finished hypotheses never starve the beam. A sentence
    stops once it has k finished hypotheses and, with length_penalty=0, no live one can still beat
    the k-th (then the search is exact up to the beam's pruning).
    """
    B, k = src.shape[0], beam_size
    max_lens = max_lens.to(torch.long)
    T = int(max_lens.max()) + 1
    # encoded once; the first step runs one row per sentence (its k hypotheses would all be BOS),
    # then cache.expand gives each source row its k decoder rows
    cache = model.new_cache(src, T)
    alive = torch.arange(B)                                                # sentence of each live row-block
    scores = torch.full((B, k), float("-inf"))
    scores[:, 0] = 0.0
    hist_tok = torch.zeros(B * k, 0, dtype=torch.long)                    # (b*k, t) tokens so far
    hist_lp = torch.zeros(B * k, 0)                                        # their per-step log-probs
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    tokens = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)
    for t in range(T):
        b = len(alive)
        lp = model.step(tokens, cache).cpu()                               # (b*k, V); (b, V) at t = 0
        if t == 0:
            lp = lp.repeat_interleave(k, 0)  # rows 1..k-1 of a sentence score -inf: only row 0 counts
            cache.expand(k)
        V = lp.shape[1]
        force = (max_lens[alive] <= t).repeat_interleave(k)
        if force.any():  # at the length limit only EOS may follow
            eos_lp = lp[force, EOS].clone()
            lp[force] = float("-inf")
            lp[force, EOS] = eos_lp
        n_cand = min(2 * k, k * V)
        # a sentence's best 2k of its k x V candidates are among each row's best 2k (a row adds one
        # score to all its tokens): rank within rows first, then k x 2k candidates, not k x V
        row_lp, row_tok = lp.topk(min(n_cand, V), dim=1)                  # (b*k, c)
        c = row_lp.shape[1]
        top_scores, pos = (scores.view(-1, 1) + row_lp).view(b, k * c).topk(n_cand, dim=1)  # (b, 2k)
        beam, tok = pos // c, row_tok.view(b, k * c).gather(1, pos)
        is_eos = (tok == EOS) | ~torch.isfinite(top_scores)
        rank = torch.arange(n_cand)
        for i, j in ((tok == EOS) & torch.isfinite(top_scores) & (rank < k)).nonzero().tolist():
            row = i * k + int(beam[i, j])
            step_lps = hist_lp[row].tolist() + [float(lp[row, EOS])]
            finished[int(alive[i])].append(_finish(hist_tok[row].tolist(), step_lps, length_penalty))
        # the best k candidates that are not EOS continue
        sel = (is_eos.long() * n_cand + rank).argsort(dim=1)[:, :k]      # (b, k)
        # a sentence with fewer than k non-EOS candidates (at its length limit) fills up with dead rows
        scores = top_scores.gather(1, sel).masked_fill(is_eos.gather(1, sel), float("-inf"))
        src_rows = (torch.arange(b)[:, None] * k + beam.gather(1, sel)).view(-1)
        new_tok = tok.gather(1, sel).view(-1)
        hist_lp = torch.cat([hist_lp[src_rows], lp[src_rows, new_tok][:, None]], 1)
        hist_tok = torch.cat([hist_tok[src_rows], new_tok[:, None]], 1)
        # which sentences are done
        done = []
        for i in range(b):
            fin = finished[int(alive[i])]
            best_live = float(scores[i, 0])
            if t + 1 >= T or best_live == float("-inf"):
                done.append(True)
            elif len(fin) >= k:
                # log-probs only fall, so with length_penalty=0 no live hypothesis can still beat the
                # k-th finished one once the best live score is below it (exact); with a length
                # penalty, stop at k finished hypotheses, as fairseq does
                kth = sorted((h.score for h in fin), reverse=True)[k - 1]
                done.append(length_penalty > 0 or best_live <= kth)
            else:
                done.append(False)
        done_t = torch.tensor(done)
        if done_t.all():
            break
        keep_sent = _fill_holes(done_t)  # sentence order does not matter; fewer source rows move
        rows = (keep_sent[:, None] * k + torch.arange(k)).view(-1)
        src_rows = src_rows[rows]
        cache.reorder(src_rows.to(src.device))
        alive, scores = alive[keep_sent], scores[keep_sent]
        hist_tok, hist_lp = hist_tok[rows], hist_lp[rows]
        tokens = new_tok[rows][:, None].to(src.device)
    return [sorted(fin, key=lambda h: h.score, reverse=True)[:nbest] for fin in finished]


@torch.inference_mode()
def mask_predict(model, src, max_lens, *, steps: int, length_beam: int, nbest: int = 1, sample: bool = False,
                 temperature: float = 1.0, ids=None, seed: int = 0) -> list[list[Hypothesis]]:
    """Parallel decoding of a masked-diffusion model (mt.models.diffusion), Mask-Predict style.

    For each sentence, its `length_beam` most likely lengths (1 .. max_lens) start fully masked.
    Each of `steps` passes predicts every masked position at once (argmax, or a draw at `temperature`
    keyed by (seed, sentence id, candidate, position, pass)); then the least confident positions of
    the whole candidate are masked again: L (T - 1 - s) // T of them after pass s, none after the
    last, so every token is committed by pass T. A position keeps the log-prob it was committed with;
    candidates are ranked by their mean. The encoder runs once per sentence, not once per pass.
    Returns per sentence its `nbest` best candidates: score = mean token log-prob, logprob = log P(L | x)
    + the committed tokens' log-probs (a ranking score, not log P(y | x)).
    """
    B = src.shape[0]
    ids = torch.arange(B) if ids is None else torch.as_tensor(ids, dtype=torch.long)
    memory, memory_mask = model.encode(src)
    length_lp = model.length_log_probs(memory, memory_mask).cpu()            # (B, P)
    P = length_lp.shape[1]
    longest = max_lens.clamp(min=1, max=P - 1)
    allowed = (torch.arange(P)[None, :] >= 1) & (torch.arange(P)[None, :] <= longest[:, None])
    K = min(length_beam, int(allowed.sum(1).min()))
    cand_lp, cand_len = length_lp.masked_fill(~allowed, float("-inf")).topk(K, dim=1)  # (B, K)
    rows = torch.arange(B).repeat_interleave(K)
    lengths = cand_len.flatten()
    kv = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in model.memory_kv(memory)]
    mask_rows = memory_mask[rows.to(memory_mask.device)]
    L = int(lengths.max())
    real = torch.arange(L)[None, :] < lengths[:, None]                        # (B*K, L)
    z = torch.full((B * K, L), model.mask_id, dtype=torch.long).masked_fill(~real, PAD)
    tokens, conf = z.clone(), torch.zeros(B * K, L)
    keys = ((ids[rows] * K + torch.arange(K).repeat(B)) * P)[:, None] + torch.arange(L)[None, :]
    for s in range(steps):
        masked = z == model.mask_id
        lp = model.normalize(model.denoise(z.to(src.device), kv, mask_rows)).cpu()  # (B*K, L, V)
        if sample:
            probs = (lp / max(temperature, 1e-6)).softmax(-1).double()
            cdf = probs.cumsum(-1)
            u = _uniform(seed, keys.flatten(), s).view(B * K, L, 1) * cdf[..., -1:]
            new_tok = torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=lp.shape[-1] - 1)
            new_lp = lp.gather(2, new_tok[..., None]).squeeze(-1)
        else:
            new_lp, new_tok = lp.max(-1)
        tokens, conf = torch.where(masked, new_tok, tokens), torch.where(masked, new_lp, conf)
        remask = (lengths * (steps - 1 - s)) // steps                         # (B*K,)
        if not bool((remask > 0).any()):
            break
        order = conf.masked_fill(~real, float("inf")).argsort(dim=1, stable=True)  # least confident first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(L).expand(B * K, L).contiguous())
        z = tokens.masked_fill(rank < remask[:, None], model.mask_id).masked_fill(~real, PAD)
    mean = (conf * real).sum(1) / lengths
    out = []
    for b in range(B):
        cands = sorted(range(b * K, (b + 1) * K), key=lambda r: -float(mean[r]))[:nbest]
        out.append([Hypothesis(tokens[r, :lengths[r]].tolist(), float(conf[r, :lengths[r]].sum() + cand_lp.flatten()[r]),
                               float(mean[r]), conf[r, :lengths[r]].tolist()) for r in cands])
    return out
