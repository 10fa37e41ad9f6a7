"""Plots from the benchmark CSVs (never by hand): one PNG per op and device.

    python bench/plot.py bench/results                       # every CSV there, one PNG per group
    python bench/plot.py a.csv b.csv -o cross_entropy.png    # these CSVs into one PNG

A group is the CSV stem without its setting suffix: ``cross_entropy-cpu-2026-11-23.csv`` and
``cross_entropy-cpu-2026-11-23-thp.csv`` make ``cross_entropy-cpu-2026-11-23.png``, the settings drawn
as line styles. Columns of the figure are the modes (fwd, bwd, fwd+bwd); rows are time (log scale)
and, when the CSV has it, peak memory, for each dtype. The x axis lists the shapes, ordered by size.
Colours are providers.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bench.common import MODES, read_csv  # noqa: E402

_PLAIN = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
# label the minor ticks 2, 3, 5 of each decade only: enough to read a log axis, not cluttered
_PLAIN_MINOR = matplotlib.ticker.FuncFormatter(
    lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 3, 5) else "")
_SETTING_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2})(-[a-z0-9_]+)?$")
_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def group_stem(path: Path) -> str:
    """The PNG stem of a CSV: its stem without the setting suffix after the date."""
    m = _SETTING_SUFFIX.search(path.stem)
    return path.stem[: m.start()] + m.group(1) if m else path.stem


def _num(value):
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _shape_size(label: str) -> int:
    return math.prod(int(v) for _, v in re.findall(r"(\w+)=(\d+)", label)) if label else 0


def plot_rows(rows: list[dict], out_png: Path) -> Path | None:
    rows = [r for r in rows if _num(r.get("median")) is not None]
    if not rows:
        return None
    ops = sorted({r["op"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    dtypes = sorted({r["dtype"] for r in rows})
    has_mem = any(_num(r.get("peak memory")) is not None for r in rows)
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "torch", p != "torch.compile", p))
    settings = sorted({r.get("setting", "") for r in rows}, key=lambda s: (s != "default", s))
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: (_shape_size(s), s))
    xpos = {s: i for i, s in enumerate(shapes)}
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    styles = {s: _STYLES[i % len(_STYLES)] for i, s in enumerate(settings)}

    kinds = [("median", "time (ms, log)")] + ([("peak memory", "peak memory (MB)")] if has_mem else [])
    nrows = len(dtypes) * len(kinds)
    fig, axes = plt.subplots(nrows, len(modes), figsize=(5.2 * len(modes), 3.6 * nrows + 1.2), squeeze=False)
    for d_i, dtype in enumerate(dtypes):
        for k_i, (col, ylabel) in enumerate(kinds):
            for m_i, mode in enumerate(modes):
                ax = axes[d_i * len(kinds) + k_i][m_i]
                for p_i, prov in enumerate(providers):
                    for setting in settings:
                        pts = sorted(
                            (xpos[r["shape"]], _num(r[col]))
                            for r in rows
                            if r["provider"] == prov and r["mode"] == mode and r["dtype"] == dtype
                            and r.get("setting", "") == setting and _num(r.get(col)) is not None
                        )
                        if not pts:
                            continue
                        xs, ys = zip(*pts)
                        if col == "peak memory":
                            ys = [y / 1e6 for y in ys]
                        label = prov if len(settings) == 1 else f"{prov} [{setting}]"
                        ax.plot(xs, ys, linestyle=styles[setting], marker=_MARKERS[p_i % len(_MARKERS)],
                                color=colors[prov], label=label, linewidth=1.6, markersize=5)
                if col == "median":
                    ax.set_yscale("log")
                    ax.yaxis.set_major_formatter(_PLAIN)
                    ax.yaxis.set_minor_formatter(_PLAIN_MINOR)
                ax.set_title(f"{mode} · {dtype} · {'time' if col == 'median' else 'peak memory'}", fontsize=10)
                ax.set_ylabel(ylabel)
                ax.set_xticks(range(len(shapes)))
                ax.set_xticklabels([s.replace(" ", "\n") for s in shapes], fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    first = rows[0]

    def each(col):  # the distinct values of a column, in order of appearance
        return ", ".join(dict.fromkeys(str(r.get(col) or "?") for r in rows))

    dates = ", ".join(dict.fromkeys((r.get("timestamp") or "?")[:10] for r in rows))
    title = (f"{', '.join(ops)} on {first.get('device name') or first['device']} — {dates}, git {each('git sha')}, "
             f"{each('threads')} threads\n{each('versions')}")
    loads = [_num(r.get("load avg")) for r in rows if _num(r.get("load avg")) is not None]
    if loads:
        title += f"; load average while timing {min(loads):.1f} to {max(loads):.1f}"
    fig.suptitle(title, fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    legend_rows = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * legend_rows, 1, 0.93))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_files(csvs: list[Path], out_png: Path) -> Path | None:
    rows = []
    for path in csvs:
        rows += read_csv(path)
    return plot_rows(rows, out_png)


def plot_dir(directory: Path, stems: list[str] | None = None) -> list[Path]:
    """One PNG per group of CSVs in ``directory`` (only the groups in ``stems`` when given)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(Path(directory).glob("*.csv")):
        groups[group_stem(path)].append(path)
    written = []
    for stem, paths in sorted(groups.items()):
        if stems is not None and stem not in stems:
            continue
        png = plot_files(paths, Path(directory) / f"{stem}.png")
        if png is not None:
            written.append(png)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Plot benchmark CSVs: one PNG per op and device.")
    parser.add_argument("paths", nargs="+", help="CSV files, or directories holding them")
    parser.add_argument("-o", "--out", default=None,
                        help="PNG to write when CSV files are given (default: beside the first CSV, "
                             "named after its group)")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.paths]
    written = []
    for d in (p for p in paths if p.is_dir()):
        written += plot_dir(d)
    files = [p for p in paths if p.is_file()]
    if files:
        out = Path(args.out) if args.out else files[0].with_name(group_stem(files[0]) + ".png")
        png = plot_files(files, out)
        if png is not None:
            written.append(png)
    for png in written:
        print(f"wrote {png}")
    if not written:
        print("no results to plot", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
