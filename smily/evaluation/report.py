"""The evaluation's outputs: a table for people, JSON for machines, a plot."""

from __future__ import annotations

import json
import os


def _ci(v) -> str:
    mean, lo, hi = v
    return f"{mean:.3f} [{lo:.2f},{hi:.2f}]"


def table(result: dict) -> str:
    lines = [
        f"model {result['model_id']}; archive {result['archive']['tiles']} tiles on "
        f"{result['archive']['slides']} slides (index: {result['archive']['index_slides']} slides); "
        f"mean [95% CI, {result['bootstrap']} slide-bootstrap draws]"
    ]
    for col, entry in result["columns"].items():
        names = list(next(iter(entry["methods"].values())))
        classes = ", ".join(f"{c} {n}" for c, n in entry["classes"].items())
        lines += [
            "",
            f"label column '{col}': {entry['queries']} queries from {entry['slides']} slides ({classes})",
            f"{'method':<15}" + "".join(f"{n:>22}" for n in names),
        ]
        for method, values in entry["methods"].items():
            lines.append(f"{method:<15}" + "".join(f"{_ci(values[n]):>22}" for n in names))
    if "ann_recall" in result:
        a = result["ann_recall"]
        lines += [
            "",
            f"deployed vs exact: share of the exact top {a['k']} the deployed index returns: {_ci(a['value'])}",
        ]
    if result.get("robustness"):
        r = result["robustness"]
        lines += [
            "",
            f"robustness: source tile in the deployed top {r['k']} ({r['queries']} queries)",
            f"{'slide':<24}" + "".join(f"{t:>16}" for t in r["all"]),
        ]
        for slide_id, rates in [*r["per_slide"].items(), ("all", r["all"])]:
            lines.append(f"{slide_id:<24}" + "".join(f"{v:>16.2f}" for v in rates.values()))
    if result.get("regions_without_tiles"):
        lines.append(
            f"{result['regions_without_tiles']} labelled regions gave no query: no tissue tile "
            "lies at least half inside them"
        )
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Precision@k against k, one panel per label column, one line per method."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the plot needs matplotlib: pip install -e '.[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(result["columns"])
    fig, axes = plt.subplots(1, max(1, len(cols)), figsize=(5 * max(1, len(cols)), 4), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for method, curve in result["columns"][col]["curve"].items():
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=method)
        ax.set(title=f"{col}", xlabel="k", ylabel="precision@k", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SMILY retrieval, {result['model_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, out_dir: str) -> tuple[str, str | None]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "evaluation.json")
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=2)
    png = None
    if result["columns"]:
        png = os.path.join(out_dir, "precision_at_k.png")
        plot(result, png)
    return json_path, png
