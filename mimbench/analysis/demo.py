"""The demo's analysis step: every demo encoder analysed once (reused when done by the same settings), and the
closing note on the seed's claim that DDAE's deep layers attend more locally than MAE's."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from mimbench.analysis.run import analysis_settings, run_analyze, settings_sha256
from mimbench.encoders import encoder_sha256

#: Per demo scale: the subset size and the probes' limits (quick: the feature tasks' quick limits).
DEMO_SETTINGS = {"full": dict(samples=1000, limit_train=None, limit_val=None),
                 "quick": dict(samples=200, limit_train=2048, limit_val=500)}


def _finished(folder: Path, encoder: Path, sha: str) -> dict | None:
    for path in sorted(folder.glob("analyze-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (record.get("status") == "ok" and record["protocol"].get("sha256") == sha
                and record["encoder"].get("sha256") == encoder_sha256(encoder)):
            return record
    return None


def analyze_encoders(encoders: dict[str, Path], root: Path, scale: str, data: str = "builtin:fashion-mnist",
                     log: Callable[[str], None] = print) -> dict[str, dict]:
    """Name -> analysis record of each encoder (``root/<name>/``); an encoder whose folder is a pre-training run
    (``checkpoint-latest.pt``) is analysed with it (``--pretrain-run``)."""
    kwargs = DEMO_SETTINGS[scale]
    records = {}
    for name, encoder in encoders.items():
        run = Path(encoder).parent if (Path(encoder).parent / "checkpoint-latest.pt").is_file() else None
        folder = Path(root) / name
        limits = (kwargs["limit_train"], kwargs["limit_val"])
        sha = settings_sha256(analysis_settings(kwargs["samples"], 0, limits, None, run))
        record = _finished(folder, Path(encoder), sha)
        if record is not None:
            log(f"analysis of {name}: kept from an earlier run ({folder})")
        else:
            log(f"analyze {name}")
            record = run_analyze(Path(encoder), data=data, out=folder, pretrain_run=run, **kwargs)
        records[name] = record
    return records


def locality_note(records: dict[str, dict], deep: str = "ddae", base: str = "mae") -> str:
    """Whether ``deep``'s deeper half of blocks has a smaller mean attention distance than ``base``'s (the DDAE
    claim), with the per-block distances of both; empty when either was not analysed with attention."""
    have = {n: records[n]["metrics"].get("attention_distance_mean") for n in (deep, base) if n in records}
    if len(have) < 2 or None in have.values():
        return ""
    per = {n: np.asarray(v, dtype=float) for n, v in have.items()}
    half = {n: float(v[len(v) // 2:].mean()) for n, v in per.items()}
    verdict = "more local" if half[deep] < half[base] else "not more local"
    blocks = lambda n: ", ".join(f"{x:.2f}" for x in per[n])  # noqa: E731
    return (f"Attention distance at demo scale (pixels, mean over heads, block 0 first): {deep} [{blocks(deep)}], "
            f"{base} [{blocks(base)}]. {deep}'s deeper half of blocks is {verdict} than {base}'s "
            f"({half[deep]:.2f} vs {half[base]:.2f} px mean distance).")


__all__ = ["DEMO_SETTINGS", "analyze_encoders", "locality_note"]
