"""MkDocs hooks: content the docs build computes from the code, so it cannot go stale.

* ``img/calibrators.png`` and the ``<!-- calibrator-ranges -->`` table: a small CNN trained
  for a few seconds on the bundled real MNIST, the activations entering two of its layers, and
  the range each built-in calibrator picks for them (used by ``tutorials/calibration.md``).
* ``<!-- cli-help -->``: ``lowbit --help`` and every subcommand's ``--help`` (``reference/cli.md``).
"""

from __future__ import annotations

import contextlib
import io
from functools import cache
from typing import Any

CALIBRATORS = {  # name: options, as a user would pass them
    "minmax": {},
    "moving_average": {},
    "percentile": {"percentile": 99.99},
    "entropy": {},
    "mse": {},
}
LAYERS = ("fc1", "fc2")  # their inputs: post-ReLU activations, one with a long tail


@cache
def _calibration_study() -> tuple[bytes, str]:
    """Train MnistCNN briefly, record real activations, calibrate them: (PNG, markdown table)."""
    import torch
    from matplotlib.figure import Figure
    from torch.utils.data import Subset

    from lowbit import QuantSpec, create_calibrator
    from lowbit.data import mnist_splits
    from lowbit.models import MnistCNN, train_classifier

    torch.manual_seed(0)
    splits = mnist_splits()
    model = train_classifier(MnistCNN(), Subset(splits.train, range(2000)), epochs=1,
                             lr=2e-3, progress=False)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].append(args[0].detach()))
        for name in LAYERS]
    with torch.inference_mode():
        for batch in splits.train.tensors[0][:512].split(64):
            model(batch)
    for h in hooks:
        h.remove()

    spec = QuantSpec.int8_static_activation()  # 8-bit asymmetric, per tensor
    fig = Figure(figsize=(10, 3.6))
    rows = ["| layer input | observed | " + " | ".join(CALIBRATORS) + " |",
            "|---|---|" + "---|" * len(CALIBRATORS)]
    colors = dict(zip(CALIBRATORS, ("C3", "C1", "C2", "C4", "C0"), strict=True))
    for i, name in enumerate(LAYERS):
        values = torch.cat([t.flatten() for t in seen[name]])
        ranges = {}
        for cal_name, kwargs in CALIBRATORS.items():
            cal = create_calibrator(cal_name, spec, **kwargs)
            for t in seen[name]:
                cal(t)  # forward records statistics and returns the tensor unchanged
            lo, hi = (float(v) for v in cal.compute_range())
            ranges[cal_name] = (lo, hi)
        ax = fig.add_subplot(1, len(LAYERS), i + 1)
        ax.hist(values.numpy(), bins=200, log=True, color="0.6")
        for cal_name, (_lo, hi) in ranges.items():
            ax.axvline(hi, color=colors[cal_name], linestyle="--", label=f"{cal_name}: {hi:.2f}")
        ax.set_title(f"input of {name} ({values.numel():,} values)")
        ax.set_xlabel("activation value")
        ax.legend(fontsize=7, title="upper end of the range", title_fontsize=7)
        rows.append(f"| {name} | [{float(values.min()):.2f}, {float(values.max()):.2f}] | "
                    + " | ".join(f"[{lo:.2f}, {hi:.2f}]" for lo, hi in ranges.values()) + " |")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue(), "\n".join(rows)


def _cli_help() -> str:
    """``lowbit --help`` and each subcommand's help, as markdown sections."""
    import argparse

    from lowbit.cli import build_parser

    parser = build_parser()
    parts = ["### `lowbit --help`", "", "```text", parser.format_help().rstrip(), "```", ""]
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        with contextlib.suppress(Exception):
            parts += [f"### `lowbit {name}`", "", "```text", sub.format_help().rstrip(), "```",
                      ""]
    return "\n".join(parts)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    png, _ = _calibration_study()
    files.append(File.generated(config, "img/calibrators.png", content=png))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "<!-- calibrator-ranges -->" in markdown:
        markdown = markdown.replace("<!-- calibrator-ranges -->", _calibration_study()[1])
    if "<!-- cli-help -->" in markdown:
        markdown = markdown.replace("<!-- cli-help -->", _cli_help())
    return markdown
