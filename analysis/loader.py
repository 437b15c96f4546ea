"""MLflow -> pandas: one tidy row per (trial, scored checkpoint), and the loss curves.

Works from the tracking store alone (any tracking URI), for a sweep's MLflow experiment: the runs tagged
`ditscale.role = trial`. Unfinished trials are left out with a note.
"""

from __future__ import annotations

import re
from dataclasses import fields
from functools import partial
from typing import get_type_hints

import numpy as np
import pandas as pd

from dit_core.config import DiTConfig
from dit_core.flops import training_compute
from pipeline import schema  # the names the pipeline writes: the one place they are spelled

FID_METRICS = ("fid", "fd_dinov2", "isc", "kid", "precision", "recall", "class_accuracy")  # class_accuracy: the
# classifier extractor's judgement of the samples' labels; fd_dinov2: the Frechet distance in DINOv2's features
_FURTHER_EMA = re.compile(r"^(ema[0-9.]+)/fid$")  # a further EMA decay's scores: ema0.999/fid, ema0.999/...
# What identifies a trial: its model, and its variant (the design axes' values; "default" in a study without any).
# `label` names it in tables and legends: the preset, followed by the variant where the study has several.
MODEL = ["run_name", "label", "variant", "seed", "preset", "size", "patch", "params", "gflops"]
CURVE_COLUMNS = [*MODEL, "step", "compute_flops", "loss", "val_loss"]
CHECKPOINT_COLUMNS = [
    *MODEL,
    "global_batch_size",
    "step",
    "ema_decay",
    "ema_name",
    "compute_gmacs",
    "compute_flops",
    "sampling_gflops",
    *FID_METRICS,
    "loss",
    "val_loss",
    "final_loss",
    "extractor",
    "status",
    "run_id",
]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _value_at(history: list[tuple[int, float]], step: int) -> float:
    """The last logged value at or before `step` (NaN if none)."""
    values = [v for s, v in history if s <= step]
    return values[-1] if values else float("nan")


def model_config(params: dict[str, str], run_name: str) -> DiTConfig:
    """The trial's DiTConfig from its `model.*` params (MLflow keeps every param as a string)."""
    types = get_type_hints(DiTConfig)
    parse = {int: int, float: float, str: str, bool: lambda text: {"True": True, "False": False}[text]}
    missing = [f"model.{f.name}" for f in fields(DiTConfig) if f"model.{f.name}" not in params]
    if missing:
        raise ValueError(
            f"run {run_name} has no {', '.join(missing)} param(s): it was logged by an older ditscale; rerun its "
            f"trial (`ditscale run`) or leave its sweep out of the analysis"
        )
    return DiTConfig(**{f.name: parse[types[f.name]](params[f"model.{f.name}"]) for f in fields(DiTConfig)})


def _param_value(text: str):
    """An MLflow param (a string) as the number it spells, else as it is."""
    try:
        return float(text)
    except ValueError:
        return text


def load_runs(
    tracking_uri: str, experiment_name: str, sweep: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(checkpoints, curves, notes).

    checkpoints: one row per (trial, step, EMA decay): run_name, run_id, label, variant, seed, preset, size, patch,
    params, gflops, global_batch_size, step, ema_decay, compute_gmacs (paper convention: Gflops x batch x steps x 3),
    compute_flops (true FLOPs, 2x), sampling_gflops (per image: Gflops x network evaluations), fid and friends,
    loss and val_loss at that step, final_loss, extractor, status, and `axis.<path>` for each design axis.
    curves: run_name, label, variant, seed, preset, size, patch, params, gflops, step, compute_flops, loss, val_loss.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no MLflow experiment {experiment_name!r} at {tracking_uri}: run the sweep first")
    query = f"tags.`{schema.ROLE}` = '{schema.ROLE_TRIAL}'" + (
        f" and tags.`{schema.SWEEP}` = '{sweep}'" if sweep else ""
    )
    runs = client.search_runs([experiment.experiment_id], query, max_results=10000)
    rows, curves, notes = [], [], []
    for run in runs:
        p, name = run.data.params, run.data.tags.get(schema.RUN_NAME, run.info.run_name)
        if run.info.status != "FINISHED":
            notes.append(f"{name} ({p.get('preset')}): {run.info.status.lower()}, left out")
            continue
        facts = {
            "run_name": name,
            "run_id": run.info.run_id,
            "label": p[schema.PRESET],
            "variant": p.get(schema.VARIANT, schema.DEFAULT_VARIANT),  # runs from before design axes have none
            "preset": p[schema.PRESET],
            "size": p[schema.SIZE],
            "patch": int(p[schema.PATCH]),
            "params": int(p[schema.PARAMS]),
            "gflops": float(p[schema.GFLOPS]),
            "global_batch_size": int(p["train.global_batch_size"]),
            "seed": int(p.get(schema.SEED, p.get("train.seed", 0))),
            **{k: _param_value(v) for k, v in p.items() if k.startswith(schema.AXIS_PREFIX)},
        }
        compute = partial(training_compute, model_config(p, name), facts["global_batch_size"])  # of `step` steps
        loss = _history(client, run.info.run_id, schema.LOSS)
        val = _history(client, run.info.run_id, schema.VAL_LOSS)
        for step, value in loss:
            curves.append(
                {
                    **{k: facts[k] for k in MODEL},
                    "step": step,
                    "compute_flops": compute(step)["flops"],
                    "loss": value,
                    "val_loss": _value_at(val, step),
                }
            )
        evaluations = float(run.data.tags.get(schema.FID_EVALUATIONS_PER_IMAGE, "nan"))
        further = sorted(m[1] for key in run.data.metrics if (m := _FURTHER_EMA.match(key)))
        emas = [("", float(p.get("train.ema_decay", "nan")))]
        emas += [(f"{n}/", float(n.removeprefix("ema"))) for n in further]
        for prefix, decay in emas:
            scores = {m: dict(_history(client, run.info.run_id, prefix + m)) for m in FID_METRICS}
            if not scores["fid"] and not prefix:
                notes.append(f"{name} ({p['preset']}): no FID yet (run `ditscale fid`)")
            for step in sorted(scores["fid"]):
                rows.append(
                    {
                        **facts,
                        "step": step,
                        "ema_decay": decay,
                        "ema_name": prefix.rstrip("/"),  # "" = train.ema_decay's EMA (metric `fid`)
                        "compute_gmacs": compute(step)["paper_gflops"],
                        "compute_flops": compute(step)["flops"],
                        "sampling_gflops": facts["gflops"] * evaluations,
                        **{m: scores[m].get(step, np.nan) for m in FID_METRICS},
                        "loss": _value_at(loss, step),
                        "val_loss": _value_at(val, step),
                        "final_loss": loss[-1][1] if loss else np.nan,
                        "extractor": run.data.tags.get(schema.FID_EXTRACTOR, ""),
                        "status": run.info.status,
                    }
                )
    axes = sorted({k for row in rows for k in row if k.startswith("axis.")})
    frame = pd.DataFrame(rows, columns=CHECKPOINT_COLUMNS + axes).sort_values(["gflops", "step"], ignore_index=True)
    curves_frame = pd.DataFrame(curves, columns=CURVE_COLUMNS)
    for table in (frame, curves_frame):
        if table["variant"].nunique() > 1:
            table["label"] = table["preset"] + " " + table["variant"]
    extractors = set(frame["extractor"]) - {""}
    if len(extractors) > 1:
        raise ValueError(f"runs of {experiment_name} were scored with different extractors {sorted(extractors)}")
    return frame, curves_frame.sort_values(["gflops", "step"], ignore_index=True), notes
