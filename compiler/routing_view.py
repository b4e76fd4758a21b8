"""Pictures of routing: a heat map of each layer's routed share per expert, with the partition plan outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def heatmap(layers: list[dict], path: Path, title: str) -> None:
    """layers: the partition stage's per-layer plans (tokens_per_expert, partition_of_expert, tiers)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shares = np.array([np.asarray(layer["tokens_per_expert"]) / max(1, sum(layer["tokens_per_expert"])) for layer in layers])  # [L,E]
    experts = shares.shape[1]
    figure, axes = plt.subplots(figsize=(2 + 0.45 * experts, 1.5 + 0.45 * len(layers)))
    image = axes.imshow(shares, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label="share of the layer's routed tokens")
    for row, layer in enumerate(layers):
        # Experts in the same partition share an outline colour; hot experts get a star, pruned ones an x.
        for expert, part in enumerate(layer["partition_of_expert"]):
            if part < 0:
                axes.text(expert, row, "x", ha="center", va="center", fontsize=9, color="red")
                continue
            axes.add_patch(Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, lw=2, edgecolor=plt.cm.tab10(part % 10)))
            axes.text(expert, row, f"p{part}" + ("*" if layer["tiers"][expert] == "hot" else ""), ha="center", va="center", fontsize=7, color="white")
    axes.set_xticks(range(experts))
    axes.set_yticks(range(len(layers)))
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
