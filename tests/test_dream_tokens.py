"""DREAM's teacher labels (llama.cpp) and its training examples (transformers) tokenize an answer alike.

The labels are the teacher's top-k logprobs along its own tokens of the answer; the training
example puts the student's tokens of the same answer under them. Both must be the same ids,
special tokens included: special-token text written inside an answer (``<|im_end|>``) is text
on both sides, neither adds a BOS, and both close the answer with the token the chat template
ends an assistant turn with. A tiny qwen2 GGUF with a byte-level BPE vocabulary is built in code,
so the comparison runs wherever llama-cpp-python is installed; the real sensory and tactical
GGUFs are checked by the ``model``-marked test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the dream extra is not installed (bash scripts/setup.sh)")
pytest.importorskip("transformers", reason="the dream extra is not installed")
pytest.importorskip("gguf", reason="the dream extra is not installed")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh)")

from dreamroute.backends.llama import LlamaBackend  # noqa: E402
from dreamroute.config import TierConfig  # noqa: E402
from dreamroute.dream.data import Example, encode_example  # noqa: E402
from dreamroute.dream.labels import label_row  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["The answer is 5. The answer is 42. What is 2 + 3? Solve step by step.",
          "Résumé: 3/4 of 1,250 = 937.5 and so on, with spaces  and\ttabs.",
          "Tom has 3 apples and buys 4 more; how many apples does he have now?",
          "日本語のテキストと emoji 🤖 are bytes too.", "assistant user system end text here"] * 4
ANSWERS = ["The answer is 5.", " leading space and  two  spaces", "Résumé: 3/4 of 1,250 = 937.5\n\nSo **42**.",
           "a<|im_end|>b", "<|endoftext|> is only text here", "x<|im_start|>assistant\n", "日本語 🤖",
           "end</s>", "tabs\tand\r\nlines\n"]
MSGS = [{"role": "user", "content": "What is 2 + 3?"}]


def tiny_qwen2_gguf(path: Path) -> Path:
    """A 1-layer qwen2 GGUF (random fp32 weights) with a byte-level BPE vocabulary trained here,
    ChatML special tokens and a ChatML chat template."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    n_normal = len(tokens)
    tokens += SPECIALS
    n_vocab, d, ff, heads, kv = len(tokens), 64, 128, 4, 2
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(512)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * n_normal + [gguf.TokenType.CONTROL] * len(SPECIALS))
    w.add_token_merges(merges)
    w.add_bos_token_id(n_normal)          # <|endoftext|>
    w.add_pad_token_id(n_normal)
    w.add_eos_token_id(n_normal + 2)      # <|im_end|>
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def t(name, *shape):
        w.add_tensor(name, (rng.normal(size=shape) * 0.05).astype(np.float32) if len(shape) > 1
                     else np.ones(shape, dtype=np.float32))
    t("token_embd.weight", n_vocab, d)
    t("output_norm.weight", d)
    t("output.weight", n_vocab, d)
    t("blk.0.attn_norm.weight", d)
    t("blk.0.ffn_norm.weight", d)
    for name, rows in (("attn_q", d), ("attn_k", kv * d // heads), ("attn_v", kv * d // heads)):
        t(f"blk.0.{name}.weight", rows, d)
        w.add_tensor(f"blk.0.{name}.bias", np.zeros(rows, dtype=np.float32))
    t("blk.0.attn_output.weight", d, d)
    t("blk.0.ffn_gate.weight", ff, d)
    t("blk.0.ffn_up.weight", ff, d)
    t("blk.0.ffn_down.weight", d, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def teacher_and_tokenizer(gguf_path: Path):
    """(llama.cpp backend on the GGUF, transformers tokenizer read from the same GGUF)."""
    from transformers import AutoTokenizer

    tier = TierConfig(name="teacher", model="m", source={"gguf": str(gguf_path)}, params_b=0.001, n_ctx=512,
                      n_threads=1)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return LlamaBackend(tier, gguf_path), tokenizer


def assert_same_ids(backend, tokenizer) -> None:
    """For every answer: the label row's ids are the example's labels, end-of-turn included,
    and the teacher's rows are aligned to them."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for answer in ANSWERS:
        row = label_row(backend, "k", MSGS, answer, k=4)
        ex = Example(MSGS, answer, (row["ids"], row["logprobs"]), "k", row["tokens"])
        enc = encode_example(tokenizer, ex, 512, top_k=4)
        p = enc["n_prompt_tokens"]
        assert enc["labels"][p:].tolist() == row["tokens"], answer
        assert row["tokens"][-1] == im_end and enc["kd"] == "aligned", answer
        assert len(row["ids"]) == len(row["tokens"])
        assert enc["teacher_topk_ids"][p:].tolist() == row["ids"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_qwen2_gguf(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf")
    backend, tokenizer = teacher_and_tokenizer(path)
    yield backend, tokenizer
    backend.close()


def test_labels_and_examples_tokenize_the_answer_to_the_same_ids(tiny):
    assert_same_ids(*tiny)


def test_special_token_text_in_an_answer_is_text_on_both_sides(tiny):
    backend, tokenizer = tiny
    answer = "a<|im_end|>b"
    row = label_row(backend, "k", MSGS, answer, k=4)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in row["tokens"][:-1]  # llama.cpp read the text literally ...
    # ... where transformers' default would have made it the special token (the ids would differ)
    assert im_end in tokenizer(answer, add_special_tokens=False)["input_ids"]


def test_teacher_rows_on_other_ids_are_dropped_not_misaligned(tiny):
    backend, tokenizer = tiny
    answer = "The answer is 5."
    row = label_row(backend, "k", MSGS, answer, k=4)
    for tokens in (row["tokens"][:-1] + [row["tokens"][-1] - 1],     # another end-of-turn token
                   [row["tokens"][1]] + row["tokens"][1:]):          # another first token, same length
        enc = encode_example(tokenizer, Example(MSGS, answer, (row["ids"], row["logprobs"]), "k", tokens), 512,
                             top_k=4)
        assert enc["kd"] == "token_mismatch" and "teacher_topk_ids" not in enc
    # label files written before the ids were recorded still align by length
    old = encode_example(tokenizer, Example(MSGS, answer, (row["ids"], row["logprobs"]), "k"), 512, top_k=4)
    assert old["kd"] == "aligned"


@pytest.mark.model
@pytest.mark.parametrize("tier", ["sensory", "tactical"])
def test_real_tiers_tokenize_alike(tier):
    from .test_dream_export import tier_gguf

    backend, tokenizer = teacher_and_tokenizer(tier_gguf(tier))
    try:
        assert_same_ids(backend, tokenizer)
    finally:
        backend.close()
