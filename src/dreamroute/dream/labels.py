"""Teacher labels for a DREAM cycle: the teacher's answer, and its top-k token logprobs.

The answer is the stored response of the teacher's experience (judged
correct). Where teacher and student share a vocabulary (the two Qwen tiers
do), :func:`teacher_topk` also reads the teacher's distribution at each token
of that answer, for the forward-KL term of :func:`dreamroute.dream.train.distill_loss`:
the prompt (the teacher's chat template, generation prompt included) and the
answer's tokens are decoded in chunks of 64 with logits requested only for the
positions that predict an answer token or the end-of-turn token after it, and
the top k of each row's log-softmax are kept.

The answer is tokenized literally (``special=False``: special-token text inside an
answer is text), without BOS, and closed by the token the teacher's chat template
writes after an assistant message (:func:`end_of_turn`); the training examples
(:func:`dreamroute.dream.data.response_ids`, :func:`~dreamroute.dream.data.end_of_turn_id`)
use the same rule, and :func:`label_row` records these ids, so a training example whose
student ids differ gets no KL term rather than a misaligned one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import BackendError

CHUNK = 64
PROBE = "\u27e6dreamroute end-of-turn probe\u27e7"  # the same probe as dreamroute.dream.data.PROBE


def answer_tokens(llm, response: str) -> list[int]:
    """The answer's token ids in llama.cpp: the text read literally (``special=False``), no BOS."""
    return llm.tokenize(response.encode("utf-8"), add_bos=False, special=False)


def _is_special(llm, token: int) -> bool:
    """A control token: its text, read literally, is not that token (``<|im_end|>``, ``</s>``)."""
    text = llm.detokenize([token], special=True)
    return bool(text) and llm.tokenize(text, add_bos=False, special=False) != [token]


def end_of_turn(backend) -> int:
    """The token that follows an assistant answer in the teacher's chat template: the first token
    written after an assistant message's content when it is a special token (ChatML's
    ``<|im_end|>``), else llama.cpp's EOS; the rule of :func:`dreamroute.dream.data.end_of_turn_id`."""
    llm = backend._model()
    try:
        text = backend._formatter(messages=[{"role": "user", "content": "?"},
                                            {"role": "assistant", "content": PROBE}]).prompt
    except Exception:  # noqa: BLE001 - a template that refuses this chat: fall back to EOS
        text = ""
    at = text.find(PROBE)
    if at >= 0:
        after = llm.tokenize(text[at + len(PROBE):].encode("utf-8"), add_bos=False, special=True)
        if after and _is_special(llm, after[0]):
            return int(after[0])
    return int(llm.token_eos())


def shared_vocabulary(a, b, probe: str = "The answer is 42. Résumé: 3/4 of 1,250 = 937.5") -> bool:
    """Whether two llama.cpp backends tokenize alike (same vocabulary size and the same ids for a probe)."""
    la, lb = a._model(), b._model()
    if la.n_vocab() != lb.n_vocab():
        return False
    enc = probe.encode("utf-8")
    return la.tokenize(enc, add_bos=False, special=True) == lb.tokenize(enc, add_bos=False, special=True)


def teacher_topk(backend, messages: list[dict], response: str, k: int = 8) -> tuple[list[int], list[list[int]], list[list[float]]]:
    """The teacher's top-k next-token logprobs along its own answer.

    Args:
        backend: a loaded-on-demand :class:`~dreamroute.backends.llama.LlamaBackend` (the teacher).
        messages: the chat, ending with the user turn.
        response: the answer text.
        k: tokens kept per position.

    Returns:
        (answer token ids [n], top-k ids [n + 1][k], top-k logprobs [n + 1][k]): row i is
        the distribution that predicts answer token i; the last row predicts the token after
        the answer (end of turn). Natural logs.

    Raises:
        BackendError: the prompt and answer do not fit ``n_ctx``, or llama.cpp failed.
    """
    import llama_cpp

    llm = backend._model()
    prompt = backend.prompt_tokens(messages)
    answer = answer_tokens(llm, response)
    tokens = prompt + answer
    if len(tokens) >= llm.n_ctx():
        raise BackendError(f"tier {backend.tier.name!r}: prompt and answer have {len(tokens)} tokens, n_ctx is "
                           f"{llm.n_ctx()}; raise n_ctx or lower max_seq_len")
    first = len(prompt) - 1  # the position whose logits predict the first answer token
    ids, lps = [], []
    n_vocab = llm.n_vocab()
    backend.reset()
    try:
        for i in range(0, len(tokens), CHUNK):
            piece = tokens[i: i + CHUNK]
            want = i + len(piece) - 1 >= first
            llm._batch.set_batch(batch=piece, n_past=i, logits_all=want)
            llm._ctx.decode(llm._batch)
            if not want:
                continue
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), shape=(len(piece), n_vocab))
            lo = max(first - i, 0)
            x = logits[lo:].astype(np.float64)
            x = x - x.max(axis=1, keepdims=True)
            x = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
            top = np.argpartition(-x, k - 1, axis=1)[:, :k]
            for row, t in zip(x, top):
                order = t[np.argsort(-row[t])]
                ids.append(order.tolist())
                lps.append(row[order].tolist())
    except Exception as e:
        raise BackendError(f"tier {backend.tier.name!r}: reading the teacher's logprobs failed: {e}") from e
    finally:
        backend.reset()
    return answer, ids, lps


def label_row(backend, key: str, messages: list[dict], response: str, k: int = 8) -> dict:
    """One labels-file row: ``{"key", "tokens", "ids", "logprobs"}``; ``tokens`` are the ids the
    rows describe (the answer's, then :func:`end_of_turn`), which the training example checks
    its own ids against. Raises BackendError as :func:`teacher_topk` does."""
    answer, ids, lps = teacher_topk(backend, messages, response, k)
    return {"key": key, "tokens": answer + [end_of_turn(backend)], "ids": ids, "logprobs": lps}


def write_labels(path: Path, rows: list[dict]) -> None:
    """Append label rows (JSON lines) and flush, so a killed cycle keeps what it finished."""
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()


def read_labels(path: Path) -> dict[str, dict]:
    """Label rows by key; a torn last line (a kill mid-write) is ignored."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[r["key"]] = r
    return out
