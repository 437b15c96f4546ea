"""The study-level analysis on synthetic frames of known truth: replicates pooled, the best EMA per model, the
hyperparameter envelope, the sampling-compute frontier, the report, and messages for data that cannot be fitted."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.document import write_report
from analysis.study import choose_emas, frame_with_emas, replicate_points
from analysis.summary import summarize

SIZES = {"S": (0.05, 1e6), "B": (0.2, 4e6), "L": (0.8, 1.6e7), "XL": (3.2, 6.4e7)}  # gflops, params


def frame(seeds=(0, 1), emas=(0.999, 0.9999), noise=0.02, lrs=None, steps=(1000, 2000)) -> pd.DataFrame:
    """FID = 100 Gflops^-0.4 (x 0.8 at the later step); the slower EMA helps the larger models only (EDM2's
    finding): FID x 1.2 for S and B at 0.9999, for L and XL at 0.999. With `lrs`, the lr 1e-3 is best and FID
    rises by 30% per decade away from it."""
    rng, rows = np.random.default_rng(0), []
    for size, (gflops, params) in SIZES.items():
        for seed in seeds:
            for lr in lrs or (None,):
                for step in steps:
                    for ema in emas:
                        worse = (ema == 0.9999) == (size in ("S", "B"))
                        fid = 100 * gflops**-0.4 * (0.8 if step == steps[-1] else 1) * (1.2 if worse else 1)
                        if lr is not None:
                            fid *= 1 + 0.3 * abs(np.log10(lr / 1e-3))
                        label = f"DiT-{size}/2" + (f" lr={lr:g}" if lr else "")
                        rows.append({
                            "run_name": f"{size}-{seed}-{lr}", "run_id": "", "label": label,
                            "variant": f"lr={lr:g}" if lr else "default", "seed": seed, "preset": f"DiT-{size}/2",
                            "size": size, "patch": 2, "params": params, "gflops": gflops, "global_batch_size": 256,
                            "step": step, "ema_decay": ema, "ema_name": "" if ema == emas[0] else f"ema{ema:g}",
                            "compute_flops": gflops * 1e9 * 6 * 256 * step, "sampling_gflops": gflops * 50,
                            "fid": fid * np.exp(rng.normal(0, noise)), "loss": 0.1 + gflops**-0.1 * 0.01,
                            **({"axis.train.lr": lr} if lr else {}),
                        })  # fmt: skip
    return pd.DataFrame(rows)


def test_best_ema_per_model_and_replicate_means():
    f = frame()
    emas = choose_emas(f, 2000)
    assert emas == {"DiT-S/2": 0.999, "DiT-B/2": 0.999, "DiT-L/2": 0.9999, "DiT-XL/2": 0.9999}
    best = frame_with_emas(f, emas)
    assert len(best) == len(f) // 2 and set(zip(best["label"], best["ema_decay"])) == set(emas.items())
    points = replicate_points(best)
    at = points[(points["step"] == 2000) & (points["label"] == "DiT-XL/2")].iloc[0]
    rows = best[(best["step"] == 2000) & (best["label"] == "DiT-XL/2")]["fid"]
    assert at["fid"] == pytest.approx(rows.mean()) and at["fid_std"] == pytest.approx(rows.std())
    assert (at["fid_min"], at["fid_max"], at["seeds"]) == (rows.min(), rows.max(), 2)


def test_summary_fits_the_pooled_seeds_at_the_best_emas_and_says_which():
    summary = summarize(frame(), pd.DataFrame(), None).json
    assert summary["step"] == 2000 and summary["replicates"]["seeds"] == [0, 1]
    assert summary["ema"]["chosen"]["DiT-XL/2"] == 0.9999 and summary["ema"]["decays"] == [0.999, 0.9999]
    fit = summary["fid_vs_gflops"]
    assert fit["b"] == pytest.approx(-0.4, abs=0.03) and fit["n"] == 8 and fit["b_ci"][0] < -0.4 < fit["b_ci"][1]
    (p,) = summary["fid_held_out"]["predictions"]
    assert p["label"] == "DiT-XL/2" and abs(p["error"]) < 0.1 and p["inside"]
    frontier = summary["sampling"]["frontier"]
    assert [f["label"] for f in frontier] == ["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"]  # FID falls with cost
    assert "DiT-S/2" in summary["sampling"]["best_at_budget"]


def numpy_scalar(value):
    """json.dumps' fallback for numpy scalars alone: a fitted object, frame or array in the JSON part raises."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a {type(value).__name__} is not a JSON value")


def test_hyperparameter_envelope_takes_the_best_lr_per_size():
    summary = summarize(frame(lrs=(1e-4, 1e-3, 1e-2)), pd.DataFrame(), None)
    assert {"hyperparameters", "by_variant"} <= set(summary.json)  # each lr is a variant too
    json.dumps(summary.json, default=numpy_scalar)  # plain values only; the objects live beside them
    assert set(summary.variants.fid) == {"lr=0.0001", "lr=0.001", "lr=0.01"}
    hyper = summary.json["hyperparameters"]
    assert hyper["axes"] == ["train.lr"]
    assert all(best["train.lr"] == pytest.approx(1e-3) for best in hyper["best"].values())
    assert hyper["envelope_fit"]["b"] == pytest.approx(-0.4, abs=0.03)
    sens = summary.sensitivity
    assert len(sens) == 12 and sens.groupby("preset")["fid"].idxmin().map(sens["axis.train.lr"]).eq(1e-3).all()


@pytest.mark.parametrize(
    "change, key, message",
    [
        (lambda f: f[f["seed"] == 0], "replicates", "one seed per model"),
        (lambda f: f[f["size"].isin(["S", "B"])], "fid_vs_gflops", "2 distinct points"),
        (lambda f: f.assign(fid=np.where(f["size"] == "L", np.nan, f["fid"])), "fid_vs_gflops", "missing"),
        (lambda f: f.assign(gflops=1.0), "fid_vs_gflops", "same x"),
    ],
)
def test_degenerate_studies_give_messages_in_place_of_fits(change, key, message):
    summary = summarize(change(frame()).reset_index(drop=True), pd.DataFrame(), None)
    entry = summary.json[key]
    assert message in (entry.get("skipped", "") if key != "replicates" else entry["note"])
    if key != "replicates":
        assert "fid_vs_gflops" not in summary.fits and "b" not in entry


def test_report_is_self_contained_and_says_why_fits_are_missing(tmp_path):
    import re

    summary = summarize(frame(seeds=(0,)), pd.DataFrame(), None)
    public = {**summary.json}
    public["notes"] = ["DiT-XL/4 (x): failed, left out"]
    table = pd.DataFrame({"preset": ["DiT-S/2"], "fid": [10.0]})
    figure = tmp_path / "fid_vs_gflops.png"
    figure.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    paths = write_report(public, table, None, [str(figure)], tmp_path, "synthetic")
    page = open(paths["html"]).read()
    assert "data:image/png;base64," in page and not re.search(r'src="(?!data:)', page)
    markdown = open(paths["markdown"]).read()
    assert "![fid_vs_gflops](fid_vs_gflops.png)" in markdown
    assert "one seed per model" in markdown and "failed, left out" in markdown
    assert "no held-out check" not in markdown and "predicted" in markdown
