"""Stage `verify`: accuracy gates of the final model against the exported reference on held-out text.

The reference is the export stage's model (fp32 unless the recipe exports fp16); the candidate is what
goes into the artifact. A failed gate raises BuildError with the figures, so no artifact is published.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict

from compiler.checkpoint import Checkpoint
from compiler.errors import BuildError
from compiler.ort_windows import run_windows
from compiler.stages import quantize
from compiler.stages.export import MODEL_FILE
from runtime.decoder import session_options
from runtime.evaluate import next_token_nll

VERSION = "2"


class VerifyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    text_sha256: str
    tokens: int  # taken from the end of the text, away from the calibration tokens taken from its start
    window: int
    max_perplexity_increase: float  # relative: 0.05 allows +5 %
    min_top1_agreement: float


class VerifyResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    tokens: int
    reference_perplexity: float
    perplexity: float
    perplexity_increase: float
    top1_agreement: float
    finite: bool
    passed: bool


def scores(model_dir: Path, ids: list[int], window: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per window: the negative log-likelihood of each next token and the argmax before it; and whether all logits were finite."""
    # The candidate runs as the runtime will run it: same session settings, so the gate measures what users get.
    session = ort.InferenceSession(str(model_dir / MODEL_FILE), session_options(quantize.session_options_of(model_dir)), providers=["CPUExecutionProvider"])
    losses, predictions, finite = [], [], True
    starts = range(0, len(ids), window)
    for start, (logits,) in zip(starts, run_windows(session, ids, window, ["logits"])):
        logits = logits[0, :-1]  # [T-1,V]: each position predicts the next token of its window
        finite &= bool(np.isfinite(logits).all())
        losses.append(next_token_nll(logits, np.asarray(ids[start + 1 : start + window])))
        predictions.append(np.argmax(logits, axis=-1))
    return np.concatenate(losses), np.concatenate(predictions), finite


Scores = tuple[np.ndarray, np.ndarray, bool]


def judge(tokens: int, reference: Scores, candidate: Scores, max_perplexity_increase: float, min_top1_agreement: float, hint: str) -> VerifyResult:
    """The accuracy gate: the candidate's figures against the reference's; raises BuildError with them when it fails."""
    (reference_nll, reference_top1, _), (nll, top1, finite) = reference, candidate
    reference_ppl, ppl = math.exp(reference_nll.mean()), math.exp(nll.mean()) if finite else math.inf
    increase = ppl / reference_ppl - 1
    agreement = float((top1 == reference_top1).mean())
    passed = finite and increase <= max_perplexity_increase and agreement >= min_top1_agreement
    result = VerifyResult(
        tokens=tokens, reference_perplexity=round(reference_ppl, 4), perplexity=round(ppl, 4),
        perplexity_increase=round(increase, 5), top1_agreement=round(agreement, 5), finite=finite, passed=passed,
    )
    if not passed:
        raise BuildError(
            f"accuracy gate failed: perplexity {ppl:.3f} vs {reference_ppl:.3f} "
            f"({increase:+.2%}, allowed +{max_perplexity_increase:.2%}), top-1 agreement {agreement:.3f} "
            f"(required {min_top1_agreement:.3f}), finite logits: {finite}",
            hint=hint,
        )
    return result


def run(checkpoint: Checkpoint, config: VerifyConfig, out_dir: Path, progress=None, *, export_dir: Path, candidate_dir: Path, ids: list[int]) -> VerifyResult:
    ids = ids[-config.tokens :]
    reference = scores(export_dir, ids, config.window)
    # Nothing quantized: the artifact's model is the reference itself.
    candidate = reference if candidate_dir == export_dir else scores(candidate_dir, ids, config.window)
    return judge(
        len(ids), reference, candidate, config.max_perplexity_increase, config.min_top1_agreement,
        hint="relax the gate in the recipe's verify block, or choose a gentler quantization or pruning threshold",
    )
