"""Experiment: a Qwen2-MoE main (shared expert) and two candidate drafts distilled in one pass."""
import sys, time, math, json
from pathlib import Path
sys.path.insert(0, "/work/main/scripts"); sys.path.insert(0, "/work/main")
import numpy as np, torch, torch.nn.functional as F
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM
import train_tiny_coder as t

MAIN = dict(vocab_size=t.VOCAB_SIZE, hidden_size=384, intermediate_size=1536, moe_intermediate_size=192,
            shared_expert_intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
            tie_word_embeddings=False, router_aux_loss_coef=0.01, output_router_logits=True)
DRAFTS = {
  "d128": dict(vocab_size=t.VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True),
  "d256": dict(vocab_size=t.VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True),
}
out = Path(sys.argv[1]); main_steps = int(sys.argv[2]); draft_steps = int(sys.argv[3]); bs = 16
torch.set_num_threads(2)
log = lambda m: print(m, flush=True)
tok = t.train_tokenizer()
train, held = t.token_stream(tok, "train"), t.token_stream(tok, "heldout")
log(f"train {len(train)} held {len(held)}")
if (out / "main" / "model.safetensors").exists():
    main = Qwen2MoeForCausalLM.from_pretrained(out / "main", dtype=torch.float32).eval()
else:
    torch.manual_seed(0)
    main = Qwen2MoeForCausalLM(Qwen2MoeConfig(**MAIN))
    opt = torch.optim.AdamW(main.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    st = time.time()
    for step, batch in zip(range(main_steps), t.batches(train, bs, seed=1)):
        for g in opt.param_groups: g["lr"] = t.learning_rate(step, main_steps, 3e-3)
        loss = main(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(main.parameters(), 1.0); opt.step()
        if step % 25 == 0 or step == main_steps - 1: log(f"main {step}/{main_steps} loss {loss.item():.3f} {time.time()-st:.0f}s")
    main.eval(); t.save(main, tok, out / "main")
log(f"main ppl {t.heldout_perplexity(main, held):.2f}")
drafts, opts = {}, {}
for name, cfg in DRAFTS.items():
    torch.manual_seed(0)
    drafts[name] = Qwen3ForCausalLM(Qwen3Config(**cfg))
    opts[name] = torch.optim.AdamW(drafts[name].parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
st = time.time()
for step, batch in zip(range(draft_steps), t.batches(train, bs, seed=2)):
    with torch.no_grad():
        teacher = F.log_softmax(main(input_ids=batch).logits, dim=-1)
    msg = []
    for name, d in drafts.items():
        for g in opts[name].param_groups: g["lr"] = t.learning_rate(step, draft_steps, 3e-3)
        o = d(input_ids=batch, labels=batch)
        kl = F.kl_div(F.log_softmax(o.logits, dim=-1), teacher, log_target=True, reduction="batchmean") / t.SEQ_LEN
        loss = kl + 0.1 * o.loss
        opts[name].zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0); opts[name].step()
        msg.append(f"{name} kl {kl.item():.3f}")
    if step % 25 == 0 or step == draft_steps - 1: log(f"draft {step}/{draft_steps} {' '.join(msg)} {time.time()-st:.0f}s")
for name, d in drafts.items():
    d.eval(); t.save(d, tok, out / name); log(f"{name} ppl {t.heldout_perplexity(d, held):.2f}")
