"""One report per study: report.md (beside its PNGs) and report.html (self-contained: the figures inlined), written
from the analysis summary. Readable without the code: every number says what it is and every skipped fit says why.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _ci(pair) -> str:
    return f"[{pair[0]:.3g}, {pair[1]:.3g}]"


def _law_line(entry: dict[str, Any], law: str) -> str:
    if "skipped" in entry:
        return f"no fit: {entry['skipped']}"
    seed = ""
    if entry.get("seed_share") is not None:
        seed = (f"; seed noise alone gives {_ci(entry['b_seed_ci'])}, {entry['seed_share']:.0%} of the interval's "
                f"width")  # fmt: skip
    fit = f"{law} = {entry['a']:.4g} x^{entry['b']:.3f}, exponent 95% CI {_ci(entry['b_ci'])}"
    return f"{fit}, R^2 {entry['r2']:.2f}{seed}"


def sections(summary: dict[str, Any]) -> list[tuple[str, list[str], list[str]]]:
    """(heading, paragraphs, figure names) in reading order."""
    step = summary["step"]
    out = []
    rep = summary["replicates"]
    out.append((
        "The study",
        [f"{summary['presets']} models read at step {step:,}; seeds {rep['seeds']}: {rep['note']}."]
        + ([f"Several EMAs (decays {summary['ema']['decays']}): {summary['ema']['note']}; used: "
            + ", ".join(f"{k} {v:g}" for k, v in summary["ema"]["chosen"].items()) + "."] if "ema" in summary else [])
        + [f"Note: {n}" for n in summary.get("notes", [])],
        ["ema_decays"],
    ))  # fmt: skip
    f = summary["fid_vs_gflops"]
    lines = [_law_line(f, "FID")]
    if "spearman" in f:
        lines.append(f"Pearson r of FID with log Gflops {f['pearson_r_log_gflops']:.2f} (the paper: -0.93), "
                     f"Spearman {f['spearman']:.2f}.")  # fmt: skip
    progress = summary.get("fid_first_to_last")
    if progress:
        lines.append(f"FID improved from the first to the last scored checkpoint in {progress['improved']} of "
                     f"{len(progress['presets'])} models.")  # fmt: skip
    if "fd_dinov2_vs_gflops" in summary:
        lines.append("FD_DINOv2: " + _law_line(summary["fd_dinov2_vs_gflops"], "FD_DINOv2"))
    out.append(("FID against model compute (Gflops)", lines,
                ["fid_vs_gflops", "fd_dinov2_vs_gflops", "fid_vs_steps", "residuals"]))  # fmt: skip
    held = summary.get("fid_held_out", {})
    lines = []
    if "skipped" in held:
        lines.append(f"no held-out check: {held['skipped']}")
    elif held:
        lines.append(f"A power law fitted on the {held['fit_on']} smaller models ({_law_line(held['fit'], 'FID')}) "
                     f"predicts:")  # fmt: skip
        for p in held["predictions"]:
            lines.append(f"- {p['label']}: predicted {p['predicted']:.4g}, 95% prediction interval "
                         f"{_ci(p['interval'])}; measured {p['measured']:.4g}; error {p['error']:+.1%}; the truth "
                         f"is {'inside' if p['inside'] else 'outside'} the interval.")  # fmt: skip
    paper = summary.get("paper_table4_held_out")
    if paper:
        lines.append(f"On the paper's Table 4 the same check predicts DiT-XL/2 at {paper['predicted']:.2f} "
                     f"{_ci(paper['interval'])} against the measured {paper['measured']:.2f} (error "
                     f"{paper['error']:+.1%}): {paper['note']}.")  # fmt: skip
    out.append(("Held-out prediction", lines, ["held_out"]))
    loss = summary.get("loss_vs_compute", {})
    lines = [f"no fit: {loss['skipped']}"] if "skipped" in loss else [
        f"L(C) = {loss['E']:.4g} + {loss['A']:.4g} C^-{loss['alpha']:.3f} over {loss['n']} trials' final losses; "
        f"alpha 95% CI {_ci(loss['alpha_ci'])}, irreducible E {_ci(loss['E_ci'])}"
        + (f"; seed noise alone gives alpha {_ci(loss['alpha_seed_ci'])}, {loss['seed_share']:.0%} of its interval."
           if "seed_share" in loss else ".")
    ] if loss else []  # fmt: skip
    c = summary.get("fid_vs_compute", {})
    lines.append("FID vs training compute (lower envelope): " + _law_line(c, "FID") if c else "")
    out.append(("Loss and FID against training compute", [x for x in lines if x], ["loss_law", "fid_vs_compute",
                                                                                  "loss_curves"]))  # fmt: skip
    iso = summary.get("isoflop", {})
    lines = [f"approach 2 (isoFLOP profiles): none ({iso['skipped']})"] if "skipped" in iso else [
        f"approach 2 (isoFLOP profiles): N_opt ~ C^{iso['a']:.3f} {_ci(iso['a_ci'])}, D_opt = C / 6N ~ "
        f"C^{iso['b']:.3f} {_ci(iso['b_ci'])} over {len(iso['optima'])} budgets (Liang et al. report about "
        f"C^0.57 and C^0.43 for DiTs on ImageNet)."
    ] if iso else []  # fmt: skip
    par = summary.get("parametric", {})
    if par:
        lines.append(f"approach 3 (L(N, D) = E + A/N^alpha + B/D^beta): none ({par['skipped']})" if "skipped" in par
                     else f"approach 3: E {par['E']:.4g}, alpha {par['alpha']:.3f} {_ci(par['ci']['alpha'])}, beta "
                     f"{par['beta']:.3f} {_ci(par['ci']['beta'])}, so N_opt ~ C^{par['a']:.3f} "
                     f"{_ci(par['ci']['a'])}; D counted as C / 6N.")  # fmt: skip
    out.append(("Compute-optimal frontier", lines, ["isoflop"]))
    sampling = summary.get("sampling", {})
    out.append(("Sampling compute", [sampling.get("best_at_budget") or f"none: {sampling.get('skipped')}"],
                ["sampling_compute"]))  # fmt: skip
    hyper = summary.get("hyperparameters")
    if hyper:
        best = "; ".join(
            f"{k}: " + ", ".join(f"{a}={v}" for a, v in b.items() if a != "fid") for k, b in hyper["best"].items()
        )
        out.append(("Hyperparameter envelope", [f"best per model: {best}.",
                                                 "envelope: " + _law_line(hyper["envelope_fit"], "FID")],
                    ["hyperparameters"]))  # fmt: skip
    variants = summary.get("by_variant")
    if variants:
        from analysis.variants import describe_variants

        out.append(("Designs compared", [line.strip() for line in describe_variants(variants)],
                    ["variants_fid_vs_gflops", "variants_loss_vs_compute"]))  # fmt: skip
    return out


def markdown_table(table: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table, floats to 4 significant digits."""
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = [
        "| " + " | ".join(f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v) for v in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows]) + "\n"


def write_report(
    summary: dict[str, Any], table: pd.DataFrame, emas: pd.DataFrame | None, figures: list[str], out: Path,
    title: str,
) -> dict[str, str]:  # fmt: skip
    """Write report.md and report.html into `out`; returns their paths."""
    available = {Path(f).stem: Path(f) for f in figures}
    md = [f"# Scaling report: {title}", ""]
    body = [f"<h1>Scaling report: {html.escape(title)}</h1>"]
    for heading, lines, names in sections(summary):
        md += [f"## {heading}", ""] + [line if line.startswith("- ") else line + "\n" for line in lines]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body += [f"<p>{html.escape(line)}</p>" for line in lines]
        for name in names:
            if name in available:
                md.append(f"![{name}]({available[name].relative_to(out)})\n")
                data = base64.b64encode(available[name].read_bytes()).decode()
                body.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}'
                            f"</figcaption></figure>")  # fmt: skip
        if heading == "The study":
            md += ["### The models", "", markdown_table(table), ""]
            body.append("<h3>The models</h3>")
            body.append(table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0))
            if emas is not None:
                md += ["### FID per EMA decay", "", markdown_table(emas), ""]
                body.append("<h3>FID per EMA decay</h3>")
                body.append(emas.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0))
    samples = sorted(p for p in available.values() if p.parent.name == "samples")
    if samples:
        md += ["## Samples", ""] + [f"![{p.stem}]({p.relative_to(out)}) {p.stem}\n" for p in samples]
        body.append("<h2>Samples</h2>")
        for p in samples:
            data = base64.b64encode(p.read_bytes()).decode()
            body.append(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{data}"><figcaption>{p.stem}'
                        f"</figcaption></figure>")  # fmt: skip
    (out / "report.md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto;line-height:1.4}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}")  # fmt: skip
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}" \
        f"</style></head><body>{''.join(body)}</body></html>"  # fmt: skip
    (out / "report.html").write_text(page)
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html")}
