"""Fine-tuning data: reasoning-gym sources and their splits, JSONL files and their errors, prompts,
encodings, batches. No real model or tokenizer: a byte-level BPE trained here on a few sentences."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("reasoning_gym")
from _tokenizers import tiny_tokenizer  # noqa: E402

from galore_plus.app.builtin_tasks import _exact_value, _gsm_example, _gsm_symbolic  # noqa: E402
from galore_plus.app.data import (  # noqa: E402
    ARITHMETIC_CONFIG,
    DataError,
    Example,
    build_prompt,
    collate,
    encode,
    context_ids,
    load_task,
    normalize_number,
    prompt_ids,
    read_examples,
)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat"])
def tokenizer(request):
    return tiny_tokenizer(chat=request.param)


# ---------------------------------------------------------------------- reasoning-gym sources

def test_gsm_symbolic_question_split_is_disjoint_and_gsm8k_shaped():
    task = load_task("gsm_symbolic", n_train=40, n_test=12, seed=0)
    assert (task.name, task.kind) == ("gsm_symbolic", "math")
    assert len(task.train) == 40 and len(task.test) == 12
    train_q = [ex.prompt for ex in task.train]
    test_q = [ex.prompt for ex in task.test]
    assert len(set(train_q)) == 40 and len(set(test_q)) == 12
    assert not set(train_q) & set(test_q)
    for ex in task.train + task.test:
        assert ex.answer.endswith(f"#### {ex.final}")
        assert ex.answer.count("####") == 1
        assert normalize_number(ex.final) == ex.final
    # the test set does not depend on n_train; the seed changes everything
    again = load_task("gsm_symbolic", n_train=5, n_test=12, seed=0)
    assert again.test == task.test
    other = load_task("gsm_symbolic", n_train=5, n_test=12, seed=1)
    assert not {ex.prompt for ex in other.test} & set(test_q)


def test_gsm_symbolic_template_split_holds_out_whole_templates():
    task = load_task("gsm_symbolic", n_train=60, n_test=20, seed=3, split="template")
    assert len(task.train) == 60 and len(task.test) == 20
    train_t = {ex.template for ex in task.train}
    test_t = {ex.template for ex in task.test}
    assert None not in train_t | test_t
    assert not train_t & test_t
    assert test_t <= set(task.info["test_templates"])
    assert not set(task.info["test_templates"]) & set(task.info["train_templates"])
    assert not {ex.prompt for ex in task.train} & {ex.prompt for ex in task.test}
    # a different seed holds out different templates
    other = load_task("gsm_symbolic", n_train=60, n_test=20, seed=4, split="template")
    assert other.info["test_templates"] != task.info["test_templates"]


def test_gsm_symbolic_float_final_line_is_rewritten_to_the_answer():
    item = {"question": "How many? ", "answer": "8",
            "metadata": {"answer_cot": "I eat 4 * 2 = 8 grams\n#### 8.0"}}
    ex = _gsm_example(item, template=25)
    assert ex == Example(prompt="How many?", answer="I eat 4 * 2 = 8 grams\n#### 8", final="8", template=25)
    bad = {"question": "q", "answer": "9", "metadata": {"answer_cot": "no\n#### 8"}}
    assert _gsm_example(bad, template=1) is None


def test_arithmetic_is_small_exact_and_disjoint():
    task = load_task("arithmetic", n_train=50, n_test=15, seed=0)
    assert (task.name, task.kind) == ("arithmetic", "math")
    assert len(task.train) == 50 and len(task.test) == 15
    assert not {ex.prompt for ex in task.train} & {ex.prompt for ex in task.test}
    assert len({ex.prompt for ex in task.train}) == 50
    for ex in task.train + task.test:
        expression = re.fullmatch(r"Calculate (.+)\.", ex.prompt).group(1)
        numbers = re.findall(r"\d+", expression)
        # reasoning-gym may add a correction term to make a division exact: one more number
        assert ARITHMETIC_CONFIG["min_terms"] <= len(numbers) <= ARITHMETIC_CONFIG["max_terms"] + 1
        assert all(len(n) <= ARITHMETIC_CONFIG["max_digits"] for n in numbers)
        assert ex.answer == ex.final == str(_exact_value(expression))


@pytest.mark.parametrize("expression, value", [("2 + 3 * 4", 14), ("( 2 + 3 ) * 4", 20), ("-6 / 3", -2),
                                               ("7 / 2", 3.5), ("1 / 0", None), ("__import__('os')", None)])
def test_exact_value(expression, value):
    result = _exact_value(expression)
    assert (result is None and value is None) or result == value


def test_load_task_argument_errors(tmp_path):
    forms = "use arithmetic or gsm_symbolic, or a .jsonl, .json, .parquet or .csv file of records with"
    with pytest.raises(DataError, match=f"'gsm8k' is neither a task nor a file; {forms}"):
        load_task("gsm8k", n_train=1, n_test=1)
    with pytest.raises(DataError, match="missing.jsonl': no such file"):
        load_task(str(tmp_path / "missing.jsonl"), n_train=1, n_test=1)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=f"is not a .jsonl, .json, .parquet or .csv file; {forms}"):
        load_task(str(tmp_path / "data.txt"), n_train=1, n_test=1)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=f"is a directory; {forms}"):
        load_task(str(tmp_path / "dir.jsonl"), n_train=1, n_test=1)
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("gsm_symbolic", n_train=1, n_test=1, split="random")
    with pytest.raises(ValueError, match="split 'template' needs data 'gsm_symbolic'"):
        load_task("arithmetic", n_train=1, n_test=1, split="template")
    with pytest.raises(ValueError, match="n_test must be an integer >= 0"):
        load_task("arithmetic", n_train=1, n_test=-1)
    with pytest.raises(ValueError, match=r"eval_fraction must be a number in \[0, 1\], got 1.5"):
        load_task("arithmetic", n_train=1, n_test=1, eval_fraction=1.5)


# ---------------------------------------------------------------------- data files

def write_jsonl(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return str(path)


def gsm_line(i):
    return json.dumps({"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1:,}"})


def test_jsonl_gsm8k_form(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [gsm_line(i) for i in range(995, 1005)] + ["", "  "])
    task = load_task(path, n_train=5, n_test=3, seed=0, eval_fraction=0.5)
    assert (task.name, task.kind) == ("mine", "math")
    assert len(task.test) == 3 and len(task.train) == 5
    assert not {ex.prompt for ex in task.train} & {ex.prompt for ex in task.test}
    for ex in task.train + task.test:
        i = int(re.search(r"\d+", ex.prompt).group())
        assert ex.final == str(i + 1)  # "1,000" → "1000"
        assert ex.answer.endswith(f"#### {i + 1:,}")
    assert task.info["form"] == "gsm8k"
    assert load_task(path, n_train=5, n_test=3, seed=0, eval_fraction=0.5) == task
    assert load_task(path, n_train=5, n_test=3, seed=1, eval_fraction=0.5).test != task.test
    full = load_task(path, n_train=100, n_test=3, seed=0, eval_fraction=0.5)
    assert len(full.train) == 7


def test_jsonl_text_form_keeps_an_input_on_one_side(tmp_path):
    lines = [json.dumps({"input": f"name {i}", "output": f"text {i}\n"}) for i in range(6)]
    lines += [json.dumps({"input": "name 0", "output": "another reference"})]
    path = write_jsonl(tmp_path / "e2e.jsonl", lines)
    for seed in range(5):
        task = load_task(path, n_train=10, n_test=2, seed=seed, eval_fraction=0.5)
        assert task.kind == "text" and len(task.test) == 2
        assert all(ex.final is None for ex in task.train + task.test)
        assert not {ex.prompt for ex in task.train} & {ex.prompt for ex in task.test}
        assert all(ex.answer == ex.answer.strip() for ex in task.train)


GOOD = gsm_line(1)
TEXT = json.dumps({"input": "a", "output": "b"})
MALFORMED = [
    ("not json", "not valid JSON (Expecting value at column 1)"),
    ('{"question": "q", "answer": "#### 1"', "not valid JSON (Expecting ',' delimiter at column 37)"),
    ("[1, 2]", "expected a JSON object, got array"),
    ('"text"', "expected a JSON object, got string"),
    ('{"question": "q"}', "missing key 'answer' (question/answer (GSM8K: the answer ends in '#### N') form)"),
    ('{"output": "o"}', "missing key 'input' (input/output form)"),
    ('{"instruction": "i", "input": "x"}', "missing key 'output' (Alpaca instruction/input/output form)"),
    ('{"q": 1}', "expected the keys of one form: 'question'/'answer' (the answer ending in '#### N'), "
                 "'input'/'output', Alpaca 'instruction'/'input'/'output', 'prompt'/'completion', or chat "
                 "'messages' (a list of role/content objects ending with the assistant's); got 'q'"),
    ('{"question": "q", "answer": "#### 1", "input": "i"}',
     "ambiguous: has keys of the question/answer (GSM8K: the answer ends in '#### N') ('question', 'answer') and "
     "input/output ('input') forms; use one"),
    ('{"prompt": "p", "completion": "c", "messages": []}',
     "ambiguous: has keys of the prompt/completion ('prompt', 'completion') and chat messages (role/content) "
     "('messages') forms; use one"),
    ('{"question": 3, "answer": "#### 1"}', "'question' must be a string, got number"),
    ('{"question": "q", "answer": null}', "'answer' must be a string, got null"),
    ('{"question": "q", "answer": ["#### 1"]}', "'answer' must be a string, got array"),
    ('{"question": "  ", "answer": "#### 1"}', "'question' is empty"),
    ('{"question": "q", "answer": ""}', "'answer' is empty"),
    ('{"question": "q", "answer": "it is 42"}', "'answer' has no final '#### N' line"),
    ('{"question": "q", "answer": "so #### many"}',
     "'answer' must end with '#### N', N a number of at most 100 digits; it ends with '#### many'"),
    ('{"question": "q", "answer": "#### 4\\nthen more"}',
     "'answer' must end with '#### N', N a number of at most 100 digits; it ends with '#### 4\\nthen more'"),
    # written out, 1e999999 has a million digits: expanding it took 72 s, longer exponents never ended
    ('{"question": "q", "answer": "#### 1e999999"}',
     "'answer' must end with '#### N', N a number of at most 100 digits; it ends with '#### 1e999999'"),
    ('{"question": "q", "answer": "#### 1e99999999999999999999"}',
     "'answer' must end with '#### N', N a number of at most 100 digits; it ends with '#### 1e99999999999999999999'"),
    # valid JSON, but no text: tokenizers cannot encode a lone surrogate
    ('{"question": "a \\ud800 b", "answer": "#### 1"}',
     "'question' holds a lone surrogate '\\ud800' at character 3, not text"),
    ('{"question": "q", "answer": "\\udfff #### 1"}',
     "'answer' holds a lone surrogate '\\udfff' at character 1, not text"),
    (TEXT, "a record of the input/output form in a file whose first record ({path}:1) is of the question/answer "
           "(GSM8K: the answer ends in '#### N') form; use one form per file"),
    (b'{"question": "caf\xe9", "answer": "#### 1"}', "not valid UTF-8 (invalid continuation byte at byte 17)"),
]


@pytest.mark.parametrize("line, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_jsonl_malformed_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError) as info:
        load_task(path, n_train=1, n_test=1)
    assert str(info.value) == f"{path}:3: {message.format(path=path)}"
    assert isinstance(info.value, ValueError)


ALONE = [  # records of the other forms, each alone in its file
    ('{"instruction": "i", "input": 3, "output": "o"}', "'input' must be a string, got number"),
    ('{"messages": [{"role": "user", "content": "q"}]}',
     "the last message must be the assistant's (the answer to learn), not the user's"),
    ('{"messages": "hi"}', "'messages' must be a non-empty array of {'role', 'content'} objects, got string"),
    ('{"messages": [{"role": "user"}]}', "message 1 has no 'content'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "message 1: role 'bot' is not one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]}',
     "message 2's content must be a string, got number"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "a"}]}', "message 2: a system message may only come first"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}',
     "no user message before the first assistant message"),
]


@pytest.mark.parametrize("line, message", ALONE, ids=[m for _, m in ALONE])
def test_malformed_record_of_each_form(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ["", line])
    with pytest.raises(DataError) as info:
        load_task(path, n_train=1, n_test=1)
    assert str(info.value) == f"{path}:2: {message}"


def test_jsonl_reports_every_bad_line_before_splitting(tmp_path):
    lines = [TEXT, '{"input": "x", "output": 5}', TEXT, GOOD, "{"]
    path = write_jsonl(tmp_path / "many.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_task(path, n_train=100, n_test=100)  # the sizes would fail too; the lines come first
    assert info.value.errors == [
        f"{path}:2: 'output' must be a string, got number",
        f"{path}:4: a record of the question/answer (GSM8K: the answer ends in '#### N') form in a file whose first "
        f"record ({path}:1) is of the input/output form; use one form per file",
        f"{path}:5: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
    ]
    assert str(info.value) == "\n".join(info.value.errors)


def test_jsonl_size_errors(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", " "])
    with pytest.raises(DataError, match="no examples"):
        load_task(empty, n_train=1, n_test=1)


@pytest.mark.parametrize("n, n_test, fraction, held", [
    (40, 200, 0.1, 4), (41, 200, 0.1, 5), (3000, 200, 0.1, 200), (10, 3, 0.5, 3), (2, 200, 0.1, 1),
    (1, 200, 0.1, 0), (40, 200, 0.0, 0), (5, 200, 0.99, 4), (40, 3, 1.0, 3), (5, 200, 1.0, 4)])
def test_a_small_file_holds_out_a_fraction_never_an_error(tmp_path, n, n_test, fraction, held):
    path = write_jsonl(tmp_path / "mine.jsonl", [gsm_line(i) for i in range(n)])
    task = load_task(path, n_train=10_000, n_test=n_test, seed=0, eval_fraction=fraction)
    assert len(task.test) == held and len(task.train) == n - held
    assert not {ex.prompt for ex in task.train} & {ex.prompt for ex in task.test}


def test_a_file_of_one_prompt_holds_nothing_out(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [json.dumps({"input": "x", "output": f"y{i}"}) for i in range(5)])
    task = load_task(path, n_train=100, n_test=200, seed=0)
    assert task.test == [] and len(task.train) == 5


def test_eval_data_replaces_the_held_out_share(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [gsm_line(i) for i in range(20)])
    held = write_jsonl(tmp_path / "held.jsonl", [json.dumps({"input": f"x{i}", "output": f"y {i}"}) for i in range(8)])
    task = load_task(train, n_train=100, n_test=200, seed=0, eval_data=held)
    assert len(task.train) == 20 and task.kind == "text" and len(task.test) == 8
    assert [ex.prompt for ex in task.test] == [f"x{i}" for i in range(8)]
    sample = load_task(train, n_train=100, n_test=3, seed=0, eval_data=held)
    assert len(sample.test) == 3 and set(sample.test) <= set(task.test)
    builtin = load_task("arithmetic", n_train=5, n_test=200, seed=0, eval_data=held)
    assert len(builtin.train) == 5 and builtin.test == task.test
    with pytest.raises(DataError, match="eval_data must be a data file, not the task 'arithmetic'"):
        load_task(train, n_train=1, n_test=1, eval_data="arithmetic")


# one record per form, and what each becomes
FORM_RECORDS = [
    ("gsm8k", {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}, "What is 2+2?", "2+2=4\n#### 4", "math"),
    ("text", {"input": "name 1", "output": "The cat sat."}, "name 1", "The cat sat.", "text"),
    ("alpaca", {"instruction": "Summarize.", "input": "The dog ran in the park.", "output": "A dog ran."},
     "Summarize.\n\nThe dog ran in the park.", "A dog ran.", "text"),
    ("alpaca", {"instruction": "Say hi.", "input": "", "output": "hi"}, "Say hi.", "hi", "text"),
    ("alpaca", {"instruction": "Say hi.", "output": "hi"}, "Say hi.", "hi", "text"),
    ("completion", {"prompt": "The cat", "completion": "sat on the mat."}, "The cat", "sat on the mat.", "text"),
    ("chat", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "#### 4"}]}, "2+2?", "#### 4", "math"),
]


@pytest.mark.parametrize("form, record, prompt, answer, kind", FORM_RECORDS,
                         ids=[f"{f}-{i}" for i, (f, *_) in enumerate(FORM_RECORDS)])
def test_each_form_is_detected(tmp_path, form, record, prompt, answer, kind):
    path = write_jsonl(tmp_path / "one.jsonl", [json.dumps(record)] * 2)
    got_kind, got_form, examples = read_examples(path)
    assert (got_kind, got_form) == (kind, form)
    assert (examples[0].prompt, examples[0].answer) == (prompt, answer)
    assert examples[1].where == f"{path}:2"
    assert (examples[0].final is not None) == (kind == "math")


def test_json_parquet_and_csv_files_read_the_same_examples(tmp_path):
    import datasets

    records = [{"instruction": f"Task {i}.", "input": "" if i % 2 else f"x{i}", "output": f"0{i}"} for i in range(6)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in records])
    (tmp_path / "a.json").write_text(json.dumps(records, indent=1))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(records).to_csv(str(tmp_path / "a.csv"), index=False)
    expected = read_examples(jsonl)
    assert expected[1] == "alpaca" and expected[2][1].answer == "01"  # CSV cells stay text: "01", not 1
    for name in ("a.json", "a.parquet", "a.csv"):
        assert read_examples(str(tmp_path / name)) == expected, name


def test_errors_name_the_record_in_each_file_type(tmp_path):
    import datasets

    records = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.csv").write_text('prompt,completion\n"two\nlines",c\n\np,\n')
    for name, where in (("a.json", "record 2"), ("a.parquet", "record 2"), ("a.csv", "5")):
        path = str(tmp_path / name)
        with pytest.raises(DataError) as info:
            read_examples(path)
        assert str(info.value) == f"{path}:{where}: 'completion' is empty", name
    (tmp_path / "bad.json").write_text('[{"prompt": "p",\n "completion": }]')
    with pytest.raises(DataError, match=r"bad.json:2: not valid JSON \(Expecting value at column 16\)"):
        read_examples(str(tmp_path / "bad.json"))
    (tmp_path / "object.json").write_text('{\n"prompt": "p", "completion": "c"\n}')
    with pytest.raises(DataError, match=r"object.json: holds one JSON object; give an array of records"):
        read_examples(str(tmp_path / "object.json"))


# ---------------------------------------------------------------------- prompts, encodings, batches

def test_build_prompt_uses_the_chat_template_when_there_is_one():
    assert build_prompt(tiny_tokenizer(chat=False), "2+2?") == "Question: 2+2?\nAnswer: "
    assert build_prompt(tiny_tokenizer(chat=True), "2+2?") == "<|user|>2+2?\n<|assistant|>"


def test_labels_cover_the_answer_and_eos_only(tokenizer):
    ex = Example(prompt="Tom has 3 apples and buys 4 more.", answer="3 + 4 = 7 apples.\n#### 7", final="7")
    enc = encode(tokenizer, ex, max_length=512)
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])
    assert all(m == 1 for m in enc["attention_mask"])
    n_prompt = len(prompt_ids(tokenizer, ex.prompt))
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tokenizer.decode(enc["labels"][n_prompt:]) == ex.answer + tokenizer.eos_token
    assert tokenizer.decode(enc["input_ids"][:n_prompt]) == build_prompt(tokenizer, ex.prompt)


def test_encode_truncates_the_prompt_from_the_left_never_the_answer(tokenizer):
    ex = Example(prompt="The cat sat on the mat. The dog ran in the park. " * 4, answer="#### 7")
    full = encode(tokenizer, ex, max_length=512)
    n_answer = sum(label != -100 for label in full["labels"])
    cut = encode(tokenizer, ex, max_length=n_answer + 5)
    assert len(cut["input_ids"]) == n_answer + 5
    assert cut["input_ids"] == full["input_ids"][-(n_answer + 5):]  # left part of the prompt gone
    assert cut["labels"][5:] == full["labels"][-n_answer:]
    assert cut["labels"][:5] == [-100] * 5


def test_encode_cuts_an_answer_that_cannot_fit(tokenizer):
    ex = Example(prompt="q", answer="The cat sat on the mat. The dog ran in the park.")
    full = encode(tokenizer, ex, max_length=512)
    cut = encode(tokenizer, ex, max_length=6)
    n_prompt = full["labels"].count(-100)
    assert cut["labels"][0] == -100 and -100 not in cut["labels"][1:]
    assert cut["input_ids"] == [full["input_ids"][n_prompt - 1]] + full["input_ids"][n_prompt:n_prompt + 5]
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        encode(tokenizer, ex, max_length=1)


def test_collate_right_pads():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
                {"input_ids": torch.tensor([5, 6, 7, 8, 9]), "labels": torch.tensor([-100, -100, 7, 8, 9]),
                 "attention_mask": torch.ones(5, dtype=torch.long)}]
    batch = collate(features, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert all(t.dtype == torch.long for t in batch.values())


@pytest.mark.parametrize("text, expected", [("1,000", "1000"), ("3.0", "3"), ("2.50", "2.5"), ("-2", "-2"),
                                            ("-0", "0"), ("007", "7"), ("abc", None), ("", None), ("nan", None),
                                            ("1e3", "1000"), ("9" * 100, "9" * 100), ("9" * 101, None),
                                            ("1e99", "1" + "0" * 99), ("1e100", None), ("1e999999", None),
                                            ("0." + "0" * 98 + "1", "0." + "0" * 98 + "1"),
                                            ("1e-100", None), ("Infinity", None)])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


# ---------------------------------------------------------------------- which tokens carry loss

def response_text(tokenizer, enc):
    """The tokens that carry loss, decoded run by run (a masked token between two runs splits them)."""
    runs, current = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("form, record, prompt, answer, kind", FORM_RECORDS,
                         ids=[f"{f}-{i}" for i, (f, *_) in enumerate(FORM_RECORDS)])
@pytest.mark.parametrize("chat", [False, "chatml"], ids=["plain", "chatml"])
def test_each_form_puts_the_loss_on_its_response_only(tmp_path, form, record, prompt, answer, kind, chat):
    tokenizer = tiny_tokenizer(chat=chat)
    path = write_jsonl(tmp_path / "one.jsonl", [json.dumps(record)])
    (example,) = read_examples(path)[2]
    enc = encode(tokenizer, example, max_length=512)
    assert response_text(tokenizer, enc) == [answer + "<eos>"]
    context = tokenizer.decode(context_ids(tokenizer, example))
    assert enc["input_ids"][:len(context_ids(tokenizer, example))] == context_ids(tokenizer, example)
    if chat:
        assert context.endswith("<|assistant|>") and f"<|user|>{prompt}<eos>" in context
    else:
        assert context.endswith(f"Question: {prompt}\nAnswer: ")
    if form == "chat":
        assert context.startswith("Be brief.") if not chat else context.startswith("<|system|>Be brief.<eos>")


@pytest.mark.parametrize("chat", [False, "chatml"], ids=["plain", "chatml"])
def test_a_conversation_trains_on_every_assistant_turn(chat):
    tokenizer = tiny_tokenizer(chat=chat)
    turns = (("user", "Tom has 3 apples."), ("assistant", "Yes."), ("user", "He buys 4 more. How many?"))
    example = Example(prompt="He buys 4 more. How many?", answer="7 apples.", context=turns)
    enc = encode(tokenizer, example, max_length=512)
    assert response_text(tokenizer, enc) == ["Yes.<eos>", "7 apples.<eos>"]
    # the whole sequence is the conversation as the template writes it (plain: PLAIN_CHAT_TEMPLATE)
    whole = tokenizer.decode(enc["input_ids"])
    if chat:
        assert whole == ("<|user|>Tom has 3 apples.<eos>\n<|assistant|>Yes.<eos>\n<|user|>He buys 4 more. How many?"
                         "<eos>\n<|assistant|>7 apples.<eos>\n")
    else:
        assert whole == ("Question: Tom has 3 apples.\nAnswer: Yes.<eos>\nQuestion: He buys 4 more. How many?\n"
                         "Answer: 7 apples.<eos>\n")
    # generation continues from exactly the tokens training saw before the last answer
    context = context_ids(tokenizer, example)
    assert enc["input_ids"][:len(context)] == context and enc["labels"][len(context)] != -100
    # cut to fit: the earliest tokens go, the last answer stays whole
    n_last = len(tokenizer("7 apples.<eos>", add_special_tokens=False)["input_ids"]) + 1
    cut = encode(tokenizer, example, max_length=n_last + 3)
    assert cut["input_ids"] == enc["input_ids"][-(n_last + 3):]


def test_a_chat_template_that_cannot_split_turns_is_refused():
    tokenizer = tiny_tokenizer(chat=True)  # writes every message as the user's
    example = Example(prompt="q", answer="a", context=(("user", "q"),))
    with pytest.raises(ValueError, match="the chat template does not write this conversation's turns one after"):
        encode(tokenizer, example, max_length=64)


# ---------------------------------------------------------------------- validation set


@pytest.mark.parametrize("data, split", [("arithmetic", "question"), ("gsm_symbolic", "question"),
                                         ("gsm_symbolic", "template")])
def test_a_validation_set_is_the_training_head_and_leaves_the_test_set_alone(data, split):
    plain = load_task(data, n_train=40, n_test=15, seed=3, split=split)
    # what the training side would hold with 10 more (the template split: with the same held-out templates)
    longer = (load_task(data, n_train=50, n_test=15, seed=3, split=split) if split == "question"
              else _gsm_symbolic(50, 15, 3, split, n_templates_train=40))
    held = load_task(data, n_train=40, n_test=15, seed=3, split=split, n_validation=10)
    assert held.test == plain.test and held.info.get("test_templates") == plain.info.get("test_templates")
    assert held.validation == longer.train[:10] and held.train == longer.train[10:50]
    assert plain.validation == [] and held.info["n_validation"] == 10
    assert len({ex.prompt for ex in held.train + held.validation + held.test}) == 65


def test_a_files_validation_set_takes_whole_prompts_after_the_test_share(tmp_path):
    records = [gsm_line(i) for i in range(30)] + [gsm_line(i) for i in range(5)]  # prompts 0-4 twice
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    plain = load_task(path, n_train=10_000, n_test=200, seed=1, eval_fraction=0.1)
    held = load_task(path, n_train=10_000, n_test=200, seed=1, eval_fraction=0.1, n_validation=6)
    assert held.test == plain.test and len(held.validation) == 6 and held.validation == plain.train[:6]
    prompts = [{ex.prompt for ex in part} for part in (held.train, held.validation, held.test)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    with pytest.raises(DataError, match="leave none for training after holding out 40 for validation"):
        load_task(path, n_train=10, n_test=200, seed=1, n_validation=40)
    with pytest.raises(ValueError, match="n_validation must be an integer >= 0, got -1"):
        load_task("arithmetic", n_train=1, n_test=1, n_validation=-1)
