"""Export a peft LoRA adapter as a GGUF LoRA adapter that llama.cpp applies to the base GGUF.

The new student version is ``base GGUF + adapter GGUF`` (llama.cpp's ``lora_path``);
no full-model copy is written. :func:`export_gguf_lora` maps Hugging Face module
names to GGUF tensor names with the ``gguf`` package's tensor-name map and writes
``<base tensor>.lora_a`` (A, ``[r, in]``) and ``<base tensor>.lora_b`` (B,
``[out, r]``) in float32, with ``general.type = adapter``, ``adapter.type = lora``
and ``adapter.lora.alpha``. :func:`logit_delta_correlation` checks the export:
the adapter's change to next-token logits in llama.cpp against the same change in
transformers.

Layout notes (what llama.cpp's own ``convert_lora_to_gguf.py`` produces):

* llama.cpp scales an adapter tensor pair by ``alpha / r`` with r the rows of A;
  peft scales by ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA, or per-module
  alphas). One ``alpha`` is written and any per-module difference is folded into B,
  so the product llama.cpp applies equals peft's exactly.
* ``llama``: the GGUF converter reorders the rows of q and k weights per head
  (from Hugging Face's rotary layout ``[2, head_dim/2]`` to ``[head_dim/2, 2]``), so
  the rows of B for ``q_proj`` and ``k_proj`` get the same reordering. ``qwen2``
  keeps Hugging Face's layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DreamrouteError

#: Architectures whose export has been checked against transformers, and whether
#: their GGUF converter permutes the rows of attention q/k weights.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False}


class ExportError(DreamrouteError):
    """An adapter cannot be written as a GGUF LoRA (or checked against llama.cpp)."""


class UnsupportedArchitectureError(ConfigError, ExportError):
    """The base GGUF's architecture has no checked LoRA export."""


class UnmappedModuleError(ExportError):
    """An adapted module has no tensor in the base GGUF (e.g. tied embeddings, an unknown layer)."""


def _field(reader, key: str, default: Any = None) -> Any:
    """A scalar or string field of a GGUF file, read with the gguf package's reader."""
    f = reader.fields.get(key)
    if f is None:
        return default
    part = f.parts[f.data[0]]
    if part.dtype == np.uint8 and len(f.types) and f.types[0].name == "STRING":
        return bytes(part).decode("utf-8")
    return part[0].item()


def _read_base(base_gguf: str | Path) -> dict[str, Any]:
    import gguf

    path = Path(base_gguf)
    if not path.is_file():
        raise ExportError(f"base GGUF {path} does not exist; pass the tier's assembled model file "
                          "(`dreamroute models fetch` prints its path).")
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"LoRA export for architecture {arch!r} (from {path.name}) is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}. Add it to "
            "dreamroute.dream.export.SUPPORTED_ARCHITECTURES once its q/k layout is checked "
            "with logit_delta_correlation.")
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    return {
        "arch": arch,
        "n_blocks": int(_field(reader, f"{arch}.block_count")),
        "n_head": n_head,
        "n_head_kv": int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        "tensors": {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors},  # ggml order: [in, out]
    }


def _adapter_from_model(model, adapter_name: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    from peft.tuners.lora import LoraLayer

    found: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name in getattr(module, "lora_embedding_A", {}):
            raise UnmappedModuleError(f"{name}: LoRA on embeddings is not exported; target linear layers only.")
        if adapter_name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter_name):
            raise ExportError(f"{name}: DoRA adapters cannot be written as a llama.cpp LoRA; train with use_dora=False.")
        if getattr(module, "lora_bias", {}).get(adapter_name):
            raise ExportError(f"{name}: LoRA bias terms are not supported by llama.cpp adapters; use lora_bias=False.")
        if getattr(module, "merged", False):
            raise ExportError(f"{name}: the adapter is merged into the base weights; call unmerge_adapter() first.")
        a = module.lora_A[adapter_name].weight.detach().float().cpu().numpy()
        b = module.lora_B[adapter_name].weight.detach().float().cpu().numpy()
        found[name.removeprefix("base_model.model.")] = (a, b, float(module.scaling[adapter_name]))
    return found


def _adapter_from_dir(adapter_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    from safetensors.numpy import load_file

    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise ExportError(f"{adapter_dir} is not a peft adapter directory (needs adapter_config.json and "
                          "adapter_model.safetensors, as written by save_pretrained).")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r} is not LoRA.")
    if cfg.get("use_dora"):
        raise ExportError(f"{adapter_dir}: DoRA adapters cannot be written as a llama.cpp LoRA.")
    if cfg.get("alpha_pattern"):
        raise ExportError(f"{adapter_dir}: per-module alpha_pattern is set; load the adapter with peft and "
                          "pass the PeftModel to export_gguf_lora instead of the directory.")
    alpha, rslora = float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(weights)).items():
        base = key.removeprefix("base_model.model.")
        for tag in ("lora_A", "lora_B"):
            if base.endswith(f".{tag}.weight"):
                parts.setdefault(base[: -len(f".{tag}.weight")], {})[tag] = value.astype(np.float32)
                break
        else:
            raise UnmappedModuleError(f"{adapter_dir}: tensor {key!r} is not a LoRA A/B matrix "
                                      "(modules_to_save and embedding LoRA are not exported).")
    found = {}
    for name, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ExportError(f"{adapter_dir}: module {name} lacks its {'lora_B' if 'lora_A' in ab else 'lora_A'}.")
        r = ab["lora_A"].shape[0]
        found[name] = (ab["lora_A"], ab["lora_B"], alpha / (r ** 0.5 if rslora else r))
    return found


def rope_row_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives a llama q or k weight of ``n_rows`` rows.

    Within each head of ``d = n_rows / n_head`` rows, Hugging Face stores the two rotary
    halves one after the other (rows ``[0..d/2)`` then ``[d/2..d)``); the GGUF interleaves
    them. Returns ``idx`` with ``W_gguf = W_hf[idx]``.
    """
    if n_rows % n_head or (n_rows // n_head) % 2:
        raise ExportError(f"cannot reorder {n_rows} rows into {n_head} heads of even size.")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).transpose(0, 2, 1).reshape(-1)


def export_gguf_lora(peft_model_or_adapter_dir, base_gguf_path: str | Path, out_path: str | Path, *,
                     adapter_name: str = "default") -> Path:
    """Write a peft LoRA adapter as a GGUF LoRA adapter for ``base_gguf_path``.

    Args:
        peft_model_or_adapter_dir: a peft ``PeftModel`` (its ``adapter_name`` adapter is
            exported) or a directory written by ``save_pretrained``.
        base_gguf_path: the base model's GGUF (architecture, head counts and tensor
            shapes are read from it; it is not modified).
        out_path: the adapter file to write (temp file + rename: never half-written).

    Returns:
        ``out_path`` as a Path. Load it with ``llama_cpp.Llama(model_path=base, lora_path=out)``.

    Raises:
        UnsupportedArchitectureError: the base architecture is not in :data:`SUPPORTED_ARCHITECTURES`.
        UnmappedModuleError: an adapted module has no matching tensor (or shape) in the base GGUF.
        ExportError: no LoRA weights, DoRA/bias/merged adapters, a missing base file.
    """
    import gguf

    base = _read_base(base_gguf_path)
    if isinstance(peft_model_or_adapter_dir, (str, os.PathLike)):
        lora = _adapter_from_dir(Path(peft_model_or_adapter_dir))
    else:
        lora = _adapter_from_model(peft_model_or_adapter_dir, adapter_name)
    if not lora:
        raise ExportError("the adapter has no LoRA weights to export (adapter name "
                          f"{adapter_name!r}); train one with train_lora first.")
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[base["arch"]]
    name_map = gguf.get_tensor_name_map(arch_enum, base["n_blocks"])
    first_a, _, first_s = next(iter(lora.values()))
    alpha = first_s * first_a.shape[0]  # llama.cpp applies alpha / r; fold the rest into B
    tensors: list[tuple[str, np.ndarray]] = []
    for module, (a, b, scale) in lora.items():
        found = name_map.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
        if found is None:
            raise UnmappedModuleError(f"module {module} has no GGUF tensor name for architecture {base['arch']}; "
                                      "restrict target_modules to attention/MLP projections.")
        kind, gname = found
        shape = base["tensors"].get(gname)
        if shape is None:
            raise UnmappedModuleError(f"module {module} maps to {gname}, which {Path(base_gguf_path).name} "
                                      "does not have (tied embeddings?); drop it from target_modules.")
        if shape[:2] != (a.shape[1], b.shape[0]):
            raise UnmappedModuleError(f"module {module}: LoRA is {b.shape[0]}x{a.shape[1]} but {gname} in the "
                                      f"base GGUF is {shape[1]}x{shape[0]}; is this the student's base model?")
        fold = scale * a.shape[0] / alpha  # 1.0 unless rsLoRA or per-module alphas make scales differ
        if fold != 1.0:
            b = b * fold
        if SUPPORTED_ARCHITECTURES[base["arch"]] and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            heads = base["n_head"] if kind == gguf.MODEL_TENSOR.ATTN_Q else base["n_head_kv"]
            b = b[rope_row_permutation(b.shape[0], heads)]
        tensors += [(gname + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)),
                    (gname + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))]

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), base["arch"])
    try:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        writer.add_name("dreamroute DREAM LoRA")
        for name, arr in tensors:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, out)
    return out


def logit_delta_correlation(base_gguf: str | Path, adapter_gguf: str | Path, peft_model, tokenizer,
                            prompts: Sequence[str], *, amplify: float = 1.0, n_threads: int | None = None,
                            adapter_name: str = "default") -> float:
    """Pearson correlation between the adapter's logit change in llama.cpp and in transformers.

    For each prompt (tokenised once with ``tokenizer``; the same ids feed both engines),
    the next-token logits at the last position over the full vocabulary are taken with
    and without the adapter: llama.cpp loads ``base_gguf`` with and without
    ``lora_path=adapter_gguf``; transformers runs ``peft_model`` with the adapter
    enabled and inside ``disable_adapter()``. The deltas of all prompts are
    concatenated (length ``len(prompts) × vocab``) and correlated.

    llama.cpp's quantized matmuls add noise to its logits (std ≈ 0.13 on the sensory
    tier's base logits against the dequantized fp32 model), so an adapter whose logit
    change is of that size correlates poorly even when exported exactly (a lightly
    trained adapter on sensory: ≈ 0.7). ``amplify`` multiplies the adapter's scale in
    both engines (llama.cpp ``lora_scale``, peft's per-layer ``scaling``) to lift the
    change above that noise; the export is linear in B, so this checks the same mapping.

    Returns:
        the correlation in [-1, 1]; ≥ 0.98 means the export reproduces the adapter.

    Raises:
        ExportError: no prompts, or a delta with no variance (the adapter changes
            nothing, e.g. an untrained LoRA whose B is zero).
    """
    import torch
    from llama_cpp import Llama

    if not prompts:
        raise ExportError("logit_delta_correlation needs at least one prompt.")
    from peft.tuners.lora import LoraLayer

    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    dev = next(peft_model.parameters()).device
    was_training = peft_model.training
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling]
    saved = [m.scaling[adapter_name] for m in layers]
    peft_model.eval()
    hf: list[np.ndarray] = []
    try:
        for m in layers:
            m.scaling[adapter_name] *= amplify
        with torch.no_grad():
            for seq in ids:
                x = torch.tensor([seq], device=dev)
                on = peft_model(input_ids=x, use_cache=False).logits[0, -1].float().cpu().numpy()
                with peft_model.disable_adapter():
                    off = peft_model(input_ids=x, use_cache=False).logits[0, -1].float().cpu().numpy()
                hf.append(on - off)
    finally:
        for m, s in zip(layers, saved):
            m.scaling[adapter_name] = s
        peft_model.train(was_training)

    def last_logits(lora_path: str | None) -> list[np.ndarray]:
        llm = Llama(model_path=str(base_gguf), lora_path=lora_path, lora_scale=amplify,
                    n_ctx=max(map(len, ids)) + 8, logits_all=True, verbose=False, n_threads=n_threads)
        try:
            rows = []
            for seq in ids:
                llm.reset()
                llm.eval(seq)
                rows.append(np.array(llm.scores[len(seq) - 1], dtype=np.float64))
            return rows
        finally:
            llm.close()

    base_rows, lora_rows = last_logits(None), last_logits(str(adapter_gguf))
    cpp = [lo - ba for lo, ba in zip(lora_rows, base_rows)]
    n = min(min(len(x) for x in hf), min(len(x) for x in cpp))  # padded vocabularies differ in length
    a = np.concatenate([x[:n] for x in hf]).astype(np.float64)
    b = np.concatenate([x[:n] for x in cpp])
    if a.std() == 0 or b.std() == 0:
        raise ExportError("the adapter does not change the logits in "
                          f"{'transformers' if a.std() == 0 else 'llama.cpp'}; nothing to correlate "
                          "(an untrained LoRA has B = 0).")
    return float(np.corrcoef(a, b)[0, 1])
