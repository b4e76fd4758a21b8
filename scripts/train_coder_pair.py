"""Train a shipped pair: a byte-level BPE tokenizer, an MoE main model, a dense Qwen3 draft distilled from it.

Reproducible: fixed seeds, single process, the CPython 3.11 standard library as text.

    .venv/bin/python scripts/train_coder_pair.py --pair tiny-coder
    .venv/bin/python scripts/train_coder_pair.py --pair small-coder

writes recipes/PAIR/main and recipes/PAIR/draft as Hugging Face checkpoints (config.json, model.safetensors,
tokenizer.json) that transformers loads as they are. On 2 cores: tiny-coder about 60 minutes (30 for the
main model, 30 for the draft) and then its context stages, about 30; small-coder about 125 (75 and 50) and then its context stages, about 35.

Stages, in order (STAGES). `base` trains the main model on rows of SEQ_LEN tokens and distils the draft from
it. A pair with context steps then continues both on rows of CONTEXT_LEN tokens, the recipes'
max_sequence_length: `main-context` the main model, `draft-context` the draft, distilled again from the main
model as it now is. Models trained on short rows only fall apart past them: small-coder's base main model's
held-out perplexity was 7.8 at positions 128-256, 31 at 512-768 and 48 at 768-1024, its draft's agreement with
it 0.21 after 1,920 tokens, and speculation on a 512-token prompt ran 0.65x main-only.
`--from-stage S` runs S and the stages after it from the checkpoints in OUT as the stages before S left them.
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
CONTEXT_LEN = 2048
CONTEXT_ROWS = 4  # per step: 8,192 tokens, twice the base stage's
CONTEXT_PEAK_LR = 1e-3  # a continuation, not a new start
GREEDY_TOKENS = 128  # the main model's greedy tokens at the end of each on-policy distillation row

COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=4096, rms_norm_eps=1e-6)
MOE_TRAINING = dict(router_aux_loss_coef=0.01, output_router_logits=True)


@dataclass(frozen=True)
class Pair:
    main_class: type
    main_config: object  # a transformers config
    draft_config: Qwen3Config
    main_steps: int
    draft_steps: int
    on_policy: bool = False  # half of each distillation batch the main model's greedy continuations
    main_context_steps: int = 0  # the main model's steps on CONTEXT_LEN rows after the base stage
    draft_context_steps: int = 0  # the draft's after that, a third of them on CONTEXT_LEN rows, the rest on SEQ_LEN ones


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
        # Its draft, of about the main model's size, distilled for as long as small-coder's (750 steps) after 250
        # main steps beat the main model on 256-token windows (held-out perplexity 8.99 against 9.23): the main
        # model trains longer here and the draft less.
        main_context_steps=750,
        draft_context_steps=300,
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
        on_policy=True,
        main_context_steps=250,
        draft_context_steps=750,
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


def batches(stream: np.ndarray, batch_size: int, seed: int, length: int = SEQ_LEN):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(stream) - length - 1, size=batch_size)
        yield torch.from_numpy(np.stack([stream[s : s + length] for s in starts]))


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)


def optimizer_step(model, optimizer, loss, step: int, steps: int, peak: float) -> None:
    """One step at the schedule's learning rate, gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, steps, peak, warmup=min(100, steps // 10))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


@dataclass(frozen=True)
class Rows:
    """How a stage reads the training text: rows of `length` tokens, `count` per step, at `peak` learning rate;
    `seed` draws the rows, `seed + 1` the on-policy rows and `seed + 2` which of them each step takes."""

    length: int
    count: int
    peak: float
    seed: int


@torch.no_grad()
def heldout_perplexity(model, stream: np.ndarray, length: int = SEQ_LEN, tokens: int = 64 * SEQ_LEN, skip: int = 0) -> float:
    """Perplexity over windows of `length` held-out tokens (`tokens` in all), not counting each window's first
    `skip` predictions: skip > 0 measures how well a model reads far into its context."""
    model.eval()
    windows = tokens // length
    starts = np.linspace(0, len(stream) - length - 1, windows).astype(int)
    batch = torch.from_numpy(np.stack([stream[s : s + length] for s in starts]))
    losses = []
    for chunk in batch.split(max(1, 4096 // length)):
        logits = model(input_ids=chunk).logits[:, skip:-1]
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, skip + 1 :].reshape(-1)).item())
    return math.exp(sum(losses) / len(losses))


def train_language_model(model, stream, steps: int, rows: Rows, log, name: str):
    """`steps` steps of next-token loss on the text (plus the router's balancing loss for an MoE)."""
    model.train()
    optimizer = adamw(model)
    started = time.time()
    for step, batch in zip(range(steps), batches(stream, rows.count, seed=rows.seed, length=rows.length)):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer_step(model, optimizer, loss, step, steps, rows.peak)
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {loss.item():.3f} {time.time() - started:.0f}s")
    return model.eval()


@torch.no_grad()
def greedy_continuations(main, stream: np.ndarray, count: int, length: int = SEQ_LEN, seed: int = 3, batch_size: int = 32) -> torch.Tensor:
    """The main model's greedy continuations of `count` prompts of the text, `length` tokens per row, the last
    GREEDY_TOKENS of them the main model's: the text speculation verifies when it decodes greedily."""
    prompt_tokens = length - GREEDY_TOKENS
    starts = np.random.default_rng(seed).integers(0, len(stream) - prompt_tokens, size=count)
    prompts = torch.from_numpy(np.stack([stream[s : s + prompt_tokens] for s in starts]))
    return torch.cat([
        main.generate(chunk, attention_mask=torch.ones_like(chunk), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False)
        for chunk in prompts.split(max(1, batch_size * SEQ_LEN // length))
    ])


@torch.no_grad()
def greedy_agreement(main, draft, stream: np.ndarray, count: int = 64, length: int = SEQ_LEN) -> float:
    """Share of the main model's greedy continuations of `count` held-out prompts (`length` tokens per row)
    that the draft's argmax predicts, token by token: the per-token acceptance of greedy speculation."""
    rows = greedy_continuations(main, stream, count, length)
    predicted = draft(input_ids=rows).logits.argmax(-1)[:, -GREEDY_TOKENS - 1 : -1]
    return (predicted == rows[:, -GREEDY_TOKENS:]).float().mean().item()


def distill_draft(draft, main, stream, steps: int, turns: tuple[Rows, ...], on_policy: bool, log, name: str) -> Qwen3ForCausalLM:
    """Train the draft to match the main model's next-token distribution (forward KL), plus the data loss, for
    `steps` steps, step i on rows of the kind turns[i % len(turns)].

    On policy, half of each step's rows are the main model's own greedy continuations (as in DistillSpec): a
    draft distilled on training text alone agrees less with the main model on the text the main model writes,
    which is what greedy speculation verifies."""
    feeds = {}
    for rows in dict.fromkeys(turns):
        greedy = rows.count // 2 if on_policy else 0
        pool = greedy_continuations(main, stream, 128 * greedy * SEQ_LEN // rows.length, rows.length, rows.seed + 1) if greedy else None
        if greedy:
            log(f"{name}: {len(pool)} greedy continuations of the main model, {rows.length} tokens each")
        feeds[rows] = (greedy, pool, batches(stream, rows.count - greedy, seed=rows.seed, length=rows.length), np.random.default_rng(rows.seed + 2))
    draft.train()
    optimizer = adamw(draft)
    started = time.time()
    for step in range(steps):
        rows = turns[step % len(turns)]
        greedy, pool, text, picks = feeds[rows]
        batch = next(text)
        if greedy:
            batch = torch.cat([batch, pool[picks.integers(0, len(pool), size=greedy)]])
        with torch.no_grad():
            teacher = F.log_softmax(main(input_ids=batch).logits, dim=-1)
        output = draft(input_ids=batch, labels=batch)
        student = F.log_softmax(output.logits, dim=-1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") / rows.length
        optimizer_step(draft, optimizer, kl + 0.1 * output.loss, step, steps, rows.peak)
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} kl {kl.item():.3f} ce {output.loss.item():.3f} {time.time() - started:.0f}s")
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


def long_context_report(main, draft, heldout: np.ndarray, log) -> None:
    """How both models read far into CONTEXT_LEN tokens, beside how they read SEQ_LEN."""
    for name, model in (("main", main), ("draft", draft)):
        log(f"{name} held-out perplexity: {heldout_perplexity(model, heldout):.2f} on {SEQ_LEN}-token windows, "
            f"{heldout_perplexity(model, heldout, CONTEXT_LEN, skip=CONTEXT_LEN // 2):.2f} past position {CONTEXT_LEN // 2}")
    log(f"draft agreement with the main model's greedy continuations of held-out text: {greedy_agreement(main, draft, heldout):.3f} "
        f"after {SEQ_LEN - GREEDY_TOKENS} tokens, {greedy_agreement(main, draft, heldout, 16, CONTEXT_LEN):.3f} after {CONTEXT_LEN - GREEDY_TOKENS}")


STAGES = ("base", "main-context", "draft-context")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="tiny-coder")
    parser.add_argument("--out", type=Path, help="default: recipes/PAIR")
    parser.add_argument("--from-stage", choices=STAGES, default="base", help="run this stage and the later ones, starting from OUT's checkpoints as the earlier stages left them")
    parser.add_argument("--main-steps", type=int, help="default: the pair's")
    parser.add_argument("--draft-steps", type=int, help="default: the pair's")
    parser.add_argument("--main-context-steps", type=int, help="default: the pair's")
    parser.add_argument("--draft-context-steps", type=int, help="default: the pair's")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pair = PAIRS[args.pair]
    out = args.out or Path("recipes") / args.pair
    first = STAGES.index(args.from_stage)
    main_context_steps = pair.main_context_steps if args.main_context_steps is None else args.main_context_steps
    draft_context_steps = pair.draft_context_steps if args.draft_context_steps is None else args.draft_context_steps

    def log(message: str) -> None:
        print(message, flush=True)

    tokenizer = train_tokenizer()
    train, heldout = token_stream(tokenizer, "train"), token_stream(tokenizer, "heldout")
    log(f"tokenizer: {tokenizer.get_vocab_size()} tokens; train {len(train)} tokens, held out {len(heldout)}")
    if first == 0:
        torch.manual_seed(0)
        base_rows = Rows(SEQ_LEN, args.batch_size, PEAK_LR, seed=1)
        main_model = train_language_model(pair.main_class(pair.main_config), train, args.main_steps or pair.main_steps, base_rows, log, "main")
        torch.manual_seed(0)
        base_rows = Rows(SEQ_LEN, args.batch_size, PEAK_LR, seed=2)
        draft = distill_draft(Qwen3ForCausalLM(pair.draft_config), main_model, train, args.draft_steps or pair.draft_steps, (base_rows,), pair.on_policy, log, "draft")
    else:
        main_model = pair.main_class.from_pretrained(out / "main", dtype=torch.float32)
        draft = Qwen3ForCausalLM.from_pretrained(out / "draft", dtype=torch.float32)
    if first <= 1 and main_context_steps:
        main_model.config.output_router_logits = True  # the router's balancing loss, as in the base stage
        long_rows = Rows(CONTEXT_LEN, CONTEXT_ROWS, CONTEXT_PEAK_LR, seed=5)
        main_model = train_language_model(main_model, train, main_context_steps, long_rows, log, "main, long context")
    if draft_context_steps:
        # Long rows and, twice as often, the base stage's short ones: the main model changed in its context stage,
        # and on policy, the long rows' greedy tokens all come after CONTEXT_LEN - GREEDY_TOKENS of text. Long
        # and short in turn (250 steps each) left the draft's agreement after 128 tokens at 0.827, where the
        # base pair's was 0.839.
        long_rows, short_rows = Rows(CONTEXT_LEN, CONTEXT_ROWS, CONTEXT_PEAK_LR, seed=6), Rows(SEQ_LEN, args.batch_size, CONTEXT_PEAK_LR, seed=9)
        draft = distill_draft(draft, main_model, train, draft_context_steps, (long_rows, short_rows, short_rows), pair.on_policy, log, "draft, long context")
    save(main_model, tokenizer, out / "main")
    save(draft, tokenizer, out / "draft")
    long_context_report(main_model, draft, heldout, log)


if __name__ == "__main__":
    main()
