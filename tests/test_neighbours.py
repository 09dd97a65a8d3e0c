"""spare_core.neighbours (SPARE Nearest Concepts): ranking candidate concepts by the text encoder's token states, on
the bundled MiniCanvas model, whose neighbours and their damage are measured (bench/RESULTS.md)."""
import pytest
import torch

from spare_core import neighbours
from spare_core.errors import SpareInputError
from spare_core.minicanvas import data
from spare_core.minicanvas.model import load
from spare_core.prompts import MAX_EXPANDED, expand_alternatives

STYLES = ["ukiyo", "neon", "pastel", "sketch", "popart", "mosaic", "sunset", "forest", "blueprint", "lava"]
OBJECTS = ["circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond", "crescent", "arrow"]


@pytest.fixture(scope="module")
def model():
    return load()


def style_lines(names):
    return [data.prompt(s, "{" + "|".join(OBJECTS) + "}") for s in names]


def test_the_nearest_styles_are_the_ones_the_erasure_damages(model):
    """ukiyo's nearest style is sunset (the unlisted style its erasure takes with it, RESULTS "Which unlisted classes
    lose"); ring's nearest object is circle (ring took circle 75 -> 20)."""
    forget = [data.prompt("ukiyo", o) for o in OBJECTS]
    ranked = neighbours.rank(model.encode, forget, style_lines([s for s in STYLES if s != "ukiyo"]))
    assert ranked[0].line == data.prompt("sunset", "{" + "|".join(OBJECTS) + "}")
    assert [n.similarity for n in ranked] == sorted((n.similarity for n in ranked), reverse=True)
    assert all(-1.0 <= n.similarity <= 1.0 for n in ranked) and len(ranked) == 9
    forget = [data.prompt(s, "ring") for s in STYLES]
    objects = [data.prompt("{" + "|".join(STYLES) + "}", o) for o in OBJECTS if o != "ring"]
    assert neighbours.rank(model.encode, forget, objects)[0].line.endswith("circle image in {ukiyo|neon|pastel|"
                                                                           "sketch|popart|mosaic|sunset|forest|"
                                                                           "blueprint|lava} style.")


def test_a_line_is_the_mean_code_of_its_expansions(model):
    forget = [data.prompt("ukiyo", "star")]
    line = data.prompt("{neon|lava}", "star")
    (got,) = neighbours.rank(model.encode, forget, [line])
    codes = neighbours.prompt_codes(model.encode, forget + expand_alternatives([line]))
    expected = torch.nn.functional.cosine_similarity(codes[1:].mean(0), codes[0], dim=0)
    assert got.line == line and got.similarity == pytest.approx(float(expected), abs=1e-6)
    # the concept itself, reworded by a synonym the model reads alike, ranks above every other style
    ranked = neighbours.rank(model.encode, forget, [data.prompt(s, "star") for s in ("neon", "lava", "forest")] +
                             [data.prompt("ukiyo", "star").rstrip(".")])  # same tokens
    assert ranked[0].similarity == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs_name_the_input(model):
    forget = [data.prompt("ukiyo", "star")]
    with pytest.raises(SpareInputError, match="candidates is empty"):
        neighbours.rank(model.encode, forget, ["", "  "])
    with pytest.raises(SpareInputError, match="is one of the concept prompts"):
        neighbours.rank(model.encode, forget, [data.prompt("{ukiyo|neon}", "star")])
    with pytest.raises(SpareInputError, match="concepts"):
        neighbours.rank(model.encode, [], ["neon"])
    with pytest.raises(SpareInputError, match="candidates line 2 .* unbalanced"):
        neighbours.rank(model.encode, forget, ["neon", "{neon"])
    with pytest.raises(SpareInputError, match="count=0"):
        neighbours.nearest(model.encode, forget, ["neon"], 0)
    got = neighbours.nearest(model.encode, forget, style_lines(["neon", "lava", "sunset"]), 2)
    assert len(got) == 2 and got == neighbours.rank(model.encode, forget, style_lines(["neon", "lava", "sunset"]))[:2]


def test_default_candidates_expand():
    lines = neighbours.DEFAULT_CANDIDATES
    assert len(lines) == len(set(lines)) >= 90
    expanded = expand_alternatives(lines, "candidates")
    assert len(expanded) <= MAX_EXPANDED and all(len(expand_alternatives([ln])) >= 3 for ln in lines)
