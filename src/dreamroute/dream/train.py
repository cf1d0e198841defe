"""LoRA distillation of a teacher tier's answers into a student tier (the DREAM training core).

* the examples, their encoding and the loss live in :mod:`dreamroute.dream.data`.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, ModelFileError
from .data import (IGNORE_INDEX, Example, TeacherTopK, TrainingError, _teacher_rows, collate,  # noqa: F401
                   distill_loss, encode_example, eval_loss)
from .dream_config import DreamConfig

CKPT_PREFIX = "step-"
KEEP_CHECKPOINTS = 2


@dataclass
class TrainResult:
    """What :func:`train_lora` did: optimiser ``steps`` in total, training ``wall_s``
    (seconds, summed over resumed runs), per-step mean ``losses`` (and their KL parts),
    the directory of the saved adapter, the step this call resumed from (0: fresh start),
    the trained peft ``model`` (``PeftModel``; the base model passed in was wrapped in place)
    and ``kd``: examples per teacher-data status of :func:`encode_example` ("none", "aligned",
    "length_mismatch", "token_mismatch")."""

    steps: int
    wall_s: float
    losses: list[float]
    adapter_dir: Path
    resumed_from: int = 0
    kl_losses: list[float] = field(default_factory=list)
    model: Any = field(default=None, repr=False)
    kd: dict[str, int] = field(default_factory=dict)


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
    skip = {"device", "checkpoint_every", "heldout_fraction", "min_examples", "promote_margin", "max_regression",
            "regression_items", "perplexity_prompts", "max_perplexity_increase"}  # the gate, not training
    h = hashlib.sha256(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in skip}, sort_keys=True).encode())
    h.update(type(model).__name__.encode())
    for ex in examples:
        teacher = None if ex.teacher_topk is None else _teacher_rows(ex.teacher_topk, cfg.kl_top_k)
        record = [ex.key, ex.messages, ex.response, teacher]
        if ex.teacher_tokens is not None:  # (absent from older label files: their digests stay as they were)
            record.append([int(t) for t in ex.teacher_tokens])
        h.update(json.dumps(record).encode())
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
                       resumed_from=start, kl_losses=list(kl_losses), model=inner,
                       kd=dict(Counter(e["kd"] for e in encoded)))


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
