"""
The two figures of a run, as PNG in the run folder (matplotlib is optional: without it the tables still print).

  gains_by_domain.png   each method's change of the answer NLL and of accuracy against no_adapt, per domain and
                        overall, mean ± s.e. over the held-out targets (the paper's Figure 2, at toy scale)
  meta_training.png     the meta-training curve from metrics.jsonl: post-update improvement, scorer weights and
                        how they separate right from wrong examples, what the generator writes, the useful share

    python plots.py runs/default     # redraws both from results.json and metrics.jsonl
"""
import json
import os
import sys


def _pyplot():
    """matplotlib's pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def gains_by_domain(results, path):
    """Two panels of grouped bars: dnll (lower is better) and accuracy minus no_adapt's, with s.e. error bars."""
    plt = _pyplot()
    if plt is None:
        return None
    methods = [m for m in results["methods"] if m != "no_adapt"]
    groups = list(results["methods"]["no_adapt"]["by_domain"]) + ["overall"]
    cell = lambda m, g: results["methods"][m]["overall"] if g == "overall" else results["methods"][m]["by_domain"][g]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.4 * len(groups)), 7), sharex=True)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        axes[0].bar(xs, [cell(m, g)["dnll"] for g in groups], width, yerr=[cell(m, g)["dnll_se"] for g in groups],
                    label=m, capsize=2)
        # accuracy gain: the difference of means; its error bar is the method's own s.e. (not paired)
        axes[1].bar(xs, [cell(m, g)["acc"] - cell("no_adapt", g)["acc"] for g in groups], width,
                    yerr=[cell(m, g)["acc_se"] for g in groups], capsize=2)
    axes[0].set_ylabel("change of answer NLL (nats)\nlower is better")
    axes[1].set_ylabel("accuracy minus no_adapt's")
    for ax in axes:
        ax.axhline(0, color="black", linewidth=0.8)
    axes[1].set_xticks(range(len(groups)), [f"{g}\n(n={cell('no_adapt', g)['n']})" for g in groups])
    axes[0].legend(ncol=len(methods), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def meta_training(metrics_path, path):
    """The logged means against targets seen, one panel per quantity that the log has."""
    plt = _pyplot()
    if plt is None or not os.path.exists(metrics_path):
        return None
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    panels = [("improvement", "L_before - L_after (nats)"), ("w_mean", "mean scorer weight w"),
              ("w_correct_minus_wrong", "w(right example) - w(wrong)"), ("correct", "generator: right share"),
              ("same_answer", "generator: right, T's answer, not T"), ("is_target", "generator: T itself (left out)"),
              ("useful", "share of examples that help (g < 0)")]
    panels = [(k, label) for k, label in panels if any(k in r for r in rows)]   # a line of skipped steps has none
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3))
    for ax, (k, label) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        ax.plot([r["targets"] for r in rows], [r.get(k, float("nan")) for r in rows], marker=".")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("meta-training targets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(out):
    """Both figures of the run in `out`; returns the paths written (empty without matplotlib)."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    paths = [gains_by_domain(results, os.path.join(out, "gains_by_domain.png")),
             meta_training(os.path.join(out, "metrics.jsonl"), os.path.join(out, "meta_training.png"))]
    return [p for p in paths if p]


if __name__ == "__main__":
    written = draw(sys.argv[1] if len(sys.argv) > 1 else "runs/default")
    print("\n".join(f"wrote {p}" for p in written) or "matplotlib is not installed: pip install matplotlib")
