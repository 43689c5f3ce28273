"""Matplotlib figures (Agg, written as PNG): each function draws arrays it is given and saves one file."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def dense_maps(images: list[np.ndarray], maps: dict[str, list[tuple[np.ndarray, np.ndarray]]], k: int,
               path: Path) -> Path:
    """One row per image: the image, then for each checkpoint its K-means map and PCA-RGB map."""
    cols = 1 + 2 * len(maps)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.9 * cols, 1.9 * len(images)), squeeze=False)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20", k)
    for row, image in enumerate(images):
        axes[row, 0].imshow(image)
        col = 1
        for name, per_image in maps.items():
            clusters, rgb = per_image[row]
            axes[row, col].imshow(clusters, cmap=cmap, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
            axes[row, col + 1].imshow(rgb, interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(f"{name}: K-means ({k})", fontsize=8)
                axes[row, col + 1].set_title(f"{name}: PCA → RGB", fontsize=8)
            col += 2
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def text_heatmaps(image: np.ndarray, heats: dict[str, np.ndarray], boxes: list[tuple[list[float], str]],
                  path: Path) -> Path:
    """The image with its boxes, then one overlay per text (similarity, colour bar)."""
    cols = 1 + len(heats)
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, 2.6), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title("image and boxes", fontsize=8)
    for ax in axes:
        for (x, y, w, h), _ in boxes:
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="white", linewidth=1))
    for (x, y, _, _), label in boxes:
        axes[0].text(x, y - 1, label, color="white", fontsize=6, va="bottom",
                     bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    for ax, (text, heat) in zip(axes[1:], heats.items(), strict=True):
        ax.imshow(image)
        shown = ax.imshow(heat, cmap="inferno", alpha=0.65)
        ax.set_title(f'"{text}"', fontsize=8)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def confusion(matrix: np.ndarray, names: list[str], path: Path) -> Path:
    """Rows: true class, columns: predicted; each row normalised to the class's boxes (counts in the cells)."""
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="share of the class's boxes")
    ax.set_title("box classification: confusion", fontsize=9)
    return _save(fig, path)


def per_class_bars(top1: np.ndarray, counts: np.ndarray, names: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(4.0, 0.4 * len(names) + 1.5), 3))
    ax.bar(range(len(names)), top1, color="tab:blue")
    ax.axhline(100 / len(names), color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(names)), [f"{n} ({c})" for n, c in zip(names, counts, strict=True)], rotation=60,
                  ha="right", fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 118)  # room above full bars for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("box classification: top-1 per class (boxes)", fontsize=9)
    return _save(fig, path)


def curves(runs: dict[str, dict[str, tuple[list[float], list[float]]]], path: Path) -> Path:
    """One panel per metric; one line per run; x = optimizer step."""
    keys = sorted({k for series in runs.values() for k in series})
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        ax.set_title(key, fontsize=8)
        for name, series in runs.items():
            if key in series:
                steps, values = series[key]
                ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=name)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def box_grid(crops: list[np.ndarray], titles: list[str], path: Path, title: str, cols: int = 6) -> Path:
    """Box crops in a grid, each titled (e.g. "true → predicted")."""
    rows = max(1, (len(crops) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, crop, text in zip(axes.flat, crops, titles, strict=False):
        ax.imshow(crop)
        ax.set_title(text, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def retrieval(queries: list[str], results: list[list[tuple[np.ndarray, bool]]], path: Path) -> Path:
    """One row per text query: its top-5 images, the correct ones framed in green, the others in red."""
    cols = max(len(r) for r in results)
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.6 * cols, 1.9 * len(queries)), squeeze=False)
    for row, (query, found) in enumerate(zip(queries, results, strict=True)):
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(found):
                ax.axis("off")
                continue
            image, correct = found[col]
            ax.imshow(image)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if correct else "tab:red")
                spine.set_linewidth(3)
        axes[row, 0].set_title(f'"{query}"', fontsize=7, loc="left")
    fig.suptitle("text → image retrieval, top-5 (green: the caption's image)", fontsize=9)
    return _save(fig, path)
