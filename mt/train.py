"""The training loop: plain Hugging Face Accelerate, resumable, time- and step-limited.

One update = `accum_steps` micro-batches on each of the Accelerate processes. The loss is the
label-smoothed cross-entropy summed over non-pad target tokens and divided by the number of such
tokens in the whole update (all micro-batches, all processes), so 2 processes x 1 batch and
1 process x 2 batches give the same gradient. Batch order comes from (seed, epoch); the position in
the epoch, elapsed time and best score are saved beside Accelerate's state, so a resumed run
continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load, set_seed
from tqdm import tqdm

from mt import checkpoint, data as data_mod, fast
from mt.config import Config
from mt.errors import MTError
from mt.loss import symmetric_kl, training_loss
from mt.models import build_model
from mt.schedule import budget_used, lr_at
from mt.tokenizer import PAD
from mt.train_data import load_data
from mt.validation import improves, selection_metric, use_average, validate


def update(model, optimizer, accelerator: Accelerator, micro: list[dict], *, lr: float,
           label_smoothing: float, clip_norm: float, rdrop_alpha: float = 0.0) -> tuple[float, float, int, bool, int]:
    """One optimizer update over this process's micro-batches. rdrop_alpha > 0: R-Drop, each batch
    is run twice (different dropout), loss = the mean of both cross-entropies + alpha/2 x symmetric KL.

    Returns (summed smoothed loss, summed NLL, local target tokens, applied, target tokens of all
    processes); applied is False when any process saw a non-finite loss, in which case the gradients
    are dropped and nothing changes.
    """
    world = accelerator.num_processes
    local = sum(int((m["tgt_out"] != PAD).sum()) for m in micro)
    total = accelerator.reduce(torch.tensor(float(local), device=accelerator.device), "sum").item()
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = nll_sum = 0.0
    for a, m in enumerate(micro):
        m = {k: v.to(accelerator.device, non_blocking=True) for k, v in m.items()}
        if rdrop_alpha:  # one forward over the batch twice: rows b and B + b get different dropout
            m = {k: torch.cat([v, v]) for k, v in m.items()}
        sync = a == len(micro) - 1  # gradients are all-reduced once, after the last micro-batch
        with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
            out = model(m["src"], m["tgt_in"], m["tgt_out"])  # logits (N, V) of non-pad positions, or
            loss, nll = training_loss(out, m["tgt_out"], label_smoothing)  # a diffusion model's terms
            if rdrop_alpha:
                loss, nll = loss / 2 + rdrop_alpha / 2 * symmetric_kl(out), nll / 2
        accelerator.backward(loss * world / total)  # DDP averages over processes: undo that, divide by all tokens
        loss_sum, nll_sum = loss_sum + loss.item(), nll_sum + nll.item()
    finite = accelerator.reduce(torch.tensor(float(math.isfinite(loss_sum)), device=accelerator.device), "min")
    if finite.item() < 1:
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, nll_sum, local, False, int(total)
    if clip_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, nll_sum, local, True, int(total)


def prepare_run(cfg: Config, accelerator: Accelerator, resume: bool, overwrite: bool = False,
                tokenizer: Path | None = None) -> tuple[Path, int | None]:
    """The run directory, locked by the main process for the whole training (returns the lock's
    descriptor): checked for --resume, or emptied for a new run (mt.checkpoint.claim_for_new_run).
    tokenizer: a SentencePiece model for a new run to use instead of training one."""
    run = Path(cfg.train.out_dir)
    if resume and not (run / "state").is_dir() and not (run / "state.old").is_dir():
        raise MTError(f"--resume: no saved state in {run}")
    if resume and overwrite:
        raise MTError("--resume continues a run and --overwrite replaces it: give one of them")
    held = None
    if accelerator.is_main_process:
        try:
            run.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise MTError(f"train.out_dir {run} exists and is not a directory") from None
        held = checkpoint.lock(run)
        try:
            if resume:
                saved = checkpoint.config_mod.load(run / "config.yaml")
                for section in ("data", "model"):
                    if getattr(saved, section) != getattr(cfg, section):
                        raise MTError(f"--resume: {section} config differs from the one saved in {run}/config.yaml")
            else:
                checkpoint.claim_for_new_run(run, overwrite=overwrite)
                if tokenizer is not None:
                    shutil.copy(tokenizer, run / "spm.model")
        except BaseException:
            os.close(held)
            raise
    accelerator.wait_for_everyone()
    return run, held


class Progress:
    """What Accelerate's state does not hold: position in the data, time, best score. Saved as JSON."""

    def __init__(self):
        self.step = self.epoch = self.batch = self.bad_steps = 0
        self.stale = 0  # validations since the last new best (train.patience)
        self.tokens = 0  # target tokens trained on, all processes
        self.elapsed = 0.0
        self.best = None

    def save(self, path: Path):
        checkpoint.atomic_write_text(path, json.dumps(self.__dict__))

    def load(self, path: Path):
        self.__dict__.update(json.loads(path.read_text()))


def new_accelerator(cfg: Config, *, speed_paths: bool = True) -> Accelerator:
    """This process's Accelerator (and torch threads, and mt.fast's process settings)."""
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    if speed_paths:
        fast.tune_process()
    return Accelerator(mixed_precision=cfg.train.precision)


def build_training(cfg: Config, vocab_size: int, accelerator: Accelerator, *, speed_paths: bool = True):
    """The model (fast paths on unless speed_paths=False), AdamW, torch.compile if asked, through
    accelerator.prepare: returns (raw model, prepared model, prepared optimizer)."""
    tc = cfg.train
    raw_model = build_model(cfg.model, vocab_size, packed=cfg.data.pack)
    if speed_paths:
        fast.enable(raw_model)
    opt_kwargs = {"fused": True} if accelerator.device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                  weight_decay=tc.weight_decay, **opt_kwargs)
    # batches vary in shape: dynamic shapes compile once instead of once per length
    model = torch.compile(raw_model, dynamic=True) if tc.compile else raw_model
    model, optimizer = accelerator.prepare(model, optimizer)
    return raw_model, model, optimizer


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, tokenizer: Path | None = None,
          speed_paths: bool = True) -> Path:
    """Train the model described by `cfg`; returns the run directory. resume: continue the run in
    train.out_dir; overwrite: replace a trained run there (else refused); tokenizer: a SentencePiece
    model to use instead of training one; speed_paths: mt.fast's CPU layers and process settings
    (same results, faster)."""
    accelerator = new_accelerator(cfg, speed_paths=speed_paths)
    run, held = prepare_run(cfg, accelerator, resume, overwrite, tokenizer)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _train_in(run, cfg, accelerator, resume=resume, speed_paths=speed_paths)
    finally:
        for s, h in handlers.items():  # the caller's (a library user's) handlers again
            signal.signal(s, h)
        if held is not None:
            os.close(held)  # releases the run directory's lock


def _train_in(run: Path, cfg: Config, accelerator: Accelerator, *, resume: bool, speed_paths: bool) -> Path:
    tc = cfg.train
    set_seed(tc.seed)
    tok, train_data, valid, resample = load_data(cfg, run, accelerator)
    raw_model, model, optimizer = build_training(cfg, len(tok), accelerator, speed_paths=speed_paths)
    progress = Progress()
    if accelerator.is_main_process:
        with checkpoint.out_of_space_is_one_line(run / "config.yaml", "none yet"):
            checkpoint.save_config(cfg, run, vocab_size=len(tok))
    if resume:
        state = run / "state" if (run / "state").is_dir() else run / "state.old"
        try:
            # load_state would swallow a bad RNG file and resume inexactly: read it first (weights only)
            accelerate_load(state / f"random_states_{accelerator.process_index}.pkl")
            accelerator.load_state(str(state))
            progress.load(state / "progress.json")
        except Exception as e:  # truncated, corrupted or unsafe (pickled objects are refused) state
            raise MTError(f"{state}: cannot resume from this state ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    world, rank = accelerator.num_processes, accelerator.process_index
    per_update = tc.accum_steps * world
    data_epoch = 0  # the epoch whose segmentation train_data holds (data.spm_alpha)
    metrics_file = run / "metrics.jsonl"
    accelerator.print(f"mt: {len(train_data.src)} training pairs, {raw_model.num_parameters():,} parameters, "
                      f"{world} process(es) on {accelerator.device}", file=sys.stderr)

    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop_signal.append(s))

    saved = {"step": None}  # the last state written whole (resume's starting point)
    if resume:
        saved["step"] = progress.step

    def last_good() -> str:
        return f"{run / 'state'} (step {saved['step']})" if saved["step"] is not None else "none yet"

    def log(record: dict):
        if accelerator.is_main_process:
            with checkpoint.out_of_space_is_one_line(metrics_file, last_good()):
                with open(metrics_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

    def save_state():
        try:
            with checkpoint.out_of_space_is_one_line(run / "state.tmp", last_good()):
                write_state()
        except BaseException:
            shutil.rmtree(run / "state.tmp", ignore_errors=True)  # half-written: free its space
            raise
        saved["step"] = progress.step

    def write_state():
        """Accelerate state + progress into state.tmp, then swap it in: never a half-written state."""
        if accelerator.is_main_process:
            shutil.rmtree(run / "state.tmp", ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(run / "state.tmp"), safe_serialization=True)
        if accelerator.is_main_process:
            progress.save(run / "state.tmp" / "progress.json")
            checkpoint.save_weights(raw_model, run / "last.safetensors")
            if tc.average_last:
                checkpoint.snapshot(raw_model, run, progress.step, tc.average_last)
            if (run / "state").is_dir():
                shutil.rmtree(run / "state.old", ignore_errors=True)
                os.replace(run / "state", run / "state.old")
            os.replace(run / "state.tmp", run / "state")
            shutil.rmtree(run / "state.old", ignore_errors=True)
            if progress.best is None:  # no validation yet: the latest weights are the best we have
                checkpoint.save_weights(raw_model, run / "model.safetensors")
        accelerator.wait_for_everyone()

    def run_validation():
        if valid is None or not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return
        scores = validate(raw_model, tok, valid, cfg, accelerator.device)
        metric = selection_metric(scores, cfg)
        if improves(metric, progress.best):
            progress.best, progress.stale = metric, 0
            with checkpoint.out_of_space_is_one_line(run / "model.safetensors", last_good()):
                checkpoint.save_weights(raw_model, run / "model.safetensors")
                checkpoint.save_config(cfg, run, vocab_size=len(tok), step=progress.step, **scores)
        else:
            progress.stale += 1
        log({"step": progress.step, **scores})
        extra = "".join(f" {label} {scores[key]:{fmt}}" for key, label, fmt in (
            ("valid_loss_per_char", "per char", ".4f"), ("valid_bleu", "greedy BLEU", ".2f")) if key in scores)
        accelerator.print(f"mt: step {progress.step} valid loss {scores['valid_loss']:.3f} "
                          f"ppl {scores['valid_ppl']:.2f}{extra}", file=sys.stderr)
        accelerator.wait_for_everyone()

    def out_of_budget() -> bool:
        elapsed = elapsed_base + time.time() - session_start
        return bool((tc.max_steps and progress.step >= tc.max_steps)
                    or (tc.max_tokens and progress.tokens >= tc.max_tokens)
                    or (tc.max_epochs and progress.epoch >= tc.max_epochs)
                    or (tc.max_minutes and elapsed >= tc.max_minutes * 60)
                    or (tc.patience and progress.stale >= tc.patience) or stop_signal)

    session_start, elapsed_base = time.time(), progress.elapsed
    bar = tqdm(disable=not (tc.progress and accelerator.is_main_process), file=sys.stderr,
               initial=progress.step, unit="step", dynamic_ncols=True)
    model.train()
    win_tokens, win_loss, win_nll, win_start = 0, 0.0, 0.0, time.time()
    stopped_by_faults = False
    while not out_of_budget():
        if resample is not None and data_epoch != progress.epoch:
            train_data, data_epoch = resample(progress.epoch), progress.epoch
        batches = data_mod.token_batches(train_data.src.lengths(), train_data.tgt.lengths(), tc.batch_tokens,
                                         seed=tc.seed, epoch=progress.epoch)
        n_updates = len(batches) // per_update
        if n_updates == 0:
            raise MTError(f"train.batch_tokens={tc.batch_tokens} leaves fewer batches than one update needs")
        while progress.batch < n_updates and not out_of_budget():
            first = progress.batch * per_update
            micro = [data_mod.collate(train_data, batches[first + a * world + rank]) for a in range(tc.accum_steps)]
            lr = lr_at(progress.step + 1, tc, budget_used(tc, progress.step, progress.epoch + progress.batch / n_updates,
                                                          elapsed_base + time.time() - session_start, progress.tokens))
            loss_sum, nll_sum, local, applied, total = update(model, optimizer, accelerator, micro, lr=lr,
                                                       label_smoothing=tc.label_smoothing, clip_norm=tc.clip_norm,
                                                       rdrop_alpha=tc.rdrop_alpha)
            progress.batch += 1
            if not applied:  # non-finite loss: the update was skipped; stop after too many in a row
                progress.bad_steps += 1
                log({"step": progress.step, "skipped_nonfinite": progress.bad_steps})
                if progress.bad_steps >= tc.max_bad_steps:
                    stopped_by_faults = True
                    break
                continue
            progress.bad_steps = 0
            progress.step += 1
            progress.tokens += total
            progress.elapsed = elapsed_base + time.time() - session_start
            win_tokens += local
            win_loss, win_nll = win_loss + loss_sum / local, win_nll + nll_sum / local
            bar.update(1)
            if progress.step % tc.log_every == 0:
                dt = time.time() - win_start
                rec = {"step": progress.step, "epoch": progress.epoch, "lr": lr,
                       "loss": win_loss / tc.log_every, "nll": win_nll / tc.log_every,
                       "tgt_tokens_per_s": win_tokens * world / dt, "elapsed_s": round(progress.elapsed, 1)}
                log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tgt_tokens_per_s']:.0f}")
                win_tokens, win_loss, win_nll, win_start = 0, 0.0, 0.0, time.time()
            if progress.step % tc.valid_every == 0:
                run_validation()
            if progress.step % tc.save_every == 0:
                save_state()
        if stopped_by_faults:
            break
        if progress.batch >= n_updates:
            progress.epoch, progress.batch = progress.epoch + 1, 0
    bar.close()
    progress.elapsed = elapsed_base + time.time() - session_start
    if progress.step % tc.valid_every and not stopped_by_faults and not stop_signal:
        run_validation()
    save_state()
    if tc.average_last > 1 and not stopped_by_faults and not stop_signal and accelerator.is_main_process:
        with checkpoint.out_of_space_is_one_line(run / "averaged.safetensors", last_good()):
            use_average(raw_model, tok, valid, cfg, run, progress, device=accelerator.device, log=log)
    accelerator.wait_for_everyone()
    if stopped_by_faults:
        raise MTError(f"training stopped: {tc.max_bad_steps} non-finite losses in a row at step {progress.step} "
                      f"(state saved in {run}/state)")
    if stop_signal:
        accelerator.print(f"mt: signal {stop_signal[0]} received: state saved, resume with --resume", file=sys.stderr)
    accelerator.print(f"mt: stopped at step {progress.step}, epoch {progress.epoch}, "
                      f"{progress.elapsed / 60:.1f} min; run directory {run}", file=sys.stderr)
    return run
