"""The one training loop shared by pre-training, linear probing and fine-tuning.

What it guarantees:

* **Schedule** - the learning rate is set per optimizer step by timm's ``CosineLRScheduler``
  configured to equal the official MAE ``lr_sched.adjust_learning_rate``: linear warm-up from 0
  over ``warmup_epochs``, then a half cosine down to ``min_lr``; a param group's ``lr_scale``
  (layer-wise decay) multiplies its rate.
* **Checkpoints** - ``checkpoint-latest.pt`` after every epoch (and ``checkpoint-<epoch>.pt``
  every ``ckpt_every`` epochs) holding model, optimizer, grad scaler, scheduler, caller state,
  RNG state and the number of finished epochs; with ``ckpt_every_steps = n`` also every ``n``
  optimizer steps inside an epoch, then holding the data position (optimizer steps done in the
  epoch), the RNG state at the epoch's start and the epoch's running loss. Files are written
  atomically (temp file in the same directory, fsync, ``os.replace``) and contain only tensors and
  primitives, so they load with ``torch.load(weights_only=True)``.
* **Resume** - from the last checkpoint, at an epoch boundary or mid-epoch; on CPU the resumed run is
  bit-for-bit the uninterrupted one. Mid-epoch, the loader is re-created under the epoch-start RNG
  state (so a shuffling sampler draws the same order), the consumed batches are skipped through the
  batch sampler without loading them (a batch sampler or loader with ``iter_from(n)``, such as
  :class:`mimbench.batching.GlobalBatchSampler`, starts at micro-batch ``n`` itself; any other
  iterable is advanced batch by batch), and then the RNG state of the checkpoint is restored.
  Bit-identical needs in-process loading (``num_workers=0``) or a loader whose randomness is a
  function of (seed, epoch, index); with worker processes the data order is still exact but the
  workers' augmentation streams restart.
* **Safety** - a non-finite loss or gradient stops training with a :class:`MimbenchError` that names
  the optimizer step, the loss terms and the gradient norm; no checkpoint is written after it, so the
  last one on disk is the last good state. Under ``amp="fp16"`` the grad scaler instead skips steps
  whose gradients overflow (and lowers its scale), as mixed-precision training is meant to; a
  non-finite *loss* still stops. On CPU every step is checked at once; on accelerators the checks
  accumulate on the device and are read at log steps and before every checkpoint.
* **Speed** - the hot loop never synchronises with the device except at log steps and checkpoints.
* **Processes** - the process group and device come from :func:`mimbench.dist.setup`; the model
  must already be on that device (checked before DDP wraps it). Logged and per-epoch losses are
  means over every micro-batch of every rank of the step / epoch, so they do not depend on the
  number of processes (a mid-epoch checkpoint holds the running loss as a mean over ranks, so this
  stays true after a resume); loss terms are those of rank 0's last micro-batch. Only rank 0 writes
  the log, checkpoints and progress; a non-finite value seen on any rank stops all of them before a
  checkpoint.
* **Logs** - on a terminal a tqdm bar (stderr); otherwise (a batch job) a plain line on stdout
  every ``log_every`` optimizer steps: step / total, epoch, loss, lr, img/s, ETA. With
  ``trackers`` (``tensorboard``, ``wandb``, ``mlflow``; ``tensorboard=True`` adds the first) the same
  scalars also go to mmengine's vis backends under ``<out>`` (:mod:`mimbench.trackers`; the packages are
  the ``mimbench[trackers]`` extra; none by default).
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mimbench import trackers
from mimbench.atomic import atomic_write, check_writable_dir
from mimbench.errors import MimbenchError
from mimbench.rng import rng_state, seed_everything, set_rng_state

__all__ = [
    "seed_everything", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
    "build_scheduler", "LoopConfig", "fit", "resume_from",
]


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are fsynced, and the file is then
    renamed over ``path`` with ``os.replace``: a crash at any point leaves either the old file or
    the new one, never a truncated file. ``state`` must hold only tensors and primitives.
    """
    atomic_write(path, lambda tmp: torch.save(state, tmp), what="checkpoint",
                 fix="Choose an output directory you can write to (--out) with free space.")


def load_checkpoint(path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    Raises MimbenchError when the file is missing, truncated/corrupt, or holds non-tensor objects.
    """
    path = Path(path)
    if not path.is_file():
        raise MimbenchError(f"Checkpoint {path} does not exist.",
                            "Check the path, or start without --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise MimbenchError(
            f"Checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it is truncated, corrupt, or holds Python objects other than tensors and primitives.",
            "Delete it and resume from another checkpoint-<epoch>.pt in the same directory, or start again without --resume.",
        ) from exc
    if not isinstance(state, dict):
        raise MimbenchError(f"Checkpoint {path} does not hold a dict of training state.",
                            "Pass a checkpoint written by mimbench.")
    return state


# ---------------------------------------------------------------------------- schedule
def build_scheduler(optimizer, *, epochs: float, warmup_epochs: float, iters_per_epoch: int, min_lr: float = 0.0):
    """Per-step cosine schedule equal to MAE's ``adjust_learning_rate``.

    With ``e = step / iters_per_epoch`` (fractional epoch) and ``lr`` each param group's base rate:
    ``lr * e / warmup_epochs`` while ``e < warmup_epochs``, else
    ``min_lr + (lr - min_lr) / 2 * (1 + cos(pi * (e - warmup_epochs) / (epochs - warmup_epochs)))``,
    times ``param_group["lr_scale"]`` when present. Call ``step_update(step)`` before each
    optimizer step. The warm-up length is rounded to whole optimizer steps.
    """
    from timm.scheduler import CosineLRScheduler

    if iters_per_epoch < 1:
        raise MimbenchError(f"An epoch has {iters_per_epoch} optimizer steps.",
                            "Use a smaller batch size / accum_iter or a larger dataset.")
    total = int(round(epochs * iters_per_epoch))
    warmup = int(round(warmup_epochs * iters_per_epoch))
    if warmup >= total:
        raise MimbenchError(f"warmup_epochs={warmup_epochs} is not shorter than epochs={epochs}.",
                            "Set schedule.warmup_epochs below schedule.epochs.")
    return CosineLRScheduler(
        optimizer,
        t_initial=total - warmup,
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )


# ---------------------------------------------------------------------------- loop
@dataclass
class LoopConfig:
    """Loop settings. ``epochs`` counts passes over ``loader``; ``accum_iter`` micro-batches make one
    optimizer step (an epoch uses ``len(loader) // accum_iter * accum_iter`` micro-batches);
    ``clip_grad`` is a max global grad norm (None: no clipping); ``amp``: "auto" (bf16 on CUDA and on
    CPUs with native bf16, fp32 elsewhere; :func:`mimbench.fastpath.resolve_amp`), "bf16", "fp16"
    (with a grad scaler) or "none"; ``log_every`` in optimizer steps; ``progress``: show progress (bar
    or plain log lines); ``tensorboard``: also log scalars for TensorBoard; ``trackers``: log them to these
    (:data:`mimbench.trackers.TRACKERS`);
    ``ckpt_every_steps`` > 0 also writes ``checkpoint-latest.pt`` every that many optimizer steps
    inside an epoch (0: at epoch ends only)."""

    epochs: int
    warmup_epochs: float
    min_lr: float = 0.0
    accum_iter: int = 1
    clip_grad: float | None = None
    amp: str = "auto"
    ckpt_every: int = 1
    ckpt_every_steps: int = 0
    seed: int = 0
    log_every: int = 20
    progress: bool = True
    tensorboard: bool = False
    trackers: tuple = ()
    compile: bool = False


def _autocast(amp: str, device: torch.device):
    """(autocast context factory, grad scaler or None) for setting ``amp`` on ``device``; the
    choice itself is :func:`mimbench.fastpath.resolve_amp` (bf16 where the hardware has it)."""
    from mimbench.fastpath import autocast_factory, resolve_amp

    precision = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return autocast_factory(precision, device), scaler


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, Mapping):
        x = next(iter(x.values()))
    return int(x.shape[0])


def _resolve_terms(terms) -> dict[str, float]:
    if callable(terms):
        terms = terms()
    return {k: float(v) for k, v in (terms or {}).items()}


class _Progress:
    """Progress over optimizer steps, rank 0 only: a tqdm bar when stderr is a terminal, else a plain
    log line on stdout at each log step (batch jobs, Slurm logs)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar, self.plain = None, False
        self.total, self.initial, self.desc = total, initial, desc
        self.t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True, file=sys.stderr)
        elif enabled:
            self.plain = True

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, it: int, epoch: float, loss: float, lr: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **{"img/s": f"{ips:.0f}"}, refresh=False)
        elif self.plain:
            done = max(it - self.initial, 1)
            eta = (time.perf_counter() - self.t0) / done * (self.total - it)
            eta_s = int(round(eta))
            print(f"{self.desc}: step {it}/{self.total} epoch {epoch:.2f} loss {loss:.4f} lr {lr:.3e} "
                  f"img/s {ips:.0f} eta {eta_s // 3600}:{eta_s // 60 % 60:02d}:{eta_s % 60:02d}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _vis_backends(cfg: LoopConfig, out_dir: Path) -> list:
    """The trackers' mmengine backends (``cfg.trackers``; ``tensorboard=True`` adds TensorBoard) under ``out_dir``."""
    names = tuple(cfg.trackers) + (("tensorboard",) if cfg.tensorboard else ())
    return trackers.vis_backends(names, out_dir, config=asdict(cfg)) if names else []


def _set_epoch(loader, epoch: int) -> None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None), loader):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


def fit(model: nn.Module, optimizer, loader, step_fn: Callable, cfg: LoopConfig, out_dir, *,
        resume: bool = False, extra_state: Mapping[str, Any] | None = None,
        on_step_end: Callable[[int, int], None] | None = None,
        on_epoch_end: Callable[[int], dict] | None = None, desc: str = "train") -> list[dict]:
    """Train ``model`` for ``cfg.epochs`` epochs; returns one dict per epoch run in this call.

    ``step_fn(model, batch) -> (loss, terms)``: ``loss`` a scalar tensor to minimise, ``terms`` a
    dict of floats/0-d tensors, or a zero-argument callable returning one (evaluated at log steps
    only, so it may sync). Under DDP ``model`` passed to ``step_fn`` is the DDP wrapper (use
    ``getattr(model, "module", model)`` for attributes). ``on_step_end(it, total_its)`` runs after
    each optimizer step ``it`` (0-based); ``on_epoch_end(epoch)`` (1-based finished epochs) may
    return metrics merged into that epoch's history entry. When resuming and the model has
    ``set_progress(next_it, total_its)`` it is called so per-step schedules kept outside the
    state dict continue where they stopped. The ``loader`` decides the data order: a sampler /
    batch sampler / loader ``set_epoch(epoch)`` is called each epoch (0-based); otherwise the
    order follows the global torch RNG, which checkpoints restore.
    """
    from mimbench import dist

    out_dir = Path(out_dir)
    ctx = dist.setup()
    rank, world, distributed, is_main = ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main
    if is_main:
        check_writable_dir(out_dir)

    extra_state = dict(extra_state or {})
    accum = max(int(cfg.accum_iter), 1)
    micro_per_epoch = len(loader) // accum * accum
    iters_per_epoch = micro_per_epoch // accum
    if iters_per_epoch < 1:
        raise MimbenchError(f"The loader yields {len(loader)} batches per epoch, fewer than accum_iter={accum}.",
                            "Lower optim.accum_iter or the batch size, or use more data.")
    total_its = iters_per_epoch * int(cfg.epochs)
    scheduler = build_scheduler(optimizer, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                iters_per_epoch=iters_per_epoch, min_lr=cfg.min_lr)
    dist.check_device(model)
    device = ctx.device
    autocast, scaler = _autocast(cfg.amp, device)
    raw_model = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    latest = out_dir / "checkpoint-latest.pt"
    log_path = out_dir / "log.jsonl"
    start_epoch, skip_steps, resume_ck = 0, 0, None
    if resume:
        if not latest.is_file():
            raise MimbenchError(f"--resume was given but {latest} does not exist.",
                                f"Start without --resume, or point --out at the directory of the interrupted run.")
        ck = load_checkpoint(latest)
        try:
            raw_model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            for name, obj in extra_state.items():
                obj.load_state_dict(ck["extra_state"][name])
            start_epoch = int(ck["epoch"])
            skip_steps = int(ck.get("step_in_epoch", 0))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MimbenchError(f"Checkpoint {latest} does not match this model/config ({exc}).",
                                "Resume with the config the run was started with, or start a new --out.") from exc
        if ck.get("iters_per_epoch", iters_per_epoch) != iters_per_epoch:
            raise MimbenchError(
                f"Checkpoint {latest} was written with {ck['iters_per_epoch']} steps per epoch, this run has {iters_per_epoch}.",
                "Resume with the same data, batch size and accum_iter.")
        set_rng_state(ck["rng"])
        resume_ck = ck if skip_steps else None
        done = start_epoch * iters_per_epoch + skip_steps
        if hasattr(raw_model, "set_progress"):
            raw_model.set_progress(done, total_its)
        if is_main and log_path.is_file():  # drop log lines of steps after the checkpoint
            keep = [ln for ln in log_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("it", 0) <= done]
            text = "".join(ln + "\n" for ln in keep)
            atomic_write(log_path, lambda tmp: Path(tmp).write_text(text), what="the training log",
                         fix="Point --out at a directory you can write to.")
    else:
        seed_everything(cfg.seed + rank)
        if is_main and log_path.exists():
            log_path.unlink()

    history: list[dict] = []
    it = start_epoch * iters_per_epoch + skip_steps
    ckpt_steps = max(int(cfg.ckpt_every_steps or 0), 0)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # accelerators: non-finite seen, read lazily
    scheduler.step_update(it)
    log_every = max(int(cfg.log_every), 1)
    boards = _vis_backends(cfg, out_dir) if is_main else []
    bar = _Progress(total_its, it, desc, enabled=cfg.progress and is_main)
    log_fh = open(log_path, "a") if is_main else None
    try:
        for epoch in range(start_epoch, int(cfg.epochs)):
            model.train()
            _set_epoch(loader, epoch)
            epoch_loss = torch.zeros((), device=device)
            step_loss = torch.zeros((), device=device)
            mid_resume = resume_ck is not None and epoch == start_epoch
            if mid_resume:  # the loader must draw its order from the epoch-start RNG state again
                set_rng_state(resume_ck["rng_epoch_start"])
            epoch_rng = rng_state() if ckpt_steps else None
            first_micro = skip_steps * accum if mid_resume else 0
            if mid_resume:
                epoch_loss += resume_ck["epoch_loss"].to(device)
                batches = resume_from(loader, first_micro, then=lambda: set_rng_state(resume_ck["rng"]))
            else:
                batches = iter(loader)
            window_imgs, window_t0 = 0, time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            for micro, batch in enumerate(batches, start=first_micro):
                if micro >= micro_per_epoch:
                    break
                last_micro = (micro + 1) % accum == 0
                sync_ctx = model.no_sync() if (distributed and not last_micro) else nullcontext()
                with sync_ctx:
                    with autocast():
                        loss, terms = step_fn(model, batch)
                    # CPU: checking every step costs nothing; on accelerators this would sync each step.
                    if device.type == "cpu":
                        if not bool(torch.isfinite(loss.detach())):
                            _raise_non_finite(it, loss, terms, out_dir)
                    else:
                        bad |= ~torch.isfinite(loss.detach())
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                epoch_loss += loss.detach()
                step_loss += loss.detach()
                window_imgs += _batch_size(batch)
                if not last_micro:
                    continue
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.clip_grad is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
                elif scaler is None:
                    grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in raw_model.parameters() if p.grad is not None])
                if scaler is None:  # the fp16 grad scaler skips overflowing steps itself
                    if device.type == "cpu":
                        if not bool(torch.isfinite(grad_norm)):
                            _raise_non_finite(it, loss, terms, out_dir, grad_norm=grad_norm)
                    else:
                        bad |= ~torch.isfinite(grad_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if on_step_end is not None:
                    on_step_end(it, total_its)
                lr = optimizer.param_groups[0]["lr"]
                it += 1
                bar.update()
                if it % log_every == 0 or it == total_its or micro + 1 == micro_per_epoch:
                    # the step's loss: mean over its micro-batches on every rank (one collective per log step)
                    loss_v = float(dist.all_sum(step_loss)) / (accum * world)
                    if not math.isfinite(loss_v) or bool(bad):
                        _raise_non_finite(it - 1, loss, terms, out_dir, window=log_every)
                    now = time.perf_counter()
                    ips = window_imgs * world / max(now - window_t0, 1e-9)
                    window_imgs, window_t0 = 0, now
                    epoch_f = round(it / iters_per_epoch, 4)
                    bar.show(it, epoch_f, loss_v, lr, ips)
                    if log_fh is not None:
                        rec = {"it": it, "epoch": epoch_f, "lr": lr, "loss": loss_v,
                               "terms": _resolve_terms(terms), "img_per_s": round(ips, 1)}
                        log_fh.write(json.dumps(rec) + "\n")
                        log_fh.flush()
                        for board in boards:
                            board.add_scalars({"loss": loss_v, "lr": lr, "img_per_s": ips,
                                               **{f"terms/{k}": v for k, v in rec["terms"].items()}}, step=it)
                step_loss.zero_()
                scheduler.step_update(it)
                in_epoch = it - epoch * iters_per_epoch
                if ckpt_steps and in_epoch % ckpt_steps == 0 and in_epoch < iters_per_epoch:
                    if bool(dist.all_sum(bad.float()) > 0):  # every rank stops together, none writes
                        _raise_non_finite(it - 1, loss, terms, out_dir, window=ckpt_steps)
                    # the running loss as a per-rank mean: each rank resumes from it, so the epoch-end
                    # sum over ranks still counts every micro-batch once
                    shared_loss = dist.all_sum(epoch_loss) / world
                    if is_main:
                        save_checkpoint(latest, _train_state(raw_model, optimizer, scaler, extra_state, epoch,
                                                             iters_per_epoch, cfg, it, step_in_epoch=in_epoch,
                                                             epoch_rng=epoch_rng, epoch_loss=shared_loss))
            mean_loss = float(dist.all_sum(epoch_loss)) / (micro_per_epoch * world)
            entry = {"epoch": epoch + 1, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"]}
            if on_epoch_end is not None:
                entry.update(on_epoch_end(epoch + 1) or {})
            history.append(entry)
            if bool(dist.all_sum(bad.float()) > 0):
                _raise_non_finite(it - 1, loss, terms, out_dir, window=iters_per_epoch)
            if is_main:
                state = _train_state(raw_model, optimizer, scaler, extra_state, epoch + 1, iters_per_epoch, cfg, it)
                save_checkpoint(latest, state)
                if cfg.ckpt_every and (epoch + 1) % int(cfg.ckpt_every) == 0:
                    save_checkpoint(out_dir / f"checkpoint-{epoch + 1}.pt", state)
    finally:
        bar.close()
        if log_fh is not None:
            log_fh.close()
        for board in boards:
            board.close()
    return history


def _train_state(raw_model, optimizer, scaler, extra_state, epoch: int, iters_per_epoch: int, cfg: LoopConfig,
                 it: int, *, step_in_epoch: int = 0, epoch_rng=None, epoch_loss=None) -> dict:
    """Everything :func:`fit` needs to continue: ``epoch`` finished epochs plus ``step_in_epoch``
    optimizer steps of the next one (mid-epoch: with the epoch-start RNG state and running loss)."""
    state = {
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "scheduler": {"it": it},  # the schedule is a pure function of the step
        "extra_state": {k: v.state_dict() for k, v in extra_state.items()},
        "rng": rng_state(),
        "epoch": epoch,
        "iters_per_epoch": iters_per_epoch,
        "loop": {k: v for k, v in asdict(cfg).items()},
    }
    if step_in_epoch:
        state.update(step_in_epoch=step_in_epoch, rng_epoch_start=epoch_rng,
                     epoch_loss=epoch_loss.detach().cpu().clone())
    return state


class _SkipBatches:
    """A batch sampler that drops the first ``skip`` index lists of ``inner`` (never loading them;
    one with ``iter_from(skip)`` starts there without drawing them), then calls ``then()`` - lazily, at the first request, as the wrapped sampler would draw."""

    def __init__(self, inner, skip: int, then: Callable[[], None]):
        self.inner, self.skip, self.then = inner, skip, then

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)

    def __iter__(self):
        if hasattr(self.inner, "iter_from"):  # e.g. mimbench.batching.GlobalBatchSampler: starts there itself
            indices = self.inner.iter_from(self.skip)
        else:
            indices = iter(self.inner)
            for _ in range(self.skip):
                next(indices, None)
        self.then()
        yield from indices


def resume_from(loader, skip: int, then: Callable[[], None] = lambda: None):
    """An iterator over ``loader``'s current epoch from batch ``skip`` on; ``then()`` runs once the
    skipped part is passed (the caller restores the RNG state there).

    A torch ``DataLoader`` is rebuilt around a batch sampler that skips index lists, so skipped
    images are never read or decoded; a loader with ``iter_from(skip)`` (whose randomness must not
    come from the global RNG) skips itself; any other iterable is advanced ``skip`` batches.
    """
    from torch.utils.data import DataLoader

    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        rebuilt = DataLoader(
            loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, skip, then),
            num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor if loader.num_workers else None)
        return iter(rebuilt)
    if hasattr(loader, "iter_from"):
        batches = loader.iter_from(skip)
        then()
        return batches
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    then()
    return batches


def _raise_non_finite(it: int, loss: torch.Tensor, terms, out_dir: Path, window: int = 0, grad_norm=None) -> None:
    try:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in _resolve_terms(terms).items()) or "none reported"
    except Exception:  # terms may themselves be unusable once the loss diverged
        shown = "unavailable"
    where = f"optimizer step {it}" if not window else f"the {window} optimizer steps up to step {it}"
    what = "loss or gradient" if window else ("gradient" if grad_norm is not None else "loss")
    grad = f"; gradient norm {float(grad_norm)}" if grad_norm is not None else ""
    raise MimbenchError(
        f"The {what} became non-finite at {where} (loss {float(loss.detach())}{grad}); loss terms: {shown}.",
        f"Training stopped; {Path(out_dir) / 'checkpoint-latest.pt'} still holds the last good state. "
        "Lower the learning rate (optim.blr), enable gradient clipping, or use amp='none', then resume.",
    )
