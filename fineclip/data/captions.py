"""The rule-based region caption (no model): shared by ``captioner=rule`` and the synthetic generator."""


def rule_caption(name: str, attributes: list[str] | tuple[str, ...] = ()) -> str:
    """"a large striped red circle": the article, the attributes in order, the class name."""
    words = [*(a.strip() for a in attributes if a and a.strip()), name.strip().replace("_", " ")]
    return "a " + " ".join(words)
