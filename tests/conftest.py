"""Test set-up: the repository root on sys.path (spare_core, bench) without importing the pack's root __init__.py,
which needs ComfyUI. Tests that need ComfyUI use tests/comfy_fixtures.py and skip without COMFYUI_PATH."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

torch.set_num_threads(1)  # the tiny test models are overhead-bound: one thread is fastest and steady


@pytest.fixture(scope="session", autouse=True)
def no_model_patcher_outlives_the_tests():
    """After the last test (every module's fixtures torn down): no ComfyUI ModelPatcher may still be alive.

    One that is would be collected only at interpreter exit, after ComfyUI's module globals are gone, and its
    `__del__` would print "Exception ignored in ... ModelPatcher.__del__ ... 'NoneType' object has no attribute
    'ON_DETACH'" below the test summary. The cause is always something that keeps a MODEL / CLIP / VAE past its use
    (a module global, a closed host that kept its models): the failure names what holds each one. Nothing to check
    when no test imported ComfyUI."""
    yield
    mp = sys.modules.get("comfy.model_patcher")
    report = _live_patchers(mp.ModelPatcher) if mp is not None else ""
    if report:
        pytest.fail("ComfyUI ModelPatcher(s) still alive after the last test (each would print an 'Exception ignored "
                    "in ModelPatcher.__del__' traceback at exit):\n" + report, pytrace=False)


def _live_patchers(cls) -> str:
    """One line per live instance of `cls` (after a full collection) with what refers to it, and what refers to
    that; "" when none. Plain loops only: a comprehension naming the object would add a referrer of its own."""
    import gc

    gc.collect()
    live = []
    for obj in gc.get_objects():
        if issubclass(type(obj), cls):  # type(): no __class__ lookups on arbitrary objects
            live.append(obj)
    lines = []
    for patcher in live:
        holders = []
        first = _referrers(patcher, [live])
        for ref in first:
            name = _describe(ref, patcher)
            outer = []
            if not name.startswith("module "):
                for ref2 in _referrers(ref, [live, first]):
                    outer.append(_describe(ref2, ref))
            holders.append(name + (f" (held by {', '.join(outer[:3])})" if outer else ""))
        lines.append(f"  ModelPatcher of {type(patcher.model).__name__}, held by: {'; '.join(holders) or '?'}")
    return "\n".join(lines)


def _referrers(obj, skip: list) -> list:
    """gc referrers of `obj` less the lists in `skip` (this check's own) and frames."""
    import gc

    out = []
    for ref in gc.get_referrers(obj):
        mine = False
        for s in skip:
            mine = mine or ref is s
        if not mine and type(ref).__name__ != "frame":
            out.append(ref)
    return out


def _describe(ref, target) -> str:
    """`ref` (something referring to `target`) as "module m['name']", "Type['attr']" or "Type"."""
    if not isinstance(ref, dict):
        return type(ref).__name__
    key = "?"
    for k, v in ref.items():
        if v is target:
            key = k
            break
    for mod_name, mod in list(sys.modules.items()):
        if getattr(mod, "__dict__", None) is ref:
            return f"module {mod_name}[{key!r}]"
    return f"dict[{key!r}]"
