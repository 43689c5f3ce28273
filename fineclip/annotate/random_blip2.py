"""A BLIP-2 with random weights and a word-level processor, made without any download: the tiny one the
tests caption with, or one at blip2-opt-2.7b's dimensions (EVA ViT-g/14, Q-Former, OPT-2.7B) whose speed
the GPU check measures."""

from __future__ import annotations

import torch

WORDS = ["<pad>", "</s>", "<unk>", "describe", "this", "image", "in", "one", "sentence", ".", "a", "red", "blue",
         "green", "circle", "square", "star", "large", "small", "striped"]


def random_blip2(full_size: bool = False, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(Blip2ForConditionalGeneration with random weights, its Blip2Processor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                        bos_token="</s>", unk_token="<unk>")
    size, queries = (224, 32) if full_size else (32, 4)
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                               tokenizer=tokenizer, num_query_tokens=queries)  # adds the image token
    tokenizer = processor.tokenizer
    if full_size:
        vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                   num_attention_heads=16, image_size=224, patch_size=14)
        qformer = Blip2QFormerConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, encoder_hidden_size=1408)
        text = OPTConfig(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                         num_attention_heads=32, word_embed_proj_dim=2560, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    else:
        small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        vision = Blip2VisionConfig(**small, image_size=32, patch_size=8)
        qformer = Blip2QFormerConfig(**small, encoder_hidden_size=32, vocab_size=100)
        text = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                         num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=96, pad_token_id=0,
                         bos_token_id=1, eos_token_id=1)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=queries,
                         image_token_index=tokenizer.convert_tokens_to_ids(str(processor.image_token)))
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(dtype)
    return model, processor
