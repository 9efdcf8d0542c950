"""Evaluation: answer loss against a hand computation, left-padded greedy generation against
one-at-a-time generation, final-answer extraction, the metrics dictionary. A tiny random LLaMA and a
byte-level BPE trained here; no real model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from _tokenizers import tiny_tokenizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from galore_plus.app import evaluate as ev  # noqa: E402
from galore_plus.app.data import Example, encode, prompt_ids  # noqa: E402
from galore_plus.app.evaluate import answer_loss, evaluate, extract_final, generate, text_metrics  # noqa: E402

def tiny_llama(tokenizer, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).float()


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat"])
def tokenizer(request):
    return tiny_tokenizer(chat=request.param)


EXAMPLES = [
    Example(prompt="Tom has 3 apples and buys 4 more. How many apples?", answer="3 + 4 = 7\n#### 7", final="7"),
    Example(prompt="2 hours?", answer="60 * 2 = 120 miles.\n#### 120", final="120"),
    Example(prompt="The cat sat on the mat. The dog ran in the park. Calculate 12 * 3 - 5.", answer="#### 31",
            final="31"),
]


def hand_loss(model, tokenizer, examples):
    """Σ −log p(answer token | everything before) / number of answer tokens, one unpadded
    sequence at a time, a plain loop over positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            enc = encode(tokenizer, ex, max_length=512)
            ids = torch.tensor([enc["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for t, label in enumerate(enc["labels"]):
                if label != -100:
                    total -= logp[t - 1, label].item()
                    count += 1
    return total / count


def test_answer_loss_equals_the_hand_computed_token_mean(tokenizer):
    model = tiny_llama(tokenizer)
    model.train()
    expected = hand_loss(model.eval(), tokenizer, EXAMPLES)
    model.train()
    # batch of 2 + batch of 1 with different answer lengths: a mean of batch means would differ
    got = answer_loss(model, tokenizer, EXAMPLES, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-5)
    assert model.training  # mode restored
    assert answer_loss(model, tokenizer, EXAMPLES, batch_size=8) == pytest.approx(expected, abs=1e-5)
    model.eval()
    answer_loss(model, tokenizer, EXAMPLES[:1])
    assert not model.training


def test_answer_loss_without_logits_to_keep():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)

    class Plain(torch.nn.Module):  # a model whose forward has no logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    expected = hand_loss(model.eval(), tokenizer, EXAMPLES)
    assert answer_loss(Plain(model), tokenizer, EXAMPLES, batch_size=2) == pytest.approx(expected, abs=1e-5)


def test_generate_left_padded_batch_equals_one_at_a_time(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    short, long = EXAMPLES[1], EXAMPLES[2]
    assert len(prompt_ids(tokenizer, long.prompt)) > len(prompt_ids(tokenizer, short.prompt)) + 5
    alone = generate(model, tokenizer, [short], max_new_tokens=8)
    batched = generate(model, tokenizer, [short, long, short], max_new_tokens=8, batch_size=3)
    assert batched[0] == batched[2] == alone[0]
    assert batched[1] == generate(model, tokenizer, [long], max_new_tokens=8)[0]
    assert alone[0]  # the random model says something (no EOS at once)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == "<pad>"  # the tokenizer is untouched


def test_generate_returns_new_text_up_to_the_first_eos():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=2)
    ids = torch.tensor([prompt_ids(tokenizer, EXAMPLES[0].prompt)])
    raw = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    raw = raw.tolist()
    assert tokenizer.eos_token_id not in raw
    # make the model's third greedy token an EOS (through its generation config): the text stops before it
    stop = raw[2]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    out = generate(model, tokenizer, EXAMPLES[:1], max_new_tokens=6)
    assert out == [tokenizer.decode(raw[:raw.index(stop)])]
    # a model that always says EOS says nothing
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0 ...
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
    model.lm_head.bias.data[tokenizer.eos_token_id] = 10.0  # ... except EOS's
    assert generate(model, tokenizer, EXAMPLES, max_new_tokens=5, batch_size=2) == ["", "", ""]


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 1,000", "1000"),
    ("so the answer is #### -2.", "-2"),
    ("#### 3.0 and then 5", "3"),
    ("#### $12.50", "12.5"),
    ("He had 5 then 8 apples.", "8"),
    ("The total is 1,234,567 dollars", "1234567"),
    ("5-3=2", "2"),
    ("It costs -4 degrees", "-4"),
    ("x-3", "3"),
    ("1, 2, 3", "3"),
    ("#### none, but 7 earlier", "7"),
    ("no number here", None),
    ("", None),
])
def test_extract_final(text, expected):
    assert extract_final(text) == expected


def test_evaluate_returns_the_metrics_of_its_kind():
    tokenizer = tiny_tokenizer(chat=True)
    model = tiny_llama(tokenizer)
    math = evaluate(model, tokenizer, EXAMPLES, "math", max_new_tokens=4, batch_size=2)
    assert set(math) == {"n", "answer_loss", "perplexity", "accuracy"} and math["n"] == 3
    assert math["perplexity"] == pytest.approx(2.718281828459045 ** math["answer_loss"])
    assert 0.0 <= math["accuracy"] <= 1.0
    assert math["answer_loss"] == pytest.approx(answer_loss(model, tokenizer, EXAMPLES))
    text_examples = [Example(prompt="name 1", answer="The cat sat on the mat."),
                     Example(prompt="name 2", answer="The dog ran in the park.")]
    text = evaluate(model, tokenizer, text_examples, "text", max_new_tokens=4, batch_size=2, return_generations=True)
    assert set(text) == {"n", "answer_loss", "perplexity", "bleu", "rouge_l", "generations"}
    assert len(text["generations"]) == 2
    quick = evaluate(model, tokenizer, text_examples, "text", max_new_tokens=4, batch_size=2, generate_answers=False)
    assert set(quick) == {"n", "answer_loss", "perplexity"}
    with pytest.raises(ValueError, match="kind must be one of"):
        evaluate(model, tokenizer, text_examples, "code", max_new_tokens=4, batch_size=2)


def test_evaluate_scores_generations(monkeypatch):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    monkeypatch.setattr(ev, "generate", lambda *a, **k: ["3 + 4 = 7\n#### 7", "it is 120.0", "#### 30"])
    scores = evaluate(model, tokenizer, EXAMPLES, "math", max_new_tokens=4, batch_size=2)
    assert scores["accuracy"] == pytest.approx(2 / 3)
    refs = ["the cat sat on the mat today", "the dog ran in the park"]
    monkeypatch.setattr(ev, "generate", lambda *a, **k: [" the cat sat on the mat today\n", "a bird flew"])
    scores = evaluate(model, tokenizer, [Example("a", refs[0]), Example("b", refs[1])], "text",
                      max_new_tokens=4, batch_size=2)
    assert scores["rouge_l"] == pytest.approx((1.0 + 0.0) / 2)
    assert 0.0 < scores["bleu"] < 100.0


def test_text_metrics_extremes():
    same = text_metrics(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert same == {"bleu": pytest.approx(100.0), "rouge_l": pytest.approx(1.0)}
    other = text_metrics(["completely unrelated words here"], ["the cat sat on the mat today"])
    assert other["bleu"] == pytest.approx(0.0) and other["rouge_l"] == pytest.approx(0.0)


def test_dora_caching_gives_the_same_results_and_is_dropped_afterwards(monkeypatch):
    """Evaluation caches an unmerged DoRA layer's ``B @ A`` and weight norm (PEFT's DoraCaching):
    the same loss and generations, bit for bit, as recomputing them at every forward; and weights
    changed after an evaluation are scored with their own norm, not a stale one."""
    peft = pytest.importorskip("peft")
    if not hasattr(pytest.importorskip("peft.helpers"), "DoraCaching"):
        pytest.skip("this peft has no DoraCaching: evaluation recomputes the DoRA norm, nothing to test")
    from peft.tuners.lora.dora import DoraLinearLayer

    tokenizer = tiny_tokenizer()
    model = peft.get_peft_model(tiny_llama(tokenizer), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)  # B = 0 at init would make the adapter (and the test) trivial

    def results():
        return (answer_loss(model, tokenizer, EXAMPLES, batch_size=2),
                generate(model, tokenizer, EXAMPLES, max_new_tokens=6, batch_size=2))

    stores = []
    real_store = DoraLinearLayer._cache_store
    monkeypatch.setattr(DoraLinearLayer, "_cache_store", lambda self, k, v: (stores.append(k), real_store(self, k, v)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()  # and left there: no train() call will clear a cache when the weights change below
    cached = results()
    assert stores, "DoRA caching was not used"
    assert all(not m._dora_cache for m in model.modules() if hasattr(m, "_dora_cache"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.mul_(3.0)
    changed = results()
    assert changed[0] != cached[0]

    monkeypatch.setattr(ev, "_dora_caching", lambda: ev.nullcontext())  # recompute at every forward
    assert results() == changed
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name])
    assert results() == cached


def test_answer_loss_sum_is_the_summed_next_token_loss_of_the_labelled_positions():
    from galore_plus.app.encoding import answer_loss_sum

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected = 0.0
    for b in range(2):
        for t in range(4):  # logits at t predict the label at t + 1
            if labels[b, t + 1] != -100:
                expected -= torch.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]].item()
    assert answer_loss_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)
