"""The demo's analysis steps (:class:`mimbench.steps.Analyze`): every demo encoder analysed once, side by side with
the evaluations (reused when done by the same settings), and the closing note on the seed's claim that DDAE's deep
layers attend more locally than MAE's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mimbench.analysis.run import analysis_settings, run_analyze, settings_sha256
from mimbench.encoders import encoder_sha256

def _pretrain_run(encoder: Path) -> Path | None:
    """The encoder's folder when it is a pre-training run (``checkpoint-latest.pt``): analysed with it."""
    folder = Path(encoder).parent
    return folder if (folder / "checkpoint-latest.pt").is_file() else None


def _settings_sha(encoder: Path, settings: dict) -> str:
    limits = (settings.get("limit_train"), settings.get("limit_val"))
    return settings_sha256(analysis_settings(settings["samples"], 0, limits, None, _pretrain_run(encoder)))


def finished_analysis(folder: Path, encoder: Path, settings: dict) -> dict | None:
    """The finished analysis record in ``folder`` of this ``encoder`` file by these ``settings`` (a
    demo scale's ``analysis``), or None: the demo's analysis step is then done again."""
    sha = _settings_sha(Path(encoder), settings)
    for path in sorted(Path(folder).glob("analyze-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (record.get("status") == "ok" and record["protocol"].get("sha256") == sha
                and record["encoder"].get("sha256") == encoder_sha256(encoder)):
            return record
    return None


def analyze_encoder(encoder: Path, folder: Path, settings: dict, data: str = "builtin:fashion-mnist") -> dict:
    """``mimbench analyze`` of one demo encoder into ``folder`` with ``settings`` (a demo scale's ``analysis``),
    with its pre-training run where it has one; the record."""
    return run_analyze(Path(encoder), data=data, out=Path(folder), pretrain_run=_pretrain_run(Path(encoder)),
                       **settings)


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


__all__ = ["analyze_encoder", "finished_analysis", "locality_note"]
