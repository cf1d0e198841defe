"""GGUF LoRA export checked against transformers on the real sensory (llama) and tactical (qwen2) GGUFs.

Each test loads the student from its GGUF with transformers (dequantized to fp32),
attaches a LoRA with seeded random B on q, k, v, o, exports it with
``export_gguf_lora`` and requires llama.cpp's logit change from the adapter to
match transformers' (``logit_delta_correlation`` ≥ 0.98 over 3 prompts). Marked
``model``; skipped when the GGUFs are not assembled or the dream extra is missing.

B's scale (std 0.4) makes the adapter's logit change large against llama.cpp's own
numerical noise (its quantized matmuls give base logits that differ from the
dequantized fp32 model by a std of about 0.13 on sensory); with a tiny change the
correlation measures that noise, not the export.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from dreamroute.config import default_data_dir, default_tiers
from dreamroute.errors import ConfigError, ModelFileError

torch = pytest.importorskip("torch", reason="the dream extra is not installed (bash scripts/setup.sh)")
pytest.importorskip("transformers", reason="the dream extra is not installed")
pytest.importorskip("peft", reason="the dream extra is not installed")
pytest.importorskip("gguf", reason="the dream extra is not installed")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh)")

from dreamroute.dream import export as export_mod  # noqa: E402
from dreamroute.dream.export import (  # noqa: E402
    ExportError, UnmappedModuleError, UnsupportedArchitectureError, export_gguf_lora, logit_delta_correlation,
    rope_row_permutation,
)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Question: what is 12 times 7? Answer:"]
B_STD = 0.4


def tier_gguf(name: str) -> Path:
    """The tier's assembled GGUF, or skip: a single-part source is used in place (sidecar in a temp
    dir); a multi-part one only if ``dreamroute models fetch`` already assembled it."""
    from dreamroute.backends.registry import resolve_model

    tier = next(t for t in default_tiers() if t.name == name)
    src = tier.source
    if len(src.parts) > 1:
        models_dir = default_data_dir() / "models"
        if not (models_dir / f"{src.sha256}.gguf").is_file():
            pytest.skip(f"{name} GGUF is not assembled; run `dreamroute models fetch`")
    else:
        models_dir = Path(tempfile.gettempdir()) / "dreamroute-test-models"
    try:
        return resolve_model(src, models_dir)
    except ModelFileError as e:
        pytest.skip(f"{name} GGUF cannot be resolved: {e}")


def random_lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, B_STD)
    return pm.eval()


# ----------------------------------------------------------------------------- without models

def test_rope_row_permutation_interleaves_the_halves_of_each_head():
    # 2 heads of 4 rows: HF [a0 a1 | b0 b1] per head -> GGUF [a0 b0 a1 b1]
    assert rope_row_permutation(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ExportError):
        rope_row_permutation(6, 2)


def test_unsupported_architecture_and_missing_files(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_uint32("mamba.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedArchitectureError, match="mamba.*supported: llama, qwen2") as e:
        export_gguf_lora(tmp_path, path, tmp_path / "out.gguf")
    assert isinstance(e.value, ConfigError)
    with pytest.raises(ExportError, match="does not exist"):
        export_gguf_lora(tmp_path, tmp_path / "nope.gguf", tmp_path / "out.gguf")


def _write_base(path, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, val in (("block_count", 1), ("attention.head_count", 2), ("attention.head_count_kv", 1)):
        w.add_uint32(f"{arch}.{key}", val)
    for name, rows in (("attn_q", 8), ("attn_k", 4), ("attn_v", 4)):  # head_dim 4, hidden 8
        w.add_tensor(f"blk.0.{name}.weight", np.zeros((rows, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layout_scale_folding_and_permutation_on_a_synthetic_base(tmp_path, arch):
    """A save_pretrained-style directory (rsLoRA, two ranks) on a hand-made base GGUF: names, shapes,
    alpha, B scaled so that llama.cpp's alpha / r equals peft's scale per module, q/k rows permuted for llama."""
    import gguf
    from safetensors.numpy import save_file

    _write_base(tmp_path / "base.gguf", arch)
    rng = np.random.default_rng(0)
    ranks = {"q_proj": 4, "k_proj": 4, "v_proj": 2}
    rows = {"q_proj": 8, "k_proj": 4, "v_proj": 4}
    weights = {}
    for m, r in ranks.items():
        pre = f"base_model.model.model.layers.0.self_attn.{m}"
        weights[f"{pre}.lora_A.weight"] = rng.normal(size=(r, 8)).astype(np.float32)
        weights[f"{pre}.lora_B.weight"] = rng.normal(size=(rows[m], r)).astype(np.float32)
    adir = tmp_path / "adapter"
    adir.mkdir()
    save_file(weights, str(adir / "adapter_model.safetensors"))
    (adir / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true, "rank_pattern": {"v_proj": 2}}')
    out = export_gguf_lora(adir, tmp_path / "base.gguf", tmp_path / "lora.gguf")

    r = gguf.GGUFReader(str(out))
    t = {x.name: np.array(x.data) for x in r.tensors}
    alpha = export_mod._field(r, "adapter.lora.alpha")
    assert alpha == pytest.approx(8 / 2 * 4)  # first module: peft scale alpha / sqrt(r) = 4, times r
    for m, gname in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        a = weights[f"base_model.model.model.layers.0.self_attn.{m}.lora_A.weight"]
        b = weights[f"base_model.model.model.layers.0.self_attn.{m}.lora_B.weight"]
        ga, gb = t[f"blk.0.{gname}.weight.lora_a"], t[f"blk.0.{gname}.weight.lora_b"]
        assert ga.shape == a.shape and gb.shape == b.shape
        peft_delta = (8 / np.sqrt(ranks[m])) * b @ a                 # what peft adds to W (HF row order)
        cpp_delta = (alpha / ranks[m]) * gb @ ga                      # what llama.cpp adds (GGUF row order)
        if arch == "llama" and m != "v_proj":
            heads = 2 if m == "q_proj" else 1
            peft_delta = peft_delta[rope_row_permutation(rows[m], heads)]
        assert np.allclose(cpp_delta, peft_delta, atol=1e-5), m
    assert export_mod._field(r, "general.type") == "adapter"


# ----------------------------------------------------------------------------- real models

@pytest.mark.model
@pytest.mark.parametrize("tier,arch", [("sensory", "llama"), ("tactical", "qwen2")])
def test_exported_adapter_matches_transformers(tier, arch, tmp_path, monkeypatch):
    from dreamroute.dream.train import load_student

    t0 = time.perf_counter()
    base = tier_gguf(tier)
    model, tok = load_student(base)
    pm = random_lora(model)
    out = export_gguf_lora(pm, base, tmp_path / f"{tier}-lora.gguf")
    assert out.is_file() and not list(tmp_path.glob(".*tmp*"))

    import gguf
    r = gguf.GGUFReader(str(out))
    assert export_mod._field(r, "general.type") == "adapter"
    assert export_mod._field(r, "adapter.type") == "lora"
    assert export_mod._field(r, "general.architecture") == arch
    assert export_mod._field(r, "adapter.lora.alpha") == pytest.approx(16.0)
    names = {t.name for t in r.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.0.attn_output.weight.lora_b"} <= names
    n_layers = model.config.num_hidden_layers
    assert len(names) == n_layers * 4 * 2

    corr = logit_delta_correlation(base, out, pm, tok, PROMPTS)
    print(f"\n{tier} ({arch}): logit-delta correlation {corr:.4f}")
    assert corr >= 0.98
    if arch == "llama":  # the q/k row permutation is what makes llama match
        monkeypatch.setattr(export_mod, "rope_row_permutation", lambda n, h: np.arange(n))
        plain = export_gguf_lora(pm, base, tmp_path / "no-permute.gguf")
        corr_plain = logit_delta_correlation(base, plain, pm, tok, PROMPTS)
        print(f"{tier} ({arch}): without the q/k permutation {corr_plain:.4f}")
        assert corr_plain < corr - 0.02
    print(f"{tier}: test wall time {time.perf_counter() - t0:.1f} s")


@pytest.mark.model
def test_adapter_dir_export_and_unmapped_module(tmp_path):
    """The save_pretrained directory exports like the model; a small adapter checks out when amplified;
    an lm_head LoRA on tied embeddings is refused."""
    from peft import LoraConfig, get_peft_model

    from dreamroute.dream.train import load_student

    base = tier_gguf("sensory")
    model, tok = load_student(base)
    pm = random_lora(model)
    pm.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    a = export_gguf_lora(pm, base, tmp_path / "from-model.gguf")
    b = export_gguf_lora(tmp_path / "adapter", base, tmp_path / "from-dir.gguf")
    import gguf
    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    ta, tb = ({t.name: np.array(t.data) for t in r.tensors} for r in (ra, rb))
    assert ta.keys() == tb.keys() and all(np.allclose(ta[k], tb[k]) for k in ta)

    # a small adapter (B std 0.04) is checked by amplifying it 10x in both engines; scales are restored
    from peft.tuners.lora import LoraLayer
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    small = export_gguf_lora(pm, base, tmp_path / "small.gguf")
    scales = [m.scaling["default"] for m in pm.modules() if isinstance(m, LoraLayer)]
    corr = logit_delta_correlation(base, small, pm, tok, PROMPTS, amplify=10)
    print(f"\nsensory: small adapter, amplified 10x: correlation {corr:.4f}")
    assert corr >= 0.98
    assert [m.scaling["default"] for m in pm.modules() if isinstance(m, LoraLayer)] == scales

    head = get_peft_model(pm.unload(), LoraConfig(r=4, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    with pytest.raises(UnmappedModuleError, match="lm_head.*output.weight"):
        export_gguf_lora(head, base, tmp_path / "head.gguf")
