"""Reading data files and mapping their columns to training text."""
import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from sloth_plugins.studio.datasets import DatasetError, columns, guess_mapping, length_stats, load_rows, to_texts
from sloth_plugins.testing import load_instructions

ROWS = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"},
        {"instruction": "Translate.", "input": "chat", "output": "cat"}]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet", "folder"])
def test_every_file_kind_reads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == "json":
        path.write_text(json.dumps(ROWS))
    elif suffix == "csv":
        path.write_text("instruction,input,output\nAdd 1 and 2.,,3\nTranslate.,chat,cat\n")
    else:
        ds = Dataset.from_list(ROWS)
        ds.to_parquet(str(path)) if suffix == "parquet" else ds.save_to_disk(str(path))
    assert load_rows(str(path)) == ROWS


@pytest.mark.parametrize("name, text, where", [
    ("bad.jsonl", '{"a": 1}\n{"a": 2\n', "line 2, column 8"),
    ("bad.jsonl", '{"a": 1}\n[1, 2]\n', "line 2, column 1: expected a JSON object"),
    ("bad.json", '[{"a": 1},\n {"a": }]', "line 2, column 8"),
    ("bad.csv", "a,b\n1,2\n3,4,5\n", "line 3: 3 fields, the header has 2"),
    ("data.txt", "hello", "unsupported file type .txt"),
])
def test_malformed_file_names_line_and_column(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DatasetError, match=where):
        load_rows(str(tmp_path / name))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_alpaca_with_and_without_input(tokenizer):
    mapping = {"format": "alpaca", "instruction": "instruction", "input": "input", "output": "output"}
    plain, with_input = to_texts(ROWS, mapping, tokenizer)
    assert plain == "### Instruction:\nAdd 1 and 2.\n### Response:\n3</s>"
    assert with_input == "### Instruction:\nTranslate.\n### Input:\nchat\n### Response:\ncat</s>"


def test_shipped_data_maps_as_alpaca_with_response_column(tokenizer):
    rows = load_rows(__import__("sloth_plugins.testing", fromlist=["DATA_FILE"]).DATA_FILE)
    mapping = guess_mapping(columns(rows))
    assert mapping == {"format": "alpaca", "instruction": "instruction", "input": None, "output": "response"}
    texts = to_texts(rows, mapping, tokenizer)
    assert len(texts) == len(load_instructions())
    assert texts[0] == f"### Instruction:\n{rows[0]['instruction']}\n### Response:\n{rows[0]['response']}</s>"


def test_sharegpt_renders_like_the_same_messages(tokenizer):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    shared = to_texts([{"conversations": conv}], {"format": "sharegpt", "conversations": "conversations"}, tokenizer)
    chat = to_texts([{"messages": msgs}], {"format": "messages", "messages": "messages"}, tokenizer)
    assert shared == chat == [tokenizer.apply_chat_template(msgs, tokenize=False)]
    assert "<|assistant|>\nHello</s>" in chat[0]


def test_chat_format_without_chat_template_is_refused(tokenizer):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(DatasetError, match="needs a tokenizer with a chat template"):
        to_texts([{"messages": [{"role": "user", "content": "x"}]}], {"format": "messages", "messages": "messages"},
                 bare)


def test_unknown_sharegpt_role_is_named(tokenizer):
    with pytest.raises(DatasetError, match="from='robot'"):
        to_texts([{"conversations": [{"from": "robot", "value": "x"}]}],
                 {"format": "sharegpt", "conversations": "conversations"}, tokenizer)


def test_guess_mapping_per_format():
    assert guess_mapping(["messages", "id"])["format"] == "messages"
    assert guess_mapping(["conversations"])["format"] == "sharegpt"
    assert guess_mapping(["instruction", "input", "output"]) == {"format": "alpaca", "instruction": "instruction",
                                                                "input": "input", "output": "output"}
    assert guess_mapping(["body"]) == {"format": "text", "text": "body"}


def test_length_stats_count_rows_cut_by_max_length(tokenizer):
    texts = ["a", "a b c d e f g h", "x" * 400]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    stats = length_stats(texts, tokenizer, max_length=lengths[1])
    assert stats["lengths"] == lengths
    assert stats["cut"] == sum(n > lengths[1] for n in lengths) >= 1
    assert sum(stats["counts"]) == 3 and stats["max"] == max(lengths)
    assert stats["edges"][0] == 0 and stats["edges"][-1] > max(lengths)
