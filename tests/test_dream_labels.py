"""Teacher labels: top-k logprobs along the teacher's own answer (llama.cpp), and the labels file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from dreamroute.dream.labels import read_labels, write_labels


def test_labels_file_survives_a_torn_last_line(tmp_path):
    p = tmp_path / "labels.jsonl"
    write_labels(p, [{"key": "a", "ids": [[1]], "logprobs": [[-0.1]]}])
    with open(p, "a") as f:
        f.write('{"key": "b", "ids": [[')  # a kill mid-write
    assert set(read_labels(p)) == {"a"}
    assert read_labels(tmp_path / "none.jsonl") == {}


@pytest.mark.model
def test_teacher_topk_matches_scoring_the_answer():
    pytest.importorskip("llama_cpp")
    from dreamroute.backends.llama import LlamaBackend
    from dreamroute.config import default_tiers
    from dreamroute.dream.labels import shared_vocabulary, teacher_topk
    from dreamroute.errors import ModelFileError
    from dreamroute.backends.registry import resolve_model

    tier = default_tiers()[0]
    try:
        path = resolve_model(tier.source, Path(tempfile.gettempdir()) / "dreamroute-test-models")
    except ModelFileError as e:
        pytest.skip(f"sensory GGUF cannot be resolved: {e}")
    b = LlamaBackend(tier.model_copy(update={"n_threads": 2}), path)
    try:
        msgs = [{"role": "user", "content": "What is 2 + 3? End with: The answer is N."}]
        answer = "2 + 3 = 5. The answer is 5."
        ids, top, lps = teacher_topk(b, msgs, answer, k=5)
        assert len(top) == len(lps) == len(ids) + 1 and all(len(r) == 5 for r in top)
        assert all(np.all(np.diff(r) <= 1e-12) and max(r) <= 0 for r in lps)   # sorted, log-probabilities
        # where the answer's token is in the top k, its logprob is what score() gives for it
        full = b.prompt_tokens(msgs) + ids
        n_prompt = len(full) - len(ids)
        b.reset()
        ref = _token_logprobs(b, full)[n_prompt - 1:]
        hits = [(row_i, tok) for row_i, tok in enumerate(ids) if tok in top[row_i]]
        assert hits
        for row_i, tok in hits:
            got = lps[row_i][top[row_i].index(tok)]
            assert got == pytest.approx(ref[row_i], abs=2e-3)
        assert shared_vocabulary(b, b)
    finally:
        b.close()


def _token_logprobs(b, tokens):
    """log p(token i | tokens < i) for i ≥ 1 with one batched decode (the reference)."""
    import llama_cpp
    llm = b._llm
    llm._batch.set_batch(batch=tokens, n_past=0, logits_all=True)
    llm._ctx.decode(llm._batch)
    x = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), shape=(len(tokens), llm.n_vocab()))
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    x = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    b.reset()
    return [float(x[i - 1, tokens[i]]) for i in range(1, len(tokens))]
