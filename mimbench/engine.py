"""The one training loop shared by pre-training, linear probing and fine-tuning.

What it guarantees:

* **Schedule** - the learning rate is set per optimizer step by timm's ``CosineLRScheduler``
  configured to equal the official MAE ``lr_sched.adjust_learning_rate``: linear warm-up from 0
  over ``warmup_epochs``, then a half cosine down to ``min_lr``; a param group's ``lr_scale``
  (layer-wise decay) multiplies its rate.
* **Checkpoints** - ``checkpoint-latest.pt`` after every epoch (and ``checkpoint-<epoch>.pt``
  every ``ckpt_every`` epochs) holding model, optimizer, grad scaler, scheduler, every rank's RNG
  state (a list, index = rank) and the number of finished epochs; with ``ckpt_every_steps = n`` also
  every ``n`` optimizer steps inside an epoch, then holding the data position (optimizer steps done
  in the epoch), every rank's RNG state at the epoch's start and the epoch's running loss. Files are written
  atomically (temp file in the same directory, fsync, ``os.replace``) and contain only tensors and
  primitives, so they load with ``torch.load(weights_only=True)``.
* **Resume** - from the last checkpoint, at an epoch boundary or mid-epoch; on CPU the resumed run is
  bit-for-bit the uninterrupted one. Mid-epoch, the loader is re-created under the epoch-start RNG
  state (so a shuffling sampler draws the same order), the consumed batches are skipped through the
  batch sampler without loading them (a batch sampler or loader with ``iter_from(n)``, such as
  :class:`mimbench.batching.GlobalBatchSampler`, starts at micro-batch ``n`` itself; any other
  iterable is advanced batch by batch), and then the RNG state of the checkpoint is restored. Each
  rank gets its own streams back (its dropout masks continue as in the uninterrupted run); a rank
  the checkpoint holds no state of (written by another number of processes) is re-seeded from
  (seed, rank, step) and says so on stderr.
  Bit-identical needs in-process loading (``num_workers=0``) or a loader whose randomness is a
  function of (seed, epoch, index); with worker processes the data order is still exact but the
  workers' augmentation streams restart.
* **Safety** - a non-finite loss or gradient stops training with a :class:`MimbenchError` that names
  the optimizer step, the loss terms and the gradient norm; no checkpoint is written after it, so the
  last one on disk is the last good state. Under ``amp="fp16"`` the grad scaler instead skips steps
  whose gradients overflow (and lowers its scale), as mixed-precision training is meant to; a
  non-finite *loss* still stops. The decision is collective: a NaN on one rank stops every rank at
  the same step with the same error (:class:`NonFiniteGuard`). On CPU every step is checked; on
  accelerators the checks accumulate on the device and are read at log steps and before every
  checkpoint.
* **Speed** - the hot loop never synchronises with the device except at log steps and checkpoints.
* **Processes** - the process group and device come from :func:`mimbench.dist.setup`; the model
  must already be on that device (checked before DDP wraps it; with ``compile`` the DDP wrapper is
  compiled, :func:`wrap_for_training`). Logged and per-epoch losses are
  means over every micro-batch of every rank of the step / epoch, so they do not depend on the
  number of processes (a mid-epoch checkpoint holds the running loss as a mean over ranks, so this
  stays true after a resume); loss terms are those of rank 0's last micro-batch. Only rank 0 writes
  the log, checkpoints and progress.
* **Logs** - on a terminal a tqdm bar (stderr); otherwise (a batch job) a plain line on stdout
  every ``log_every`` optimizer steps: step / total, epoch, loss, lr, img/s, ETA. With
  ``trackers`` (``tensorboard``, ``wandb``, ``mlflow``; ``tensorboard=True`` adds the first) the same
  scalars also go to mmengine's vis backends under ``<out>`` (:mod:`mimbench.trackers`; the packages are
  the ``mimbench[trackers]`` extra; none by default).

The loop is :class:`TrainLoop` (``run -> run_epoch -> run_step``) made of named pieces: resume
(:func:`load_resume_point`, :func:`trim_log`, :func:`restore_rng`), :class:`NonFiniteGuard`,
:class:`StepLog` and :class:`OptimizerStep`; :func:`fit` is its public entry.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mimbench import dist, trackers
from mimbench.atomic import atomic_write, check_writable_dir
from mimbench.errors import MimbenchError
from mimbench.fastpath import autocast_factory, choose_precision, match_attention, maybe_compile
from mimbench.rng import rank_states, restore_rank_state, rng_state, seed_everything, set_rng_state

__all__ = [
    "seed_everything", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
    "build_scheduler", "LoopConfig", "fit", "resume_from", "TrainLoop", "StepLog", "NonFiniteGuard",
    "OptimizerStep", "wrap_for_training",
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


# ---------------------------------------------------------------------------- loop settings
@dataclass
class LoopConfig:
    """Loop settings. ``epochs`` counts passes over ``loader``; ``accum_iter`` micro-batches make one
    optimizer step (an epoch uses ``len(loader) // accum_iter * accum_iter`` micro-batches);
    ``clip_grad`` is a max global grad norm (None: no clipping); ``amp``: "auto" (bf16 on CUDA GPUs of
    compute capability >= 8.0 and on CPUs with native bf16, fp16 with a grad scaler on older GPUs, fp32
    elsewhere; :func:`mimbench.fastpath.choose_precision`), "bf16", "fp16" (with a grad scaler) or
    "none"; ``log_every`` in optimizer steps; ``progress``: show progress (bar or plain log lines);
    ``tensorboard``: also log scalars for TensorBoard; ``trackers``: log them to these
    (:data:`mimbench.trackers.TRACKERS`); ``ckpt_every_steps`` > 0 also writes
    ``checkpoint-latest.pt`` every that many optimizer steps inside an epoch (0: at epoch ends only);
    ``compile``: ``torch.compile`` the model once DDP has wrapped it (:func:`wrap_for_training`)."""

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


@dataclass(frozen=True)
class _Sizes:
    """Micro-batches per optimizer step (``accum``) and per epoch, optimizer steps per epoch and in all."""

    accum: int
    micro_per_epoch: int
    iters_per_epoch: int
    total_its: int

    @classmethod
    def of(cls, loader, cfg: LoopConfig) -> "_Sizes":
        accum = max(int(cfg.accum_iter), 1)
        micro = len(loader) // accum * accum
        if micro < 1:
            raise MimbenchError(f"The loader yields {len(loader)} batches per epoch, fewer than accum_iter={accum}.",
                                "Lower optim.accum_iter or the batch size, or use more data.")
        return cls(accum, micro, micro // accum, micro // accum * int(cfg.epochs))


def _autocast(amp: str, device: torch.device):
    """(autocast context factory, grad scaler or None) for setting ``amp`` on ``device``; the
    choice itself is :func:`mimbench.fastpath.choose_precision`."""
    precision = choose_precision(amp, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return autocast_factory(precision, device), scaler


def wrap_for_training(model: nn.Module, ctx, *, compile: bool = False) -> nn.Module:
    """The module the loop calls: ``model`` inside DistributedDataParallel when ``ctx`` has several
    processes, then compiled (``torch.compile`` in place, :func:`mimbench.fastpath.maybe_compile`) when
    ``compile``. DDP first, so the compiled graph is the DDP wrapper's and DDP's gradient buckets split
    it (compiling first would hide the parameters' gradient hooks inside one graph)."""
    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return maybe_compile(model, compile)


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, Mapping):
        x = next(iter(x.values()))
    return int(x.shape[0])


def _resolve_terms(terms) -> dict[str, float]:
    if callable(terms):
        terms = terms()
    return {k: float(v) for k, v in (terms or {}).items()}


def _set_epoch(loader, epoch: int) -> None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None), loader):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
            return


# ---------------------------------------------------------------------------- step log
class _Progress:
    """Progress over optimizer steps, rank 0 only: a tqdm bar when stderr is a terminal, else a plain
    log line on stdout at each log step (batch jobs, Slurm logs)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar, self.plain = None, False
        self.total, self.initial, self.desc = total, initial, desc
        self.t0 = time.perf_counter()
        if enabled and sys.stderr.isatty():
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
            eta_s = int(round((time.perf_counter() - self.t0) / done * (self.total - it)))
            print(f"{self.desc}: step {it}/{self.total} epoch {epoch:.2f} loss {loss:.4f} lr {lr:.3e} "
                  f"img/s {ips:.0f} eta {eta_s // 3600}:{eta_s // 60 % 60:02d}:{eta_s % 60:02d}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _vis_backends(cfg: LoopConfig, out_dir: Path) -> list:
    """The trackers' mmengine backends (``cfg.trackers``; ``tensorboard=True`` adds TensorBoard) under ``out_dir``."""
    names = tuple(cfg.trackers) + (("tensorboard",) if cfg.tensorboard else ())
    return trackers.vis_backends(names, out_dir, config=asdict(cfg)) if names else []


class StepLog:
    """What a log step leaves, rank 0 only: a line in ``log.jsonl``, the scalars in every backend of
    :func:`_vis_backends`, and the progress bar or plain line; other ranks count nothing but images."""

    def __init__(self, cfg: LoopConfig, out_dir: Path, sizes: _Sizes, initial: int, desc: str, ctx):
        self.every, self.world, self.sizes = max(int(cfg.log_every), 1), ctx.world_size, sizes
        self.fh = open(out_dir / "log.jsonl", "a") if ctx.is_main else None
        self.backends = _vis_backends(cfg, out_dir) if ctx.is_main else []
        self.bar = _Progress(sizes.total_its, initial, desc, enabled=cfg.progress and ctx.is_main)
        self.imgs, self.t0 = 0, time.perf_counter()

    def due(self, it: int, epoch_ends: bool) -> bool:
        return it % self.every == 0 or it == self.sizes.total_its or epoch_ends

    def write(self, it: int, loss: float, lr: float, terms) -> None:
        now = time.perf_counter()
        ips = self.imgs * self.world / max(now - self.t0, 1e-9)
        self.imgs, self.t0 = 0, now
        epoch = round(it / self.sizes.iters_per_epoch, 4)
        self.bar.show(it, epoch, loss, lr, ips)
        if self.fh is None:
            return
        rec = {"it": it, "epoch": epoch, "lr": lr, "loss": loss, "terms": _resolve_terms(terms),
               "img_per_s": round(ips, 1)}
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        scalars = {"loss": loss, "lr": lr, "img_per_s": ips, **{f"terms/{k}": v for k, v in rec["terms"].items()}}
        for backend in self.backends:
            backend.add_scalars(scalars, step=it)

    def close(self) -> None:
        self.bar.close()
        if self.fh is not None:
            self.fh.close()
        for backend in self.backends:
            backend.close()


# ---------------------------------------------------------------------------- optimizer step, non-finite guard
class OptimizerStep:
    """Backward of a micro-batch, then one optimizer step: grad-scaler unscale, clip, step, zero grads."""

    def __init__(self, optimizer, scaler, params, clip_grad: float | None):
        self.optimizer, self.scaler, self.clip_grad = optimizer, scaler, clip_grad
        self.params = list(params)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_and_clip(self) -> torch.Tensor | None:
        """The global gradient norm before clipping; None under the fp16 grad scaler without clipping
        (the scaler checks for overflow itself and skips such steps)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad is not None:
            return torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        if self.scaler is None:
            return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return None

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class NonFiniteGuard:
    """Stops training at a non-finite loss or gradient - on every rank, at the same step, with the same error.

    Flags (loss, gradient) accumulate on the device; the decision is collective (their maximum over ranks),
    so a NaN on one rank stops all of them before any of them writes a checkpoint. One CPU process: the
    loss is checked at once (before backward), the gradient before the optimizer step. Several CPU
    processes: both before every optimizer step (one small all-reduce). Accelerators: at log steps and
    before every checkpoint, so the hot loop never synchronises. Under the fp16 grad scaler gradients are
    not checked (the scaler skips overflowing steps)."""

    def __init__(self, ctx, out_dir: Path, *, check_grads: bool):
        self.flags = torch.zeros(2, device=ctx.device)
        self.every_step, self.alone = ctx.device.type == "cpu", ctx.world_size == 1
        self.check_grads, self.out_dir = check_grads, out_dir
        self.loss, self.terms, self.grad_norm = torch.zeros(()), None, None

    def after_forward(self, it: int, loss: torch.Tensor, terms) -> None:
        self.loss, self.terms = loss, terms
        self.flags[0] += (~torch.isfinite(loss.detach())).float()
        if self.every_step and self.alone and bool(self.flags[0]):
            self._raise(it, 0, self.flags, loss=float(loss.detach()))

    def after_grads(self, it: int, grad_norm: torch.Tensor | None) -> None:
        self.grad_norm = grad_norm if self.check_grads else None
        if self.grad_norm is not None:
            self.flags[1] += (~torch.isfinite(self.grad_norm.detach())).float()
        if self.every_step:
            self.check(it)

    def check(self, it: int, window: int = 0) -> None:
        """Raise on every rank when any rank saw a non-finite value since the start (collective)."""
        flags = dist.all_max(self.flags)
        if bool(flags.any()):  # every rank is here: the message's loss is the mean over ranks, the same on each
            self._raise(it, window, flags, loss=float(dist.all_mean(self.loss.detach().float())))

    def check_lazily(self, it: int, window: int) -> None:
        """:meth:`check` where values are not checked every step (accelerators)."""
        if not self.every_step:
            self.check(it, window)

    def _raise(self, it: int, window: int, flags: torch.Tensor, loss: float) -> None:
        try:
            shown = ", ".join(f"{k}={v:.6g}" for k, v in _resolve_terms(self.terms).items()) or "none reported"
        except Exception:  # terms may themselves be unusable once the loss diverged
            shown = "unavailable"
        where = f"optimizer step {it}" if not window else f"the {window} optimizer steps up to step {it}"
        what = "loss or gradient" if window else ("loss" if bool(flags[0]) else "gradient")
        grad = f"; gradient norm {float(self.grad_norm)}" if bool(flags[1]) and self.grad_norm is not None else ""
        raise MimbenchError(
            f"The {what} became non-finite at {where} (loss {loss}{grad}); loss terms: {shown}.",
            f"Training stopped; {Path(self.out_dir) / 'checkpoint-latest.pt'} still holds the last good state. "
            "Lower the learning rate (optim.blr), enable gradient clipping, or use amp='none', then resume.",
        )


# ---------------------------------------------------------------------------- resume
def load_resume_point(path: Path, raw_model: nn.Module, optimizer, scaler, iters_per_epoch: int) -> dict:
    """Load ``path`` (``checkpoint-latest.pt``) into the model, optimizer and grad scaler after checking
    that it belongs to this run; returns the checkpoint."""
    if not path.is_file():
        raise MimbenchError(f"--resume was given but {path} does not exist.",
                            "Start without --resume, or point --out at the directory of the interrupted run.")
    ck = load_checkpoint(path)
    try:
        missing = [key for key in ("epoch", "rng") if key not in ck]
        if missing:
            raise KeyError(", ".join(missing))
        raw_model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise MimbenchError(f"Checkpoint {path} does not match this model/config ({exc}).",
                            "Resume with the config the run was started with, or start a new --out.") from exc
    if ck.get("iters_per_epoch", iters_per_epoch) != iters_per_epoch:
        raise MimbenchError(
            f"Checkpoint {path} was written with {ck['iters_per_epoch']} steps per epoch, "
            f"this run has {iters_per_epoch}.",
            "Resume with the same data, batch size and accum_iter.")
    return ck


def trim_log(log_path: Path, done: int) -> None:
    """Drop the lines of ``log.jsonl`` of steps after ``done`` (they are trained again)."""
    if not log_path.is_file():
        return
    keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("it", 0) <= done]
    text = "".join(ln + "\n" for ln in keep)
    atomic_write(log_path, lambda tmp: Path(tmp).write_text(text), what="the training log",
                 fix="Point --out at a directory you can write to.")


def restore_rng(saved, ctx, seed: int, step: int) -> None:
    """This rank's own RNG streams from a checkpoint's per-rank list (:func:`mimbench.rng.restore_rank_state`);
    a rank the checkpoint has no state of (another number of processes wrote it) is re-seeded from
    (seed, rank, step), and says so."""
    if restore_rank_state(saved, rank=ctx.rank, seed=seed, step=step) == "reseeded":
        kept = len(saved) if isinstance(saved, (list, tuple)) else 1
        print(f"mimbench: the checkpoint holds RNG states of {kept} process(es), not of rank {ctx.rank} of "
              f"{ctx.world_size}; its random streams restart from (seed, rank, step) - dropout and augmentation "
              "draws differ from an uninterrupted run.", file=sys.stderr)


def _train_state(loop: "TrainLoop", epoch: int, rng: list, *, step_in_epoch: int = 0, epoch_loss=None) -> dict:
    """Everything :func:`fit` needs to continue: ``epoch`` finished epochs plus ``step_in_epoch``
    optimizer steps of the next one (mid-epoch: with the epoch-start RNG states and running loss);
    ``rng`` holds every rank's RNG state, index = rank."""
    scaler = loop.opt.scaler
    state = {
        "model": loop.raw_model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "scheduler": {"it": loop.it},  # the schedule is a pure function of the step
        "rng": rng,
        "epoch": epoch,
        "iters_per_epoch": loop.sizes.iters_per_epoch,
        "loop": dict(asdict(loop.cfg)),
    }
    if step_in_epoch:
        state.update(step_in_epoch=step_in_epoch, rng_epoch_start=loop.epoch_rng,
                     epoch_loss=epoch_loss.detach().cpu().clone())
    return state


# ---------------------------------------------------------------------------- the loop
class TrainLoop:
    """``run -> run_epoch -> run_step`` over micro-batches, as :func:`fit` describes."""

    def __init__(self, model: nn.Module, optimizer, loader, step_fn: Callable, cfg: LoopConfig, out_dir: Path, *,
                 on_step_end: Callable[[int, int], None] | None = None, desc: str = "train"):
        self.ctx = dist.setup()
        if self.ctx.is_main:
            check_writable_dir(out_dir)
        self.raw_model, self.optimizer, self.loader, self.step_fn = model, optimizer, loader, step_fn
        self.cfg, self.out_dir, self.on_step_end, self.desc = cfg, out_dir, on_step_end, desc
        self.sizes = _Sizes.of(loader, cfg)
        self.scheduler = build_scheduler(optimizer, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                         iters_per_epoch=self.sizes.iters_per_epoch, min_lr=cfg.min_lr)
        dist.check_device(model)
        precision = choose_precision(cfg.amp, self.ctx.device)
        self.autocast, scaler = _autocast(precision, self.ctx.device)
        match_attention(model, precision, self.ctx.device)
        self.model = wrap_for_training(model, self.ctx, compile=cfg.compile)
        self.opt = OptimizerStep(optimizer, scaler, model.parameters(), cfg.clip_grad)
        self.guard = NonFiniteGuard(self.ctx, out_dir, check_grads=scaler is None)
        self.ckpt_steps = max(int(cfg.ckpt_every_steps or 0), 0)
        self.it, self.start_epoch, self.skip_steps, self.resume_ck = 0, 0, 0, None
        self.epoch, self.epoch_rng, self.terms, self.log = 0, None, None, None

    def run(self, resume: bool) -> list[dict]:
        if resume:
            self.resume()
        else:
            self.start_fresh()
        self.scheduler.step_update(self.it)
        self.log = StepLog(self.cfg, self.out_dir, self.sizes, self.it, self.desc, self.ctx)
        try:
            return [self.run_epoch(epoch) for epoch in range(self.start_epoch, int(self.cfg.epochs))]
        finally:
            self.log.close()

    def start_fresh(self) -> None:
        seed_everything(self.cfg.seed + self.ctx.rank)
        log_path = self.out_dir / "log.jsonl"
        if self.ctx.is_main and log_path.exists():
            log_path.unlink()

    def resume(self) -> None:
        """Continue from ``checkpoint-latest.pt``: state, position, this rank's RNG streams, the log."""
        ck = load_resume_point(self.out_dir / "checkpoint-latest.pt", self.raw_model, self.optimizer,
                               self.opt.scaler, self.sizes.iters_per_epoch)
        self.start_epoch, self.skip_steps = int(ck["epoch"]), int(ck.get("step_in_epoch", 0))
        self.it = self.start_epoch * self.sizes.iters_per_epoch + self.skip_steps
        restore_rng(ck["rng"], self.ctx, self.cfg.seed, self.it)
        self.resume_ck = ck if self.skip_steps else None
        if hasattr(self.raw_model, "set_progress"):
            self.raw_model.set_progress(self.it, self.sizes.total_its)
        if self.ctx.is_main:
            trim_log(self.out_dir / "log.jsonl", self.it)

    def run_epoch(self, epoch: int) -> dict:
        self.epoch = epoch
        self.model.train()
        _set_epoch(self.loader, epoch)
        self.epoch_loss = torch.zeros((), device=self.ctx.device)
        self.step_loss = torch.zeros((), device=self.ctx.device)
        first_micro, batches = self._epoch_batches(epoch)
        self.optimizer.zero_grad(set_to_none=True)
        for micro, batch in enumerate(batches, start=first_micro):
            if micro >= self.sizes.micro_per_epoch:
                break
            self.run_step(micro, batch)
        mean_loss = float(dist.all_sum(self.epoch_loss)) / (self.sizes.micro_per_epoch * self.ctx.world_size)
        entry = {"epoch": epoch + 1, "loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"]}
        self.guard.check(self.it - 1, window=self.sizes.iters_per_epoch)
        self.save(epoch + 1)
        return entry

    def _epoch_batches(self, epoch: int):
        """``(first micro-batch, batch iterator)`` of the epoch: all of it, or after a mid-epoch checkpoint the
        rest, drawn in the order of the epoch-start RNG states and then continuing with the checkpoint's."""
        ck = self.resume_ck if epoch == self.start_epoch else None
        epoch_start = epoch * self.sizes.iters_per_epoch
        if ck is not None:  # the loader must draw its order from the epoch-start RNG state again
            restore_rng(ck["rng_epoch_start"], self.ctx, self.cfg.seed, epoch_start)
        self.epoch_rng = rank_states() if self.ckpt_steps else None
        if ck is None:
            return 0, iter(self.loader)
        self.epoch_loss += ck["epoch_loss"].to(self.ctx.device)
        first = self.skip_steps * self.sizes.accum
        then = lambda: restore_rng(ck["rng"], self.ctx, self.cfg.seed, self.it)  # noqa: E731
        return first, resume_from(self.loader, first, then=then)

    def run_step(self, micro: int, batch) -> None:
        """One micro-batch: forward and backward (DDP synchronises gradients on the step's last one only);
        the optimizer step after the last micro-batch of a step."""
        last = (micro + 1) % self.sizes.accum == 0
        with self.model.no_sync() if (self.ctx.distributed and not last) else nullcontext():
            with self.autocast():
                loss, self.terms = self.step_fn(self.model, batch)
            self.guard.after_forward(self.it, loss, self.terms)
            self.opt.backward(loss / self.sizes.accum)
        self.epoch_loss += loss.detach()
        self.step_loss += loss.detach()
        self.log.imgs += _batch_size(batch)
        if last:
            self._optimizer_step(epoch_ends=micro + 1 == self.sizes.micro_per_epoch)

    def _optimizer_step(self, epoch_ends: bool) -> None:
        self.guard.after_grads(self.it, self.opt.unscale_and_clip())
        self.opt.step()
        if self.on_step_end is not None:
            self.on_step_end(self.it, self.sizes.total_its)
        lr = self.optimizer.param_groups[0]["lr"]
        self.it += 1
        self.log.bar.update()
        if self.log.due(self.it, epoch_ends):
            # the step's loss: mean over its micro-batches on every rank (one collective per log step)
            loss = float(dist.all_sum(self.step_loss)) / (self.sizes.accum * self.ctx.world_size)
            self.guard.check_lazily(self.it - 1, window=self.log.every)
            self.log.write(self.it, loss, lr, self.terms)
        self.step_loss.zero_()
        self.scheduler.step_update(self.it)
        in_epoch = self.it - self.epoch * self.sizes.iters_per_epoch
        if self.ckpt_steps and in_epoch % self.ckpt_steps == 0 and in_epoch < self.sizes.iters_per_epoch:
            self.guard.check(self.it - 1, window=self.ckpt_steps)  # every rank stops together, none writes
            # the running loss as a per-rank mean: each rank resumes from it, so the epoch-end sum over
            # ranks still counts every micro-batch once
            shared_loss = dist.all_sum(self.epoch_loss) / self.ctx.world_size
            self.save(self.epoch, step_in_epoch=in_epoch, epoch_loss=shared_loss)

    def save(self, epoch: int, *, step_in_epoch: int = 0, epoch_loss=None) -> None:
        """Rank 0 writes ``checkpoint-latest.pt`` (and at epoch ends every ``ckpt_every`` epochs
        ``checkpoint-<epoch>.pt``) holding every rank's RNG state; every rank must call it."""
        rng = rank_states()
        if not self.ctx.is_main:
            return
        state = _train_state(self, epoch, rng, step_in_epoch=step_in_epoch, epoch_loss=epoch_loss)
        save_checkpoint(self.out_dir / "checkpoint-latest.pt", state)
        if not step_in_epoch and self.cfg.ckpt_every and epoch % int(self.cfg.ckpt_every) == 0:
            save_checkpoint(self.out_dir / f"checkpoint-{epoch}.pt", state)


def fit(model: nn.Module, optimizer, loader, step_fn: Callable, cfg: LoopConfig, out_dir, *, resume: bool = False,
        on_step_end: Callable[[int, int], None] | None = None, desc: str = "train") -> list[dict]:
    """Train ``model`` for ``cfg.epochs`` epochs; returns ``{"epoch", "loss", "lr"}`` per epoch run in this call.

    ``step_fn(model, batch) -> (loss, terms)``: ``loss`` a scalar tensor to minimise, ``terms`` a
    dict of floats/0-d tensors, or a zero-argument callable returning one (evaluated at log steps
    only, so it may sync). Under DDP ``model`` passed to ``step_fn`` is the DDP wrapper (use
    ``getattr(model, "module", model)`` for attributes). ``on_step_end(it, total_its)`` runs after
    each optimizer step ``it`` (0-based). When resuming and the model has
    ``set_progress(next_it, total_its)`` it is called so per-step schedules kept outside the
    state dict continue where they stopped. The ``loader`` decides the data order: a sampler /
    batch sampler / loader ``set_epoch(epoch)`` is called each epoch (0-based); otherwise the
    order follows the global torch RNG, which checkpoints restore.
    """
    loop = TrainLoop(model, optimizer, loader, step_fn, cfg, Path(out_dir), on_step_end=on_step_end, desc=desc)
    return loop.run(resume)


class _SkipBatches:
    """A batch sampler that drops the first ``skip`` index lists of ``inner`` (never loading them;
    one with ``iter_from(skip)`` starts there without drawing them), then calls ``then()`` - lazily, at the
    first request, as the wrapped sampler would draw."""

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


