"""Retain-set builder: one line with {a|b|c} alternatives stands for every combination.

The authors retain on every image of every other theme; a user typing retain prompts by hand writes a dozen. A line
such as "a {cat|house|portrait} in {Monet|Picasso|Rembrandt} style" expands to the 9 combinations, so a broad
retain set (neighbour concepts x everyday subjects) is one line in the node's retain box. The syntax is the
"dynamic prompts" one ComfyUI users know; nesting is not supported (a clear error says so).
"""
from __future__ import annotations

import itertools
import re
from typing import Sequence

from .errors import SpareInputError

MAX_EXPANDED = 2000  # a typo like {a|b|...} x 6 groups should fail loudly, not generate for an hour
_GROUP = re.compile(r"\{([^{}]*)\}")


def expand_alternatives(lines: Sequence[str], name: str = "retain") -> list[str]:
    """Every combination of the {a|b|c} groups of each line, in order, duplicates removed; lines without groups are
    kept as they are. Raises SpareInputError for unbalanced or nested braces, an empty alternative set, or more than
    MAX_EXPANDED prompts."""
    out: list[str] = []
    seen = set()
    for i, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        stripped = _GROUP.sub("", text)
        if "{" in stripped or "}" in stripped:
            raise SpareInputError(f"{name} line {i + 1} ('{text}') has unbalanced or nested braces; write groups as "
                                  "{a|b|c}, one level deep")
        parts = _GROUP.split(text)  # literal, group, literal, group, ...
        choices = []
        for k, part in enumerate(parts):
            if k % 2 == 0:
                choices.append([part])
            else:
                alts = [a.strip() for a in part.split("|")]
                if not any(alts):
                    raise SpareInputError(f"{name} line {i + 1} ('{text}') has an empty group {{{part}}}")
                choices.append(alts)
        count = 1
        for c in choices:
            count *= len(c)
        if len(out) + count > MAX_EXPANDED:
            raise SpareInputError(f"{name}: the {{a|b}} groups expand to more than {MAX_EXPANDED} prompts; use fewer "
                                  "alternatives")
        for combo in itertools.product(*choices):
            prompt = re.sub(r"\s+", " ", "".join(combo)).strip()
            if prompt and prompt.lower() not in seen:
                seen.add(prompt.lower())
                out.append(prompt)
    return out


def validate_prompts(prompts: Sequence[str] | str, name: str) -> list[str]:
    """Strip and check concept-like prompts: a non-empty list of non-empty strings."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SpareInputError(f"{name}: at least one {name} prompt is required")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise SpareInputError(f"{name} #{i + 1} is empty; give the text that names the {name}, e.g. 'Van Gogh'")
        out.append(p.strip())
    return out
