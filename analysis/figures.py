"""Figures a reader would put in a paper, drawn with matplotlib's object API (no pyplot state, no GUI backend) in
seaborn's paper style and colour-blind-safe palettes.

Every function takes the analysis tables and returns a `matplotlib.figure.Figure` (or None when the data for it are
absent); `save_figure` writes PNG and PDF. Colours follow model size (viridis: light = small, dark = large) in every
figure, strategies use seaborn's colour-blind palette. Panels of one axis share their y scale, so curves compare
across strategies at a glance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from .drop import AXES
from .fit import DropCurveFit

METRIC_LABELS = {
    "zeroshot_top1": "zero-shot top-1 accuracy",
    "zeroshot_top5": "zero-shot top-5 accuracy",
    "i2t_r1": "image-to-text recall@1",
    "t2i_r1": "text-to-image recall@1",
}
TOKEN_COUNTS = {"image": "incl. class token", "text": "incl. start/end"}  # what a token count includes
STRATEGY_ORDER = {"image": ["random", "grid", "block", "resize"], "text": ["truncation", "random", "block", "syntax"]}
# What the x value of a reduced run is, and what was evaluated, per stage: after a fine-tune or at full length, the
# model is evaluated at full length, so the x axis is the length it was pre-trained at.
STAGE_PHRASES = {
    "pretrain": "pre-trained and evaluated at the reduced length",
    "finetune": "pre-trained at the reduced length, fine-tuned and evaluated at full length",
    "pretrain_full_length": "pre-trained at the reduced length, evaluated at full length",
}
_STYLE = {
    **sns.axes_style("whitegrid"), **sns.plotting_context("paper"),
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "grid.alpha": 0.5,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays text for journals
}
STRATEGY_PALETTE = sns.color_palette("colorblind")
# A strategy keeps its colour in every figure and on both axes (random is random wherever it is drawn)
STRATEGY_COLORS = {name: i for i, name in enumerate(["random", "grid", "block", "resize", "truncation", "syntax"])}
# The built-in models keep their shade whichever of them an analysis holds (the paper's image and text studies are
# separate sweeps with different models); each family spans the colour map, as the two are not drawn together.
MODEL_SHADES = {"cpu-s": 0.15, "cpu-m": 0.52, "cpu-l": 0.9,
                "ViT-S-16": 0.15, "ViT-B-16": 0.4, "ViT-L-16": 0.65, "ViT-H-14": 0.9}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def model_colors(cells: pd.DataFrame) -> dict[str, tuple]:
    """One colour per model, ordered by parameter count (viridis, colour-blind safe: light = small, dark = large):
    the built-in models' fixed shades when the analysis holds only those (one family of sizes), else spread evenly."""
    order = model_order(cells)
    cmap = colormaps["viridis_r"]
    families = {m.startswith("cpu-") for m in order}
    if all(m in MODEL_SHADES for m in order) and len(families) == 1:
        return {model: cmap(MODEL_SHADES[model]) for model in order}
    shades = np.linspace(0.15, 0.9, len(order)) if len(order) > 1 else [0.6]
    return {model: cmap(s) for model, s in zip(order, shades)}


def strategy_color(strategy: str) -> tuple:
    """A strategy's colour, the same in every figure; strategies added by a user get the palette's later colours."""
    index = STRATEGY_COLORS.get(strategy)
    if index is None:
        index = len(STRATEGY_COLORS) + sum(map(ord, strategy)) % (len(STRATEGY_PALETTE) - len(STRATEGY_COLORS))
    return STRATEGY_PALETTE[index]


def token_label(axis: str, stage: str = "pretrain", short: bool = False) -> str:
    """The label of a token axis: after a fine-tune or at full length, the length the model was pre-trained at.
    `short`: without what the count includes."""
    label = f"{axis} tokens" if short else f"{axis} tokens ({TOKEN_COUNTS[axis]})"
    return label if stage == "pretrain" else f"pre-training {label}"


def _wrap_title(text: str, width: float) -> str:
    """A title wrapped to a figure `width` inches wide (~11 characters of 10-pt text per inch)."""
    import textwrap

    chars = max(15, int(width * 11))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def _title(fig: Figure, text: str) -> None:
    """A suptitle wrapped to the figure's width (a one-panel figure is narrow)."""
    text = _wrap_title(text, fig.get_figwidth())
    fig.suptitle(text)
    # room for every line above the panels and their titles (~0.2 in a line)
    fig.subplots_adjust(top=min(fig.subplotpars.top, 1 - (0.35 + 0.2 * (text.count("\n") + 1)) / fig.get_figheight()))


def model_order(table: pd.DataFrame) -> list[str]:
    sizes = table.groupby("model")["params"].first()
    return sorted(sizes.index, key=lambda m: (np.nan_to_num(sizes[m], nan=np.inf), m))


def model_label(model: str, params: float) -> str:
    return f"{model} ({_human(params)})" if np.isfinite(params) else model


def _human(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def human_flops(value: float) -> str:
    """FLOPs with an SI prefix, three significant digits: 1.23P."""
    for unit, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _strategies(cells: pd.DataFrame, axis: str) -> list[str]:
    present = cells.loc[cells["axis"] == axis, "strategy"].unique().tolist()
    order = STRATEGY_ORDER.get(axis, [])
    return sorted(present, key=lambda s: (order.index(s) if s in order else len(order), s))


def _panels(cells: pd.DataFrame) -> list[tuple[str, list[str]]]:
    return [(axis, _strategies(cells, axis)) for axis in AXES if (cells["axis"] == axis).any()]


def _decades_per_inch(ax) -> float:
    """How many decades of the (log) x axis one inch of the panel spans, at its current limits."""
    low, high = ax.get_xlim()
    return np.log10(high / low) / (ax.get_position().width * ax.figure.get_figwidth())


def _x_ticks(ax, at: np.ndarray, labels: list[str]) -> bool:
    """Label the (log) x axis, whose limits are set, at `at` (ascending); a label that would touch the one before it
    on the first row goes a row lower (its tick's pad grows by the label's height). Whether any went lower."""
    ax.set_xticks(at, labels)
    per_inch = _decades_per_inch(ax)
    lowered, last = False, None  # (position, width in inches) of the last label on the first row
    for tick, x, label in zip(ax.xaxis.get_major_ticks(), at, labels):
        width = max(map(len, label.split("\n"))) * 0.075  # ~0.075 in per 8-pt character
        # half of each label's width apart, and a little air
        if last is not None and np.log10(x / last[0]) < ((width + last[1]) / 2 + 0.04) * per_inch:
            tick.set_pad(tick.get_pad() + 10 * (label.count("\n") + 1))  # ~10 pt a line of 8-pt text
            lowered = True
        else:
            last = (x, width)
    return lowered


def _token_axis(ax, ticks) -> None:
    """Log token axis labelled with the grid's own lengths (e.g. 5, 10, 17, 26, 37, 50, 65); a label too close to
    the one before it (197 and 257, the full lengths of ViT-L-16 and ViT-H-14) goes one line lower."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ticks = sorted({float(t) for t in ticks if np.isfinite(t) and t > 0})
    if ticks:
        ax.set_xlim(ticks[0] / 1.15, ticks[-1] * 1.15)
    _x_ticks(ax, np.array(ticks), [f"{t:g}" for t in ticks])


# Panel figures fit a paper's text width (7 in: a two-column figure* or a one-column page): four strategy panels
# side by side, their shared y axis labelled once per row, one x label per row, the legend below them.
_PANEL_WIDTH, _PANEL_HEIGHT, _PANEL_GAP = 1.4, 1.4, 0.2  # inches
_PANEL_TITLE = 0.3  # a panel's title above it


def _grid_figure(panels: list[tuple[str, list[str]]], ylabel: str) -> tuple[Figure, dict]:
    """One row of panels per axis, one column per strategy, the panels' size fixed in inches and each row's y axis
    shared and labelled on its first panel (`ylabel`, wrapped to the panel's height); `_finish_grid` sizes the
    figure's height once the ticks and the legend are known (fixed margins: fast, unlike a layout engine)."""
    import textwrap

    ncols = max(len(s) for _, s in panels)
    ylabel = textwrap.fill(ylabel, int(_PANEL_HEIGHT * 16), break_on_hyphens=False)  # ~16 9-pt characters/in
    left, right = 0.4 + 0.16 * (ylabel.count("\n") + 1), 0.15  # y tick labels and the y label's lines; air
    panels_width = ncols * _PANEL_WIDTH + (ncols - 1) * _PANEL_GAP
    # at least a column of a two-column paper, the legend's width, with one panel in the middle
    extra = max(0.0, 3.4 - (left + panels_width + right)) / 2
    left, right = left + extra, right + extra
    width = left + panels_width + right
    fig = Figure(figsize=(width, 4.0))  # the token axes' ticks are placed by the panels' width in inches: set it now
    fig.subplots_adjust(left=left / width, right=1 - right / width, wspace=_PANEL_GAP / _PANEL_WIDTH)
    grid = fig.subplots(len(panels), ncols, squeeze=False, sharey="row")
    axes = {}
    for row, (axis, strategies) in enumerate(panels):
        grid[row][0].set_ylabel(ylabel)
        for col in range(ncols):
            if col < len(strategies):
                axes[(axis, strategies[col])] = grid[row][col]
            else:
                grid[row][col].set_visible(False)
    return fig, axes


def _finish_grid(fig: Figure, axes: dict, xlabels: dict[str, str], models: list, notes: list, title: str) -> None:
    """Label each row's x axis once (centred under the row, below its lowest tick label), put the legend under the
    panels (the `models` in its first column, then the `notes`), and size the figure's height around the
    fixed-size panels and the `title`."""
    import textwrap

    rows: dict[str, list] = {}
    for (axis, _), ax in axes.items():
        rows.setdefault(axis, []).append(ax)
    width = fig.get_figwidth()
    below_row = {}
    for axis, row in rows.items():
        # how far below the row's panels its tick labels reach (a label moved a line lower has a larger pad)
        depth = max(t.get_pad() + 11 * (t.label1.get_text().count("\n") + 1)
                    for ax in row for t in ax.xaxis.get_major_ticks()) / 72
        span = len(row) * _PANEL_WIDTH + (len(row) - 1) * _PANEL_GAP  # panels and gaps are fixed in inches
        middle = fig.subplotpars.left * width + span / 2
        room = max(span, 2 * min(middle, width - middle) - 0.2)  # the label may reach past the row's panels
        first = row[0]
        first.set_xlabel(textwrap.fill(xlabels[axis], int(room * 16), break_on_hyphens=False))
        first.xaxis.set_label_coords(span / 2 / _PANEL_WIDTH, -(depth + 0.06) / _PANEL_HEIGHT)  # the middle
        below_row[axis] = depth + 0.13 + 0.17 * (first.get_xlabel().count("\n") + 1)
    legend = models + notes
    columns, legend_rows = _legend_columns(legend, width - 0.2, len(models))
    title = _wrap_title(title, width)
    above = 0.2 + 0.19 * (title.count("\n") + 1) + _PANEL_TITLE
    between = max(below_row.values()) + _PANEL_TITLE
    under = below_row[list(rows)[-1]]
    legend_height = 0.25 + 0.19 * legend_rows + 0.1  # its title, its lines, a margin
    nrows = len(rows)
    height = above + nrows * _PANEL_HEIGHT + (nrows - 1) * between + under + legend_height
    fig.set_size_inches(width, height)
    fig.subplots_adjust(top=1 - above / height, bottom=(under + legend_height) / height,
                        hspace=between / _PANEL_HEIGHT)
    fig.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, legend_height / height), ncol=columns,
               title="model (parameters, both towers)", frameon=False, columnspacing=1.2, handlelength=1.6)
    fig.suptitle(title, y=1 - 0.1 / height, va="top")


def _legend_columns(handles: list, width: float, lines_at_least: int) -> tuple[int, int]:
    """The fewest lines per column (at least `lines_at_least`: the models, in one column) that lets a figure legend
    of `handles` fit `width` inches, as (columns, lines); matplotlib fills the columns top to bottom."""
    def inches(handle) -> float:  # ~0.058 in per 8-pt character, after the handle and the spacing
        return 0.62 + 0.058 * max(map(len, handle.get_label().split("\n")))

    for per_column in range(min(max(1, lines_at_least), len(handles)), len(handles) + 1):
        chunks = [handles[i:i + per_column] for i in range(0, len(handles), per_column)]
        if sum(max(map(inches, chunk)) for chunk in chunks) <= width:
            break
    return len(chunks), max(sum(h.get_label().count("\n") + 1 for h in chunk) for chunk in chunks)


def _error_bars(ax, bars: list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple]]) -> bool:
    """All vertical ±err bars of a panel as one LineCollection (per-model ``errorbar`` calls are slow); whether
    there was any to draw."""
    segments, colors = [], []
    for x, y, err, color in bars:
        has = np.isfinite(err) & (err > 0) & np.isfinite(y)
        for xi, yi, ei in zip(x[has], y[has], err[has]):
            segments.append(((xi, yi - ei), (xi, yi + ei)))
            colors.append(color)
    if segments:
        ax.add_collection(LineCollection(segments, colors=colors, linewidths=1.0), autolim=True)
    return bool(segments)


def _curves(cells: pd.DataFrame) -> dict[tuple[str, str], list[tuple[str, dict[str, np.ndarray]]]]:
    """Per (axis, strategy): (model, arrays sorted by tokens) in model order, with the full-length baseline appended
    at ``full_tokens`` (drop 0). Built with one groupby so that figures with many models stay fast."""
    columns = ["tokens", "metric_mean", "metric_std", "drop", "drop_std"]
    baselines = cells[cells["axis"] == "full"].groupby(["model", "setup_id"])[["metric_mean", "metric_std"]].first()
    curves = cells[cells["axis"].isin(AXES)].sort_values("tokens")
    rank = {m: i for i, m in enumerate(model_order(cells))}
    out: dict[tuple[str, str], list] = {}
    for (axis, strategy, model), group in curves.groupby(["axis", "strategy", "model"], sort=False):
        arrays = {c: group[c].to_numpy(dtype=float) for c in columns}
        full = float(group["full_tokens"].iloc[0])
        setup = (model, group["setup_id"].iloc[0])  # a curve that pools setups (warned about): its first one's
        if setup in baselines.index and np.isfinite(full) and not np.any(arrays["tokens"] == full):
            base = baselines.loc[setup]
            extra = {"tokens": full, "metric_mean": base["metric_mean"], "metric_std": base["metric_std"],
                     "drop": 0.0, "drop_std": np.nan}
            arrays = {c: np.append(arrays[c], extra[c]) for c in columns}
        out.setdefault((axis, strategy), []).append((model, arrays))
    for items in out.values():
        items.sort(key=lambda item: rank[item[0]])
    return out


def _row_xlabels(axes: dict, stage: str) -> dict[str, str]:
    """Each row's x label: the token axis, what its count includes, the scale."""
    return {axis: f"{token_label(axis, stage, short=True)} ({TOKEN_COUNTS[axis]}; log scale)" for axis, _ in axes}


def _panel_ticks(items) -> np.ndarray:
    return np.unique(np.concatenate([arrays["tokens"] for _, arrays in items]))


def plot_accuracy_vs_tokens(cells: pd.DataFrame, stage: str = "pretrain") -> Figure | None:
    """Metric against token length: one panel per (axis, strategy), one line per model, error bars over seeds."""
    panels = _panels(cells)
    if not panels:
        return None
    metric = cells["metric"].iloc[0]
    colors = model_colors(cells)
    curves = _curves(cells)
    with _style():
        fig, axes = _grid_figure(panels, f"{metric_label(metric)} (%)")
        drawn, bars = set(), False
        for (axis, strategy), ax in axes.items():
            items = curves.get((axis, strategy), [])
            for model, c in items:
                ax.plot(c["tokens"], c["metric_mean"], marker="o", markersize=4, color=colors[model], linewidth=1.4)
                drawn.add(model)
            bars |= _error_bars(ax, [(c["tokens"], c["metric_mean"], c["metric_std"], colors[m]) for m, c in items])
            _token_axis(ax, _panel_ticks(items) if items else [])
            ax.set_title(f"{axis} · {strategy}")
        notes = [_note("mean ± 1 std over seeds" if bars else "one seed per point"),
                 _note("rightmost point: full-length run")]
        _finish_grid(fig, axes, _row_xlabels(axes, stage), _model_handles(cells, colors, drawn), notes,
                     f"{metric_label(metric).capitalize()} against token length\n{STAGE_PHRASES.get(stage, stage)}")
    return fig


def plot_drop_vs_tokens(
    cells: pd.DataFrame, fits: dict[tuple[str, str, str], DropCurveFit], max_drop: float, stage: str = "pretrain"
) -> Figure | None:
    """Drop against token length with the fitted curves and the tolerance line."""
    panels = _panels(cells)
    if not panels:
        return None
    metric = cells["metric"].iloc[0]
    colors = model_colors(cells)
    curves = _curves(cells)
    with _style():
        fig, axes = _grid_figure(panels, f"drop in {metric_label(metric)} (pp)")
        drawn, bars, fitted = set(), False, False
        for (axis, strategy), ax in axes.items():
            items = [(m, c) for m, c in curves.get((axis, strategy), []) if np.isfinite(c["drop"]).any()]
            for model, c in items:  # models without a baseline have no drop and are left out
                ax.plot(c["tokens"], c["drop"], marker="o", markersize=4, color=colors[model], linestyle="none")
                drawn.add(model)
                fit = fits.get((model, axis, strategy))
                if fit is not None and fit.usable:
                    t = np.geomspace(np.nanmin(c["tokens"]), fit.full_tokens, 60)
                    ax.plot(t, fit.predict(t), color=colors[model], linewidth=1.4)
                    fitted = True
            bars |= _error_bars(ax, [(c["tokens"], c["drop"], c["drop_std"], colors[m]) for m, c in items])
            ax.axhline(max_drop, color="crimson", linestyle="--", linewidth=1.2)
            ax.axhline(0.0, color="0.4", linewidth=0.8)
            _token_axis(ax, _panel_ticks(curves[(axis, strategy)]) if (axis, strategy) in curves else [])
            ax.set_title(f"{axis} · {strategy}")
        extra = [Line2D([], [], color="0.3", marker="o", linestyle="none",
                        label="mean ± 1 std, baseline's included" if bars else "one seed per point")]
        if fitted:
            extra.append(Line2D([], [], color="0.3", linewidth=1.4, label="fitted a·((t_full/t)^b − 1)"))
        extra += [Line2D([], [], color="crimson", linestyle="--", label=f"tolerance: {max_drop:g} pp"),
                  _note("drop: from the model's full-length run")]
        _finish_grid(fig, axes, _row_xlabels(axes, stage), _model_handles(cells, colors, drawn), extra,
                     f"Drop in {metric_label(metric)} against token length\n{STAGE_PHRASES.get(stage, stage)}")
    return fig


def plot_min_tokens_vs_params(min_tokens: pd.DataFrame, laws: pd.DataFrame) -> Figure | None:
    """The inverse scaling law as the paper draws it: minimum token length against the size of the encoder the axis
    reduces (log-log), each model named at its size, with CI bars and the fitted line per strategy."""
    size = "axis_params" if "axis_params" in min_tokens.columns else "params"
    table = min_tokens[np.isfinite(min_tokens[size].astype(float))]
    axes_present = [a for a in AXES if (table["axis"] == a).any()]
    if not axes_present or table["min_tokens_fit"].notna().sum() + table["min_tokens_measured"].notna().sum() == 0:
        return None
    max_drop = float(table["max_drop"].iloc[0])
    metric = table["metric"].iloc[0]
    confidence = float(table["confidence"].iloc[0]) if "confidence" in table.columns else 0.95
    intervals = table["ci_low"].notna().any()  # none with --bootstrap 0
    stage = table["stage"].iloc[0] if "stage" in table.columns else "pretrain"
    with _style():
        # inches: the panels' height is fixed, the space below them is what their legends need (set at the end)
        width, panel, above, below = 3.4 * len(axes_present) + 0.6, 2.75, 0.86, 0.0
        fig = Figure(figsize=(width, 5.4))
        fig.subplots_adjust(left=0.95 / width, right=1 - 0.2 / width, wspace=0.35)
        grid = fig.subplots(1, len(axes_present), squeeze=False)[0]
        keys: dict[str, Line2D] = {}  # the figure's legend of markers and lines, by label
        for ax, axis in zip(grid, axes_present):
            sub = table[table["axis"] == axis]
            strategies = _strategies(sub, axis)
            sizes = sub.groupby("model")[[size, "params"]].first().sort_values([size, "params"])[size]
            # models of one size (the cpu sizes share a text tower) share a tick, their names joined in the order
            # their points stand side by side around it
            ticks = sizes.groupby(sizes, sort=True).apply(lambda same: " / ".join(same.index))
            dodge = {model: 1.0 + 0.14 * (k - (len(same) - 1) / 2)
                     for same in sizes.groupby(sizes, sort=True).groups.values() for k, model in enumerate(same)}
            # Bars of crossings extrapolated far below the grid would stretch the axis to nonsense lengths; an
            # interval reaching below the axis (or to 0) ends in an arrow there.
            shortest = np.nanmin(pd.concat([sub["min_tokens_measured"], sub["min_tokens_fit"]]).to_numpy(float))
            longest = np.nanmax(sub["full_tokens"].to_numpy(float))
            lows = sub["ci_low"].to_numpy(float)
            lows = lows[np.isfinite(lows) & (lows > 0)]
            trained_low = np.nanmin(sub["shortest_tokens"].to_numpy(float)) / 1.3 \
                if "shortest_tokens" in sub.columns else np.inf
            bottom = max(1.0, min(shortest / 2, lows.min() / 1.3 if len(lows) else np.inf, trained_low)) \
                if np.isfinite(shortest) else np.nan
            open_ended, faces, strategy_handles = False, set(), []
            for i, strategy in enumerate(strategies):
                color = strategy_color(strategy)
                rows = sub[sub["strategy"] == strategy].sort_values(size)
                offset = rows["model"].map(dodge).to_numpy(float) * (1.0 + 0.03 * (i - (len(strategies) - 1) / 2))
                fitted = np.isfinite(rows["min_tokens_fit"].astype(float)).to_numpy()
                ok = rows[fitted]
                label = strategy
                law = laws[(laws["axis"] == axis) & (laws["strategy"] == strategy)]
                if len(law):
                    label += f" ({law['slope'].iloc[0]:.2f})"
                if len(ok):
                    x, fit = ok[size].to_numpy(float) * offset[fitted], ok["min_tokens_fit"].to_numpy(float)
                    ci_low = ok["ci_low"].to_numpy(float)
                    open_low = np.isfinite(ci_low) & (ci_low < bottom)
                    low = np.clip(fit - np.where(open_low, bottom, ci_low), 0, None)
                    high = np.clip(ok["ci_high"].to_numpy(float) - fit, 0, None)
                    ax.errorbar(x, fit, yerr=[low, high], color=color, capsize=3, linestyle="none")
                    # filled: the interval lies within the grid lengths around the minimum; open: it does not
                    solid = ok["resolved"].astype(bool).to_numpy() if intervals else np.ones(len(ok), bool)
                    faces |= {"filled" if keep else "open" for keep in solid}
                    for keep, face in ((solid, color), (~solid, "white")):
                        ax.plot(x[keep], fit[keep], color=color, marker="o", markersize=5.5,
                                markerfacecolor=face, linestyle="none")
                    if open_low.any():
                        open_ended = True
                        ax.plot(x[open_low], np.full(open_low.sum(), bottom), color=color,
                                marker="v", markersize=6, linestyle="none")
                measured = np.isfinite(rows["min_tokens_measured"].astype(float)).to_numpy()
                meas = rows[measured]
                ax.plot(meas[size] * offset[measured], meas["min_tokens_measured"], color=color, marker="s",
                        markerfacecolor="none", markersize=6, linestyle="none")
                strategy_handles.append((Line2D([], [], color=color, marker="o" if len(ok) else "s",
                                                markerfacecolor=color if len(ok) else "none", linestyle="none"),
                                         label if len(ok) else label + " (measured only)"))
                if len(law):
                    p = np.geomspace(law["params_min"].iloc[0] / 1.2, law["params_max"].iloc[0] * 1.2, 50)
                    ax.plot(p, 10 ** (law["intercept"].iloc[0] + law["slope"].iloc[0] * np.log10(p)), color=color,
                            linestyle="--", linewidth=1.2)
            ax.set_xscale("log")
            ax.set_yscale("log")
            # the models are the x ticks, named and sized as the paper labels them; the names of close sizes on
            # two rows
            if len(sizes):
                ax.set_xlim(sizes.min() / 1.6, sizes.max() * 1.6)
            at = ticks.index.to_numpy(float)
            staggered = _x_ticks(ax, at, [f"{name}\n{_human(v)}" for name, v in zip(ticks, at)])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            if np.isfinite(bottom) and np.isfinite(longest):
                ax.set_ylim(bottom, longest * 1.15)
            column = sub["axis_params_column"].iloc[0] if "axis_params_column" in sub.columns else size
            tower = {"vision_params": "vision", "text_params": "text"}.get(column, "model")
            ax.set_xlabel(f"{tower} parameters (log scale)")
            ax.set_ylabel(f"minimum {token_label(axis, stage)}\nwith drop ≤ {max_drop:g} pp (log scale)")
            ax.set_title(f"{axis} tokens")
            trained = _shortest_trained(ax, sub, size)
            if trained is not None:
                keys["shortest length trained"] = trained
            if open_ended:
                keys["interval below the axis"] = Line2D([], [], color="0.3", marker="v", linestyle="none")
            for face in faces:
                keys[f"fitted, {'resolved' if face == 'filled' else 'not resolved'}" if intervals
                     else "fitted crossing"] = Line2D([], [], color="0.3", marker="o", linestyle="none",
                                                      markerfacecolor="0.3" if face == "filled" else "white")
            ticks_in = 0.93 if staggered else 0.65  # tick labels and the axis label
            handles, labels = map(list, zip(*strategy_handles))
            ax.legend(handles, labels, title="strategy (slope of the log-log fit)", loc="upper center",
                      bbox_to_anchor=(0.5, -ticks_in / panel), ncol=2, frameon=False)
            below = max(below, ticks_in + 0.3 + 0.18 * -(-len(handles) // 2) + 0.1)  # title, rows, margin
        # what the markers and lines mean, once for every panel; an open circle's value is not an answer yet
        if intervals:
            keys[f"bars: {confidence:.0%} interval"] = _note("")
        keys["measured (grid point)"] = Line2D([], [], color="0.3", marker="s", markerfacecolor="none",
                                               linestyle="none")
        keys["log-log fit"] = Line2D([], [], color="0.3", linestyle="--")
        order = ["fitted, resolved", "fitted, not resolved", "fitted crossing", f"bars: {confidence:.0%} interval",
                 "measured (grid point)", "log-log fit", "shortest length trained", "interval below the axis"]
        labels = [label for label in order if label in keys]
        columns, lines = _legend_columns([Line2D([], [], label=label) for label in labels], width - 0.2, 1)
        key_height = 0.18 * lines + 0.1
        fig.set_size_inches(width, above + panel + below + key_height)
        fig.subplots_adjust(bottom=(below + key_height) / fig.get_figheight(), top=1 - above / fig.get_figheight())
        fig.legend([keys[label] for label in labels], labels, loc="lower center",
                   bbox_to_anchor=(0.5, 0.05 / fig.get_figheight()), ncol=columns, frameon=False)
        _title(fig, f"Minimum token length against encoder size\n{metric_label(metric)}, tolerance {max_drop:g} pp; "
                    f"{STAGE_PHRASES.get(stage, stage)}")
    return fig


def _shortest_trained(ax, rows: pd.DataFrame, size: str) -> Line2D | None:
    """Mark the shortest grid length of each curve of a scaling panel (a fitted minimum below it is extrapolated):
    one line when every curve shares it, a dash at each model's size otherwise. Returns the legend handle."""
    if "shortest_tokens" not in rows.columns:  # a table from before the column
        return None
    at = rows[[size, "shortest_tokens"]].dropna().drop_duplicates()
    if at.empty:
        return None
    style = {"color": "0.55", "linewidth": 1.1, "zorder": 0.5}
    if at["shortest_tokens"].nunique() == 1:
        ax.axhline(at["shortest_tokens"].iloc[0], linestyle=":", **style)
        return Line2D([], [], linestyle=":", **style)
    ax.plot(at[size], at["shortest_tokens"], marker="_", markersize=16, linestyle="none", **style)
    return Line2D([], [], marker="_", markersize=16, linestyle="none", **style)


def pareto_front(flops: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both less compute and higher accuracy, by compute."""
    order = np.lexsort((-accuracy, flops))
    best = np.maximum.accumulate(accuracy[order])
    keep = np.r_[True, accuracy[order][1:] > best[:-1]]
    return order[keep]


def with_compute(cells: pd.DataFrame) -> pd.DataFrame:
    """The grid cells whose training compute is known."""
    if "train_flops" not in cells.columns:
        return cells.iloc[:0]
    return cells[np.isfinite(cells["train_flops"].astype(float)) & (cells["train_flops"] > 0)]


def pareto_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells on the compute Pareto front (no other cell reaches a higher metric with less compute), by compute."""
    data = with_compute(cells)
    if data.empty:
        return data
    return data.iloc[pareto_front(data["train_flops"].to_numpy(float), data["metric_mean"].to_numpy(float))]


def plot_accuracy_vs_compute(cells: pd.DataFrame, stage: str = "pretrain") -> Figure | None:
    """Metric against training compute per grid cell (mean over seeds) with the Pareto front; None without FLOPs.
    The compute is that of the stages up to `stage` (`analysis.load.stage_compute`)."""
    data = with_compute(cells)
    if data.empty:
        return None
    metric = data["metric"].iloc[0]
    colors = model_colors(cells)
    markers = {"full": "*", "image": "o", "text": "s", "both": "^"}
    with _style():
        fig = Figure(figsize=(7.0, 4.0))  # a paper's text width, the legend on the right
        fig.subplots_adjust(left=0.1, right=0.7, bottom=0.13, top=0.9)
        ax = fig.subplots()
        point_colors = np.array([colors[m] for m in data["model"]])
        for axis, marker in markers.items():
            part = (data["axis"] == axis).to_numpy()
            if part.any():
                ax.scatter(data["train_flops"][part], data["metric_mean"][part], c=point_colors[part], marker=marker,
                           s=60 if axis == "full" else 22, alpha=0.85, edgecolors="none")
        points = pareto_cells(data)
        ax.step(points["train_flops"], points["metric_mean"], where="post", color="black", linewidth=1.3)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_flops(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        spent = "pre-training" if stage.startswith("pretrain") else "pre-training and fine-tuning"
        ax.set_xlabel(f"training compute of {spent} (FLOPs, log scale)")
        ax.set_ylabel(f"{metric_label(metric)} (%)")
        ax.set_title(f"{metric_label(metric).capitalize()} against training compute ({stage})")
        handles = [Line2D([], [], color=colors[m], marker="o", linestyle="none",
                          label=model_label(m, data.loc[data["model"] == m, "params"].iloc[0]))
                   for m in model_order(data)]
        names = {"full": "full length", "both": "both axes"}
        handles += [Line2D([], [], color="0.3", marker=mk, linestyle="none", label=names.get(ax_, f"{ax_} axis"))
                    for ax_, mk in markers.items() if (data["axis"] == ax_).any()]
        handles.append(_note("points: means over seeds"))
        handles.append(Line2D([], [], color="black", linewidth=1.3, label="Pareto front"))
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def _note(text: str) -> Line2D:
    """A legend line of text only."""
    return Line2D([], [], linestyle="none", label=text)


def _model_handles(cells: pd.DataFrame, colors: dict, drawn: set[str]) -> list[Line2D]:
    """Legend entries for the models `drawn`, with their sizes."""
    params = cells.groupby("model")["params"].first()
    return [Line2D([], [], color=colors[m], marker="o", linewidth=1.4, label=model_label(m, params[m]))
            for m in model_order(cells) if m in drawn]


class _style:
    """rc settings for the figures only, without touching the caller's global style."""

    def __enter__(self):
        import matplotlib

        self._ctx = matplotlib.rc_context(_STYLE)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def save_figure(fig: Figure, directory: Path, name: str, dpi: int = 150) -> list[Path]:
    """Write ``name``.png and ``name``.pdf into ``directory``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.png", directory / f"{name}.pdf"]
    with _style():  # pdf.fonttype is read when the file is written: TrueType, not Type 3 (which journals refuse)
        fig.savefig(paths[0], dpi=dpi)
        fig.savefig(paths[1])
    return paths
