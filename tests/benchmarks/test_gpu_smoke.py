"""benchmarks/gpu_smoke.py: exits cleanly without a GPU, runs its checks on the CPU, and its device check sees state
held outside the module tree (a frozen teacher, a cached table)."""

import pytest
import torch

from tests.contracts.entries.distillation import student
from tests.helpers import load_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run")
def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    assert load_benchmark("gpu_smoke").main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_cpu_mode_runs_the_same_checks(capsys):
    smoke = load_benchmark("gpu_smoke")
    assert smoke.main(["--device", "cpu", "--steps", "2", "--entries", "ClassifierModule", "DistillationModule"]) == 0
    out = capsys.readouterr().out
    assert "| DistillationModule | bf16-mixed | 2 |" in out and "2 of 2 runs passed" in out


def test_device_check_sees_state_outside_the_module_tree():
    smoke = load_benchmark("gpu_smoke")
    module = student(cache_teacher_logits=True)

    class Cache:  # stands for a technique's helper object holding tables
        __module__ = "lightning_methods.test"

        def __init__(self):
            self.logits = torch.zeros(4, 10)

    module._cache = Cache()
    check = smoke.DeviceCheck(torch.device("meta"))  # nothing is on "meta": every tensor must be reported
    check._check(module, "training")
    reported = " ".join(sorted(check.misplaced))
    assert "model.head.weight" in reported  # a parameter
    assert "teacher" in reported.replace("model.head", "")  # the frozen teacher, held outside the module tree
    assert "_cache.logits" in reported  # a table inside a helper object
