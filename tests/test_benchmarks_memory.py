"""The GPU suite fits an 80 GB H100: every measurement benchmarks/gpu_suite.sh makes, built by the benchmark's own
`build` on the meta device (shapes, no data), holds under 70 GiB at its peak: weights, gradients, AdamW states, the
EMA copy and the activations of one step, counted op by op as the tensors are created and freed.

The count is an upper bound of what the GPU holds: the meta device has no autocast, so activations are counted in
fp32 (bf16 halves most of them; a test below shows the bound on a small model), attention takes the math path (the
GPU's flash kernels keep no T x T matrix), and compiled measurements are counted as their eager steps (inductor
keeps no more for the backward). The official models.py is counted as dit_core's DiT: it has the same parameters
(dit_core.interop loads its checkpoints strictly) and the same layers. fid_throughput.py is not counted here."""

import re
import shlex
import sys
import weakref
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from dit_core.config import DiTOptions
from dit_core.flops import param_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import each other as top-level modules

import block_options  # noqa: E402
import train_step  # noqa: E402

LIMIT_GIB = 70.0
ALLOCATION_BYTES = 512  # the CUDA caching allocator rounds every block up to this


class ResidentMemory(TorchDispatchMode):
    """Bytes of the `device` storages alive while the mode is on, and their peak: every storage an op creates is
    counted until it is freed (rounded up as the CUDA allocator rounds it)."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device, self.live, self.peak = device, 0, 0
        self.storages = WeakIdKeyDictionary()

    def _freed(self, nbytes: int, _ref) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                storage = t.untyped_storage()
                if storage not in self.storages:
                    nbytes = -(-storage.nbytes() // ALLOCATION_BYTES) * ALLOCATION_BYTES
                    self.storages[storage] = weakref.ref(storage, partial(self._freed, nbytes))
                    self.live += nbytes
        self.peak = max(self.peak, self.live)
        return out


def suite_commands() -> dict[str, list[str]]:
    """{script: arguments} of the benchmarks/gpu_suite.sh lines that run train_step.py and block_options.py."""
    text = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    found = dict(re.findall(r"^bench \d+ benchmarks/(\w+)\.py (.*)$", text, flags=re.M))
    return {script: shlex.split(found[script]) for script in ("train_step", "block_options")}


def counted(m: train_step.Measurement) -> train_step.Measurement:
    """What the meta device can run of `m`: its eager step, with dit_core's DiT for the official one."""
    return replace(m, mode="eager", implementation="dit_core")


def suite_measurements() -> list[tuple[train_step.Measurement, SimpleNamespace]]:
    """Every distinct (counted) measurement of the GPU suite, with the arguments its script builds it with."""
    commands = suite_commands()
    ts_args = train_step.parse_args(commands["train_step"])
    bo_args = block_options.parse_args(commands["block_options"])
    planned = [(m, ts_args) for m in train_step.plan(ts_args)] + [(m, bo_args) for _, m in block_options.plan(bo_args)]
    unique = {}
    for m, args in planned:
        unique.setdefault(counted(m), args)
    return list(unique.items())


def resident_gib(m: train_step.Measurement, args, device: str = "meta") -> tuple[float, float, float]:
    """(GiB after building, after one step, at the peak of that step) of `m` built by the benchmark's `build`."""
    with ResidentMemory(device) as memory:
        step = train_step.build(m, m.config(args), args, torch.device(device))
        built = memory.live
        step()
        after = memory.live
        del step
    return built / 2**30, after / 2**30, memory.peak / 2**30


MEASUREMENTS = suite_measurements()


def test_the_suite_measures_the_xl2_training_step_against_the_official_code():
    commands = suite_commands()
    planned = train_step.plan(train_step.parse_args(commands["train_step"]))
    assert {(m.implementation, m.mode) for m in planned if m.preset == "DiT-XL/2" and m.kind == "train"} == {
        ("dit_core", "eager"),
        ("official", "eager"),
        ("dit_core", "compiled"),
        ("official", "compiled"),
    }


def label(m: train_step.Measurement) -> str:
    design = [f"{k}={v}" for k, v in vars(m.design).items() if v != getattr(DiTOptions(), k)]
    return "-".join([m.kind, m.preset, str(m.batch), *design])


@pytest.mark.parametrize("m, args", MEASUREMENTS, ids=[label(m) for m, _ in MEASUREMENTS])
def test_each_measurement_of_the_gpu_suite_fits_in_70_gib(m, args):
    args = SimpleNamespace(**{**vars(args), "precision": "fp32"})  # no autocast on meta: fp32, an upper bound
    built, after, peak = resident_gib(m, args)
    weights_gib = 4 * param_count(m.config(args)) / 2**30
    if m.kind == "train":  # the weights and the EMA; then their gradients and AdamW's two moments
        assert built == pytest.approx(2 * weights_gib, rel=0.01)
        assert after == pytest.approx(5 * weights_gib, rel=0.01)
    else:
        assert built == pytest.approx(weights_gib, rel=0.01)
    print(f"{label(m)}: peak {peak:.1f} GiB, after the step {after:.1f}, weights {weights_gib:.1f}")
    assert peak < LIMIT_GIB


def test_the_fp32_count_bounds_the_bf16_autocast_step():
    """On a small model, run for real on the CPU: bf16 autocast holds less at its peak than the fp32 count."""
    args = train_step.parse_args(["--input-size", "16", "--in-channels", "4"])
    m = train_step.Measurement("train", "DiT-d4w128/2", "dit_core", "eager", 16)
    _, _, fp32_meta = resident_gib(m, args)
    _, _, bf16_cpu = resident_gib(m, SimpleNamespace(**{**vars(args), "precision": "bf16"}), device="cpu")
    assert 0 < bf16_cpu < fp32_meta
