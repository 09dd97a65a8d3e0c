"""MiniCanvas harness: erase concepts from the bundled model with SPARE, its ablations and the baselines, and score
every edit with the UnlearnCanvas definitions (`python -m bench.minicanvas --help`: cli.py's docstring).

The harness is split by job; this module is its front door, re-exporting every public name of:

    budgets.py   what each method is asked to do: concepts, method names, Budget and the CLI presets, learning rates,
                 templates, prompt lists and retain splits, the named SPARE variants (SPARE_VARIANTS)
    memory.py    peak memory of one erasure
    judge.py     grading: the evaluation grid, the classifiers (Judge), UA / IRA / CRA / SFA, the erased lines
    methods.py   training: run_method (SPARE, ablations, variants, baselines) and sampling an erased model
    summary.py   the results file's figures: means with bootstrap intervals, drops, erased / clean counts
    dispatch.py  running: hosts, worker state, (concept, seed) tasks over processes, `run`
    cli.py       `python -m bench.minicanvas` (main)

Import order (no circles): budgets, memory <- judge, methods <- summary <- dispatch <- cli <- harness.

`run`, `LibraryHost` and `make_host` here read their inputs (concept_prompts, LR, peak_rss_reset, peak_rss_mb) from
this module on each call, as host_path.ComfyHost(harness) does: replacing `harness.concept_prompts` (the host tests
train on shorter lists) changes what both hosts train on. The same names in dispatch.py read budgets.py / memory.py.
"""
from __future__ import annotations

import sys

from spare_core.minicanvas.model import load as load_model

from . import dispatch
from .budgets import (EVAL_TEMPLATES, FEW_LISTED, GROW_UNLISTED, LR, LR_SCALE, METHODS, ERASABLE_OBJECTS, PROFILE_FLOOR_05,
                      QUICK_BASELINE_SCALE, QUICK_CONCEPTS, QUICK_METHODS, QUICK_SAMPLE_STEPS, REFERENCE_METHODS,
                      RETAIN_EXTRA, RETAIN_SETS, SHORT_STEPS, SPARE_VARIANTS, STANDARD_BASELINE_SEEDS,
                      STANDARD_ESD_STEPS, STANDARD_METHODS, ERASABLE_STYLES, TRAIN_TEMPLATE, Budget, SpareVariant, all_pairs,
                      concept_prompts, grow_order, listed_classes, parse_override, retention_split, split_variant)
from .cli import comfyui_version, main
from .dispatch import HOSTS, erase_concept, map_tasks, set_worker, worker_model
from .judge import (CLEAN_DROP, CLEAN_SFA_DROP, CLEAN_UA, CLEAN_UNLISTED_DROP, ERASED_UA, Judge, evaluate, grid,
                    split_metrics)
from .memory import peak_rss_mb, peak_rss_reset
from .methods import default_inputs, generate, run_method, sample_edited
from .summary import DROP_KEYS, SUMMARY_KEYS, summarize

__all__ = ["EVAL_TEMPLATES", "FEW_LISTED", "GROW_UNLISTED", "LR", "LR_SCALE", "METHODS", "OBJECTS",
           "PROFILE_FLOOR_05", "QUICK_BASELINE_SCALE", "QUICK_CONCEPTS", "QUICK_METHODS", "QUICK_SAMPLE_STEPS",
           "REFERENCE_METHODS", "RETAIN_EXTRA", "RETAIN_SETS", "SHORT_STEPS", "SPARE_VARIANTS",
           "STANDARD_BASELINE_SEEDS", "STANDARD_ESD_STEPS", "STANDARD_METHODS", "STYLES", "TRAIN_TEMPLATE", "Budget",
           "SpareVariant", "all_pairs", "concept_prompts", "grow_order", "listed_classes", "parse_override",
           "retention_split", "split_variant", "comfyui_version", "main", "HOSTS", "erase_concept", "map_tasks",
           "set_worker", "worker_model", "CLEAN_DROP", "CLEAN_SFA_DROP", "CLEAN_UA", "CLEAN_UNLISTED_DROP",
           "ERASED_UA", "Judge", "evaluate", "grid", "split_metrics", "peak_rss_mb", "peak_rss_reset",
           "default_inputs", "generate", "run_method", "sample_edited", "load_model", "DROP_KEYS", "SUMMARY_KEYS",
           "summarize", "LibraryHost", "make_host", "run"]


class LibraryHost(dispatch.LibraryHost):
    """dispatch.LibraryHost reading its inputs from this module (see the module docstring)."""

    def __init__(self, inputs=None, model: str = "unet"):
        super().__init__(inputs or sys.modules[__name__], model)


def make_host(name: str, inputs=None, model: str = "unet"):
    """dispatch.make_host with this module as the inputs (see the module docstring)."""
    return dispatch.make_host(name, inputs or sys.modules[__name__], model)


def run(methods=METHODS, concepts=None, budget=None, log=print, jobs: int = 1, host: str = "library", inputs=None):
    """dispatch.run with this module as the inputs (see the module docstring)."""
    return dispatch.run(methods, concepts, budget, log=log, jobs=jobs, host=host,
                        inputs=inputs or sys.modules[__name__])
