"""Results as JSON, a markdown table and a PNG bar plot."""

from __future__ import annotations

import json
import os
from pathlib import Path


# ------------------------------------------------------------------------------------------------ reporting
def write_results(
    results: dict[str, dict[str, float]],
    output_dir: str | os.PathLike,
    name: str,
    metric: str | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write `results` (`{row: {metric: value}}`) as `<name>.json`, a markdown table `<name>.md` and a bar plot of
    `metric` (default: the first metric) as `<name>.png`. The JSON is written atomically. Returns the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(dict.fromkeys(key for entry in results.values() for key in entry))
    json_path = output_dir / f"{name}.json"
    temporary = output_dir / f".{name}.json.tmp"
    temporary.write_text(json.dumps(results, indent=2))
    os.replace(temporary, json_path)
    table = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for row, entry in results.items():
        cells = [
            f"{entry[m]:.4g}" if isinstance(entry.get(m), (int, float)) else str(entry.get(m, "")) for m in metrics
        ]
        table.append(f"| {row} | " + " | ".join(cells) + " |")
    markdown_path = output_dir / f"{name}.md"
    markdown_path.write_text("\n".join(table) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or metrics[0]
    rows = [row for row, entry in results.items() if isinstance(entry.get(metric), (int, float))]
    figure, axis = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 3.2))
    axis.bar(range(len(rows)), [results[row][metric] for row in rows])
    axis.set_xticks(range(len(rows)), rows, rotation=35, ha="right", fontsize=8)
    axis.set_ylabel(metric)
    axis.set_title(title or name)
    figure.tight_layout()
    plot_path = output_dir / f"{name}.png"
    figure.savefig(plot_path, dpi=120)
    plt.close(figure)
    return {"json": json_path, "markdown": markdown_path, "plot": plot_path}
