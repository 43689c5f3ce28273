"""The rule-based region caption (no model): shared by ``captioner=rule`` and the synthetic generator."""

from collections.abc import Sequence
from itertools import combinations, product


def rule_caption(name: str, attributes: list[str] | tuple[str, ...] = ()) -> str:
    """"a large striped red circle": the article, the attributes in order, the class name."""
    words = [*(a.strip() for a in attributes if a and a.strip()), name.strip().replace("_", " ")]
    return "a " + " ".join(words)


def attribute_swaps(attributes: Sequence[str], changed: int, kinds: Sequence[Sequence[str]]) -> list[list[str]]:
    """Every attribute list with exactly ``changed`` of ``attributes`` replaced by another value of the same kind
    (``kinds``: the value lists, e.g. colours, textures, sizes), in a fixed order: the hard negatives of a
    rule caption."""
    kind_of = {value: values for values in kinds for value in values}
    swaps = []
    for positions in combinations(range(len(attributes)), changed):
        options = [[v for v in kind_of[attributes[p]] if v != attributes[p]] for p in positions]
        for choice in product(*options):
            swapped = list(attributes)
            for p, value in zip(positions, choice, strict=True):
                swapped[p] = value
            swaps.append(swapped)
    return swaps


def hard_negatives(name: str, attributes: Sequence[str], kinds: Sequence[Sequence[str]], rng,
                   count: int = 10) -> list[str]:
    """Up to ``count`` rule captions of a region with one of its attributes swapped within its kind ("a large striped
    blue circle" for "a large striped red circle"), drawn by ``rng`` (a ``random.Random``)."""
    options = [rule_caption(name, swapped) for swapped in attribute_swaps(attributes, 1, kinds)]
    return rng.sample(options, min(count, len(options)))
