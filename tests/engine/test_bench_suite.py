"""`mimbench bench --suite gpu`: every row runs at toy size on the CPU and its rows land in the Markdown table."""
import re

from typer.testing import CliRunner

from mimbench.bench import GPU_SUITE, SUITE_HEADING, append_suite_rows, run_suite
from mimbench.cli import app
from mimbench.results.records import validate_record


def test_gpu_suite_at_toy_size_on_the_cpu_appends_its_rows(tmp_path):
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nintro\n\n## Later section\n\ntext\n")
    rows = run_suite("gpu", device="cpu", steps=1, warmup=0, toy=True, out=tmp_path / "runs", append=md)
    uncompiled = [row for row, _, args in GPU_SUITE if not args.get("compile")]
    assert [row for row, _ in rows] == uncompiled  # compiled rows need CUDA
    modes = {record["protocol"]["mode"] for _, record in rows}
    assert modes == {"pretrain", "features", "finetune", "segment"}
    for _, record in rows:
        validate_record(record)
        assert record["protocol"]["precision"] == "bf16" and record["metrics"]["img_per_s"] > 0
    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(table) == len(rows) and all(f"| {row} |" in text for row in uncompiled)
    assert text.index("## Later section") < text.index(SUITE_HEADING)  # a new section goes at the end
    append_suite_rows(md, rows[:1])  # a second run adds rows to the same table
    text2 = md.read_text()
    assert text2.count(SUITE_HEADING) == 1 and len([l for l in text2.splitlines() if l.startswith("| 20")]) == len(rows) + 1
    assert re.search(r"`mimbench bench pretrain --config \S+ --batch 4 --amp bf16`", text2)


def test_rows_go_into_an_existing_table_before_the_next_section(tmp_path):
    md = tmp_path / "B.md"
    record = {"protocol": {"mode": "features", "batch": 2, "precision": "bf16", "arch": "vit_x"},
              "metrics": {"img_per_s": 12.5, "mfu": 0.5, "peak_mem_mb_per_img": 3.0},
              "hardware": {"name": "NVIDIA H100"}, "started": "2026-12-05T13:00:00Z"}
    md.write_text(f"# B\n\n{SUITE_HEADING}\n\n| h |\n|---|\n| old |\n\n## Next\n\nend\n")
    append_suite_rows(md, [("ViT-B features", record)])
    text = md.read_text()
    new = "| 2026-12-05 | NVIDIA H100 | ViT-B features | 2 | bf16 | False | 12.5 | 50.0 % | 3.0 |"
    assert new in text and text.index("| old |") < text.index(new) < text.index("## Next")


def test_suite_cli_refuses_a_mode_with_a_suite():
    result = CliRunner().invoke(app, ["bench", "pretrain", "--suite", "gpu"])
    assert result.exit_code == 2 and "not both" in result.output
    result = CliRunner().invoke(app, ["bench", "--suite", "cpu"])
    assert result.exit_code == 2 and "Unknown bench suite" in result.output
