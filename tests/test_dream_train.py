"""DREAM training core: config validation, prompt masking, the KL term, training and checkpoint resume.

Tiny llama/qwen2 models and a word-level tokenizer are built in code (no network, seconds).
"""

from __future__ import annotations

import math

import pytest

from dreamroute.dream.dream_config import DreamConfig
from dreamroute.errors import ConfigError

torch = pytest.importorskip("torch", reason="the dream extra is not installed (bash scripts/setup.sh)")
pytest.importorskip("transformers", reason="the dream extra is not installed")
pytest.importorskip("peft", reason="the dream extra is not installed")
pytest.importorskip("accelerate", reason="the dream extra is not installed")

from dreamroute.dream.train import (  # noqa: E402
    IGNORE_INDEX, Example, TrainingError, distill_loss, encode_example, eval_loss, train_lora,
)

WORDS = ("user assistant system what is plus minus times the answer zero one two three four five six "
         "seven eight nine ten please compute quickly and tell me .").split()
NUMS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


# ----------------------------------------------------------------------------- tiny models

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is ~50x faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                eos_token="<|im_end|>", bos_token=None)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    t.chat_template = TEMPLATE
    return t


def tiny_model(arch="llama", vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
              initializer_range=0.3)  # large enough that LoRA on a tiny model can move the logits
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).float()
    return Qwen2ForCausalLM(Qwen2Config(**kw)).float()


def arithmetic_examples(n=8):
    out = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 5
        out.append(Example(messages=[{"role": "user", "content": f"what is {NUMS[a]} plus {NUMS[b]}"}],
                           response=f"the answer is {NUMS[a + b]} .", key=f"ex{i}"))
    return out


def small_config(**kw):
    base = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=3e-2, epochs=3, batch_size=2,
                grad_accum=1, max_seq_len=64, seed=0, checkpoint_every=2, min_examples=1, device="cpu")
    base.update(kw)
    return DreamConfig(**base)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [
    ("lora_r", 0), ("lora_r", 2.5), ("lora_alpha", 0), ("lora_dropout", 1.0), ("lora_dropout", -0.1),
    ("target_modules", ""), ("target_modules", []), ("learning_rate", 0), ("learning_rate", 3.0),
    ("epochs", 0), ("batch_size", 0), ("grad_accum", True), ("max_seq_len", 4), ("kl_weight", -1),
    ("kl_top_k", 0), ("kl_temperature", 0), ("seed", -1), ("checkpoint_every", 0), ("max_examples", 0),
    ("heldout_fraction", 0), ("heldout_fraction", 1), ("min_examples", 0), ("promote_margin", -0.1),
    ("max_regression", 1.5), ("device", "gpu"), ("kl_weight", float("nan")),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        DreamConfig(**{field: value})


def test_config_defaults_and_parsing():
    c = DreamConfig()
    assert c.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (c.lora_r, c.lora_alpha, c.grad_accum, c.max_seq_len, c.checkpoint_every) == (8, 16, 4, 768, 25)
    assert c.examples_per_step == 4
    assert DreamConfig(target_modules="q_proj, v_proj").target_modules == ("q_proj", "v_proj")
    assert DreamConfig.from_dict(c.to_dict()) == c
    assert DreamConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(ConfigError, match="unknown DREAM setting.*lora_rank"):
        DreamConfig.from_dict({"lora_rank": 8})


# ----------------------------------------------------------------------------- encoding / masking

def test_labels_mask_exactly_the_prompt(tokenizer):
    ex = arithmetic_examples(1)[0]
    enc = encode_example(tokenizer, ex, 64)
    prompt_text = tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    p = enc["n_prompt_tokens"]
    assert p == len(prompt_ids) and enc["n_response_tokens"] == len(resp_ids)
    assert enc["input_ids"].tolist() == prompt_ids + resp_ids
    assert enc["labels"][:p].eq(IGNORE_INDEX).all()
    assert enc["labels"][p:].tolist() == resp_ids
    assert enc["attention_mask"].eq(1).all() and enc["prompt_truncated"] == 0 and enc["kd"] == "none"


def test_long_prompt_is_cut_from_the_left_never_the_response(tokenizer):
    ex = Example(messages=[{"role": "user", "content": "please " * 40 + "what is one plus two"}],
                 response="the answer is three .")
    full = encode_example(tokenizer, ex, 256)
    cut = encode_example(tokenizer, ex, 20)
    assert len(cut["input_ids"]) == 20 and cut["prompt_truncated"] == len(full["input_ids"]) - 20
    assert cut["input_ids"].tolist() == full["input_ids"][-20:].tolist()  # left cut keeps the question's end
    assert cut["n_response_tokens"] == full["n_response_tokens"]
    with pytest.raises(TrainingError, match="response alone has 6 tokens"):
        encode_example(tokenizer, ex, 6)


def test_cross_entropy_ignores_prompt_logits(tokenizer):
    enc = encode_example(tokenizer, arithmetic_examples(1)[0], 64)
    labels = enc["labels"][None]
    T, V, p = labels.shape[1], 48, enc["n_prompt_tokens"]
    torch.manual_seed(1)
    logits = torch.randn(1, T, V)
    loss, parts = distill_loss(logits, labels)
    changed = logits.clone()
    changed[:, : p - 1] = torch.randn(1, p - 1, V) * 10  # positions predicting prompt tokens
    assert torch.allclose(distill_loss(changed, labels)[0], loss)
    changed[:, p - 1] += torch.randn(V)  # the position predicting the first response token
    assert not torch.allclose(distill_loss(changed, labels)[0], loss)
    manual = torch.stack([-torch.log_softmax(logits[0, t - 1], -1)[labels[0, t]] for t in range(p, T)]).mean()
    assert torch.allclose(loss, manual) and parts["n_tokens"] == T - p and parts["kl"] == 0.0


# ----------------------------------------------------------------------------- the KL term

def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_term_on_a_hand_made_example(temperature):
    # three positions, vocabulary of 3; position 0's logits predict labels[1] = 1, position 1's predict labels[2] = 2
    z0, z1 = [1.0, 2.0, 0.5], [0.0, -1.0, 3.0]
    logits = torch.tensor([[z0, z1, [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    inf = float("-inf")
    t_ids = torch.tensor([[[0, 0], [0, 1], [0, 0]]])  # teacher top-2 for the token at position 1 only
    t_lp = torch.tensor([[[inf, inf], [math.log(0.6), math.log(0.2)], [inf, inf]]])
    loss, parts = distill_loss(logits, labels, t_ids, t_lp, kl_weight=0.5, temperature=temperature)

    # by hand: teacher renormalised over its top-2 at temperature T; student over the full vocabulary
    p = _softmax([math.log(0.6) / temperature, math.log(0.2) / temperature])
    q = _softmax([z / temperature for z in z0])
    kl = temperature ** 2 * sum(pj * (math.log(pj) - math.log(q[j])) for j, pj in enumerate(p))
    ce = (-math.log(_softmax(z0)[1]) - math.log(_softmax(z1)[2])) / 2
    if temperature == 1.0:
        assert p == pytest.approx([0.75, 0.25])
    assert parts["n_kd"] == 1 and parts["n_tokens"] == 2
    assert parts["kl"] == pytest.approx(kl, rel=1e-5)
    assert parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert float(loss) == pytest.approx(ce + 0.5 * kl, rel=1e-5)


def test_kl_gradient_is_finite_and_weight_zero_turns_it_off():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    t_ids = torch.randint(0, 7, (2, 5, 3))
    t_lp = torch.log_softmax(torch.randn(2, 5, 3), -1)
    t_lp[0, 2, 2] = float("-inf")  # fewer than k entries
    t_lp[1, 3] = float("-inf")     # a position without teacher data
    loss, parts = distill_loss(logits, labels, t_ids, t_lp, kl_weight=1.0)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and parts["kl"] > 0 and parts["n_kd"] == 5
    off, parts0 = distill_loss(logits, labels, t_ids, t_lp, kl_weight=0.0)
    assert parts0["kl"] == 0.0 and float(off.detach()) == pytest.approx(parts["ce"], rel=1e-6)


def test_teacher_topk_aligned_to_response_tokens(tokenizer):
    ex = arithmetic_examples(1)[0]
    n = len(tokenizer(ex.response, add_special_tokens=False)["input_ids"])
    rows = [{5 + i: -0.1, 6 + i: -2.5, 7 + i: -3.0} for i in range(n + 1)]  # + EOS
    enc = encode_example(tokenizer, Example(ex.messages, ex.response, rows), 64, top_k=2)
    p = enc["n_prompt_tokens"]
    assert enc["kd"] == "aligned" and enc["teacher_topk_ids"].shape == (len(enc["input_ids"]), 2)
    assert enc["teacher_topk_ids"][p].tolist() == [5, 6]  # best two, best first
    assert torch.isinf(enc["teacher_topk_logprobs"][:p]).all()
    bad = encode_example(tokenizer, Example(ex.messages, ex.response, rows[:2]), 64)
    assert bad["kd"] == "length_mismatch" and "teacher_topk_ids" not in bad


# ----------------------------------------------------------------------------- training

def test_training_lowers_the_loss(tokenizer, tmp_path):
    examples = arithmetic_examples(8)
    cfg = small_config(epochs=6, checkpoint_every=100)
    model = tiny_model("llama")
    encoded = [encode_example(tokenizer, e, cfg.max_seq_len) for e in examples]
    before = eval_loss(model, encoded, cfg)
    res = train_lora(model, tokenizer, examples, cfg, tmp_path / "run", progress=False)
    after = eval_loss(model, encoded, cfg)
    assert res.steps == 6 * 4 and len(res.losses) == res.steps and res.resumed_from == 0
    assert after < 0.5 * before, (before, after)
    assert (res.adapter_dir / "adapter_config.json").is_file()
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()


def test_training_with_teacher_logprobs_on_qwen2(tokenizer, tmp_path):
    examples = []
    for ex in arithmetic_examples(4):
        ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(ex.messages, ex.response, [{t: -0.05, 4: -3.0} for t in ids], ex.key))
    examples[1].teacher_topk = None  # batches mix examples with and without teacher logprobs
    cfg = small_config(epochs=4, kl_weight=1.0, kl_top_k=2, checkpoint_every=100)
    model = tiny_model("qwen2")
    res = train_lora(model, tokenizer, examples, cfg, tmp_path / "kd", progress=True)  # the rich bar runs too
    assert res.steps == 8 and all(k > 0 and math.isfinite(k) for k in res.kl_losses)
    assert res.losses[-1] < res.losses[0]


class Killed(Exception):
    pass


def test_checkpoint_resume_continues_where_it_was_killed(tokenizer, tmp_path):
    examples = arithmetic_examples(6)
    cfg = small_config(epochs=2, lora_dropout=0.1)  # 3 steps per epoch, 6 in all; dropout exercises the RNG
    out = tmp_path / "killed"

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_lora(tiny_model("llama"), tokenizer, examples, cfg, out, progress=False, on_step=kill_at_3)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"] and not (out / "adapter").exists()
    (out / "checkpoints" / ".tmp-step-00000004-999").mkdir()  # a save that died midway is ignored

    resumed = train_lora(tiny_model("llama"), tokenizer, examples, cfg, out, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 6 and len(resumed.losses) == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]

    straight = train_lora(tiny_model("llama"), tokenizer, examples, cfg, tmp_path / "straight", progress=False)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    from safetensors.torch import load_file
    a = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    again = train_lora(tiny_model("llama"), tokenizer, examples, cfg, out, progress=False)
    assert again.resumed_from == 6 and again.steps == 6 and again.losses == resumed.losses


def test_checkpoint_of_another_run_is_refused(tokenizer, tmp_path):
    examples = arithmetic_examples(4)
    train_lora(tiny_model(), tokenizer, examples, small_config(epochs=1), tmp_path / "r", progress=False)
    with pytest.raises(TrainingError, match="different training run"):
        train_lora(tiny_model(), tokenizer, examples, small_config(epochs=1, learning_rate=5e-3),
                   tmp_path / "r", progress=False)


def test_no_examples_and_bad_targets(tokenizer, tmp_path):
    with pytest.raises(TrainingError, match="no training examples"):
        train_lora(tiny_model(), tokenizer, [], small_config(), tmp_path / "e", progress=False)
    with pytest.raises(ConfigError, match="target_modules"):
        train_lora(tiny_model(), tokenizer, arithmetic_examples(2), small_config(target_modules="nonexistent"),
                   tmp_path / "t", progress=False)
