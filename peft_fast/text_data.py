"""Small labelled text-classification datasets read from local JSONL or CSV files.

A dataset file holds one example per JSONL line (or CSV row) with a `text` and a `label`
column, and optionally a `split` column whose values are `train` or `test`. Without a split
column, a seeded fraction of the examples is held out as the test split.

`DEFAULT_DATASET` is the dataset shipped with peft_fast: 360 short English sentences about
four topics (sports, food, technology, weather), 70 train and 20 test per topic.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATASET = Path(__file__).resolve().parent / "data" / "topics.jsonl"

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Split:
    """Texts and their label ids, aligned by position."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextClassificationData:
    """A train and a test split; label id `i` stands for `label_names[i]`."""

    train: Split
    test: Split
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_text_classification(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> TextClassificationData:
    """Read a JSONL or CSV dataset file into train and test splits.

    Labels may be strings or integers; they are mapped to ids 0..k-1 in sorted order
    (numeric order when every label is an integer). When the file has no `split` column,
    `test_fraction` of the examples, drawn with `seed`, form the test split.

    Raises FileNotFoundError when `path` is not a file, and ValueError naming the line or
    row when the file is malformed, lacks a column, or leaves a split empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist or is not a file")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        rows = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise ValueError(f"dataset file {str(path)!r}: expected a .jsonl or .csv file, got {suffix or 'no suffix'!r}")
    if not rows:
        raise ValueError(f"dataset file {str(path)!r} holds no examples")

    raw_labels = [label for _, label, _ in rows]
    label_names = _label_names(raw_labels)
    label_id = {name: i for i, name in enumerate(label_names)}
    if len(label_names) < 2:
        raise ValueError(f"dataset file {str(path)!r}: need at least 2 distinct labels, found {label_names}")

    splits = [split for _, _, split in rows]
    if all(s is None for s in splits):
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_test = max(1, round(len(rows) * test_fraction))
        test_idx = set(order[:n_test])
        splits = ["test" if i in test_idx else "train" for i in range(len(rows))]
    elif any(s is None for s in splits):
        raise ValueError(f"dataset file {str(path)!r}: some examples have a 'split' and some do not")

    out: dict[str, Split] = {s: Split([], []) for s in SPLITS}
    for (text, label, _), split in zip(rows, splits):
        out[split].texts.append(text)
        out[split].labels.append(label_id[_label_key(label)])
    for name, split in out.items():
        if len(split) == 0:
            raise ValueError(f"dataset file {str(path)!r}: the {name!r} split is empty")
    return TextClassificationData(train=out["train"], test=out["test"], label_names=label_names)


_Row = tuple[str, "str | int", "str | None"]


def _read_jsonl(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'text' and 'label'")  # noqa: TRY004
            rows.append(_check_row(record, f"{path}:{lineno}"))
    return rows


def _read_csv(path: Path, delimiter: str) -> list[_Row]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = {"text", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: the header must name 'text' and 'label' columns, found {reader.fieldnames}")
        # Row numbers count the header as line 1.
        return [_check_row(record, f"{path}:{lineno}") for lineno, record in enumerate(reader, start=2)]


def _check_row(record: dict, where: str) -> _Row:
    text, label, split = record.get("text"), record.get("label"), record.get("split")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'text' must be a non-empty string, got {text!r}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise ValueError(f"{where}: 'label' must be a string or an integer, got {label!r}")
    if split == "":
        split = None
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: 'split' must be one of {SPLITS}, got {split!r}")
    return text, label, split


def _label_key(label: str | int) -> str:
    return str(label).strip()


def _label_names(labels: list[str | int]) -> list[str]:
    names = {_label_key(label) for label in labels}
    if all(_is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True
