"""Which candidate concepts an erasure is most likely to take with it: the candidates nearest the concept in the
text encoder's own token states, nearest first, to be named in the Distill node's retain list.

Why: a LoRA that erases a concept moves the concepts the network reads alike, and no retain loss protects a concept
the retain list does not name (bench/RESULTS.md, "Which unlisted classes lose"). Given many candidates (a long list of
styles, artists or objects), the ones worth naming are the nearest.

The code of a prompt is the mean of its token states minus the empty prompt's: over the positions that hold the prompt
(start token, words, end token; `prompt_positions`, from the tokenizer's word ids) where the encoder's output lines up
with its tokens, else over every position it returns; a line's code is the mean over its {a|b} expansions; the score
is the cosine between a candidate's code and the concepts' code. On MiniCanvas the 4 of 9 other classes it names
keep their looks better than 4 random ones (the other styles' IRA 97.8 against 88.1, the other objects' drop 8.6
points against 14.4) without knowing which token is the concept, which a real model does not say; with every
position counted (its code until 2026-12-06) it named the objects no better than a random choice (bench/RESULTS.md,
"Ranking the neighbours in the product"). `encode` is any callable that maps prompts to token states [N, L, D]
(ComfyUI's CLIP cond, MiniCanvas' text encoder): the ranking needs the text encoder only, not the diffusion model.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .errors import SpareInputError
from .prompts import expand_alternatives, validate_prompts


SUBJECTS = "{a portrait|a landscape|a city street|a cat|a bowl of fruit}"
STYLES = (
    "Claude Monet", "Vincent van Gogh", "Pablo Picasso", "Rembrandt", "Johannes Vermeer", "Leonardo da Vinci",
    "Salvador Dali", "Frida Kahlo", "Gustav Klimt", "Edvard Munch", "Paul Cezanne", "Henri Matisse",
    "Katsushika Hokusai", "Andy Warhol", "Roy Lichtenstein", "Jackson Pollock", "Georgia O'Keeffe", "Edward Hopper",
    "Alphonse Mucha", "Hieronymus Bosch", "J. M. W. Turner", "Caravaggio", "Wassily Kandinsky", "Piet Mondrian",
    "Rene Magritte", "Egon Schiele", "Amedeo Modigliani", "Pierre-Auguste Renoir", "Edgar Degas", "Paul Gauguin",
    "Thomas Kinkade", "Greg Rutkowski", "Studio Ghibli", "Makoto Shinkai", "Norman Rockwell",
)
MOVEMENTS = (
    "impressionism", "post-impressionism", "expressionism", "cubism", "surrealism", "art nouveau", "pop art",
    "ukiyo-e", "baroque", "renaissance", "pointillism", "abstract expressionism", "minimalism", "watercolor",
    "oil painting", "pencil sketch", "charcoal drawing", "ink wash", "anime", "comic book", "pixel art",
    "low poly 3D render", "photorealism", "cyberpunk", "steampunk", "vaporwave", "stained glass", "mosaic",
)
OBJECTS = (
    "a dog", "a cat", "a horse", "a bird", "a fish", "a car", "a truck", "an airplane", "a ship", "a bicycle",
    "a house", "a church", "a castle", "a bridge", "a tree", "a flower", "a mountain", "the sea", "a chair",
    "a guitar", "a clock", "a cup", "an apple", "a man", "a woman", "a child", "a soldier", "a train",
    "a tower", "a lighthouse",
)
DEFAULT_CANDIDATES = (
    [f"{SUBJECTS} in the style of {s}" for s in STYLES]
    + [f"{SUBJECTS}, {m}" for m in MOVEMENTS]
    + [f"{{a photo|a painting|a drawing}} of {o}" for o in OBJECTS]
)
"""The candidates SPARE Nearest Concepts ranks when the user gives none: common painters, styles and subjects, each
a builder line (its expansions share one code). A starting point: the user's own list of what must survive is
better."""


GENERIC_WORDS = frozenset(
    "a an the in of by on at with and or to for from as its style styles styled art artwork painting paintings "
    "painted picture image images photo photograph drawing drawn illustration render print portrait".split())
"""Words that say how, not what: left out when deciding whether a candidate line names a concept."""


class Neighbour(NamedTuple):
    line: str             # the candidate line as given ({a|b} groups kept)
    similarity: float     # cosine of its code to the concepts' code, in [-1, 1]
    names_concept: bool   # the line names a concept itself (every distinctive word of a concept prompt): never kept


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def names_a_concept(prompts: Sequence[str], concepts: Sequence[str]) -> bool:
    """Whether a candidate (its expansions `prompts`) names one of the concepts: every distinctive (not generic) word
    of some concept prompt is among the candidate's words ("Van Gogh style" -> "... in the style of Vincent van
    Gogh"). Retaining it would fight the erasure. A synonym with other words (a "nude figure" for "nudity") is not
    caught: the node's ranking output shows it at the top, for the user to remove."""
    have = set().union(*(words(p) for p in prompts))
    return any(distinct and distinct <= have for distinct in (words(c) - GENERIC_WORDS for c in concepts))


def prompt_positions(word_ids: Sequence[Sequence[Sequence[int]]], length: int,
                     lead: int | Sequence[int] = 1) -> Optional[list[int]]:
    """The positions of an encoder output of `length` tokens that hold the prompt -- each chunk's start token, words
    and end token, not its padding -- from the word ids a ComfyUI tokenizer gives (`tokenize(text,
    return_word_ids=True)`: 0 for start / end / padding, >= 1 for the prompt's words), one list of chunks per
    sub-tokenizer: those whose length is the output's are read at the same positions (SDXL: "g" and "l"; Flux: its
    T5, not the CLIP-L that gives only the pooled vector). lead: the tokens before the first word (1: CLIP's start
    token; 0: T5, which has none), one for all or one per sub-tokenizer; it places the end token of a chunk without
    words. An output as long as the sub-tokenizers with a start token and the others together is read as the two
    joined along the sequence, those with a start token first (SD3: its CLIPs' output, then T5's). None when the
    output lines up with neither: then every position counts. Why: a short prompt is mostly padding (73 of CLIP's 77
    positions for "a cat"), whose states outweigh the words' in a mean and dilute the difference between two prompts'
    codes (on MiniCanvas, leaving them out ranked the damaged objects better: bench/RESULTS.md, "Ranking the
    neighbours in the product")."""
    leads = [lead] * len(word_ids) if isinstance(lead, int) else list(lead)
    sizes = [sum(len(chunk) for chunk in chunks) for chunks in word_ids]
    same = [k for k, n in enumerate(sizes) if n == length]
    if same:
        return _positions([word_ids[k] for k in same], leads[same[0]])
    first = [k for k, ld in enumerate(leads) if ld > 0]  # joined: start-token tokenizers, then the others
    rest = [k for k, ld in enumerate(leads) if ld == 0]
    if not first or not rest or len({sizes[k] for k in first}) > 1 or len({sizes[k] for k in rest}) > 1 or \
            sizes[first[0]] + sizes[rest[0]] != length:
        return None
    head = _positions([word_ids[k] for k in first], leads[first[0]])
    tail = _positions([word_ids[k] for k in rest], 0)
    if head is None or tail is None:
        return None
    return head + [sizes[first[0]] + i for i in tail]


def _positions(word_ids: Sequence[Sequence[Sequence[int]]], lead: int) -> Optional[list[int]]:
    """prompt_positions for sub-tokenizers read at the same positions (None unless their chunks line up)."""
    shapes = [[len(chunk) for chunk in chunks] for chunks in word_ids]
    if any(s != shapes[0] for s in shapes):
        return None
    keep, offset = [], 0
    for c, n in enumerate(shapes[0]):
        words = [i for i in range(n) if any(chunks[c][i] > 0 for chunks in word_ids)]
        end = words[-1] + 1 if words else lead  # the end token's position
        keep += [offset + i for i in range(min(n, end + 1))]
        offset += n
    return keep


def prompt_codes(encode: Callable[[Sequence[str]], torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
    """[N, D]: each prompt's mean token state minus the empty prompt's, in float32 on the CPU."""
    with torch.no_grad():
        states = [encode([p]).float().cpu() for p in [""] + list(prompts)]  # one prompt at a time: lengths may differ
    means = torch.stack([s.reshape(-1, s.shape[-1]).mean(0) for s in states])
    return means[1:] - means[:1]


def rank(encode: Callable[[Sequence[str]], torch.Tensor], concepts: Sequence[str],
         candidates: Sequence[str]) -> list[Neighbour]:
    """Every candidate line, nearest to the concepts first. concepts: the concept prompts (as in the Distill node);
    candidates: one concept per line, {a|b} groups allowed (their expansions share one code). A line that names a
    concept itself (`names_a_concept`) is ranked but marked: `nearest` never returns it."""
    concepts = validate_prompts(concepts, "concepts")
    lines = [c.strip() for c in candidates if c.strip()]
    if not lines:
        raise SpareInputError("candidates is empty: write the concepts the erasure might take with it, one per line "
                              "(e.g. other painters' styles), {a|b} groups allowed")
    expand_alternatives(lines, "candidates")  # the checks, with the line numbers the user sees
    expanded = [expand_alternatives([line], "candidates") for line in lines]
    flat = [p for prompts in expanded for p in prompts]
    codes = prompt_codes(encode, list(concepts) + flat)
    target = codes[:len(concepts)].mean(0)
    out, i = [], len(concepts)
    for line, prompts in zip(lines, expanded):
        code = codes[i:i + len(prompts)].mean(0)
        i += len(prompts)
        out.append(Neighbour(line, float(torch.nn.functional.cosine_similarity(code, target, dim=0)),
                             names_a_concept(prompts, concepts)))
    return sorted(out, key=lambda n: -n.similarity)


def nearest(ranked: Sequence[Neighbour], count: int) -> list[Neighbour]:
    """The first `count` lines of a `rank` result (all of them when there are fewer) that do not name a concept."""
    if count < 1:
        raise SpareInputError(f"count={count}: must be at least 1 (how many of the candidates to name)")
    return [n for n in ranked if not n.names_concept][:count]
