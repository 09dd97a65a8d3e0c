"""MiniCanvas harness, the results file's figures: per method and domain the means with 95% bootstrap intervals over
concepts and training seeds, the drops from the unerased model, and the concepts erased and cleanly erased.
"""
from __future__ import annotations

import numpy as np

from . import metrics
from .judge import CLEAN_DROP, CLEAN_SFA_DROP, CLEAN_UA, CLEAN_UNLISTED_DROP, ERASED_UA

SUMMARY_KEYS = ("UA", "IRA", "CRA", "synonym_UA", "SFA", "IRA_listed", "CRA_listed", "IRA_unlisted", "CRA_unlisted",
                "base_IRA_listed", "base_CRA_listed", "base_IRA_unlisted", "base_CRA_unlisted", "mean4")
DROP_KEYS = ("IRA_drop", "CRA_drop", "SFA_drop", "IRA_unlisted_drop", "CRA_unlisted_drop")
DERIVED_KEYS = ("mean3", "mean4") + DROP_KEYS  # what summarize adds to each run (report.pool_runs strips them)


def _ci(rows, key):
    """Mean and 95% bootstrap interval over concepts and training seeds."""
    by_concept = {}
    for r in rows:
        by_concept.setdefault(r["concept"], []).append(r[key])
    mean, lo, hi = metrics.bootstrap_ci(list(by_concept.values()))
    return {"mean": mean, "lo": lo, "hi": hi}


def summarize(per, base_acc, base_per, budget):
    """Per method: per domain mean + 95% interval of UA, IRA, CRA, synonym UA; the drop of IRA / CRA from the
    unerased model; concepts erased (mean UA >= ERASED_UA) and cleanly erased; per-concept means."""
    out = {}
    for method, rows in per.items():
        if not rows:
            continue
        res = {}
        for d in ("style", "object"):
            dr = [r for r in rows if r["domain"] == d]
            if not dr:
                continue
            keys = [k for k in SUMMARY_KEYS if all(k in r for r in dr)]
            res[d] = {k: _ci(dr, k)["mean"] for k in keys}
            res[d]["ci"] = {k: _ci(dr, k) for k in keys}
        for r in rows:
            r["mean3"] = (r["UA"] + r["IRA"] + r["CRA"]) / 3
            r["IRA_drop"] = base_per[r["concept"]]["IRA"] - r["IRA"]
            r["CRA_drop"] = base_per[r["concept"]]["CRA"] - r["CRA"]
            r["SFA_drop"] = base_per[r["concept"]]["SFA"] - r["SFA"]
            if "IRA_unlisted" in r:
                r["IRA_unlisted_drop"] = r["base_IRA_unlisted"] - r["IRA_unlisted"]
                r["CRA_unlisted_drop"] = r["base_CRA_unlisted"] - r["CRA_unlisted"]
                r["mean4"] = (r["UA"] + r["IRA_unlisted"] + r["CRA_unlisted"] + r["SFA"]) / 4
        concepts = {}
        for r in rows:
            concepts.setdefault(r["concept"], []).append(r)
        per_concept = {}
        for c, rs in concepts.items():
            pc = {k: float(np.mean([r[k] for r in rs])) for k in SUMMARY_KEYS + DROP_KEYS if all(k in r for r in rs)}
            pc["UA_min"] = float(min(r["UA"] for r in rs))
            pc["seeds"] = len(rs)
            pc["domain"] = rs[0]["domain"]
            pc["erased"] = pc["UA"] >= ERASED_UA
            pc["clean"] = (pc["UA"] >= CLEAN_UA and pc["IRA_drop"] <= CLEAN_DROP and pc["CRA_drop"] <= CLEAN_DROP
                           and pc["SFA_drop"] <= CLEAN_SFA_DROP
                           and pc.get("IRA_unlisted_drop", 0.0) <= CLEAN_UNLISTED_DROP
                           and pc.get("CRA_unlisted_drop", 0.0) <= CLEAN_UNLISTED_DROP)
            if "steps_used" in rs[0]:
                pc["steps_used"] = float(np.mean([r["steps_used"] for r in rs]))
            per_concept[c] = pc
        res.update({
            "mean3": _ci(rows, "mean3"), "IRA_drop": _ci(rows, "IRA_drop"), "CRA_drop": _ci(rows, "CRA_drop"),
            **{k: _ci(rows, k) for k in ("mean4", "IRA_unlisted_drop", "CRA_unlisted_drop")
               if all(k in r for r in rows)},
            "erased": sum(p["erased"] for p in per_concept.values()),
            "clean": sum(p["clean"] for p in per_concept.values()), "concepts": len(per_concept),
            "seeds": max(p["seeds"] for p in per_concept.values()),
            "quality_fd": _mean(rows, "quality_fd"), "seconds_per_concept": _mean(rows, "seconds"),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), "trainable_params": _mean(rows, "trainable_params"),
            "lora_bytes": _mean(rows, "lora_bytes"), "per_concept": per_concept, "runs": rows,
        })
        if "steps_used" in rows[0]:
            res["steps_used"] = _mean(rows, "steps_used")
        out[method] = res
    base = dict(base_acc)
    for d in ("style", "object"):
        dr = [b for b in base_per.values() if b["domain"] == d]
        if dr:
            base[d] = {k: float(np.mean([b[k] for b in dr])) for k in ("IRA", "CRA", "SFA")}
    base["per_concept"] = base_per
    return {"methods": out, "base": base, "budget": {k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in budget.__dict__.items()}}


def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None
