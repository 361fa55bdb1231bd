"""Fixtures of the HTML tests (test_html.py, test_html_browser.py): records of a small study (three encoders, the
random control among them, several tasks and seeds, training logs, a deviating run, inputs that must be skipped),
the record writer, and a parser listing every URL a page refers to."""
import json
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mimbench.results.records import new_record, write_record


def add_run(folder, task, value, *, technique, epochs, seed=0, deviations=(), dataset="imagenet", metrics=None,
            encoder_dir=None, arch="vit-b/16", protocol=None):
    """Write one finished record of ``task`` (headline metric ``value``) under ``folder``; return its path."""
    t = time.time()
    encoder_dir = Path(encoder_dir or folder)
    headline = {"mIoU": value} if task == "segment" else {"top1": value}
    rec = new_record(task, protocol={"name": protocol or f"{task}/std", "sha256": "cd" * 32,
                                     "deviations": list(deviations), "overrides": []},
                     encoder={"path": str(encoder_dir / "encoder.safetensors"), "sha256": "ab" * 32, "arch": arch,
                              "technique": technique, "epochs": epochs},
                     dataset={"name": dataset, "sizes": {"train": 10, "val": 5}},
                     metrics={**headline, **(metrics or {})},
                     seed=seed, started=t, finished=t + 2.0, precision="bf16")
    return write_record(folder, rec)


def _log(path: Path, n: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps({"it": i, "loss": 2.0 / (i + 1)}) for i in range(n)) + "\n")


def make_study(root: Path) -> Path:
    """``evals/<encoder>/<task>/`` records as the demo lays them out, pre-training logs beside the encoders,
    one fine-tuning log beside its record, a truncated record and another tool's JSON; returns the evals root."""
    evals, encoders = root / "evals", root / "encoders"
    for name, epochs, base in (("mae", 800.0, 70.0), ("ddae", 100.0, 72.0), ("random-init", 0.0, 40.0)):
        if name != "random-init":
            _log(encoders / name / "log.jsonl")
        devs = ["fast linear probe: 5 epochs"] if name == "random-init" else []
        for seed in (0, 1):
            add_run(evals / name / "linear", "linear", base + seed, technique=name, epochs=epochs, seed=seed,
                    deviations=devs, encoder_dir=encoders / name)
        add_run(evals / name / "knn", "knn", base - 10.0, technique=name, epochs=epochs, encoder_dir=encoders / name)
        add_run(evals / name / "finetune", "finetune", base + 10.0, technique=name, epochs=epochs,
                encoder_dir=encoders / name, dataset="builtin:fashion-mnist")
        add_run(evals / name / "segment", "segment", base / 2, technique=name, epochs=epochs,
                encoder_dir=encoders / name, dataset="ade20k",
                metrics={"per_class_iou": {"background": 90.0, "shirt": base / 3, "bag": base / 4}})
    _log(evals / "mae" / "finetune" / "log.jsonl")
    (evals / "mae" / ("knn-" + "1" * 32 + ".json")).write_text('{"schema_version": 1, "run_id": "11')  # cut short
    (evals / "mae" / ("linear-" + "2" * 32 + ".json")).write_text(json.dumps({"tool": "other", "acc": 0.5}))
    return evals


@pytest.fixture
def study(tmp_path):
    """:func:`make_study` in this test's folder."""
    return make_study(tmp_path)


@pytest.fixture(scope="session")
def html_pages(tmp_path_factory):
    """The study's report page (``report.html``) and leaderboard site (``site/``), written once per session."""
    from mimbench.results.html_site import write_site
    from mimbench.results.report import write_report

    root = tmp_path_factory.mktemp("html")
    evals = make_study(root)
    write_report([evals], fmt="html", out=root / "report" / "report.html")
    write_site(root / "site", include_runs=[evals])
    return {"report": root / "report" / "report.html", "site": root / "site"}


class Resources(HTMLParser):
    """Every URL a page refers to, as (tag, attribute, value); ``url(...)`` inside style text as ("style", "url")."""

    URL_ATTRS = ("src", "href", "srcset", "data", "poster", "action", "formaction", "background", "xlink:href")

    def __init__(self):
        super().__init__()
        self.refs, self.ids, self._style = [], set(), False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id":
                self.ids.add(value)
            if name in self.URL_ATTRS and value:
                self.refs.append((tag, name, value))
            if name == "style" and value and "url(" in value:
                self.refs.append((tag, "style", value))
        self._style = tag == "style"

    def handle_data(self, data):
        if self._style and ("url(" in data or "@import" in data):
            self.refs.append(("style", "url", data))

    @classmethod
    def of(cls, text: str) -> "Resources":
        parser = cls()
        parser.feed(text)
        return parser

    def network(self) -> list[tuple[str, str, str]]:
        """References that would reach the network, other than links (``<a href>``) to sources."""
        return [(t, a, v) for t, a, v in self.refs if "http://" in v.lower() or "https://" in v.lower() or
                v.strip().startswith("//") if not (t == "a" and a == "href")]


@pytest.fixture
def page_refs():
    """:class:`Resources`: ``page_refs.of(text).network()`` lists the references that would reach the network."""
    return Resources


@pytest.fixture
def record_writer():
    """:func:`add_run`."""
    return add_run
