"""EMA update math; checkpoint round trip, atomic writes, device mapping and config refusal; a full disk and a writer
killed mid-save leave the previous checkpoint intact (real faults: tests.faults, SIGKILL)."""

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from dit_core.checkpoint import (
    load_checkpoint,
    model_config_from_checkpoint,
    out_of_space_error,
    restore,
    save_checkpoint,
)
from dit_core.ema import create_ema, unwrap_model, update_ema
from dit_core.model import DiT
from tests import faults
from tests.dit_core.builders import tiny_dit

ROOT = Path(__file__).resolve().parents[2]


MODEL = dict(preset="DiT-d2w64/4", num_classes=5)


def test_ema_starts_as_a_frozen_copy():
    model = tiny_dit(**MODEL)
    ema = create_ema(model)
    assert not ema.training and all(not p.requires_grad for p in ema.parameters())
    for a, b in zip(model.parameters(), ema.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_ema_update_math():
    model = tiny_dit(**MODEL)
    ema = create_ema(model)
    before = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    update_ema(ema, model, decay=0.9)
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * p, atol=1e-6, rtol=1e-6)
    update_ema(ema, model, decay=0.0)  # decay 0 copies the model
    for e, p in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, p)


def test_ema_of_compiled_model_and_bad_decay():
    model = tiny_dit(**MODEL)
    ema = create_ema(model)
    compiled = torch.compile(model, backend="eager")
    assert unwrap_model(compiled) is model
    update_ema(ema, compiled, 0.5)
    with pytest.raises(ValueError, match="decay"):
        update_ema(ema, model, 1.5)


def train_one_step(model, opt):
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 4])
    (model(x, t, y) - 1).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny_dit(**MODEL)
    ema = create_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_one_step(model, opt)
    update_ema(ema, model, 0.9)
    config = {"model": asdict(model.config), "run": {"lr": 1e-3}}
    path = save_checkpoint(
        tmp_path / "ckpt" / "0000100.pt",
        model=model,
        ema=ema,
        optimizer=opt,
        step=100,
        config=config,
        extra={"rng": torch.get_rng_state()},
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["0000100.pt"]  # no temporary file left behind

    ckpt = load_checkpoint(path, map_location="cpu", expected_model_config=model.config)
    assert ckpt["step"] == 100 and ckpt["config"] == config and torch.equal(ckpt["rng"], torch.get_rng_state())
    model2 = DiT(model_config_from_checkpoint(ckpt))
    ema2 = create_ema(model2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert restore(ckpt, model2, ema2, opt2) == 100
    for a, b in zip(
        list(model.parameters()) + list(ema.parameters()), list(model2.parameters()) + list(ema2.parameters())
    ):
        assert torch.equal(a, b)
    # Both continue identically: the optimizer state came back too.
    torch.manual_seed(1)
    train_one_step(model, opt)
    torch.manual_seed(1)
    train_one_step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_checkpoint_loads_onto_another_device_map(tmp_path):
    model = tiny_dit(**MODEL)
    path = save_checkpoint(tmp_path / "c.pt", model=model, step=1, config={"model": asdict(model.config)})
    ckpt = load_checkpoint(path, map_location=torch.device("meta"))
    assert all(v.device.type == "meta" for v in ckpt["model"].values())


def test_checkpoint_refuses_other_config(tmp_path):
    model = tiny_dit(**MODEL)
    path = save_checkpoint(tmp_path / "c.pt", model=model, step=1, config={"model": asdict(model.config)})
    other = tiny_dit(**MODEL, learn_sigma=False).config
    with pytest.raises(ValueError, match="learn_sigma: checkpoint True, expected False"):
        load_checkpoint(path, expected_model_config=other)
    # Runtime-only fields do not count.
    load_checkpoint(path, expected_model_config=tiny_dit(**MODEL, grad_checkpointing=True).config)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dit_core checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_out_of_space_errors_say_what_happened_and_what_to_do():
    for code, reason, fix in [
        (errno.ENOSPC, "no space left on device", "free space on that file system"),
        (errno.EDQUOT, "disk quota exceeded", "raise your quota"),
        (errno.EFBIG, "file too large", "raise the file size limit"),
    ]:
        error = out_of_space_error(OSError(code, os.strerror(code)), "checkpoint /runs/a.pt")
        assert isinstance(error, OSError) and isinstance(error, ValueError) and error.errno == code
        assert str(error).startswith(f"{reason} while writing checkpoint /runs/a.pt: ") and fix in str(error)
        assert str(error).endswith("and run the same command again")


@pytest.mark.parametrize("method", ["namespace", "rlimit"])
def test_a_full_disk_keeps_the_previous_checkpoint(method, tmp_path):
    """A save that the file system refuses part-way (ENOSPC on a tiny tmpfs, or EFBIG past RLIMIT_FSIZE) raises an
    OutOfSpaceError naming the file and the fix, removes its temporary and leaves the previous checkpoint loadable;
    once there is room, the same save succeeds."""
    if method == "namespace" and not faults.namespace_available():
        pytest.skip("unprivileged user namespaces are not allowed here (the rlimit case covers this machine)")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.manual_seed(0)
    model = tiny_dit(**MODEL)
    path = save_checkpoint(folder / "last.pt", model=model, step=1, config={"model": asdict(model.config)})
    old = {k: v.clone() for k, v in model.state_dict().items()}
    # The new save also holds the EMA and the AdamW moments: 4x the 0.8 MB of the old one, over a 2 MiB limit.
    code = f"""
import sys, torch
from dataclasses import asdict
from dit_core.checkpoint import save_checkpoint
from dit_core.ema import create_ema
from tests.dit_core.builders import tiny_dit
from tests.dit_core.test_ema_checkpoint import MODEL, train_one_step
model = tiny_dit(**MODEL)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
train_one_step(model, opt)
try:
    save_checkpoint({str(path)!r}, model=model, ema=create_ema(model), optimizer=opt, step=2,
                    config={{"model": asdict(model.config)}})
except Exception as exc:
    print(f"{{type(exc).__name__}} errno={{getattr(exc, 'errno', None)}}: {{exc}}")
    sys.exit(3)
"""
    run = faults.run_with_space_limit(code, folder, 2 * 1024 * 1024, timeout_s=900, method=method)
    print(f"fault method: {run.method}")
    assert run.returncode == 3, run.output[-3000:]
    code_seen = errno.ENOSPC if method == "namespace" else errno.EFBIG
    assert f"OutOfSpaceError errno={code_seen}: {run.reason} while writing checkpoint {path}: " in run.output
    assert "run the same command again" in run.output
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]  # the temporary was removed
    ckpt = load_checkpoint(path, expected_model_config=model.config)
    assert ckpt["step"] == 1 and all(torch.equal(ckpt["model"][k], v) for k, v in old.items())

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_one_step(model, opt)
    save_checkpoint(path, model=model, ema=create_ema(model), optimizer=opt, step=2, config=ckpt["config"])
    assert load_checkpoint(path)["step"] == 2 and sorted(p.name for p in folder.iterdir()) == ["last.pt"]


# A child that saves a 256 MB checkpoint (16 tensors of 2048 x 2048, each filled with its step) again and again over
# the same path, printing each step once it is saved.
_REPEATED_SAVER = """
import itertools, sys, torch
from dit_core.checkpoint import save_checkpoint
model = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(2048, 2048)) for _ in range(16)])
for step in itertools.count(1):
    with torch.no_grad():
        for p in model:
            p.fill_(step)
    save_checkpoint(sys.argv[1], model=model, step=step, config={"model": {}})
    print(step, flush=True)
"""


def kill_while_writing(path: Path, log: Path, timeout_s: float = 300) -> int:
    """Start the repeated saver on `path`; once a save has completed, SIGKILL it as soon as its temporary file is seen
    growing; returns its pid. The wait follows the child's progress; timeout_s only guards against a child that never
    writes."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _REPEATED_SAVER, str(path)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    sizes: dict[Path, int] = {}
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and proc.poll() is None:
            for tmp in path.parent.glob(f".{path.name}.tmp-*") if path.exists() else ():
                size = tmp.stat().st_size if tmp.exists() else 0
                if 0 < sizes.get(tmp, size) < size:  # seen before, and larger now: torch.save is writing it
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return proc.pid
                sizes[tmp] = size
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"the saver never grew a temporary file (exit {proc.returncode}):\n{log.read_text()[-3000:]}")


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL a process while torch.save is writing the temporary file: the checkpoint at the path is still the last
    complete save and loads (weights_only); the leftover temporary is refused by load_checkpoint, unseen by the
    pipeline's milestone listing, and removed by the next save of that path."""
    from pipeline.layout import TrialLayout  # the pipeline's listing of the EMA milestones the fid stage loads

    layout = TrialLayout(str(tmp_path / "run"))
    path = Path(layout.milestone(600))
    for attempt in range(3):  # a kill lands after the rename only if this process stalls for the whole save
        log = tmp_path / f"saver-{attempt}.log"
        pid = kill_while_writing(path, log)
        leftovers = list(path.parent.glob(f".{path.name}.tmp-*"))
        if leftovers:
            break
    assert leftovers == [path.with_name(f".{path.name}.tmp-{pid}")], leftovers
    saved = [int(line) for line in log.read_text().split()]
    last = saved[-1] if saved else 0  # the last save the child reported complete

    ckpt = load_checkpoint(path)  # weights_only=True inside
    # A save renamed into place just before the kill may not have printed its step yet.
    assert ckpt["step"] in (last, last + 1) and ckpt["step"] >= 1, (ckpt["step"], saved)
    assert all(torch.all(w == ckpt["step"]) for w in ckpt["model"].values())
    assert layout.milestones() == {600: str(path)}  # the temporary is not a milestone
    with pytest.raises(ValueError, match="temporary file of a checkpoint save that did not finish"):
        load_checkpoint(leftovers[0])

    model = tiny_dit(**MODEL)
    save_checkpoint(path, model=model, step=601, config={"model": asdict(model.config)})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the killed writer's temporary is gone
    assert load_checkpoint(path)["step"] == 601
