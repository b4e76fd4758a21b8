"""The shipped pairs are useful: each MoE main model beats its draft on held-out text."""

from __future__ import annotations

import runtime
from compiler import corpus
from runtime.evaluate import perplexity


def test_main_has_lower_heldout_perplexity_than_draft(shipped_pair):
    generator = runtime.load(shipped_pair[1])
    tokens = []
    for path in corpus.stdlib_files("heldout")[:8]:
        tokens.extend(generator.encode(corpus.read_text(path)))
    tokens = tokens[:16384]
    main, draft = perplexity(generator.main, tokens), perplexity(generator.draft, tokens)
    assert main < draft, (main, draft)
    assert main < 20, main  # a trained model, far from the uniform 1024
