"""Quantization reports: markdown + one self-contained HTML page with matplotlib PNG plots.

:func:`report` writes into a folder:

* ``report.md`` - the tables, with the plots linked as PNG files next to it;
* ``report.html`` - a single file: inline CSS, the plots embedded as base64 ``data:`` URIs, no
  script and no external resource, so it opens anywhere (and offline);
* ``sensitivity.png`` and ``hist_<layer>.png``.

Sections (each appears when its input is given): the comparison table (accuracy, size, latency,
speedup), the per-layer scheme table, the sensitivity bar chart, and weight / activation
histograms with the chosen clipping ranges (see :func:`collect_histograms`).
Plots are drawn on ``matplotlib.figure.Figure`` objects with the Agg renderer; pyplot and the
global matplotlib backend are never touched.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from lowbit.calibration import run_batch
from lowbit.config import QuantSpec
from lowbit.evaluation import format_bytes, markdown_table
from lowbit.modules import QUANTIZED_MODULES
from lowbit.ops import code_range
from lowbit.sensitivity import SensitivityReport
from lowbit.serialization import _atomic_write, layer_rows
from lowbit.traverse import fold_bn_weights

__all__ = ["LayerHistogram", "collect_histograms", "report"]

_MAX_SAMPLES = 200_000
_CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:2em auto;max-width:1100px;
color:#1a1a1a;padding:0 1em}h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ccc;
padding:.3em .6em;text-align:left}th{background:#f3f5f7}tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;height:auto;
border:1px solid #eee}.meta{color:#666;font-size:.85em}figure{margin:1em 0}
figcaption{color:#555;font-size:.85em}
"""


@dataclass
class LayerHistogram:
    """Values seen at one layer and the ranges its quantization clips to.

    Attributes:
        name: layer name.
        weight: float weights (BatchNorm folded in when it was), flattened, maybe subsampled.
        weight_range: ``(lo, hi)`` the weight codes can represent (widest over channels/groups).
        activation: the layer's float inputs on the example batch (``None`` if not captured).
        activation_range: ``(lo, hi)`` of the calibrated input quantization, ``None`` when
            activations are quantized at run time or stay float.
        activation_note: how the activations are quantized.
    """

    name: str
    weight: torch.Tensor
    weight_range: tuple[float, float] | None
    activation: torch.Tensor | None
    activation_range: tuple[float, float] | None
    activation_note: str


def _sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().float().reshape(-1)
    if flat.numel() > _MAX_SAMPLES:
        flat = flat[:: -(-flat.numel() // _MAX_SAMPLES)]
    return flat.cpu()


def _plan_rows(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer plan rows from ``lowbit_report`` or a loaded model's manifest."""
    rep = getattr(model, "lowbit_report", None)
    if rep is not None and hasattr(rep, "to_dict"):
        return rep.to_dict()["layers"]
    manifest = getattr(model, "lowbit_manifest", None) or {}
    return (manifest.get("quantization_report") or {}).get("layers", [])


def collect_histograms(float_model: nn.Module, quantized_model: nn.Module, example_input: Any,
                       layers: Iterable[str]) -> dict[str, LayerHistogram]:
    """Weights, inputs and clipping ranges of some quantized layers, for :func:`report`.

    Args:
        float_model: the float model (inputs are captured from it with forward-pre-hooks,
            removed afterwards).
        quantized_model: its quantized version (ranges come from its scales / zero-points).
        example_input: one batch (tensor, ``(inputs, labels)`` tuple or dict).
        layers: names of quantized layers, e.g. ``sensitivity.most_sensitive(3)``.

    Returns:
        ``{layer: LayerHistogram}`` in the order given.

    Raises:
        ValueError: a name is not a quantized layer of ``quantized_model``.

    Example:
        >>> from lowbit.ptq import quantize_static
        >>> model = nn.Sequential(nn.Linear(4, 8))
        >>> q = quantize_static(model, [torch.randn(16, 4)], progress=False)
        >>> h = collect_histograms(model, q, torch.randn(16, 4), ["0"])["0"]
        >>> h.weight.numel(), h.activation.shape, h.activation_range[0] < 0 < h.activation_range[1]
        (32, torch.Size([64]), True)
    """
    registered = tuple(QUANTIZED_MODULES.values())
    folded = {r["name"]: r.get("folded_bn") for r in _plan_rows(quantized_model)}
    names = list(layers)
    for name in names:
        try:
            ok = isinstance(quantized_model.get_submodule(name), registered)
        except AttributeError:
            ok = False
        if not ok:
            raise ValueError(f"collect_histograms: {name!r} is not a quantized layer of "
                             "quantized_model")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                captured[name] = _sample(args[0])
        handles.append(float_model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = float_model.training
    try:
        float_model.eval()
        with torch.no_grad():
            run_batch(float_model, example_input)
    finally:
        for h in handles:
            h.remove()
        float_model.train(was_training)
    out: dict[str, LayerHistogram] = {}
    for name in names:
        q = quantized_model.get_submodule(name)
        meta = q.meta()  # type: ignore[operator]
        layer = float_model.get_submodule(name)
        weight = layer.weight.detach()
        if folded.get(name):
            weight, _ = fold_bn_weights(weight, getattr(layer, "bias", None),
                                        float_model.get_submodule(folded[name]))
        wspec = QuantSpec.from_dict(meta.get("effective_weight_spec") or meta["weight_spec"])
        wrange = code_range(q.weight_scale, q.weight_zero_point, wspec)
        arange, note = None, "float (weight-only quantization)"
        if meta.get("mode") == "static":
            aspec = QuantSpec.from_dict(meta["activation_spec"])
            arange = code_range(q.input_scale, q.input_zero_point, aspec)
            note = f"calibrated ({(meta.get('extra') or {}).get('calibrator', '?')})"
        elif meta.get("mode") == "dynamic":
            note = f"quantized at run time ({meta['activation_spec']['granularity']})"
        out[name] = LayerHistogram(name, _sample(weight), wrange, captured.get(name), arange, note)
    return out


# ---------------------------------------------------------------------------------- plots
def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _sensitivity_png(rep: SensitivityReport) -> bytes:
    rows = list(reversed(rep.rows))  # most sensitive at the top
    names = [r.name for r in rows]
    panels = []
    if all(r.drop is not None for r in rows):
        panels.append((f"{rep.metric_name} drop vs FP32", [float(r.drop) for r in rows]))
    if all(r.cosine is not None for r in rows):
        panels.append(("1 - output cosine vs FP32", [1.0 - float(r.cosine) for r in rows]))
    fig = Figure(figsize=(5.5 * len(panels), 0.45 * len(rows) + 1.6))
    for i, (label, values) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        top = max(values)
        ax.barh(names, values, color=["#c0392b" if v == top and v > 0 else "#2e86c1"
                                      for v in values])
        ax.set_xlabel(label)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.grid(axis="x", alpha=0.3)
        if not any(values):
            ax.text(0.5, 0.5, "no layer changes it", transform=ax.transAxes, ha="center",
                    va="center", color="#555555", backgroundcolor="white")
        if i > 1:
            ax.set_yticklabels([])
    fig.suptitle("Per-layer sensitivity (each layer quantized alone)")
    return _png(fig)


def _latency_png(rows: list[dict[str, Any]]) -> bytes | None:
    labels = list(rows[0].get("latency") or {}) if rows else []
    if not labels:
        return None
    fig = Figure(figsize=(4.5 * len(labels), 0.5 * len(rows) + 1.6))
    names = [str(r.get("name")) for r in rows][::-1]
    for i, label in enumerate(labels, 1):
        ax = fig.add_subplot(1, len(labels), i)
        ms = [float(r["latency"][label]["median_ms"]) for r in rows][::-1]
        speed = [float((r.get("speedup") or {}).get(label, 1.0)) for r in rows][::-1]
        ax.barh(names, ms, color=["#27ae60" if x > 1 else "#2e86c1" for x in speed])
        for y, (t, x) in enumerate(zip(ms, speed, strict=True)):
            ax.annotate(f" {x:.2f}x", (t, y), va="center", fontsize=8)
        ax.set_xlabel(f"median latency, ms ({label})")
        ax.set_xlim(0, max(ms) * 1.25)
        if i > 1:
            ax.set_yticklabels([])
    fig.suptitle("Latency per call (label: speedup vs the first row)")
    return _png(fig)


def _hist_png(h: LayerHistogram) -> bytes:
    fig = Figure(figsize=(11, 3.4))
    panels = [("weights", h.weight, h.weight_range, "clipping range")]
    if h.activation is not None:
        panels.append((f"inputs: {h.activation_note}", h.activation, h.activation_range,
                       "calibrated range"))
    for i, (title, values, rng, what) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        data = values.numpy()
        lo, hi = float(data.min()), float(data.max())
        if rng is not None:
            lo, hi = min(lo, rng[0]), max(hi, rng[1])
        pad = 0.02 * (hi - lo or 1.0)
        ax.hist(data, bins=120, range=(lo - pad, hi + pad), color="#5d6d7e", log=True)
        if rng is not None:
            for x in rng:
                ax.axvline(x, color="#c0392b", linestyle="--", linewidth=1.2)
            ax.plot([], [], color="#c0392b", linestyle="--", label=f"{what} "
                    f"[{rng[0]:.3g}, {rng[1]:.3g}]")
            ax.legend(loc="upper right", fontsize=8)
        ax.locator_params(axis="x", nbins=6)
        ax.set_title(f"{h.name} {title}", fontsize=10)
        ax.set_ylabel("count (log)")
    return _png(fig)


# ---------------------------------------------------------------------------------- tables
def _comparison_rows(comparison: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    dicts = [c.to_dict() if hasattr(c, "to_dict") else dict(c) for c in comparison]
    labels = list(dicts[0].get("latency") or {}) if dicts else []
    head = ["model", "accuracy", "drop", "size", "compression"]
    for label in labels:
        head += [f"latency {label}", f"speedup {label}"]
    body = []
    for d in dicts:
        acc, drop, size, comp = (d.get(k) for k in ("accuracy", "accuracy_drop", "nbytes",
                                                     "compression"))
        cells = [str(d.get("name")), "n/a" if acc is None else f"{acc:.2f}%",
                 "n/a" if drop is None else f"{drop:+.2f} pp",
                 "n/a" if size is None else format_bytes(size),
                 "n/a" if comp is None else f"{comp:.2f}x"]
        for label in labels:
            stats = (d.get("latency") or {}).get(label)
            speed = (d.get("speedup") or {}).get(label)
            cells += ["n/a" if stats is None else f"{stats['median_ms']:.3f} ms",
                      "n/a" if speed is None else f"{speed:.2f}x"]
        body.append(cells)
    return head, body


def _layer_table(model: nn.Module) -> tuple[list[str], list[list[str]]]:
    registered = tuple(QUANTIZED_MODULES.values())
    metas = {n: m.meta() for n, m in model.named_modules() if isinstance(m, registered)}
    details = {r.name: r for r in layer_rows(metas, model.state_dict())}
    plans = _plan_rows(model) or [{"name": n, "type": metas[n]["class"], "status": "quantized",
                                   "reason": ""} for n in metas]
    head = ["layer", "type", "status", "scheme / reason", "bits", "weight shape",
            "scale range", "bytes"]
    body = []
    for p in plans:
        d = details.get(p["name"])
        body.append([p["name"], str(p.get("type", "")), p["status"],
                     d.scheme if d else str(p.get("reason", "")),
                     str(d.bits) if d else "-", "x".join(map(str, d.shape)) if d else "-",
                     f"{d.scale_min:.3g} .. {d.scale_max:.3g}" if d else "-",
                     format_bytes(d.nbytes) if d else "-"])
    return head, body


def _sensitivity_rows(rep: SensitivityReport) -> tuple[list[str], list[list[str]]]:
    num = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    head = ["rank", "layer", "type", "scheme", rep.metric_name, "drop", "output cosine"]
    body = [[str(i), r.name, r.module_type, r.scheme, num(r.metric, ".4f"), num(r.drop, "+.4f"),
             num(r.cosine, ".6f")] for i, r in enumerate(rep.rows, 1)]
    return head, body


_NUMERIC = re.compile(r"^[+-]?[\d.]+(e[+-]?\d+)?( ?(%|pp|x|ms|B|KiB|MiB|GiB))?$")


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = []
    for row in body:
        tds = "".join(f'<td class="num">{html.escape(c)}</td>' if _NUMERIC.match(c)
                      else f"<td>{html.escape(c)}</td>" for c in row)
        trs.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


def report(out_dir: str | Path, *, comparison: Sequence[Any] | None = None,
           quantized_model: nn.Module | None = None,
           sensitivity: SensitivityReport | Mapping[str, Any] | None = None,
           histograms: Mapping[str, LayerHistogram] | None = None,
           title: str = "lowbit quantization report", notes: str = "") -> Path:
    """Write ``report.md``, a self-contained ``report.html`` and the PNG plots to ``out_dir``.

    Args:
        out_dir: folder to write (created if needed; files of the same names in it are
            replaced, each atomically).
        comparison: rows of :func:`lowbit.evaluation.compare_models` (a ``ComparisonTable``,
            ``ComparisonRow`` objects or their ``to_dict()`` dicts); the first is the baseline.
        quantized_model: a quantized model: its per-layer scheme table (from
            ``model.lowbit_report`` or a loaded model's manifest, and the modules' metas).
        sensitivity: a :class:`~lowbit.sensitivity.SensitivityReport` (or its ``to_dict()``).
        histograms: from :func:`collect_histograms`, e.g. for ``sensitivity.most_sensitive(3)``.
        title: page title.
        notes: a paragraph of plain text shown under the title (e.g. data and machine).

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: nothing to report (every section input is None).

    Example:
        >>> import tempfile
        >>> from lowbit.evaluation import ComparisonRow
        >>> rows = [ComparisonRow("FP32", 98.6, 0.0, 827_688, 1.0),
        ...         ComparisonRow("INT8", 98.5, 0.1, 211_000, 3.92)]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     page = report(d, comparison=rows)
        ...     text = page.read_text()
        >>> page.name, "INT8" in text, "<script" in text
        ('report.html', True, False)
    """
    if comparison is None and quantized_model is None and sensitivity is None and not histograms:
        raise ValueError("lowbit.report: nothing to report; pass comparison=, quantized_model=, "
                         "sensitivity= and/or histograms=")
    if isinstance(sensitivity, Mapping):
        sensitivity = SensitivityReport.from_dict(sensitivity)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta_line = f"Generated {stamp} by lowbit with torch {torch.__version__}."
    md = [f"# {title}", "", meta_line, ""]
    page = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">{html.escape(meta_line)}</p>']
    if notes:
        md += [notes, ""]
        page.append(f"<p>{html.escape(notes)}</p>")

    def section(heading: str, text: str = "") -> None:
        md.extend([f"## {heading}", ""] + ([text, ""] if text else []))
        page.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            page.append(f"<p>{html.escape(text)}</p>")

    def table(head: list[str], body: list[list[str]]) -> None:
        md.extend([markdown_table(head, body), ""])
        page.append(_html_table(head, body))

    def write(filename: str, data: bytes) -> None:  # (atomic: a crash keeps the old file)
        _atomic_write(out / filename, lambda tmp: Path(tmp).write_bytes(data))

    def image(filename: str, png: bytes, alt: str) -> None:
        write(filename, png)
        md.extend([f"![{alt}]({filename})", ""])
        data = base64.b64encode(png).decode()
        page.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
                    f"<figcaption>{html.escape(alt)}</figcaption></figure>")

    if comparison is not None and len(comparison):
        section("Comparison", "Accuracy, stored size and median latency per call against the "
                "first row (drop in percentage points; speedup = baseline latency / latency).")
        table(*_comparison_rows(comparison))
        png = _latency_png([c.to_dict() if hasattr(c, "to_dict") else dict(c)
                            for c in comparison])
        if png is not None:
            image("latency.png", png, "Median latency per call and speedup")
    if quantized_model is not None:
        section("Per-layer schemes")
        table(*_layer_table(quantized_model))
    if sensitivity is not None and sensitivity.rows:
        section("Sensitivity", "Each layer quantized alone, the rest in FP32; the most "
                "sensitive layer is highlighted.")
        image("sensitivity.png", _sensitivity_png(sensitivity), "Per-layer sensitivity")
        table(*_sensitivity_rows(sensitivity))
        summary = sensitivity.to_markdown().split("\n\n", 1)[1:]
        for text in summary:
            md.extend([text, ""])
            page.append("".join(f"<p>{html.escape(line)}</p>" for line in text.splitlines()))
    if histograms:
        section("Weight and activation histograms", "Float values (log counts) with the range "
                "each layer's integer codes can represent; values outside it are clipped.")
        for name, h in histograms.items():
            image(f"hist_{_slug(name)}.png", _hist_png(h), f"{name}: weights and inputs")
    md_text = "\n".join(md).rstrip() + "\n"
    write("report.md", md_text.encode())
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
           + "\n".join(page) + "</body></html>\n")
    write("report.html", doc.encode())
    return out / "report.html"
