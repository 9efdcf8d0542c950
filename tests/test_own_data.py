"""``galore-plus finetune`` as a user runs it on their own model and data (issue 15), on the tiny model:
a 40-example file in each form trains and evaluates on a held-out share; final/ loads with
``from_pretrained`` and gives the trained model's logits; ``galore-plus evaluate`` on it gives the run's
final metrics; bf16 weights; gradient checkpointing changes no loss; the projected backward and the
embedding choices; a chat template's refusal is a FILE:LINE error before the model loads; an old
checkpoint without a manifest resumes only when trusted."""

from __future__ import annotations

import json
import sys
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from galore_plus.app import checkpoint, models
from galore_plus.app import finetune as finetune_module
from galore_plus.app.cli import main
from galore_plus.app.config import EMBEDDINGS, FinetuneConfig
from galore_plus.app.finetune import finetune
from galore_plus.integration import EMBEDDINGS as LIBRARY_EMBEDDINGS

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import crash_at  # noqa: E402

TINY = dict(model="tiny", method="galore+", rank=4, max_steps=4, batch_size=2, n_train=100, n_test=200, max_length=64,
            max_new_tokens=4, eval_batch_size=8, warmup_steps=1, lr=1e-3, update_proj_gap=2, residual_warmup=1)


def config(tmp_path, name="run", **overrides):
    return FinetuneConfig(**{**TINY, "output_dir": str(tmp_path / name), **overrides})


def losses(directory: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (directory / "log.jsonl").read_text().splitlines()]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def forty(form: str) -> list[dict]:
    """40 examples of one form (sums, so that math forms have a '#### N')."""
    out = []
    for i in range(40):
        q, a = f"What is {i} plus {i % 7}?", f"{i} + {i % 7} = {i + i % 7}\n#### {i + i % 7}"
        out.append({"gsm8k": {"question": q, "answer": a},
                    "text": {"input": q, "output": f"the sum is {i + i % 7}"},
                    "alpaca": {"instruction": "Add the numbers.", "input": f"{i} and {i % 7}", "output": a},
                    "completion": {"prompt": q, "completion": f"It is {i + i % 7}."},
                    "chat": {"messages": [{"role": "system", "content": "You add numbers."},
                                          {"role": "user", "content": f"I have {i}."},
                                          {"role": "assistant", "content": "Noted."},
                                          {"role": "user", "content": f"Add {i % 7}."},
                                          {"role": "assistant", "content": a}]}}[form])
    return out


# ---------------------------------------------------------------------------------------------- own data


@pytest.mark.parametrize("form, kind", [("gsm8k", "math"), ("text", "text"), ("alpaca", "math"),
                                        ("completion", "text"), ("chat", "math")])
def test_a_40_example_file_of_each_form_trains_and_evaluates_on_a_held_out_share(tmp_path, capsys, form, kind):
    data = write_jsonl(tmp_path / f"{form}.jsonl", forty(form))
    out = tmp_path / "run"
    assert main(["finetune", "--model", "tiny", "--data", data, "--rank", "4", "--max-steps", "2",
                 "--batch-size", "2", "--max-length", "96", "--max-new-tokens", "4", "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"data: {data} (40 examples, " in err and ": 36 for training, 4 held out" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["data_form"], metrics["n_train"], metrics["n_test"]) == (form, 36, 4)
    scores = {"math": {"accuracy"}, "text": {"bleu", "rouge_l"}}[kind]
    for when in ("eval_before", "eval_after"):
        assert {"n", "answer_loss", "perplexity"} | scores == set(metrics[when]) and metrics[when]["n"] == 4


def test_a_file_of_other_types_trains_too(tmp_path):
    import datasets

    records = forty("completion")
    datasets.Dataset.from_list(records).to_csv(str(tmp_path / "mine.csv"), index=False)
    metrics = finetune(config(tmp_path, data=str(tmp_path / "mine.csv"), max_steps=1, eval_before=False))
    assert (metrics["data_form"], metrics["n_train"], metrics["n_test"]) == ("completion", 36, 4)


def test_nothing_held_out_trains_without_evaluating(tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", forty("text"))
    metrics = finetune(config(tmp_path, data=data, eval_fraction=0.0, max_steps=2))
    assert metrics["n_train"] == 40 and metrics["eval_before"] is None and metrics["eval_after"] is None


def test_a_chat_template_that_refuses_an_example_is_file_line_before_the_model_loads(tmp_path, capsys,
                                                                                    monkeypatch):
    finetune(config(tmp_path, name="base", max_steps=1, eval_before=False, data="arithmetic", n_test=2))
    model_dir = tmp_path / "model"
    shutil.copytree(tmp_path / "base" / "final", model_dir)
    settings = json.loads((model_dir / "tokenizer_config.json").read_text())
    settings["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                 "{{ raise_exception('System messages are not supported') }}{% endif %}"
                                 "{{ m['content'] }}{% endfor %}")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    records = forty("chat")
    for r in records[:30]:
        r["messages"] = r["messages"][1:]  # no system message
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["finetune", "--model", str(model_dir), "--data", data, "--rank", "4", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    # the ten records it refuses are one line, with their count (issue 28)
    assert err == [f"galore-plus: {data}: 10 of 40 records: the tokenizer of --model {model_dir} refuses it: System "
                   "messages are not supported (first at line 31)"]


# ---------------------------------------------------------------------------------------------- final/


def first_batch_logits(model) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("method, extra", [("galore+", {}), ("lora", {}), ("dora", {}),
                                           ("galore", {"dtype": "bfloat16"})])
def test_final_loads_with_from_pretrained_and_gives_the_trained_models_logits(tmp_path, monkeypatch, method, extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = {}
    real_export = finetune_module.export

    def export(run, built):
        was = built.model.training
        built.model.eval()
        seen["logits"] = first_batch_logits(built.model)
        built.model.train(was)
        return real_export(run, built)

    monkeypatch.setattr(finetune_module, "export", export)
    finetune(config(tmp_path, method=method, data="arithmetic", n_test=2, eval_before=False, **extra))
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    assert not any("lora" in name for name, _ in model.named_parameters())  # adapters merged
    assert model.dtype == getattr(torch, extra.get("dtype", "float32"))
    got = first_batch_logits(model.eval())
    if method in ("lora", "dora"):  # merging rounds differently from adding the adapter's output
        torch.testing.assert_close(got, seen["logits"], rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(got, seen["logits"])
    tokenizer = AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert tokenizer.eos_token == "<|endoftext|>" and len(tokenizer) == model.config.vocab_size


def test_evaluate_on_final_gives_the_runs_final_metrics(tmp_path, capsys):
    held = write_jsonl(tmp_path / "held.jsonl", forty("text")[:6])
    train = write_jsonl(tmp_path / "train.jsonl", forty("text")[6:])
    metrics = finetune(config(tmp_path, data=train, eval_data=held, eval_before=False))
    assert metrics["n_test"] == 6
    final = str(tmp_path / "run" / "final")
    capsys.readouterr()
    assert main(["evaluate", "--model", final, "--data", held, "--max-new-tokens", "4", "--max-length", "64",
                 "--output", str(tmp_path / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "eval.json").read_text())
    assert {k: printed[k] for k in metrics["eval_after"]} == metrics["eval_after"]
    assert printed["form"] == "text" and set(metrics["eval_after"]) == {"n", "answer_loss", "perplexity", "bleu",
                                                                         "rouge_l"}
    # a built-in task: the held-out set finetune draws for the seed and --n-test
    metrics = finetune(config(tmp_path, name="arith", data="arithmetic", n_test=5, eval_before=False))
    capsys.readouterr()
    result = main(["evaluate", "--model", str(tmp_path / "arith" / "final"), "--data", "arithmetic", "--n-test", "5",
                   "--max-new-tokens", "4", "--max-length", "64"])
    assert result == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in metrics["eval_after"]} == metrics["eval_after"]


def test_evaluate_refuses_bad_input_in_one_line(tmp_path, capsys):
    for args, message in [(["--model", "nope", "--data", "arithmetic"], "evaluate: --model 'nope': not smollm2"),
                          (["--model", "tiny"], "evaluate: the following arguments are required: --data"),
                          (["--model", "tiny", "--data", str(tmp_path / "x.jsonl")], "no such file"),
                          (["--model", "tiny", "--data", "arithmetic", "--n-test", "0"], "--n-test must be ≥ 1")]:
        capsys.readouterr()
        assert main(["evaluate", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------- precision, memory


def test_bfloat16_trains_bf16_weights(tmp_path):
    metrics = finetune(config(tmp_path, data="arithmetic", n_test=2, dtype="bfloat16", eval_before=False))
    assert metrics["dtype"] == "bfloat16"
    weights = load_file(tmp_path / "run" / "checkpoint" / "model.safetensors")
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    initial = models.tiny_model(len(models.tiny_tokenizer()), seed=0, dtype=torch.bfloat16).state_dict()
    assert initial["lm_head.weight"].dtype == torch.bfloat16
    changed = [k for k, w in weights.items() if not torch.equal(w, initial[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed  # (tied: one key)
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "run"))))


@pytest.mark.parametrize("method, extra", [("galore+", {}), ("galore+", {"layerwise": True, "grad_accum": 2}),
                                           ("galore", {"projected_backward": False}), ("lora", {})])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, monkeypatch, method, extra):
    """The same losses and weights, and the decoder layers run again in backward (counted in their MLPs:
    the layer's own forward is what transformers wraps)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = []
    real_forward = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda *a, **k: (calls.append(1), real_forward(*a, **k))[1])
    options = dict(data="arithmetic", n_test=2, eval_before=False, method=method, max_steps=5, export=False, **extra)
    finetune(config(tmp_path, name="plain", **options))
    plain_calls = len(calls)
    metrics = finetune(config(tmp_path, name="checkpointed", gradient_checkpointing=True, **options))
    assert metrics["gradient_checkpointing"] is True
    assert len(calls) - plain_calls == plain_calls + 2 * 5 * (2 if extra.get("grad_accum") else 1)  # recomputed
    assert losses(tmp_path / "checkpointed") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
    a, b = (load_file(tmp_path / name / "checkpoint" / "model.safetensors") for name in ("plain", "checkpointed"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- optimizer options


def test_the_projected_backward_is_on_for_galore_and_recorded(tmp_path):
    """On by default for galore and galore+ (in layer-wise mode too), recorded in metrics.json; the same
    training in exact arithmetic, so plain GaLore's float32 losses agree. (GaLore+'s can differ by a
    few 1e-3 after a refresh on the tiny model: the residual's entries, summed in another order, differ
    by round-off, and a randomized rank-4 subspace of nearly equal singular values turns that into a
    visibly different projector; the library's tests compare the paths in float64.)"""
    options = dict(data="arithmetic", n_test=2, eval_before=False, max_steps=5, method="galore")
    on = finetune(config(tmp_path, name="on", **options))
    off = finetune(config(tmp_path, name="off", projected_backward=False, **options))
    assert on["projected_backward"] is True and off["projected_backward"] is False
    assert on["config"]["projected_backward"] is None  # the default, resolved per method
    assert losses(tmp_path / "on") == pytest.approx(losses(tmp_path / "off"), rel=1e-5)
    for method, extra, used in (("galore+", {"layerwise": True}, True), ("adamw", {}, False)):
        metrics = finetune(config(tmp_path, name=method, **{**options, "method": method, **extra}))
        assert metrics["projected_backward"] is used, method


def test_embeddings_choices(tmp_path):
    assert EMBEDDINGS == LIBRARY_EMBEDDINGS
    options = dict(data="arithmetic", n_test=2, eval_before=False, max_steps=3)
    initial = models.tiny_model(len(models.tiny_tokenizer()), seed=0).state_dict()["lm_head.weight"]
    for choice, changes in (("frozen", False), ("low_rank", True), ("full", True)):
        finetune(config(tmp_path, name=choice, embeddings=choice, **options))
        weights = load_file(tmp_path / choice / "checkpoint" / "model.safetensors")
        assert (not torch.equal(weights["lm_head.weight"], initial)) == changes, choice  # tied: the embedding


# ---------------------------------------------------------------------------------------------- old checkpoints


def test_a_checkpoint_from_before_manifests_resumes_only_when_trusted(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "mine.jsonl", forty("gsm8k"))
    finetune(config(tmp_path, name="full", data=data, max_steps=6, eval_before=False))
    run = tmp_path / "old"
    crash_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(tmp_path, name="old", data=data, max_steps=6, save_every=3, eval_before=False))
    monkeypatch.undo()
    ckpt = run / "checkpoint"
    (ckpt / "manifest.json").unlink()  # what galore-plus wrote before manifests
    state = json.loads((ckpt / "state.json").read_text())
    for key in ("format", "world_size", "data_sha256", "eval_data_sha256"):
        del state[key]
    (ckpt / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err and not (ckpt / "manifest.json").exists()
    assert main(["finetune", "--resume", str(run), "--trust-unverified-checkpoint"]) == 0
    err = capsys.readouterr().err
    assert (f"galore-plus: {ckpt} has no manifest.json (it was written before galore-plus wrote manifests), so "
            "nothing can verify it; trusting its 4 files as they are (--trust-unverified-checkpoint) and writing "
            "manifest.json, with world_size, data_sha256, eval_data_sha256 added to state.json") in err
    a, b = (load_file(d / "checkpoint" / "model.safetensors") for d in (tmp_path / "full", run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # incomplete: refused, nothing changed
    (ckpt / "manifest.json").unlink()
    (ckpt / "optimizer.pt").unlink()
    before = sorted(p.name for p in ckpt.iterdir())
    assert main(["finetune", "--resume", str(run), "--max-steps", "7", "--trust-unverified-checkpoint"]) == 2
    assert "has no optimizer.pt: it is incomplete and cannot be trusted" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_a_saved_config_without_the_new_options_reproduces_the_old_run():
    old = {"model": "tiny", "data": "/x.jsonl", "method": "galore+"}
    restored = checkpoint.from_dict(old, "state.json")
    assert (restored.dtype, restored.projected_backward, restored.eval_fraction) == ("float32", False, 1.0)


def test_a_changed_eval_file_is_refused_at_resume(tmp_path, capsys):
    held = write_jsonl(tmp_path / "held.jsonl", forty("text")[:4])
    finetune(config(tmp_path, data="arithmetic", eval_data=held, eval_before=False, max_steps=2))
    write_jsonl(tmp_path / "held.jsonl", forty("text")[:5])
    capsys.readouterr()
    assert main(["finetune", "--resume", str(tmp_path / "run"), "--max-steps", "3"]) == 2
    assert f"the data file {held} has changed since the run started" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- validation


def test_a_validation_set_is_scored_by_answer_loss_and_generation_can_be_skipped(tmp_path, capsys):
    from galore_plus.app.data import load_task
    from galore_plus.app.evaluate import evaluate

    common = dict(data="arithmetic", n_train=20, n_test=6, max_steps=2, eval_before=False)
    plain = finetune(config(tmp_path, name="plain", **common))
    held = finetune(config(tmp_path, name="held", n_validation=8, generate=False, **common))
    assert "20 for training, 8 for validation, 6 held out" in capsys.readouterr().err
    assert held["n_validation"] == 8 and plain["n_validation"] == 0 and plain["eval_validation"] is None
    assert set(held["eval_validation"]) == {"n", "answer_loss", "perplexity"} and held["eval_validation"]["n"] == 8
    assert "accuracy" in plain["eval_after"] and set(held["eval_after"]) == {"n", "answer_loss", "perplexity"}
    # the validation metrics are the trained model's on the examples load_task holds out (final/ is it)
    model, tokenizer = models.load_model(str(tmp_path / "held" / "final"))
    task = load_task("arithmetic", n_train=20, n_test=6, seed=0, n_validation=8)
    again = evaluate(model, tokenizer, task.validation, "math", max_new_tokens=4, batch_size=8, max_length=64,
                     generate_answers=False)
    assert again["answer_loss"] == pytest.approx(held["eval_validation"]["answer_loss"], rel=1e-5)
    assert json.loads((tmp_path / "held" / "metrics.json").read_text())["config"]["n_validation"] == 8
