"""The PNG chart of a bench.py run: bridge vs raw libblkio, per target and workload."""

from __future__ import annotations

from pathlib import Path

PATH_COLOURS = {"copy": "#1f77b4", "copy+persistent": "#9467bd", "map": "#ff7f0e", "map+persistent": "#2ca02c"}
RAW_COLOUR = "#9a9a9a"


def draw(rows: list[dict], title: str, out: Path) -> Path:
    """One panel per target: IOPS (log scale) of raw libblkio and of each data path, per workload.

    The ratio bridge/raw is written over each bridge bar; a black tick marks
    the load generator's ceiling (its rate against the null responder).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(len(targets), 1, figsize=(14, 4.8 * len(targets)), squeeze=False)
    for ax, target in zip(axes[:, 0], targets):
        mine = [r for r in rows if r["target"] == target]
        workloads = list(dict.fromkeys(r["workload"] for r in mine))
        paths = list(dict.fromkeys(r["data_path"] for r in mine))
        width = 0.8 / (len(paths) + 1)
        for i, wl in enumerate(workloads):
            cell = {r["data_path"]: r for r in mine if r["workload"] == wl}
            any_row = next(iter(cell.values()))
            if any_row.get("raw_iops"):
                ax.bar(i - 0.4 + width / 2, any_row["raw_iops"], width, color=RAW_COLOUR,
                       label="raw libblkio" if i == 0 else None)
            for j, path in enumerate(paths):
                r = cell.get(path)
                if r is None:
                    continue
                x = i - 0.4 + width * (j + 1.5)
                ax.bar(x, r["bridge_iops"], width, color=PATH_COLOURS.get(path, "#d62728"),
                       label=f"xenblk-vhost ({path})" if i == 0 else None)
                if r.get("ratio") is not None:
                    ratio = r["ratio"]
                    ax.text(x, r["bridge_iops"] * 1.08, f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}",
                            ha="center", va="bottom",
                            fontsize=7, rotation=90)
                if r.get("loadgen_ceiling_iops"):
                    ax.plot([x - width / 2, x + width / 2], [r["loadgen_ceiling_iops"]] * 2, color="black", lw=1.5)
        ax.set_yscale("log")
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("I/Os per second")
        ax.set_title(f"{target}: {mine[0]['target_label']}  (numbers: bridge/raw; black ticks: load generator ceiling)",
                     fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
