"""An open_clip model with a Hugging Face (BERT) text tower in the wrapper: built from a local
folder, frozen and cached, its embeddings equal BERT's mean-pooled output through the projection,
and it trains."""

import json

import torch
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer, BertModel

from fineclip.cli import CONFIG_DIR
from fineclip.engine.trainer import train
from fineclip.models import create_model


def test_bert_text_tower_embeds_like_bert_mean_pooled_and_projected(tiny_bert):
    torch.manual_seed(0)
    model = create_model("fineclip-tiny", hf_text_tower=str(tiny_bert), freeze_text=True).eval()
    assert model.embed_dim == 64
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("clip.text."))
    texts = ["a red star on a gray background", "a large striped blue ring"]
    emb = model.encode_text(texts)

    bert = BertModel.from_pretrained(tiny_bert, add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
    assert batch.input_ids.eq(tokenizer.unk_token_id).sum() == 0  # every word is in the local vocabulary
    with torch.no_grad():
        hidden = bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask[..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        expected = torch.nn.functional.normalize(model.clip.text.proj(pooled), dim=-1)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)
    # the weights were read from the folder, not drawn at random
    torch.testing.assert_close(model.clip.text.transformer.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)

    calls = []
    encode = model._encode_tokens
    model._encode_tokens = lambda t: calls.append(list(t)) or encode(t)
    torch.testing.assert_close(model.encode_text(texts[::-1]), emb.flip(0))
    assert calls == []  # served from the cache of the frozen tower


def test_training_with_a_bert_text_tower(tiny_bert, synthetic_root, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"data.root={synthetic_root}", "data.synthetic.train=24", "data.synthetic.val=8",
            "data.val=null", "trainer.epochs=1", "trainer.progress=false",
            "trainer.tensorboard=false", "data.batch_size=8", "trainer.log_every=1",
            f"model.hf_text_tower={tiny_bert}", "model.freeze_text=true"])
    train(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    initial = BertModel.from_pretrained(tiny_bert, add_pooling_layer=False).state_dict()
    torch.testing.assert_close(saved["clip.text.transformer.encoder.layer.0.attention.self.query.weight"],
                               initial["encoder.layer.0.attention.self.query.weight"])  # frozen
