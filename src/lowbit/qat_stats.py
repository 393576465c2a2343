"""QAT statistics: per quantizer and training step, qparams, observed ranges and gradient flow.

Each :class:`~lowbit.fake_quantize.FakeQuantize` records one row per training forward (without
a device sync: rows stay tensors until read). :func:`collect_statistics` reads them into a
:class:`QATStatistics`, which exports a summary table (markdown), JSON and a PNG plot.

Columns per step: ``scale`` (mean over channels/groups), ``scale_min``, ``scale_max``,
``zero_point`` (mean), ``range_min`` / ``range_max`` (the observer's range: for activations the
moving average, for weights the current weights), ``clipped_fraction`` (elements outside the
representable range, whose gradient the STE zeroes, in ``[0, 1]``), ``grad_norm_in`` (L2 norm of
the gradient arriving at the node) and ``grad_norm`` (after clipping, passed on).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (doctests)
from torch import nn

from lowbit.fake_quantize import FakeQuantize

__all__ = ["QATStatistics", "collect_statistics"]

_SUFFIX = "_quantizer"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class QATStatistics:
    """Per-step statistics of every fake-quant node of a QAT model.

    Attributes:
        traces: ``{node: {column: [value per step]}}``; nodes are named ``"<layer>.weight"`` and
            ``"<layer>.input"``; columns are ``step`` plus those of the module docstring.
        info: ``{node: {"bits", "granularity", "symmetric", "dynamic", "learnable_scale"}}``.

    Example:
        >>> stats = QATStatistics({"fc.input": {"step": [1, 2], "scale": [0.1, 0.2],
        ...                        "clipped_fraction": [0.0, 0.5], "grad_norm": [1.0, 3.0]}})
        >>> stats.summary()[0]["scale_last"], stats.summary()[0]["clipped_fraction_mean"]
        (0.2, 0.25)
    """

    traces: dict[str, dict[str, list[float]]]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        """Names of the fake-quant nodes, in module order."""
        return list(self.traces)

    @property
    def layers(self) -> list[str]:
        """Names of the layers that own at least one node."""
        return list(dict.fromkeys(n.rpartition(".")[0] for n in self.traces))

    def scale_evolution(self, node: str) -> list[float]:
        """The mean scale of ``node`` at every recorded step.

        Raises:
            KeyError: on an unknown node (the message lists them).
        """
        if node not in self.traces:
            raise KeyError(f"no statistics for {node!r}; nodes: {self.nodes}")
        return list(self.traces[node].get("scale", []))

    def summary(self) -> list[dict[str, Any]]:
        """One row per node: steps, first/last scale, last range, mean clipping and grad norm."""
        rows = []
        for node, t in self.traces.items():
            scale = t.get("scale", [])
            rows.append({
                "node": node, "steps": len(t.get("step", [])),
                "scale_first": scale[0] if scale else math.nan,
                "scale_last": scale[-1] if scale else math.nan,
                "range_last": [t["range_min"][-1], t["range_max"][-1]]
                if t.get("range_min") else None,
                "clipped_fraction_mean": _mean(t.get("clipped_fraction", [])),
                "grad_norm_mean": _mean(t.get("grad_norm", [])),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (``nan`` becomes ``None``)."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, list):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        return {"traces": clean(self.traces), "info": clean(self.info)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QATStatistics:
        """Inverse of :meth:`to_dict` (``None`` back to ``nan``)."""
        traces = {n: {c: [math.nan if v is None else v for v in vals] for c, vals in t.items()}
                  for n, t in data.get("traces", {}).items()}
        return cls(traces, dict(data.get("info", {})))

    def to_json(self, path: str | Path | None = None) -> str:
        """The statistics as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self) -> str:
        """A summary table (one row per node)."""
        lines = ["| node | steps | scale first | scale last | range (last) | clipped (mean) | "
                 "grad norm (mean) |", "|---|---|---|---|---|---|---|"]
        for r in self.summary():
            rng = "" if r["range_last"] is None else \
                f"[{r['range_last'][0]:.4g}, {r['range_last'][1]:.4g}]"
            lines.append(f"| {r['node']} | {r['steps']} | {r['scale_first']:.4g} | "
                         f"{r['scale_last']:.4g} | {rng} | {r['clipped_fraction_mean']:.4f} | "
                         f"{r['grad_norm_mean']:.4g} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, path: str | Path) -> Path:
        """Save a PNG: scale (relative to step 1), clipped fraction and gradient norm per step.

        Returns:
            The path written.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
        for node, t in self.traces.items():
            steps, scale = t.get("step", []), t.get("scale", [])
            if scale and scale[0] and not math.isnan(scale[0]):
                axes[0].plot(steps, [s / scale[0] for s in scale], label=node)
            axes[1].plot(steps, t.get("clipped_fraction", []), label=node)
            axes[2].plot(steps, t.get("grad_norm", []), label=node)
        axes[0].set_ylabel("scale / scale at step 1")
        axes[1].set_ylabel("clipped fraction")
        axes[2].set_ylabel("gradient norm (after STE)")
        axes[2].set_xlabel("training step")
        axes[0].legend(fontsize="x-small", ncol=2)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _node_name(module_name: str) -> str:
    return module_name[: -len(_SUFFIX)] if module_name.endswith(_SUFFIX) else module_name


def collect_statistics(model: nn.Module) -> QATStatistics:
    """Read the recorded statistics of every ``FakeQuantize`` in ``model``.

    Example:
        >>> from lowbit.config import QuantSpec
        >>> fq = FakeQuantize(QuantSpec()).train()
        >>> _ = fq(torch.randn(4))
        >>> list(collect_statistics(nn.ModuleDict({"x": fq})).traces)
        ['x']
    """
    traces, info = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            node = _node_name(name) or m.name
            traces[node] = m.history()
            info[node] = {"bits": m.spec.bits, "granularity": m.spec.granularity,
                          "symmetric": m.spec.symmetric, "dynamic": m.dynamic,
                          "learnable_scale": m.learnable_scale}
    return QATStatistics(traces, info)
