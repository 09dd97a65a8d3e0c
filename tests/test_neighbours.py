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
    # the concept itself, reworded (same tokens), ranks first with cosine 1: marked, and never among the nearest
    others = [data.prompt(s, "star") for s in ("neon", "lava", "forest")]
    ranked = neighbours.rank(model.encode, forget, others + [data.prompt("ukiyo", "star").rstrip(".")])
    assert ranked[0].similarity == pytest.approx(1.0, abs=1e-6) and ranked[0].names_concept
    assert not any(n.names_concept for n in ranked[1:])
    assert neighbours.nearest(ranked, 3) == ranked[1:] and neighbours.nearest(ranked, 2) == ranked[1:3]


def test_a_line_that_names_the_concept_is_never_kept():
    """Every distinctive word of a concept prompt in the candidate's expansions = the concept reworded; generic words
    (style, painting, a, of, ...) do not count, nor does a shared word alone."""
    names = neighbours.names_a_concept
    assert names(["a portrait in the style of Vincent van Gogh"], ["Van Gogh style"])
    assert names(["a photo of a cat", "a drawing of a cat"], ["a cat"])
    assert names(["a Claude Monet painting"], ["cat", "painting by Claude Monet"])  # any of the concepts
    assert not names(["a portrait in the style of Anthony van Dyck"], ["Van Gogh style"])  # "van" alone
    assert not names(["a photo of a dog"], ["a cat"]) and not names(["a nude figure"], ["nudity"])
    assert not names(["a painting in a style"], ["a painting in a style"])  # nothing distinctive: no claim


def test_bad_inputs_name_the_input(model):
    forget = [data.prompt("ukiyo", "star")]
    with pytest.raises(SpareInputError, match="candidates is empty"):
        neighbours.rank(model.encode, forget, ["", "  "])
    with pytest.raises(SpareInputError, match="concepts"):
        neighbours.rank(model.encode, [], ["neon"])
    with pytest.raises(SpareInputError, match="candidates line 2 .* unbalanced"):
        neighbours.rank(model.encode, forget, ["neon", "{neon"])
    with pytest.raises(SpareInputError, match="count=0"):
        neighbours.nearest(neighbours.rank(model.encode, forget, ["neon"]), 0)
    ranked = neighbours.rank(model.encode, forget, style_lines(["neon", "lava", "sunset"]))
    assert neighbours.nearest(ranked, 2) == ranked[:2] and neighbours.nearest(ranked, 5) == ranked


def test_default_candidates_expand():
    lines = neighbours.DEFAULT_CANDIDATES
    assert len(lines) == len(set(lines)) >= 90
    expanded = expand_alternatives(lines, "candidates")
    assert len(expanded) <= MAX_EXPANDED and all(len(expand_alternatives([ln])) >= 3 for ln in lines)


def test_prompt_positions_leave_the_padding_out():
    """The positions that hold a prompt (start token, words, end token) from a ComfyUI tokenizer's word ids: CLIP-like
    (a start token), T5-like (none), the empty prompt, sub-tokenizers read at the same positions (SDXL), several
    chunks; None where the output does not line up with the tokens (then the node uses every position)."""
    clip = [[0, 1, 2, 0, 0, 0]]  # <start> two words <end> <pad> <pad>
    assert neighbours.prompt_positions([clip], 6) == [0, 1, 2, 3]
    assert neighbours.prompt_positions([[[0, 0, 0, 0]]], 4) == [0, 1]  # the empty prompt: <start> <end>
    assert neighbours.prompt_positions([[[1, 2, 0, 0]]], 4, lead=0) == [0, 1, 2]  # T5: words <end>
    assert neighbours.prompt_positions([[[0, 0, 0]]], 3, lead=0) == [0]  # T5's empty prompt: <end>
    assert neighbours.prompt_positions([[[0, 1, 0, 0]], [[0, 1, 0, 0]]], 4) == [0, 1, 2]  # SDXL's g and l
    assert neighbours.prompt_positions([[[0, 1, 0], [0, 2, 0]]], 6) == [0, 1, 2, 3, 4, 5]  # two full chunks
    assert neighbours.prompt_positions([[[0, 1, 2]]], 3) == [0, 1, 2]  # no room for <end>: every position
    assert neighbours.prompt_positions([[[0, 1, 0, 0]], [[1, 0, 0, 0, 0]]], 5, lead=[1, 0]) == [0, 1]  # Flux: T5
    assert neighbours.prompt_positions([[[0, 0, 0, 0]], [[0, 0, 0, 0, 0]]], 5, lead=[1, 0]) == [0]  # its empty prompt
    # SD3: its CLIPs' output (g and l, a start token each) and T5's joined along the sequence, CLIP first
    sd3 = [[[0, 1, 0, 0]], [[0, 1, 0, 0]], [[1, 2, 0, 0, 0]]]
    assert neighbours.prompt_positions(sd3, 9, lead=[1, 1, 0]) == [0, 1, 2] + [4, 5, 6]
    assert neighbours.prompt_positions(sd3, 4, lead=[1, 1, 0]) == [0, 1, 2]  # without its T5: the CLIPs' alone
    two_chunks = [[[0, 1, 0], [0, 2, 0]], [[1, 0, 0]]]  # a CLIP of two chunks, then T5
    assert neighbours.prompt_positions(two_chunks, 9, lead=[1, 0]) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert neighbours.prompt_positions([[[0, 1, 0]], [[1, 0, 0, 0, 0]]], 8) is None  # no T5-like one named (lead 1)
    assert neighbours.prompt_positions(sd3, 10, lead=[1, 1, 0]) is None  # neither alone nor joined
    assert neighbours.prompt_positions([[[0, 1, 0]]], 5) is None  # an output of another length


def test_the_ranking_on_the_prompts_own_positions(model):
    """The node's code since 2026-12-06 (padding left out, as `prompt_positions` gives it on the demo CLIP): sunset
    (the unlisted style ukiyo's erasure takes with it) among ukiyo's 2 nearest styles, ring's nearest object circle
    (which positions are read: test_minicanvas_harness, test_unpadded_encode_averages_the_prompt_s_own_positions)."""
    from bench.minicanvas.budgets import unpadded_encode as own  # the bundled model through prompt_positions

    forget = [data.prompt("ukiyo", o) for o in OBJECTS]
    ranked = neighbours.rank(own, forget, style_lines([s for s in STYLES if s != "ukiyo"]))
    assert data.prompt("sunset", "{" + "|".join(OBJECTS) + "}") in [n.line for n in ranked[:2]]
    forget = [data.prompt(s, "ring") for s in STYLES]
    objects = [data.prompt("{" + "|".join(STYLES) + "}", o) for o in OBJECTS if o != "ring"]
    assert " circle image" in neighbours.rank(own, forget, objects)[0].line
