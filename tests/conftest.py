import pytest
import torch

from fineclip.data.synthetic import generate
from fineclip.models import create_model


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic data set (24 train, 8 val scenes of 64 px)."""
    return generate(tmp_path_factory.mktemp("synthetic"), train=24, val=8, size=64, seed=0)


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    return create_model("fineclip-tiny", freeze_text=False).eval()


@pytest.fixture()
def frozen_text_model():
    torch.manual_seed(0)
    return create_model("fineclip-tiny", freeze_text=True).eval()
