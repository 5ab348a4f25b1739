"""Figures people would rather look at than read: segmentation overlays, the label-efficiency
plot, the trials' validation curves."""

from __future__ import annotations

import os

import numpy as np

from mixcl_ray.paired import row_order


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay_png(
    image: np.ndarray,
    truth: np.ndarray,
    prediction: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Image / ground truth / prediction on the axial slice through the largest organ area.
    image, truth, prediction: (X, Y, Z)."""
    plt = _pyplot()
    area = (truth > 0).sum(axis=(0, 1)) + (prediction > 0).sum(axis=(0, 1))
    z = int(np.argmax(area))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, (name, mask) in zip(
        axes, (("image", None), ("ground truth", truth), ("prediction", prediction)), strict=True
    ):
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
        if mask is not None:
            shown = np.ma.masked_where(mask[:, :, z].T == 0, mask[:, :, z].T)
            ax.imshow(shown, cmap="autumn", alpha=0.5, origin="lower", interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title} (slice z={z})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def label_efficiency_png(summary: dict, path: str | os.PathLike, metric_name: str) -> None:
    """summary: {method: {label_fraction: (mean, std, n)}} -> Dice against label fraction."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_fraction in sorted(summary.items(), key=lambda item: row_order(item[0])):
        fractions = sorted(by_fraction)
        means = [by_fraction[f][0] for f in fractions]
        stds = [by_fraction[f][1] for f in fractions]
        ax.errorbar(
            [100 * f for f in fractions], means, yerr=stds, marker="o", capsize=3, label=method
        )
    ax.set_xscale("log")
    ax.set_xlabel("labelled training cases of the target (%)")
    ax.set_ylabel(metric_name)
    ax.set_title("label efficiency (mean ± std over runs)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def validation_curves_png(rows: list[dict], path: str | os.PathLike) -> None:
    """rows: trials with ``method``, ``label_fraction`` and ``curve`` (the validation Dice per
    epoch, [(epoch, dice)]) -> one panel per label fraction, a line per trial, a colour per
    method: whether a method's Dice holds or falls after its peak is seen at a glance."""
    plt = _pyplot()
    fractions = sorted({r["label_fraction"] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=row_order)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(
        1, len(fractions), figsize=(4 * len(fractions), 3.5), sharey=True, squeeze=False
    )
    for ax, fraction in zip(axes[0], fractions, strict=True):
        labelled = set()
        for row in rows:
            if row["label_fraction"] != fraction or not row["curve"]:
                continue
            epochs, dice = zip(*row["curve"], strict=True)
            method = row["method"]
            ax.plot(
                epochs,
                dice,
                color=colours[method],
                marker=".",
                alpha=0.8,
                label=None if method in labelled else method,
            )
            labelled.add(method)
        ax.set_title(f"{100 * fraction:g} % labels")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation Dice (mean over organs)")
    fig.suptitle("validation Dice per epoch, one line per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def paired_png(entries: list[dict], path: str | os.PathLike) -> None:
    """entries: ``paired.summary``'s -> each method's paired difference to scratch against
    label fraction, with its 95 % interval as the bar."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({e["method"] for e in entries if "ci95" in e}, key=row_order)
    for i, method in enumerate(methods):
        rows = sorted(
            (e for e in entries if e["method"] == method and "ci95" in e),
            key=lambda e: e["label_fraction"],
        )
        shift = 1 + 0.05 * (i - (len(methods) - 1) / 2)  # side by side on the log axis
        x = [100 * e["label_fraction"] * shift for e in rows]
        y = np.array([e["mean_diff"] for e in rows])
        bars = [y - [e["ci95"][0] for e in rows], [e["ci95"][1] for e in rows] - y]
        ax.errorbar(x, y, yerr=bars, marker="o", capsize=3, linestyle="none", label=method)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training cases of the target (%)")
    ax.set_ylabel("test Dice minus scratch's")
    ax.set_title("paired difference to scratch (95 % interval)")
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
