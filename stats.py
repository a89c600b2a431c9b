"""
The statistics of the evaluation, written out: mean and standard error, median, a two-sided sign test for paired
differences, the AUC of a ranking, and a correlation. Plain Python on lists of numbers; then the summaries that
evaluate.py makes of its per-target results (a method's (dnll, correct[, dnll_answer]) per target).

    python -m pytest test_mass.py -k statistics
"""
import math


def mean_se(xs):
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mu = sum(xs) / n
    return mu, (math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan"))


def median(xs):
    s = sorted(xs)
    return float("nan") if not s else (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def sign_test(diffs):
    """Two-sided sign test p-value of 'the median difference is 0' (ties dropped)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(pos, neg) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def auc(scores, labels):
    """P(score of a random positive > score of a random negative), ties count half; nan without both kinds."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def correlation(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


# ----------------------------------------------------------------------------- per-target results of evaluate.py

def summary(rows):
    """n, acc, acc_se, dnll, dnll_se, dnll_median over a list of (dnll, correct), and dnll_answer, dnll_answer_se
    over (dnll, correct, dnll_answer)."""
    dnll, acc = [r[0] for r in rows], [float(r[1]) for r in rows]
    (a, a_se), (d, d_se) = mean_se(acc), mean_se(dnll)
    out = {"n": len(rows), "acc": a, "acc_se": a_se, "dnll": d, "dnll_se": d_se, "dnll_median": median(dnll)}
    if rows and len(rows[0]) > 2:
        out["dnll_answer"], out["dnll_answer_se"] = mean_se([r[2] for r in rows])
    return out


def paired(per_target, a, b, keep):
    rows = [r for r in per_target if keep(r)]
    dd = [r[a][0] - r[b][0] for r in rows]
    da = [float(r[a][1]) - float(r[b][1]) for r in rows]
    (d, d_se), (x, x_se) = mean_se(dd), mean_se(da)
    out = {"n": len(rows), "dnll_diff": d, "dnll_diff_se": d_se, "dnll_diff_median": median(dd),
           "sign_test_p": sign_test(dd), "acc_diff": x, "acc_diff_se": x_se}
    if rows and len(rows[0][a]) > 2:
        out["dnll_answer_diff"], out["dnll_answer_diff_se"] = mean_se([r[a][2] - r[b][2] for r in rows])
    return out
