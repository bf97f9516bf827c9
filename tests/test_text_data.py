"""peft_fast/text_data.py: reading labelled text files, and the bundled dataset."""

import json
from collections import Counter

import pytest

from peft_fast.text_data import DEFAULT_DATASET, load_text_classification


def test_bundled_dataset_is_balanced_and_splits_do_not_overlap():
    data = load_text_classification(DEFAULT_DATASET)
    assert data.label_names == ["food", "sports", "technology", "weather"]
    assert (len(data.train), len(data.test)) == (280, 80)
    assert Counter(data.train.labels) == {0: 70, 1: 70, 2: 70, 3: 70}
    assert Counter(data.test.labels) == {0: 20, 1: 20, 2: 20, 3: 20}
    all_texts = data.train.texts + data.test.texts
    assert len(set(all_texts)) == len(all_texts)


def test_csv_without_split_holds_out_a_seeded_fraction(tmp_path):
    path = tmp_path / "d.csv"
    rows = [f'"text number {i}, with a comma",{[2, 10][i % 2]}' for i in range(20)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    a = load_text_classification(path, test_fraction=0.25, seed=1)
    b = load_text_classification(path, test_fraction=0.25, seed=1)
    assert a.label_names == ["2", "10"]  # integer labels sort numerically
    assert (len(a.train), len(a.test)) == (15, 5)
    assert a.test.texts == b.test.texts
    assert "text number 0, with a comma" in a.train.texts + a.test.texts


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("d.jsonl", '{"text": "a", "label": "x"}\nnot json\n', r"d.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"text": "a"}\n', r"d.jsonl:1: 'label' must be"),
        ("d.jsonl", '{"text": "", "label": "x"}\n', r"d.jsonl:1: 'text' must be a non-empty string"),
        ("d.jsonl", '{"text": "a", "label": "x", "split": "dev"}\n', r"'split' must be one of"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', r"at least 2 distinct labels"),
        (
            "d.jsonl",
            '{"text": "a", "label": "x", "split": "train"}\n{"text": "b", "label": "y", "split": "train"}\n',
            r"the 'test' split is empty",
        ),
        ("d.jsonl", "", r"holds no examples"),
        ("d.csv", "sentence,label\nhello,1\n", r"must name 'text' and 'label' columns"),
        ("d.txt", "hello\n", r"expected a .jsonl or .csv file"),
    ],
)
def test_malformed_files_raise_value_error_saying_where(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=expected):
        load_text_classification(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_classification(tmp_path / "missing.jsonl")


def test_split_column_is_respected(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2, "split": "test" if i < 2 else "train"} for i in range(6)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_text_classification(path)
    assert data.test.texts == ["t0", "t1"] and data.test.labels == [0, 1]
    assert len(data.train) == 4
