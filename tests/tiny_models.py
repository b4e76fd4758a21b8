"""Random-init tiny checkpoints written in the Hugging Face layout, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from compiler import corpus

VOCAB = 320


def tiny_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([corpus.read_text(p) for p in corpus.stdlib_files("train")[:20]], trainer=trainer)
    return tokenizer


def moe_config(**overrides) -> Qwen3MoeConfig:
    options = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=512, eos_token_id=0,
    )
    return Qwen3MoeConfig(**(options | overrides))


def dense_config(**overrides) -> Qwen3Config:
    options = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=0,
    )
    return Qwen3Config(**(options | overrides))


def save_model(model, tokenizer: Tokenizer, folder: Path, seed: int, scale: float = 0.2) -> Path:
    """Random weights at a scale that gives peaked, varied logits (the default init is nearly uniform)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.8, 1.2)
            else:
                parameter.normal_(0.0, scale)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def make_pair(root: Path, tokenizer: Tokenizer | None = None) -> tuple[Path, Path]:
    tokenizer = tokenizer or tiny_tokenizer()
    main = save_model(Qwen3MoeForCausalLM(moe_config()), tokenizer, root / "main", seed=1)
    draft = save_model(Qwen3ForCausalLM(dense_config()), tokenizer, root / "draft", seed=2)
    return main, draft


def write_recipe(root: Path, name: str = "tiny", extra: str = "", draft: str = "") -> Path:
    """A recipe for the pair in root/main and root/draft; `extra` adds top-level settings, `draft` the draft's own
    (indented under it)."""
    path = root / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmain:\n  checkpoint: main\ndraft:\n  checkpoint: draft\n{draft}export:\n  max_sequence_length: 256\n"
        f"calibrate:\n  max_tokens: 1024\nverify:\n  tokens: 512\n{extra}"
    )
    return path
