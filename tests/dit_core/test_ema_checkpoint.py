"""EMA update math; checkpoint round trip, atomic writes, device mapping and config refusal."""

from dataclasses import asdict

import pytest
import torch

from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint, restore, save_checkpoint
from dit_core.ema import create_ema, unwrap_model, update_ema
from dit_core.model import DiT


def make_model(**overrides):
    return DiT.from_preset("DiT-d2w64/4", input_size=8, num_classes=5, **overrides)


def test_ema_starts_as_a_frozen_copy():
    model = make_model()
    ema = create_ema(model)
    assert not ema.training and all(not p.requires_grad for p in ema.parameters())
    for a, b in zip(model.parameters(), ema.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_ema_update_math():
    model = make_model()
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
    model = make_model()
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
    model = make_model()
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
    model = make_model()
    path = save_checkpoint(tmp_path / "c.pt", model=model, step=1, config={"model": asdict(model.config)})
    ckpt = load_checkpoint(path, map_location=torch.device("meta"))
    assert all(v.device.type == "meta" for v in ckpt["model"].values())


def test_checkpoint_refuses_other_config(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "c.pt", model=model, step=1, config={"model": asdict(model.config)})
    other = make_model(learn_sigma=False).config
    with pytest.raises(ValueError, match="learn_sigma: checkpoint True, expected False"):
        load_checkpoint(path, expected_model_config=other)
    # Runtime-only fields do not count.
    load_checkpoint(path, expected_model_config=make_model(grad_checkpointing=True).config)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dit_core checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
