"""``+experiment=detailclip_*`` follows the public DetailCLIP code where this framework had its own
defaults: the decoder (16 heads, layer-norm eps 1e-6) and its initialisation (trunc-normal head, Xavier
decoder), weight decay on every tensor of two or more dimensions, a warmup from 1e-6, and (from
scratch) a patch embedding frozen at its random init. Each is an option whose default is unchanged."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from fineclip.cli import CONFIG_DIR
from fineclip.engine.optim import build_optimizer
from fineclip.models import create_model
from fineclip.models.detail_heads import DetailCLIPHeads


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("experiment", ["detailclip_scratch", "detailclip_finetune"])
def test_the_detailclip_experiments_take_the_references_settings(experiment):
    cfg = _compose(f"+experiment={experiment}")
    assert {"decoder_heads": 16, "norm_eps": 1e-6, "init": "reference"}.items() <= dict(cfg.model.detailclip).items()
    assert cfg.optim.optimizer.no_decay == "ndim" and cfg.optim.scheduler.warmup_lr == 1e-6
    assert cfg.model.get("freeze_patch_embed", False) == (experiment == "detailclip_scratch")
    assert cfg.teacher.view_source == "image" and list(cfg.teacher.view_scale) == [0.14, 1.0]
    default = _compose("method=detailclip")  # the tiny demo keeps PyTorch's inits and 1e-5
    assert default.model.detailclip.init == "torch" and default.model.detailclip.norm_eps == 1e-5
    assert default.teacher.view_source == "batch"


def test_reference_init_and_norms_of_the_decoder_and_head():
    torch.manual_seed(0)
    heads = DetailCLIPHeads(128, 4, (8, 8), 8, hidden=512, bottleneck=64, out_dim=256, decoder_heads=16,
                            norm_eps=1e-6, init="reference")
    decoder = heads.decoder
    assert decoder.block.attn.num_heads == 16
    assert decoder.norm.eps == decoder.block.ln_1.eps == decoder.block.ln_2.eps == 1e-6
    for layer in [m for m in heads.head.mlp if isinstance(m, nn.Linear)]:  # DINO's head: N(0, 0.02²), bias 0
        assert abs(layer.weight.std().item() - 0.02) < 0.002 and not layer.bias.any()
    xavier = [decoder.embed.weight, decoder.block.attn.in_proj_weight, decoder.block.attn.out_proj.weight,
              decoder.block.mlp.c_fc.weight, decoder.block.mlp.c_proj.weight]
    for weight in xavier:  # U(−a, a), a = √(6 / (fan_in + fan_out)): std a/√3
        bound = math.sqrt(6 / (weight.shape[0] + weight.shape[1]))
        assert weight.abs().max() <= bound and abs(weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    biases = [decoder.embed.bias, decoder.block.attn.in_proj_bias, decoder.block.attn.out_proj.bias,
              decoder.block.mlp.c_fc.bias, decoder.block.mlp.c_proj.bias]
    assert not any(b.any() for b in biases)
    # the default is PyTorch's: the MLP's first layer is kaiming-uniform, bound 1/√fan_in, not std 0.02
    torch.manual_seed(0)
    plain = DetailCLIPHeads(128, 4, (8, 8), 8, hidden=512, bottleneck=64, out_dim=256)
    assert plain.head.mlp[0].weight.abs().max() > 0.05 and plain.decoder.norm.eps == 1e-5


def test_ndim_weight_decay_decays_embeddings_and_the_mask_token():
    model = create_model("fineclip-tiny", freeze_text=False, detailclip={})

    def decayed(rule):
        optimizer = build_optimizer(model, weight_decay=0.5, no_decay=rule)
        ids = {id(p) for p in optimizer.param_groups[0]["params"]}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    ndim, clip = decayed("ndim"), decayed("clip")
    for name in ("clip.positional_embedding", "clip.visual.positional_embedding", "clip.token_embedding.weight",
                 "detail.decoder.mask_token"):
        assert name in ndim and name not in clip, name
    expected = {n for n, p in model.named_parameters()
                if p.requires_grad and p.ndim >= 2 and not any(s in n for s in ("bias", "ln", "bn"))}
    assert ndim == expected


def test_a_frozen_patch_embedding_stays_at_its_init():
    model = create_model("fineclip-tiny", freeze_patch_embed=True)
    assert not model.clip.visual.conv1.weight.requires_grad
    assert model.clip.visual.transformer.resblocks[0].attn.in_proj_weight.requires_grad
    eva = create_model("fineclip-tiny-eva", freeze_patch_embed=True)
    assert not any(p.requires_grad for p in eva.clip.visual.trunk.patch_embed.proj.parameters())
