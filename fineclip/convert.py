"""Convert a weights file of any recognised format into an open_clip checkpoint for a model config.

    python -m fineclip.convert IN OUT model=vit_b16 [model.KEY=VALUE ...]

IN is read as ``fineclip/models/weights.py`` recognises it (fineclip or open_clip training checkpoint, plain
open_clip state dict, OpenAI's TorchScript archive), loaded strictly into the model of the config (a file
that does not fit names its missing and unexpected keys; OpenAI's weights are refused by a GELU model),
and written as ``{"state_dict": ...}``: ``open_clip.create_model(NAME, pretrained=OUT)`` reads it.
"""

from __future__ import annotations

import argparse
import logging

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fineclip.cli import CONFIG_DIR, exit_on_user_error
from fineclip.engine.checkpoint import save_checkpoint
from fineclip.errors import user_errors_unwrapped

log = logging.getLogger("fineclip.convert")


def convert(source: str, output: str, overrides: list[str]) -> str:
    """Write the weights of ``source`` as an open_clip checkpoint of the configured model; returns its name."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    with user_errors_unwrapped():
        model = instantiate(cfg.model, checkpoint=source)
    save_checkpoint({"state_dict": model.clip.state_dict()}, output)
    return cfg.model.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="the weights file to convert")
    parser.add_argument("output", help="where to write the open_clip checkpoint")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=vit_b16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name = exit_on_user_error(lambda: convert(args.source, args.output, args.overrides), log)
    print(f"wrote {args.output}: open_clip.create_model({name!r}, pretrained={args.output!r})")


if __name__ == "__main__":
    main()
