"""``mimbench demo``: the whole pipeline on the embedded Fashion-MNIST data, on a CPU, in minutes.

Pre-trains small encoders under MAE, the robust-MAE recipe and DDAE, adds a randomly initialised
encoder of the same architecture as the control, evaluates every encoder with k-NN, the linear probe,
fine-tuning and FashionMNIST-Seg segmentation, and ends with the report table and plots.

Each step writes into its own directory under ``out``; a step whose result is already there, made from
the same config, overrides and encoder, is reused, so a second run (or a run after an interruption) only
does what is missing. A step left there by other settings (``--quick`` into the same folder, an older
config, a re-trained encoder) is removed and redone, so the report never mixes the two.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from mimbench.errors import MimbenchError
from mimbench.results.records import encoder_made_by, finished_record

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DemoScale:
    """Budgets of one demo size; everything else comes from the configs themselves."""

    pretrain_overrides: tuple[str, ...]
    eval_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _configs_root() -> Path:
    root = REPO_ROOT / "eval_configs"
    if not root.is_dir():
        raise MimbenchError(f"The evaluation configs were not found at {root}.",
                            "Run the demo from an editable install of the repository (pip install -e .).")
    return root


def _pretrain_config(name: str) -> Path:
    import pretrain

    return Path(pretrain.__file__).resolve().parent / "configs" / name


def _clear_stale(path: Path, console) -> None:
    """Empty a step's directory that holds no finished result of these settings, so the report sees one run.

    What is there was made by other settings (another demo size, an older config, a re-trained encoder)
    or did not finish; either way the step starts again from nothing.
    """
    import shutil

    if path.exists() and any(path.iterdir()):
        console.print(f"redoing {path}: no finished result of these settings there")
        shutil.rmtree(path)


# Pre-training configs of the demo (in pretrain/configs/) and the control. Each technique is a name the
# report shows; "random-init" is the same architecture as the others with MAE's initialisation, no training.
TECHNIQUES = (
    ("mae", "mae_tiny_fmnist.py"),
    ("robust-mae", "robust-mae_tiny_fmnist.py"),
    ("ddae", "ddae_tiny_fmnist.py"),
)
QUICK_TECHNIQUES = (
    ("mae", "mae_micro_fmnist.py"),
    ("ddae", "ddae_micro_fmnist.py"),
)


def _console():
    from rich.console import Console

    return Console()


def _random_init_encoder(reference: Path, dst: Path) -> Path:
    """An encoder file with the reference encoder's architecture and MAE's initialisation, never trained."""
    import torch

    from mimbench.encoders import read_metadata, save_encoder
    from pretrain.registry import create_model

    meta = read_metadata(reference)
    arch = {k: int(meta[k]) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    torch.manual_seed(0)
    model = create_model("mae", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                         mlp_ratio=float(meta.get("mlp_ratio", 4.0)), **arch)
    return save_encoder(model.encoder_state_dict(), dst, arch=meta["arch"], technique="random-init", epochs=0,
                        data="none", mlp_ratio=float(meta.get("mlp_ratio", 4.0)), **arch)


def _same_architecture(control: Path, reference: Path) -> bool:
    """The control file exists and has the reference encoder's architecture (it holds no trained weights)."""
    if not control.is_file():
        return False
    from mimbench.encoders import read_metadata

    keys = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
    a, b = read_metadata(control), read_metadata(reference)
    return all(a.get(k) == b.get(k) for k in keys)


def _scale(quick: bool) -> dict:
    """Budgets: full demo ≈ 8 min on 2 idle CPU cores (limit 15), quick ≈ 35 s (toy sizes, used by the tests)."""
    if quick:
        small = ("data.limit_train=2048", "data.limit_val=500")
        return dict(techniques=QUICK_TECHNIQUES,
                    pretrain=("schedule.epochs=1", "schedule.warmup_epochs=0.2", "data.limit=1024"),
                    knn=small, linear=small,
                    finetune=("schedule.epochs=1", "schedule.warmup_epochs=0.2", "data.limit_train=1024",
                              "data.limit_val=500"),
                    segment=("train_cfg.max_iters=10",), seg_data=dict(n_train=200, n_val=50))
    return dict(techniques=TECHNIQUES,
                pretrain=("schedule.epochs=2", "schedule.warmup_epochs=0.5"),
                knn=(), linear=(), finetune=(), segment=("train_cfg.max_iters=300",), seg_data={})


def run_demo(out: Path = Path("runs/demo"), quick: bool = False) -> Path:
    """Pre-train → evaluate (k-NN, linear probe, fine-tune, segmentation) → report; returns the report path."""
    from mimbench.evals import run_eval
    from mimbench.evals.segment import run_segment
    from mimbench.results.report import write_report
    from pretrain.main import run_pretrain

    console = _console()
    out = Path(out)
    scale = _scale(quick)
    configs = _configs_root()
    evals = [(task, configs / "demo" / f"{task}_fmnist.py", scale[task]) for task in ("knn", "linear", "finetune")]
    seg_config = configs / "segmentation" / "demo_fmnist_seg.py"
    from mimbench.data.seg import build_fashion_mnist_seg

    seg_data = str(build_fashion_mnist_seg(out / "data" / "fashion-mnist-seg", **scale["seg_data"]))  # shared
    encoders: dict[str, Path] = {}
    steps = len(scale["techniques"]) + 1 + (len(scale["techniques"]) + 1) * (len(evals) + 1)
    done = 0
    t0 = time.time()

    def header(text: str) -> None:
        nonlocal done
        done += 1
        console.rule(f"[bold]{done}/{steps}[/] {text}  [dim]({time.time() - t0:.0f} s)[/]")

    for name, cfg in scale["techniques"]:
        header(f"pre-train {name}")
        enc = out / "encoders" / name / "encoder.safetensors"
        if not encoder_made_by(enc, _pretrain_config(cfg), scale["pretrain"]):
            _clear_stale(enc.parent, console)
            enc = run_pretrain(_pretrain_config(cfg), data="builtin:fashion-mnist", out=enc.parent,
                               overrides=list(scale["pretrain"]))
        else:
            console.print(f"reusing {enc}")
        encoders[name] = enc
    header("random-init control")
    control = out / "encoders" / "random-init" / "encoder.safetensors"
    if not _same_architecture(control, next(iter(encoders.values()))):
        _clear_stale(control.parent, console)
        _random_init_encoder(next(iter(encoders.values())), control)
    else:
        console.print(f"reusing {control}")
    encoders["random-init"] = control

    for name, enc in encoders.items():
        # k-NN and the cached linear probe share one feature cache per encoder: features are extracted once.
        cache = f"cache_dir={str(out / 'features' / name)!r}"
        for task, cfg, overrides in evals:
            header(f"{task} on {name}")
            step_dir = out / "evals" / name / task
            if task in ("knn", "linear"):
                overrides = (*overrides, cache)
            if finished_record(step_dir, cfg, overrides, enc) is None:
                _clear_stale(step_dir, console)
                run_eval(task, encoder=enc, config=cfg, data="builtin:fashion-mnist", out=step_dir,
                         overrides=list(overrides), resume=False)
            else:
                console.print(f"reusing {step_dir}")
        header(f"segment on {name}")
        step_dir = out / "evals" / name / "segment"
        if finished_record(step_dir, seg_config, scale["segment"], enc) is None:
            _clear_stale(step_dir, console)
            step_dir.mkdir(parents=True, exist_ok=True)
            # mmsegmentation prints every parameter's layer id; keep the terminal readable, the log complete.
            with open(step_dir / "console.log", "w") as log, contextlib.redirect_stdout(log):
                # single-scale only: the 6-scale x flip test costs about 12x the single-scale one on a CPU
                run_segment(encoder=enc, config=seg_config, data=seg_data, out=step_dir,
                            overrides=list(scale["segment"]), launcher="none", resume=False, aug_test=False)
        else:
            console.print(f"reusing {step_dir}")

    report = out / "report.md"
    text = write_report([out / "evals"], fmt="md", out=report)
    console.rule(f"[bold]report[/]  [dim]({time.time() - t0:.0f} s in all)[/]")
    console.print(text, markup=False, highlight=False)
    console.print(f"\nencoders: {out / 'encoders'}\nrun records: {out / 'evals'}\nreport: {report}")
    return report
