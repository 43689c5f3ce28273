import os

import pytest
import torch

# nothing in the tests may reach a model hub: a lookup that would download fails at once
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fineclip.data.synthetic import generate
from fineclip.models import create_model


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic data set (24 train, 8 val scenes of 64 px). A config that trains on it must
    say so (data.synthetic.train=24 data.synthetic.val=8), or the data is regenerated at full size."""
    return generate(tmp_path_factory.mktemp("synthetic"), train=24, val=8, size=64, seed=0)


@pytest.fixture(scope="session")
def trained_tiny_run(synthetic_root, tmp_path_factory):
    """One training run of the tiny model on ``synthetic_root`` (1 epoch of batch 8, all three losses),
    shared by the tests that need *a* trained checkpoint and its run folder: it evaluates box
    classification, retrieval and segmentation at the end and logs the feature maps of 2 val images."""
    from hydra import compose, initialize_config_dir

    from fineclip.cli import CONFIG_DIR
    from fineclip.engine.trainer import train

    run_dir = tmp_path_factory.mktemp("trained_tiny") / "run"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"data.root={synthetic_root}", "data.synthetic.train=24", "data.synthetic.val=8", "data.batch_size=8",
            "trainer.epochs=1", "trainer.progress=false", "trainer.log_maps=2", "eval.segmentation=true",
            "eval.probe_steps=5"])
    train(cfg, run_dir)
    return run_dir


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    return create_model("fineclip-tiny", freeze_text=False).eval()


@pytest.fixture()
def frozen_text_model():
    torch.manual_seed(0)
    return create_model("fineclip-tiny", freeze_text=True).eval()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A local Hugging Face folder: a 2-layer BERT of width 32 and a vocabulary of the synthetic
    captions' words, written here (no hub)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from fineclip.data.synthetic import BACKGROUNDS, COLOURS, SHAPES, SIZES, TEXTURES

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "on", "and", "background", "shapes",
             "shape", "photo", "of", ",", ":", ".", "two", "three", "four", "top", "bottom", "left", "right", "centre",
             *SHAPES, *COLOURS, *BACKGROUNDS, *TEXTURES, *SIZES]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(dict.fromkeys(words)), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpu_check():
    """scripts/gpu_check.py as a module (its rows run on the CPU in the tests)."""
    import importlib
    import sys

    from fineclip.cli import CONFIG_DIR

    sys.path.insert(0, str(CONFIG_DIR.parent / "scripts"))
    return importlib.import_module("gpu_check")
