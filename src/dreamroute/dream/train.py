"""LoRA distillation of a teacher tier's answers into a student tier (the DREAM training core).

* :func:`encode_example` turns a chat + teacher response into token ids whose
  labels cover only the response (prompt masked with -100).
* :func:`distill_loss` is cross-entropy on response tokens plus a forward-KL
  term on the teacher's top-k logprobs where they exist.
* :func:`train_lora` wraps a Hugging Face causal LM with a peft LoRA adapter and
  trains it (AdamW, fp32, ``accelerate`` picks CPU or GPU), checkpointing every
  ``checkpoint_every`` steps and resuming from the latest checkpoint.
* :func:`load_student` loads a tier as a Hugging Face model from its GGUF.

Needs the ``dream`` extra (torch, transformers, peft, accelerate).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DreamrouteError, ModelFileError
from .dream_config import DreamConfig

IGNORE_INDEX = -100
CKPT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2

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
    """

    messages: list[dict[str, str]]
    response: str
    teacher_topk: TeacherTopK | None = None
    key: str = ""


@dataclass
class TrainResult:
    """What :func:`train_lora` did: optimiser ``steps`` in total, training ``wall_s``
    (seconds, summed over resumed runs), per-step mean ``losses`` (and their KL parts),
    the directory of the saved adapter, the step this call resumed from (0: fresh start)
    and the trained peft ``model`` (``PeftModel``; the base model passed in was wrapped in place)."""

    steps: int
    wall_s: float
    losses: list[float]
    adapter_dir: Path
    resumed_from: int = 0
    kl_losses: list[float] = field(default_factory=list)
    model: Any = field(default=None, repr=False)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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
    the response tokens and EOS follow. Too long: prompt tokens are dropped from the
    left; the response is never cut.

    Returns:
        dict with 1-D LongTensors ``input_ids``, ``labels`` (-100 on every prompt token,
        the token id on response tokens and EOS) and ``attention_mask`` (all ones), each
        of length T ≤ max_seq_len; ints ``n_prompt_tokens`` (kept), ``n_response_tokens``
        (with EOS), ``prompt_truncated`` (tokens dropped); ``kd`` ("none", "aligned" or
        "length_mismatch": teacher data whose length fits neither the response tokens nor
        them + EOS is dropped); with aligned teacher data also ``teacher_topk_ids``
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
    text_ids = _ids(tokenizer, example.response)
    response = text_ids + [tokenizer.eos_token_id]
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


def _plan(n: int, cfg: DreamConfig) -> list[list[list[int]]]:
    """Optimiser steps as lists of micro-batches of example indices; epoch e shuffled with seed (seed, e)."""
    steps: list[list[list[int]]] = []
    for epoch in range(cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        mbs = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        steps += [mbs[i:i + cfg.grad_accum] for i in range(0, len(mbs), cfg.grad_accum)]
    return steps


def _fingerprint(model, examples: Sequence[Example], cfg: DreamConfig) -> str:
    """Digest of what determines the training trajectory (checkpoints of another run are refused)."""
    skip = {"device", "checkpoint_every", "heldout_fraction", "min_examples", "promote_margin", "max_regression"}
    h = hashlib.sha256(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in skip}, sort_keys=True).encode())
    h.update(type(model).__name__.encode())
    for ex in examples:
        teacher = None if ex.teacher_topk is None else _teacher_rows(ex.teacher_topk, cfg.kl_top_k)
        h.update(json.dumps([ex.key, ex.messages, ex.response, teacher]).encode())
    return h.hexdigest()


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = [p for p in ckpt_dir.glob(CKPT_PREFIX + "*") if p.is_dir() and (p / "state.json").is_file()]
    return max(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]), default=None)


def _save_checkpoint(ckpt_dir: Path, model, optimizer, state: dict[str, Any]) -> Path:
    """Write adapter, optimiser, RNG and state to a temp dir, then rename it into place (atomic)."""
    step = state["step"]
    final = ckpt_dir / f"{CKPT_PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob(CKPT_PREFIX + "*"), key=lambda p: int(p.name[len(CKPT_PREFIX):]))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _accelerator(device: str):
    from accelerate import Accelerator
    if device == "cpu":
        return Accelerator(cpu=True, mixed_precision="no")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but no CUDA GPU is visible; use device='auto' or 'cpu'.")
        if ":" in device:
            torch.cuda.set_device(int(device.split(":")[1]))
    return Accelerator(mixed_precision="no")


def train_lora(model, tokenizer, train_examples: Sequence[Example], config: DreamConfig, out_dir: str | Path,
               progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a LoRA adapter on ``train_examples`` (resuming from ``out_dir`` if a checkpoint is there).

    Runs in one process (CPU, or one GPU when ``accelerate`` finds it). ``model``, a
    transformers causal LM, is wrapped in place with a LoRA adapter (``config.lora_*``,
    task CAUSAL_LM, LoRA weights in fp32; a ``PeftModel`` passed in is used as it is), then trained with AdamW for ``ceil(n / (batch_size × grad_accum))``
    steps per epoch, where n is ``len(train_examples)`` capped by ``max_examples`` (the
    first ones are used). Data order, LoRA init and dropout are seeded by ``config.seed``.
    Every ``checkpoint_every`` steps and at the end, ``out_dir/checkpoints/step-NNNNNNNN``
    gets the adapter, optimiser state, RNG state and the step (written to a temp dir and
    renamed); a later call with the same ``out_dir``, examples and config continues from
    the latest one and ends at the same step count. The final adapter is saved with
    ``save_pretrained`` in ``out_dir/adapter``. ``on_step(step, loss)`` is called after
    each optimiser step (1-based step). With ``progress`` a rich bar shows the loss.

    Returns:
        :class:`TrainResult`; the model holds the trained adapter afterwards.

    Raises:
        TrainingError: no examples, an example that cannot be encoded, or a checkpoint in
            ``out_dir`` from a different run (other config or data).
        ConfigError: a CUDA device is configured but none is visible.
    """
    from accelerate.utils import set_seed
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    examples = list(train_examples)[: config.max_examples]
    if not examples:
        raise TrainingError("no training examples; DREAM needs teacher-correct experiences to learn from.")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    encoded = [encode_example(tokenizer, ex, config.max_seq_len, top_k=config.kl_top_k) for ex in examples]
    fingerprint = _fingerprint(model, examples, config)
    plan = _plan(len(encoded), config)
    total = len(plan)

    set_seed(config.seed)
    if not isinstance(model, PeftModel):
        lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.target_modules), task_type="CAUSAL_LM", bias="none")
        try:
            with warnings.catch_warnings():  # peft calls a transformers API that v5 renamed
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, lcfg)
        except ValueError as e:
            raise ConfigError(f"cannot attach LoRA to target_modules={list(config.target_modules)}: {e}; "
                              "name linear layers that exist in the student (e.g. q_proj,v_proj).") from e
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    accelerator = _accelerator(config.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)

    start, losses, kl_losses, wall_before = 0, [], [], 0.0
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        state = json.loads((latest / "state.json").read_text())
        if state.get("fingerprint") != fingerprint:
            raise TrainingError(
                f"{ckpt_dir} holds checkpoints of a different training run (other config or examples); "
                "use a new out_dir, or delete that checkpoints folder to start over.")
        set_peft_model_state_dict(inner, load_file(str(latest / "adapter" / "adapter_model.safetensors")))
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
        rng = torch.load(latest / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        start, losses, kl_losses = state["step"], state["losses"], state.get("kl_losses", [])
        wall_before = state["wall_s"]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    bar = None
    if progress and start < total:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        bar = Progress(TextColumn("[bold]DREAM train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        task = bar.add_task("train", total=total, completed=start, loss=f"{losses[-1]:.4f}" if losses else "-")
        bar.start()
    try:
        model.train()
        for step in range(start, total):
            group = plan[step]
            step_loss = step_kl = 0.0
            for mb in group:
                b = {k: v.to(accelerator.device) for k, v in collate([encoded[i] for i in mb], pad_id).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                loss, parts = distill_loss(logits, b["labels"], b.get("teacher_topk_ids"),
                                           b.get("teacher_topk_logprobs"), kl_weight=config.kl_weight,
                                           temperature=config.kl_temperature)
                accelerator.backward(loss / len(group))
                step_loss += float(loss.detach()) / len(group)
                step_kl += parts["kl"] / len(group)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            kl_losses.append(step_kl)
            done = step + 1
            if done % config.checkpoint_every == 0 or done == total:
                _save_checkpoint(ckpt_dir, inner, optimizer, {
                    "step": done, "total": total, "losses": losses, "kl_losses": kl_losses,
                    "wall_s": wall_before + time.perf_counter() - t0, "fingerprint": fingerprint})
            if bar is not None:
                bar.update(task, completed=done, loss=f"{step_loss:.4f}")
            if on_step is not None:
                on_step(done, step_loss)
    finally:
        if bar is not None:
            bar.stop()
    wall = wall_before + (time.perf_counter() - t0 if start < total else 0.0)
    adapter_dir = out_dir / "adapter"
    tmp = out_dir / f".tmp-adapter-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    inner.save_pretrained(tmp, save_embedding_layers=False)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(tmp, adapter_dir)
    model.eval()
    return TrainResult(steps=total, wall_s=wall, losses=list(losses), adapter_dir=adapter_dir,
                       resumed_from=start, kl_losses=list(kl_losses), model=inner)


def load_student(source: str | Path, *, dtype: torch.dtype = torch.float32, tokenizer_source: str | Path | None = None):
    """Load a student tier as a Hugging Face ``(model, tokenizer)``.

    ``source`` is a local ``.gguf`` file (loaded with transformers' GGUF support,
    ``from_pretrained(dir, gguf_file=name)``, which dequantizes every tensor to
    ``dtype``, fp32 by default: about 4 bytes per parameter of RAM), a local Hugging
    Face model directory, or a Hugging Face model id (needs network). The tokenizer
    comes from the same source unless ``tokenizer_source`` is given.

    Raises:
        ModelFileError: the file is missing, or transformers cannot load it (unsupported
            architecture or quantization type, no network for an id); the message names
            the source and the underlying error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(source).expanduser()
    if str(source).endswith(".gguf"):
        if not src.is_file():
            raise ModelFileError(f"student GGUF {src} does not exist; run `dreamroute models fetch` "
                                 "or point the tier's source at the file.")
        where, kw = str(src.parent), {"gguf_file": src.name}
    else:
        where, kw = (str(src) if src.exists() else str(source)), {}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
        if tokenizer_source is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
        else:
            tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise ModelFileError(
            f"transformers cannot load the student from {source}: {type(e).__name__}: {e}. "
            "A GGUF needs an architecture and quantization types transformers can dequantize; "
            "otherwise pass a Hugging Face model directory.") from e
    return model, tokenizer
