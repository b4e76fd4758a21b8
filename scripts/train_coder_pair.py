"""Train a shipped pair: a byte-level BPE tokenizer, an MoE main model, a dense Qwen3 draft distilled from it.

Reproducible: fixed seeds, single process, the CPython 3.11 standard library as text.

    .venv/bin/python scripts/train_coder_pair.py --pair tiny-coder
    .venv/bin/python scripts/train_coder_pair.py --pair small-coder

writes recipes/PAIR/main and recipes/PAIR/draft as Hugging Face checkpoints (config.json, model.safetensors,
tokenizer.json) that transformers loads as they are. On 2 cores: tiny-coder about 60 minutes (30 for the
main model, 30 for the draft), small-coder about 125 (75 and 50).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from compiler import corpus

END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 1024
SEQ_LEN = 256
PEAK_LR = 3e-3

COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=4096, rms_norm_eps=1e-6)
MOE_TRAINING = dict(router_aux_loss_coef=0.01, output_router_logits=True)


@dataclass(frozen=True)
class Pair:
    main_class: type
    main_config: object  # a transformers config
    draft_config: Qwen3Config
    main_steps: int
    draft_steps: int
    greedy_rows: int = 0  # rows of each distillation batch taken from the main model's greedy continuations


PAIRS = {
    # Main and draft of about the same cost per token: small enough to test everything on quickly.
    "tiny-coder": Pair(
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **COMMON, **MOE_TRAINING, hidden_size=256, intermediate_size=768, moe_intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, tie_word_embeddings=False,
        ),
        Qwen3Config(
            **COMMON, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
        ),
        main_steps=2000,
        draft_steps=2000,
    ),
    # A pair shaped for speculation, as deployed pairs are: a main model whose weights read per token exceed
    # the L3 cache (41 MiB in fp32), most of them in a shared expert every token uses, so a verify call over
    # several tokens reads little more than one token's call (5 positions: 1.6-1.7 calls in the decoding
    # loop); and a draft costing a tenth of a main call per proposal there.
    "small-coder": Pair(
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            **COMMON, **MOE_TRAINING, hidden_size=384, intermediate_size=1536, moe_intermediate_size=192,
            shared_expert_intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
        ),
        Qwen3Config(
            **COMMON, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
        ),
        main_steps=1500,
        draft_steps=3000,  # agreement with the main model's greedy continuations: 0.789 after 1000 steps, 0.839 after 3000, 0.843 after 4500
        greedy_rows=8,
    ),
}


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [corpus.read_text(p) for p in corpus.stdlib_files("train")]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_stream(tokenizer: Tokenizer, split: str) -> np.ndarray:
    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids: list[int] = []
    for path in corpus.stdlib_files(split):
        ids.extend(tokenizer.encode(corpus.read_text(path)).ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def batches(stream: np.ndarray, batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(stream) - SEQ_LEN - 1, size=batch_size)
        yield torch.from_numpy(np.stack([stream[s : s + SEQ_LEN] for s in starts]))


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)


def optimizer_step(model, optimizer, loss, step: int, steps: int) -> None:
    """One step at the schedule's learning rate, gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, steps, PEAK_LR)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


@torch.no_grad()
def heldout_perplexity(model, stream: np.ndarray, windows: int = 64) -> float:
    model.eval()
    starts = np.linspace(0, len(stream) - SEQ_LEN - 1, windows).astype(int)
    batch = torch.from_numpy(np.stack([stream[s : s + SEQ_LEN] for s in starts]))
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in batch.split(16)]
    model.train()
    return math.exp(sum(losses) / len(losses))


def train_main(pair: Pair, stream, steps: int, batch_size: int, log):
    torch.manual_seed(0)
    model = pair.main_class(pair.main_config)
    optimizer = adamw(model)
    started = time.time()
    for step, batch in zip(range(steps), batches(stream, batch_size, seed=1)):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer_step(model, optimizer, loss, step, steps)
        if step % 50 == 0 or step == steps - 1:
            log(f"main step {step}/{steps} loss {loss.item():.3f} {time.time() - started:.0f}s")
    return model.eval()


@torch.no_grad()
def greedy_continuations(main, stream: np.ndarray, count: int, batch_size: int = 32) -> torch.Tensor:
    """The main model's greedy continuations of `count` prompts of training text, SEQ_LEN tokens per row (half
    prompt, half continuation): the text speculation verifies when it decodes greedily."""
    prompt_tokens = SEQ_LEN // 2
    starts = np.random.default_rng(3).integers(0, len(stream) - prompt_tokens, size=count)
    prompts = torch.from_numpy(np.stack([stream[s : s + prompt_tokens] for s in starts]))
    length = SEQ_LEN - prompt_tokens
    return torch.cat([
        main.generate(chunk, attention_mask=torch.ones_like(chunk), max_new_tokens=length, min_new_tokens=length, do_sample=False)
        for chunk in prompts.split(batch_size)
    ])


@torch.no_grad()
def greedy_agreement(main, draft, stream: np.ndarray, count: int = 64) -> float:
    """Share of the main model's greedy continuations of `count` held-out prompts that the draft's argmax
    predicts, token by token: the per-token acceptance of greedy speculation."""
    rows = greedy_continuations(main, stream, count)
    predicted = draft(input_ids=rows).logits.argmax(-1)[:, SEQ_LEN // 2 - 1 : -1]
    return (predicted == rows[:, SEQ_LEN // 2 :]).float().mean().item()


def distill_draft(pair: Pair, main, stream, steps: int, batch_size: int, log) -> Qwen3ForCausalLM:
    """Train the draft to match the main model's next-token distribution (forward KL), plus the data loss.

    The pair's greedy_rows of each batch are the main model's own greedy continuations (on-policy data, as in
    DistillSpec): a draft distilled on training text alone agrees less with the main model on the text the
    main model writes, which is what greedy speculation verifies."""
    generated = pair.greedy_rows
    pool = greedy_continuations(main, stream, count=128 * generated) if generated else None
    if generated:
        log(f"distillation: {len(pool)} greedy continuations of the main model")
    picks = np.random.default_rng(4)
    torch.manual_seed(0)
    draft = Qwen3ForCausalLM(pair.draft_config)
    optimizer = adamw(draft)
    started = time.time()
    for step, text in zip(range(steps), batches(stream, batch_size - generated, seed=2)):
        batch = torch.cat([text, pool[picks.integers(0, len(pool), size=generated)]]) if generated else text
        with torch.no_grad():
            teacher = F.log_softmax(main(input_ids=batch).logits, dim=-1)
        output = draft(input_ids=batch, labels=batch)
        student = F.log_softmax(output.logits, dim=-1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") / SEQ_LEN
        optimizer_step(draft, optimizer, kl + 0.1 * output.loss, step, steps)
        if step % 50 == 0 or step == steps - 1:
            log(f"draft step {step}/{steps} kl {kl.item():.3f} ce {output.loss.item():.3f} {time.time() - started:.0f}s")
    return draft.eval()


def save(model, tokenizer: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # a training-time setting; inference does not need it
    model.config.eos_token_id = model.config.bos_token_id = tokenizer.token_to_id(END_OF_TEXT)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save(str(out / "tokenizer.json"))
    eot = END_OF_TEXT
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eot, "bos_token": eot, "pad_token": eot}, indent=2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="tiny-coder")
    parser.add_argument("--out", type=Path, help="default: recipes/PAIR")
    parser.add_argument("--main-steps", type=int, help="default: the pair's")
    parser.add_argument("--draft-steps", type=int, help="default: the pair's")
    parser.add_argument("--reuse-main", action="store_true", help="load OUT/main instead of training it again (same result, saves time)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pair = PAIRS[args.pair]
    out = args.out or Path("recipes") / args.pair

    def log(message: str) -> None:
        print(message, flush=True)

    tokenizer = train_tokenizer()
    train, heldout = token_stream(tokenizer, "train"), token_stream(tokenizer, "heldout")
    log(f"tokenizer: {tokenizer.get_vocab_size()} tokens; train {len(train)} tokens, held out {len(heldout)}")
    if args.reuse_main:
        main_model = pair.main_class.from_pretrained(out / "main", dtype=torch.float32).eval()
    else:
        main_model = train_main(pair, train, args.main_steps or pair.main_steps, args.batch_size, log)
        save(main_model, tokenizer, out / "main")
    log(f"main held-out perplexity {heldout_perplexity(main_model, heldout):.2f}")
    draft = distill_draft(pair, main_model, train, args.draft_steps or pair.draft_steps, args.batch_size, log)
    save(draft, tokenizer, out / "draft")
    log(f"draft held-out perplexity {heldout_perplexity(draft, heldout):.2f}")
    log(f"draft agreement with the main model's greedy continuations of held-out text {greedy_agreement(main_model, draft, heldout):.3f}")


if __name__ == "__main__":
    main()
