"""Issue 28's ``--packing`` and ``--chat-template FILE``: packed sequences hold every answer token
once (as many as unpacked), each example's logits in a packed sequence are its logits alone (no
attention across examples), packing is a pure function of the seed, a tiny run trains with it; a
chat template file replaces the tokenizer's own in training, evaluation and ``final/``, and one that
fails to render is a one-line error before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from galore_plus.app import models
from galore_plus.app.cli import main
from galore_plus.app.config import FinetuneConfig, from_dict
from galore_plus.app.encoding import IGNORE_INDEX, collate, encode
from galore_plus.app.errors import ConfigError
from galore_plus.app.finetune import finetune
from galore_plus.app.packing import pack, packed_groups
from galore_plus.app.tasks import load_task
from galore_plus.app.templates import build_prompt, use_chat_template

TINY = dict(model="tiny", method="galore+", rank=4, max_steps=3, batch_size=2, n_train=100, n_test=4, max_length=96,
            max_new_tokens=4, eval_batch_size=8, warmup_steps=1, lr=1e-3, update_proj_gap=2, residual_warmup=1,
            eval_before=False)
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"I have {i}."}, {"role": "assistant", "content": "Noted."},
                          {"role": "user", "content": f"Add {i % 5}."},
                          {"role": "assistant", "content": f"{i} + {i % 5} = {i + i % 5}"}]} for i in range(n)]


@pytest.fixture(scope="module")
def encoded():
    tokenizer = models.load_tokenizer("tiny")
    task = load_task("arithmetic", n_train=40, n_test=1, seed=0)
    return tokenizer, [encode(tokenizer, ex, 64) for ex in task.train]


def answer_tokens(labels) -> int:
    """Tokens that carry loss: labels after the first (the first token is predicted by nothing)."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------- packing


def test_groups_hold_every_example_once_within_the_length_and_depend_on_the_seed_only():
    lengths = [5, 9, 3, 12, 7, 4, 20, 1, 16, 8] * 5
    groups = packed_groups(lengths, 20, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 20 for g in groups)
    assert len(groups) <= -(-sum(lengths) // 20) + 1  # best fit wastes at most one sequence's room here
    assert packed_groups(lengths, 20, seed=0) == groups and packed_groups(lengths, 20, seed=1) != groups
    with pytest.raises(ValueError, match="example 0 has 21 tokens"):
        packed_groups([21], 20, seed=0)


def test_packed_sequences_hold_every_answer_token_exactly_once(encoded):
    _, features = encoded
    packed = pack(features, 160, seed=0)
    assert len(packed) < len(features) / 2 and max(len(p["input_ids"]) for p in packed) <= 160
    assert sum(answer_tokens(p["labels"]) for p in packed) == sum(answer_tokens(f["labels"]) for f in features)
    # cut at the restarts of the position ids, the sequences are the examples, each once
    pieces = []
    for p in packed:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
        assert p["attention_mask"] == [1] * len(p["input_ids"])
        for a, b in zip(starts, starts[1:]):
            assert p["position_ids"][a:b] == list(range(b - a))
            pieces.append((tuple(p["input_ids"][a:b]), tuple(p["labels"][a:b])))
    expected = [(tuple(f["input_ids"]), (IGNORE_INDEX, *f["labels"][1:])) for f in features]
    assert sorted(pieces) == sorted(expected)
    assert pack(features, 160, seed=0) == packed


def test_an_example_in_a_packed_batch_has_its_own_logits(encoded):
    tokenizer, features = encoded
    model, _ = models.load_model("tiny", tokenizer=tokenizer)
    model.train()  # as in training (dropout is 0): the cache is off, as finetune asks
    features = features[:12]
    batch = collate(pack(features, 160, seed=0), tokenizer.pad_token_id)
    groups = packed_groups([len(f["input_ids"]) for f in features], 160, seed=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        crossing = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        worst = 0.0
        for row, group in enumerate(groups):
            start = 0
            for i in group:
                n = len(features[i]["input_ids"])
                alone = model(input_ids=torch.tensor([features[i]["input_ids"]])).logits[0]
                worst = max(worst, float((logits[row, start:start + n] - alone).abs().max()))
                start += n
    assert worst < 1e-4
    assert float((crossing - logits).abs().max()) > 1e-2  # without the position ids examples would see each other


def test_a_tiny_run_trains_with_packing(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chats(40))
    common = {**TINY, "data": data, "max_length": 256}
    plain = finetune(FinetuneConfig(**common, output_dir=str(tmp_path / "plain")))
    packed = finetune(FinetuneConfig(**common, packing=True, output_dir=str(tmp_path / "packed")))
    assert "packing: 36 training examples in " in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "packed" / "log.jsonl").read_text().splitlines()]
    plain_log = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(0 < r["loss"] < 20 for r in log)
    assert all(p["tokens"] > q["tokens"] for p, q in zip(log, plain_log))  # a batch of 2 sequences holds more
    assert packed["config"]["packing"] is True and packed["eval_after"]["n"] == plain["eval_after"]["n"] == 4
    assert log[-1]["loss"] < log[0]["loss"]
    assert from_dict({"model": "tiny", "data": data}, "run.json").packing is False  # runs before it did not pack


# ---------------------------------------------------------------------------------------------- --chat-template


def test_a_chat_template_file_is_used_in_training_evaluation_and_final(tmp_path, capsys):
    from transformers import AutoTokenizer

    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    data = write_jsonl(tmp_path / "chat.jsonl", chats(20))
    finetune(FinetuneConfig(**{**TINY, "max_steps": 1}, data=data, chat_template=str(template),
                            output_dir=str(tmp_path / "run")))
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert saved.chat_template == TEMPLATE  # galore-plus evaluate on final/ renders with it too
    assert build_prompt(saved, "2+2?") == "[user] 2+2?[assistant] "  # transformers' Jinja trims blocks
    tokenizer = models.load_tokenizer("tiny")
    use_chat_template(tokenizer, str(template))
    example = load_task(data, n_train=100, n_test=1, seed=0).train[0]
    ids = encode(tokenizer, example, 96)["input_ids"]
    assert tokenizer.decode(ids).startswith(f"[user] {example.context[0][1]}[assistant] Noted.<|endoftext|>")


@pytest.mark.parametrize("text, message", [
    ("{% for m in messages %}{{ m['content'] }", r"template.jinja:1: not a valid Jinja template: unexpected '}'"),
    ("{{ raise_exception('no chat here') }}", r"template.jinja: cannot render a conversation \(TemplateError\): "
                                              "no chat here"),
    ("{{ messages[0]['content'] / 0 }}", r"template.jinja: cannot render a conversation \(TypeError\)"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", r"template.jinja: cannot render a conversation \(SecurityError\)"),
])
def test_a_template_that_fails_to_render_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, text,
                                                                             message):
    template = tmp_path / "template.jinja"
    template.write_text(text)
    data = write_jsonl(tmp_path / "chat.jsonl", chats(5))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    assert main(["finetune", "--model", "tiny", "--data", data, "--chat-template", str(template),
                 "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("galore-plus: --chat-template /")
    import re

    assert re.search(message, err[0]) and not out.exists()


def test_a_missing_or_empty_template_file_is_refused_with_the_options(tmp_path):
    from galore_plus.app.validation import validated

    with pytest.raises(ConfigError, match=r"^--chat-template .*none.jinja: cannot be read \(No such file"):
        validated(FinetuneConfig(model="tiny", chat_template=str(tmp_path / "none.jinja")))
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(ConfigError, match="empty.jinja: the file is empty; give a Jinja chat template"):
        validated(FinetuneConfig(model="tiny", chat_template=str(tmp_path / "empty.jinja")))
    assert from_dict({"model": "tiny"}, "run.json").chat_template is None


def test_records_a_template_refuses_are_one_line_naming_the_template(tmp_path, capsys):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{% if m['content'].startswith('I have 1') %}"
                        "{{ raise_exception('not this one') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    data = write_jsonl(tmp_path / "chat.jsonl", chats(20))
    assert main(["finetune", "--model", "tiny", "--data", data, "--chat-template", str(template),
                 "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"galore-plus: {data}: 11 of 20 records: the chat template {template} refuses it: not this one "
                   "(first at line 2)"]
