"""The evaluation report's plots, as PNG files (matplotlib's Agg canvas; pyplot is never
imported, so no process-wide backend or figure state is touched):

- ``score_scatter.png``: predicted score against the truth score (rating samples);
- ``confusion_referring_short.png``: truth distortion family set against the one the short
  referring answer names (counts; the diagonal is ``referring_short.type_acc``);
- ``grounding_mappings.png``: point-in-mask and mIoU per text-to-point mapping, on the
  generated and on the teacher-forced true answers, per grounding subtask, chance dashed.

:func:`write_plots` returns ``[(file name, caption)]`` for what it wrote; nothing when
matplotlib is not installed (it comes with mlflow).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence

from iqa_spider.evaluate.metrics import distortion_families

log = logging.getLogger(__name__)

MAX_CLASSES = 12   # confusion matrix: the most frequent truth labels, the rest as "other"


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, folder: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name), format="png")
    return name


def _score_scatter(samples: Sequence[dict], metrics: dict, folder: str):
    rs = [s for s in samples if s["task"] == "rating" and s.get("score") is not None
          and s.get("target_score") is not None]
    if not rs:
        return None
    fig = _figure(4.5, 4.2)
    ax = fig.add_subplot()
    ax.scatter([s["target_score"] for s in rs], [s["score"] for s in rs], s=14, alpha=0.7)
    ax.plot([1, 5], [1, 5], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0.8, 5.2), ylim=(0.8, 5.2), xlabel="truth score (quality_score)", ylabel="predicted score")
    m = metrics.get("rating", {})
    ax.set_title(f"rating: SRCC {m.get('srcc', float('nan')):.3f}, PLCC {m.get('plcc', float('nan')):.3f}, "
                 f"n {len(rs)}", fontsize=9)
    return _save(fig, folder, "score_scatter.png"), "Predicted score against the truth score (rating samples)."


def _set_label(families) -> str:
    return "+".join(sorted(families)) or "none"


def _confusion(samples: Sequence[dict], folder: str):
    ss = [s for s in samples if s["task"] == "referring_short"]
    if not ss:
        return None
    truth = [_set_label(s["truth_families"]) for s in ss]
    pred = [_set_label(distortion_families(s["pred"])) for s in ss]
    classes = [c for c, _ in Counter(truth).most_common(MAX_CLASSES)]
    classes += [] if "none" in classes else ["none"]   # the answer "No visible distortion." has a column
    if any(t not in classes for t in truth + pred):
        classes.append("other")
    index = {c: i for i, c in enumerate(classes)}
    counts = [[0] * len(classes) for _ in classes]
    for t, p in zip(truth, pred):
        counts[index.get(t, index.get("other"))][index.get(p, index.get("other"))] += 1
    k = len(classes)
    fig = _figure(2.2 + 0.45 * k, 1.8 + 0.4 * k)
    ax = fig.add_subplot()
    im = ax.imshow(counts, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    for i in range(k):
        for j in range(k):
            if counts[i][j]:
                ax.text(j, i, str(counts[i][j]), ha="center", va="center", fontsize=6,
                        color="white" if counts[i][j] > max(map(max, counts)) / 2 else "black")
    ax.set(xlabel="answer's family set", ylabel="truth family set")
    ax.set_title(f"referring_short: distortion families, n {len(ss)}", fontsize=9)
    return (_save(fig, folder, "confusion_referring_short.png"),
            "Distortion-type confusion (referring_short): truth family set (rows) against the families the "
            "answer names (columns); 'none' is no distortion, 'other' the rarer sets.")


def _mappings(metrics: dict, chance: dict, folder: str):
    g = metrics.get("grounding") or {}
    subs = [s for s in ("hyd", "sid", "dao", "all") if s in g]
    if not subs:
        return None
    fig = _figure(9.0, 2.4 * len(subs) + 0.4)
    names = list(g[subs[0]]["mapping"])
    x = list(range(len(names)))
    for r, sub in enumerate(subs):
        for c, key in enumerate(("point_acc", "miou")):
            ax = fig.add_subplot(len(subs), 2, 2 * r + c + 1)
            gen = [g[sub]["mapping"][m][key] for m in names]
            forced = [g[sub]["forced"][m][key] for m in names]
            ax.bar([i - 0.2 for i in x], gen, 0.4, label="generated answers")
            ax.bar([i + 0.2 for i in x], forced, 0.4, label="true answers (forced)")
            ch = ((chance.get("grounding") or {}).get(sub) or {}).get(key)
            if ch is not None:
                ax.axhline(ch, color="black", ls="--", lw=1, label="chance")
            ax.set_xticks(x, names, fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_title(f"grounding.{sub}: {'point in mask' if key == 'point_acc' else 'mIoU'} "
                         f"(n {g[sub]['n']:.0f})", fontsize=9)
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    return (_save(fig, folder, "grounding_mappings.png"),
            "Grounding: point-in-mask accuracy and mIoU per text-to-point mapping, on the model's answers "
            "and on the teacher-forced true answers; dashed: chance.")


def write_plots(report: dict, samples: Sequence[dict], folder: str) -> list[tuple[str, str]]:
    """The plots of one evaluation as PNG files in ``folder``; ``[(file name, caption)]``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("evaluate: matplotlib is not installed, the report has no plots")
        return []
    os.makedirs(folder, exist_ok=True)
    out = []
    for made in (_score_scatter(samples, report["metrics"], folder), _confusion(samples, folder),
                 _mappings(report["metrics"], report.get("chance") or {}, folder)):
        if made:
            out.append(made)
    return out
