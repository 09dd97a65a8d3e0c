"""Paired comparison of two SPARE variants (or any two methods) run on the same concepts and training seeds.

    python -m bench.minicanvas.paired bench/runs/results_standard.json:spare bench/runs/rank8_all.json:spare-rank8

Both runs must use the same evaluation grid (images per pair, sampler steps): every (concept, training seed) run of A
is paired with B's run of the same concept and seed, so the grid's and the seed's luck cancel. Per metric: the mean
difference B - A with a 95% bootstrap interval over concepts (metrics.bootstrap_ci), how many pairs went up / down /
stayed, and the two-sided exact sign test over the pairs that moved. A per-concept table follows.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np

from . import metrics
from .budgets import ERASABLE_OBJECTS, ERASABLE_STYLES

METRICS = ("UA", "IRA", "CRA", "mean3", "synonym_UA", "SFA", "IRA_unlisted", "CRA_unlisted", "IRA_listed",
           "CRA_listed", "mean4")
# --across-lists: runs whose retain lists leave different classes unlisted; what still compares pair by pair is the
# erasure and the LOSS on each run's own unlisted classes (unerased minus erased, on the same classes)
ACROSS_LISTS = ("UA", "synonym_UA", "SFA", "IRA_unlisted_drop", "CRA_unlisted_drop")


def sign_test(up: int, down: int) -> float:
    """Two-sided exact binomial (p = 1/2) test over the pairs that moved; 1.0 when none moved."""
    n = up + down
    if n == 0:
        return 1.0
    k = min(up, down)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def runs_of(path_and_method: str) -> tuple[dict, dict]:
    """{(concept, seed): run} of one method in one results file, and the file's budget (grid settings)."""
    path, _, method = path_and_method.rpartition(":")
    if not path:
        raise SystemExit(f"{path_and_method!r}: expected RESULTS.json:METHOD")
    with open(path) as f:
        results = json.load(f)
    if method not in results["methods"]:
        raise SystemExit(f"{path}: no method {method!r}; it has {', '.join(results['methods'])}")
    return {(r["concept"], r["seed"]): r for r in results["methods"][method]["runs"]}, results.get("budget", {})


def compare(a: dict, b: dict, metric_names=METRICS) -> dict:
    """Per metric: mean B - A [95% CI over concepts], up / down / tie counts and the sign test's p."""
    keys = sorted(set(a) & set(b))
    out = {"pairs": len(keys), "metrics": {}}
    for m in metric_names:
        diffs = [(k[0], b[k][m] - a[k][m]) for k in keys if a[k].get(m) is not None and b[k].get(m) is not None]
        if not diffs:
            continue
        by_concept: dict = {}
        for concept, d in diffs:
            by_concept.setdefault(concept, []).append(d)
        mean, lo, hi = metrics.bootstrap_ci(list(by_concept.values()))
        up = sum(d > 1e-9 for _, d in diffs)
        down = sum(d < -1e-9 for _, d in diffs)
        out["metrics"][m] = {"mean": mean, "lo": lo, "hi": hi, "up": up, "down": down,
                             "tie": len(diffs) - up - down, "p": sign_test(up, down)}
    return out


def incomparable(budget_a: dict, budget_b: dict) -> str | None:
    """Why two runs cannot be compared pair by pair (another grid, or retain lists that leave other classes
    unlisted), or None. The growK lists (grow3near too) leave the same classes unlisted: comparable."""
    for key in ("seeds", "sample_steps", "retain_set"):
        if key == "retain_set" and all(str(x.get(key)).startswith("grow") for x in (budget_a, budget_b)):
            continue
        if budget_a.get(key) != budget_b.get(key):
            return f"the runs used different grids: {key} = {budget_a.get(key)} vs {budget_b.get(key)}"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.minicanvas.paired", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="RESULTS.json:METHOD (the reference)")
    ap.add_argument("b", help="RESULTS.json:METHOD (the variant)")
    ap.add_argument("--domain", choices=("style", "object"), help="only the erased styles, or only the objects")
    ap.add_argument("--across-lists", action="store_true",
                    help="runs of different retain sets (other classes unlisted): compare the erasure and the drop "
                         "on each run's own unlisted classes (" + ", ".join(ACROSS_LISTS) + ")")
    args = ap.parse_args(argv)
    (a, budget_a), (b, budget_b) = runs_of(args.a), runs_of(args.b)
    if args.domain:
        a = {k: r for k, r in a.items() if r.get("domain") == args.domain}
    problem = incomparable(*(({k: v for k, v in x.items() if k != "retain_set"} if args.across_lists else x)
                             for x in (budget_a, budget_b)))
    if problem:
        raise SystemExit(problem + ("" if args.across_lists or "retain_set" not in problem else
                                    " (--across-lists compares the drops on each run's own unlisted classes)"))
    result = compare(a, b, ACROSS_LISTS if args.across_lists else METRICS)
    if not result["pairs"]:
        raise SystemExit("no (concept, training seed) run is in both")
    print(f"{result['pairs']} (concept, training seed) pairs; B - A, 95% bootstrap CI over concepts\n")
    print("| metric | mean B - A [95% CI] | up / down / tie | sign test p |\n|---|---|---|---|")
    for m, r in result["metrics"].items():
        print(f"| {m} | {r['mean']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}] | {r['up']} / {r['down']} / {r['tie']} | "
              f"{r['p']:.3g} |")
    cells = ("UA", "IRA_unlisted_drop", "CRA_unlisted_drop") if args.across_lists else ("UA", "IRA", "CRA")
    head = " / ".join(c.replace("_unlisted_drop", " drop (unlisted)") for c in cells)
    print(f"\n| concept | A: {head} | B: {head} |\n|---|---|---|")
    shared = {k[0] for k in set(a) & set(b)}
    for concept in [c for c in ERASABLE_STYLES + ERASABLE_OBJECTS if c in shared]:
        cell = []
        for runs in (a, b):
            rs = [r for k, r in runs.items() if k[0] == concept and k in a and k in b]
            cell.append(" / ".join(f"{np.mean([r.get(m, np.nan) for r in rs]):.1f}" for m in cells))
        print(f"| {concept} | {cell[0]} | {cell[1]} |")


if __name__ == "__main__":
    main()
