"""Training data of DREAM: encoding a chat and a teacher answer, and the distillation loss.

* :func:`encode_example` turns a chat + teacher response into token ids whose
  labels cover only the response (prompt masked with -100), with the teacher's
  top-k logprobs aligned to the response tokens where given.
* :func:`response_ids` and :func:`end_of_turn_id` tokenize an answer exactly as the
  teacher labels (``dreamroute.dream.labels``, llama.cpp) do: the text read literally
  (``<|im_end|>`` written inside an answer is text, not the special token), no BOS,
  then the token the chat template closes an assistant turn with. Labels carry the
  ids they were computed on; an example whose ids differ gets no KL term, never a
  misaligned one.
* :func:`distill_loss` is cross-entropy on response tokens plus a forward-KL
  term on the teacher's top-k logprobs where they exist.
* :func:`collate` pads a batch; :func:`eval_loss` is the mean loss of a model on encoded examples.

Needs the ``dream`` extra (torch, transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import DreamrouteError
from .dream_config import DreamConfig

IGNORE_INDEX = -100

TeacherTopK = Sequence[dict[int, float]] | tuple[Any, Any]


class TrainingError(DreamrouteError):
    """Training cannot start or continue (bad example, mismatched checkpoint)."""


@dataclass
class Example:
    """One training example: a chat prompt and the teacher's answer to it.

    Attributes:
        messages: chat messages (``{"role", "content"}`` dicts) ending with the user turn.
        response: the teacher's answer text (the student learns to produce it).
        teacher_topk: optional teacher top-k logprobs, one entry per response token
            (as the student tokenizer splits ``response``; an extra last entry for
            EOS is allowed): a list of ``{token_id: logprob}`` dicts, or a pair of
            arrays ``(ids [n, k], logprobs [n, k])``. Logprobs in nats.
        key: identity of the example (e.g. the experience id), used in digests and logs.
        teacher_tokens: the token ids the teacher's rows were computed on, one per row
            (the answer, then its end-of-turn token), as the labels record them; when
            given, they must equal the student's ids or the KL term is dropped.
    """

    messages: list[dict[str, str]]
    response: str
    teacher_topk: TeacherTopK | None = None
    key: str = ""
    teacher_tokens: Sequence[int] | None = None


PROBE = "\u27e6dreamroute end-of-turn probe\u27e7"
"""An assistant message whose rendering shows what the chat template writes after an answer."""


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def response_ids(tokenizer, text: str) -> list[int]:
    """An answer's token ids as the teacher labels tokenize it (llama.cpp, ``special=False``):
    the text read literally, so special-token text inside it is not a special token; no BOS."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def end_of_turn_id(tokenizer) -> int:
    """The token that follows an assistant answer: the first token the chat template writes after
    an assistant message's content when it is a special token (ChatML's ``<|im_end|>``, Llama 3's
    ``<|eot_id|>``), else EOS. The teacher labels use the same rule (``labels.end_of_turn``)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant",
                                              "content": PROBE}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this chat: fall back to EOS
        text = ""
    at = text.find(PROBE) if isinstance(text, str) else -1
    if at >= 0:
        after = _ids(tokenizer, text[at + len(PROBE):])
        if after and after[0] in set(tokenizer.all_special_ids):
            return int(after[0])
    return int(tokenizer.eos_token_id)


def _teacher_rows(topk: TeacherTopK, k: int) -> list[list[tuple[int, float]]]:
    """Normalise teacher top-k data to per-position lists of (id, logprob), best first, at most k."""
    if isinstance(topk, tuple) and len(topk) == 2 and not isinstance(topk[0], dict):
        ids, lps = (torch.as_tensor(x) for x in topk)
        rows = [list(zip(i.tolist(), lp.tolist())) for i, lp in zip(ids, lps)]
    else:
        rows = [list(d.items()) for d in topk]
    return [sorted(((int(i), float(lp)) for i, lp in row), key=lambda t: -t[1])[:k] for row in rows]


def encode_example(tokenizer, example: Example, max_seq_len: int, *, top_k: int = 8) -> dict[str, Any]:
    """Tokenise one example for training with the prompt masked.

    The prompt is ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``;
    the response tokens (:func:`response_ids`) and the end-of-turn token
    (:func:`end_of_turn_id`, "EOS" below) follow. Too long: prompt tokens are dropped from
    the left; the response is never cut.

    Returns:
        dict with 1-D LongTensors ``input_ids``, ``labels`` (-100 on every prompt token,
        the token id on response tokens and EOS) and ``attention_mask`` (all ones), each
        of length T ≤ max_seq_len; ints ``n_prompt_tokens`` (kept), ``n_response_tokens``
        (with EOS), ``prompt_truncated`` (tokens dropped); ``kd`` ("none", "aligned",
        "length_mismatch": teacher data whose length fits neither the response tokens nor
        them + EOS is dropped, or "token_mismatch": ``example.teacher_tokens`` differ from
        the student's ids, so the rows describe other tokens and are dropped); with aligned
        teacher data also ``teacher_topk_ids``
        (LongTensor [T, k]) and ``teacher_topk_logprobs`` (float [T, k], -inf where
        there is no teacher entry), row t describing the teacher's distribution for the
        token at position t (aligned with ``labels``).

    Raises:
        TrainingError: the tokenizer has no EOS token or chat template, or the response
            with EOS has more than ``max_seq_len - 1`` tokens.
    """
    if tokenizer.eos_token_id is None:
        raise TrainingError("the student's tokenizer has no EOS token; set tokenizer.eos_token before training.")
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingError("the student's tokenizer has no chat template; set tokenizer.chat_template "
                            "(a Jinja string) or load the tokenizer from the tier's GGUF.")
    text = tokenizer.apply_chat_template(list(example.messages), tokenize=False, add_generation_prompt=True)
    prompt = _ids(tokenizer, text)
    text_ids = response_ids(tokenizer, example.response)
    response = text_ids + [end_of_turn_id(tokenizer)]
    if len(response) > max_seq_len - 1:
        raise TrainingError(
            f"example {example.key or '(no key)'}: the response alone has {len(response)} tokens with EOS, "
            f"more than max_seq_len - 1 = {max_seq_len - 1}; raise max_seq_len or drop this example.")
    keep = max_seq_len - len(response)
    dropped = max(0, len(prompt) - keep)
    prompt = prompt[dropped:]
    ids = prompt + response
    p = len(prompt)
    out: dict[str, Any] = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor([IGNORE_INDEX] * p + response, dtype=torch.long),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "n_prompt_tokens": p, "n_response_tokens": len(response), "prompt_truncated": dropped, "kd": "none",
    }
    if example.teacher_topk is not None:
        rows = _teacher_rows(example.teacher_topk, top_k)
        if len(rows) not in (len(text_ids), len(response)):
            out["kd"] = "length_mismatch"
        elif example.teacher_tokens is not None and [int(t) for t in example.teacher_tokens] != response[:len(rows)]:
            out["kd"] = "token_mismatch"
        else:
            t_ids = torch.zeros(len(ids), top_k, dtype=torch.long)
            t_lps = torch.full((len(ids), top_k), float("-inf"))
            for i, row in enumerate(rows):
                for j, (tid, lp) in enumerate(row):
                    t_ids[p + i, j], t_lps[p + i, j] = tid, lp
            out.update(kd="aligned", teacher_topk_ids=t_ids, teacher_topk_logprobs=t_lps)
    return out


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_topk_ids: torch.Tensor | None = None,
                 teacher_topk_logprobs: torch.Tensor | None = None, *, kl_weight: float = 0.5,
                 temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    r"""Cross-entropy on response tokens plus forward KL to the teacher's top-k distribution.

    Shapes follow Hugging Face (unshifted): ``logits`` [B, T, V], ``labels`` [B, T] with
    -100 on positions without loss; ``teacher_topk_ids`` [B, T, k] (long) and
    ``teacher_topk_logprobs`` [B, T, k] (nats, -inf where absent) aligned with ``labels``.
    Position t-1's logits predict ``labels[t]``.

    * CE: mean token cross-entropy over positions with ``labels != -100``.
    * KL (forward, teacher → student), as in top-k logit distillation (Hinton et al. 2015,
      "Distilling the Knowledge in a Neural Network"; the forward-KL form used as the KD
      baseline of MiniLLM, Gu et al. 2023): with the teacher renormalised over its top-k,
      :math:`p_j = \mathrm{softmax}_j(\ell^T_j / T)` over the k entries, and the student's
      log-softmax over the full vocabulary gathered at those ids,
      :math:`\log q_j = \log\mathrm{softmax}(z / T)_{id_j}`,
      :math:`KL = T^2 \sum_j p_j (\log p_j - \log q_j)`, averaged over positions that
      have a response label and at least one teacher entry.
    * loss = CE + kl_weight · KL (KL is 0 where no position has teacher data).

    Returns:
        ``(loss, parts)``: the scalar loss tensor (differentiable) and floats
        ``ce``, ``kl``, ``n_tokens`` (positions in CE) and ``n_kd`` (positions in KL).

    Raises:
        TrainingError: no position has a label (nothing to learn from).
    """
    s_logits = logits[:, :-1, :].float()
    s_labels = labels[:, 1:]
    mask = s_labels != IGNORE_INDEX
    n_tok = int(mask.sum())
    if n_tok == 0:
        raise TrainingError("no response tokens to learn from in this batch (all labels are -100).")
    ce = F.cross_entropy(s_logits.reshape(-1, s_logits.size(-1)), s_labels.reshape(-1), ignore_index=IGNORE_INDEX)
    kl = s_logits.new_zeros(())
    n_kd = 0
    if teacher_topk_ids is not None and teacher_topk_logprobs is not None and kl_weight > 0:
        t_ids = teacher_topk_ids[:, 1:, :]
        t_lp = teacher_topk_logprobs[:, 1:, :].float()
        present = torch.isfinite(t_lp)
        pos = present.any(-1) & mask
        n_kd = int(pos.sum())
        if n_kd:
            lp_t = t_lp[pos] / temperature  # [N, k]; each row has at least one finite entry
            p, log_p = torch.softmax(lp_t, -1), torch.log_softmax(lp_t, -1)
            log_q = torch.log_softmax(s_logits[pos] / temperature, -1).gather(-1, t_ids[pos])
            kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1).mean() * temperature ** 2
    loss = ce + kl_weight * kl
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach()), "n_tokens": n_tok, "n_kd": n_kd}


def collate(encoded: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch [B, T(, k)] (labels -100, attention 0, teacher -inf on padding)."""
    def pad(key: str, value: float, fill=None) -> torch.Tensor:
        rows = [e[key] if key in e else fill(e) for e in encoded]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)

    batch = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX),
             "attention_mask": pad("attention_mask", 0)}
    k = max((e["teacher_topk_ids"].shape[1] for e in encoded if "teacher_topk_ids" in e), default=0)
    if k:
        batch["teacher_topk_ids"] = pad("teacher_topk_ids", 0, lambda e: torch.zeros(len(e["input_ids"]), k,
                                                                                  dtype=torch.long))
        batch["teacher_topk_logprobs"] = pad("teacher_topk_logprobs", float("-inf"),
                                             lambda e: torch.full((len(e["input_ids"]), k), float("-inf")))
    return batch


@torch.no_grad()
def eval_loss(model, encoded: Sequence[dict[str, Any]], config: DreamConfig) -> float:
    """Mean :func:`distill_loss` over encoded examples, one at a time, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total = 0.0
    for e in encoded:
        b = {k: v.to(dev) for k, v in collate([e], 0).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        total += float(distill_loss(logits, b["labels"], b.get("teacher_topk_ids"), b.get("teacher_topk_logprobs"),
                                    kl_weight=config.kl_weight, temperature=config.kl_temperature)[0])
    model.train(was_training)
    return total / max(1, len(encoded))
