"""Export the weights of a fineclip checkpoint as a plain open_clip checkpoint.

    python -m fineclip.export runs/<run>/checkpoints/last.pt model.pt

The output holds the open_clip model's state dict (no optimizer, no wrapper prefix), loadable with
``open_clip.create_model(NAME, pretrained="model.pt")`` or ``open_clip.load_checkpoint``; NAME is
printed (it is the run's ``model.name``).
"""

from __future__ import annotations

import argparse
import sys

from fineclip.engine.checkpoint import load_checkpoint, save_checkpoint


def export(checkpoint: str, output: str) -> str:
    """Write the open_clip weights of ``checkpoint`` to ``output``; returns the model name."""
    state = load_checkpoint(checkpoint)
    prefix = "clip."
    weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if not weights:
        raise RuntimeError(f"{checkpoint} holds no fineclip model weights")
    save_checkpoint({"state_dict": weights}, output)
    return state.get("config", {}).get("model", {}).get("name", "?")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a fineclip checkpoint as an open_clip checkpoint.")
    parser.add_argument("checkpoint", help="fineclip checkpoint (e.g. runs/<run>/checkpoints/last.pt)")
    parser.add_argument("output", help="where to write the open_clip checkpoint")
    args = parser.parse_args(argv)
    try:
        name = export(args.checkpoint, args.output)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.output}: open_clip.create_model({name!r}, pretrained={args.output!r})")


if __name__ == "__main__":
    main()
