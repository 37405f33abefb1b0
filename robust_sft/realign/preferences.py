"""Safety preference pairs: Anthropic hh-rlhf dialogues and prompt/chosen/rejected files."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..data import DataFormatError, load_examples

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ preference data
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_dialogue(text: str) -> list[dict[str, str]]:
    """`\\n\\nHuman: ...\\n\\nAssistant: ...` into chat turns."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return turns


def hh_to_preference(row: dict[str, str], index: int | None = None) -> dict[str, Any]:
    """An hh-rlhf row (`chosen`, `rejected`: whole dialogues) as a conversational preference pair."""
    chosen, rejected = parse_hh_dialogue(row["chosen"]), parse_hh_dialogue(row["rejected"])
    where = f"Row {index}" if index is not None else "A row"
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise DataFormatError(f"{where}: a dialogue does not end with an Assistant turn.")
    if chosen[:-1] != rejected[:-1]:
        raise DataFormatError(f"{where}: the chosen and rejected dialogues differ before their last turn.")
    return {"prompt": chosen[:-1], "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


def load_hh_rlhf(path: str | os.PathLike, limit: int | None = None, skip_invalid: bool = True) -> Dataset:
    """hh-rlhf pairs (`.jsonl` or `.jsonl.gz` with `chosen` / `rejected` dialogues) as `prompt` / `chosen` /
    `rejected` conversational rows. Pairs whose dialogues differ before the last turn, or whose answers are equal,
    are skipped (and counted in the log) unless `skip_invalid=False`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Preference file {path} does not exist.")
    opener = gzip.open if path.suffix == ".gz" else open
    rows, skipped = [], 0
    with opener(path, "rt", encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if limit is not None and len(rows) >= limit:
                break
            try:
                pair = hh_to_preference(json.loads(line), index)
                if pair["chosen"][0]["content"] == pair["rejected"][0]["content"]:
                    raise DataFormatError(f"Row {index}: chosen and rejected answers are the same.")
            except DataFormatError:
                if not skip_invalid:
                    raise
                skipped += 1
                continue
            rows.append(pair)
    if skipped:
        logger.info("%s: skipped %d pairs that are not a clean preference between two last turns.", path, skipped)
    return Dataset.from_list(rows)


def load_preference_pairs(source: Dataset | str | os.PathLike) -> Dataset:
    """`prompt` / `chosen` / `rejected` rows (text or conversational) from a Dataset or a file; hh-rlhf files (only
    `chosen` / `rejected` dialogues) are converted."""
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".gz"):
        return load_hh_rlhf(source)
    data = load_examples(source)
    columns = set(data.column_names)
    if columns >= {"prompt", "chosen", "rejected"}:
        return data
    if columns >= {"chosen", "rejected"}:
        return Dataset.from_list([hh_to_preference(row, index) for index, row in enumerate(data)])
    raise DataFormatError(
        f"Preference data needs `prompt`, `chosen` and `rejected` columns (or hh-rlhf `chosen` / `rejected` "
        f"dialogues); got {sorted(columns)}."
    )
