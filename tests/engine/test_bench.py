"""Throughput benchmark reports a positive rate and refuses bad input."""
import re

import pytest

from mimbench.bench import run_bench
from mimbench.errors import MimbenchError


@pytest.mark.parametrize("what", ["train", "forward"])
def test_run_bench_reports_images_per_second(what):
    text = run_bench(what, "mae_vit_micro_patch4_32", batch=4, steps=1)
    rate = float(re.search(r"([0-9.]+) img/s", text).group(1))
    assert rate > 0 and text.startswith(f"{what} mae_vit_micro_patch4_32 batch=4")


def test_run_bench_bad_input():
    with pytest.raises(MimbenchError, match="Unknown benchmark"):
        run_bench("backward")
    with pytest.raises(MimbenchError, match=">= 1"):
        run_bench("train", batch=0)
