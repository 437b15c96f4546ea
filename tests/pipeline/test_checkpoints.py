"""A trial's checkpoints are ordered by the step each holds: the resume fallback past an unreadable latest checkpoint
takes the newest older one by step, whatever the folders' names (Ray Train names them by time)."""

import torch

from dit_core.ema import create_ema
from dit_core.model import DiT
from dit_core.training import adamw
from pipeline.checkpoints import restore_newest, save_resumable
from pipeline.layout import TrialLayout


def test_the_fallback_goes_by_step_not_by_folder_name(tmp_path):
    from ray.train import Checkpoint

    torch.manual_seed(0)
    model = DiT.from_preset("DiT-d1w48/4", input_size=8, in_channels=3, num_classes=2)
    ema, opt = create_ema(model), adamw(model)
    config = {"model": model.config.__dict__, "diffusion": {}, "train": {}}
    layout = TrialLayout(str(tmp_path / "run"))
    # folder names in time order disagree with the steps they hold (a resumed trial whose clock went back, a copy)
    for name, step in (("checkpoint_2026-01-01_00-00-01", 30), ("checkpoint_2026-01-01_00-00-02", 10),
                       ("checkpoint_2026-01-01_00-00-03", 20)):  # fmt: skip
        folder = tmp_path / "run" / name
        folder.mkdir(parents=True)
        save_resumable(str(folder), step, model, ema, opt, config, {})
    assert [step for step, _ in layout.checkpoint_folders()] == [30, 20, 10]
    latest = tmp_path / "run" / "checkpoint_2026-01-01_00-00-01"  # step 30: cut short, as by a killed writer
    (latest / "checkpoint.pt").write_bytes((latest / "checkpoint.pt").read_bytes()[:1000])
    state, resumed = restore_newest(Checkpoint.from_directory(str(latest)), layout, model.config, torch.device("cpu"))
    assert state["step"] == 20 and resumed["restored_from"] == "checkpoint_2026-01-01_00-00-03"
    assert [s["checkpoint"] for s in resumed["skipped_checkpoints"]] == [latest.name]
    (tmp_path / "run" / "checkpoint_2026-01-01_00-00-02" / "ditscale_step.json").write_text("{")  # torn: last
    assert [step for step, _ in layout.checkpoint_folders()] == [30, 20, None]
