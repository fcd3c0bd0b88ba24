"""Studio datasets: read a file or a saved ``datasets`` folder, map its columns to training text.

Every format ends as one ``text`` column (what TRL's ``SFTTrainer`` reads with
``dataset_text_field="text"``), so the studio run and the exported script train on the same strings:

* ``text``:     one column of plain text (continued pretraining)
* ``alpaca``:   instruction / input (optional) / output, in the Alpaca prompt
* ``messages``: chat ``[{"role", "content"}, ...]``, rendered with the tokenizer's chat template
* ``sharegpt``: ``[{"from", "value"}, ...]`` (human / gpt / system), rendered the same way

Reading never writes anything; a malformed file raises ``DatasetError`` naming the line and column.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
}
OPTIONAL_FIELDS = {("alpaca", "input")}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class DatasetError(ValueError):
    """A dataset the studio cannot use; the message says where and why."""


def load_rows(path: str) -> List[Dict[str, Any]]:
    """The rows of a JSONL / JSON / CSV / Parquet file or a ``datasets.save_to_disk`` folder."""
    if os.path.isdir(path):
        return _load_saved_dataset(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file or folder")
    suffix = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DatasetError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    rows = readers[suffix](path)
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {lineno}, column {exc.pos + 1}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}: line {lineno}, column 1: expected a JSON object, got "
                                   f"{type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: str) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetError(f"{path}: expected a list of objects (or {{\"data\": [...]}})")
    return data


def _read_csv(path: str) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return []
        rows = []
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise DatasetError(f"{path}: line {reader.line_num}: {len(record)} fields, the header has "
                                   f"{len(header)} ({', '.join(header)})")
            rows.append(dict(zip(header, record)))
    return rows


def _read_parquet(path: str) -> List[Dict[str, Any]]:
    import pyarrow.parquet as pq
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None


def _load_saved_dataset(path: str) -> List[Dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk
    try:
        ds = load_from_disk(path)
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{path}: not a saved `datasets` folder ({exc})") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds.to_list()


def columns(rows: List[Dict[str, Any]]) -> List[str]:
    seen: Dict[str, None] = {}
    for row in rows[:100]:
        seen.update(dict.fromkeys(row))
    return list(seen)


def guess_mapping(cols: List[str]) -> Dict[str, Optional[str]]:
    """The format and field -> column mapping the columns suggest (the UI's starting point)."""
    if "messages" in cols:
        return {"format": "messages", "messages": "messages"}
    if "conversations" in cols:
        return {"format": "sharegpt", "conversations": "conversations"}
    if "instruction" in cols:
        output = next((c for c in ("output", "response", "answer") if c in cols), None)
        return {"format": "alpaca", "instruction": "instruction", "input": "input" if "input" in cols else None,
                "output": output}
    return {"format": "text", "text": "text" if "text" in cols else (cols[0] if cols else None)}


def check_mapping(mapping: Dict[str, Optional[str]], cols: List[str]) -> None:
    fmt = mapping.get("format")
    if fmt not in FORMATS:
        raise DatasetError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    for field in FORMATS[fmt]:
        column = mapping.get(field)
        if column is None and (fmt, field) in OPTIONAL_FIELDS:
            continue
        if column not in cols:
            raise DatasetError(f"{fmt} format: field {field!r} is mapped to {column!r}, which is not a column "
                               f"(columns: {', '.join(cols)})")


def render_row(row: Dict[str, Any], mapping: Dict[str, Optional[str]], tokenizer=None) -> str:
    """One row as training text."""
    fmt = mapping["format"]
    if fmt == "text":
        return str(row[mapping["text"]])
    if fmt == "alpaca":
        extra = row.get(mapping["input"]) if mapping.get("input") else None
        prompt = (ALPACA_PROMPT_WITH_INPUT.format(instruction=row[mapping["instruction"]], input=extra) if extra
                  else ALPACA_PROMPT.format(instruction=row[mapping["instruction"]]))
        eos = getattr(tokenizer, "eos_token", None) or ""
        return prompt + str(row[mapping["output"]]) + eos
    messages = row[mapping["messages"]] if fmt == "messages" else sharegpt_to_messages(row[mapping["conversations"]])
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DatasetError(f"{fmt} format needs a tokenizer with a chat template; this model's tokenizer has none "
                           f"(map the data as text or alpaca instead)")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def sharegpt_to_messages(conversation: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    messages = []
    for turn in conversation:
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise DatasetError(f"ShareGPT turn with from={turn.get('from')!r}; expected one of "
                               f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn.get("value", "")})
    return messages


def to_texts(rows: List[Dict[str, Any]], mapping: Dict[str, Optional[str]], tokenizer=None) -> List[str]:
    check_mapping(mapping, columns(rows))
    texts = []
    for i, row in enumerate(rows):
        try:
            texts.append(render_row(row, mapping, tokenizer))
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"row {i + 1}: cannot render as {mapping['format']} ({type(exc).__name__}: "
                               f"{exc})") from None
    return texts


def length_stats(texts: List[str], tokenizer, max_length: int, bins: int = 20) -> Dict[str, Any]:
    """Token lengths: a histogram (edges, counts), and how many rows ``max_length`` would cut."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    top = max(lengths) if lengths else 0
    width = max(1, -(-(top + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(n // width, bins - 1)] += 1
    return {"lengths": lengths, "edges": [i * width for i in range(bins + 1)], "counts": counts,
            "max": top, "mean": sum(lengths) / len(lengths) if lengths else 0.0,
            "cut": sum(n > max_length for n in lengths), "max_length": max_length}
