"""Data: load rows, carve leak-free splits, tokenize for the task, and batch without padding waste."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler

from adapters.config import PREFERENCE_OBJECTIVES, DataConfig, RunConfig
from adapters.data.builtins import BUILTIN_DATASETS
from adapters.data.chat import chat_encoder
from adapters.data.formats import normalize_rows
from adapters.data.pairs import check_preference_rows, preference_encoder
from adapters.data.prompts import (
    PromptFormat,
    build_prompt_ids,
    cut_prompt,
    prompt_budget,
    prompt_parts,
    response_suffix_ids,
)
from adapters.data.report import DataReport, build_data_report, dedupe_across_splits, enforce, record_truncation
from adapters.data.splits import kfold_splits, split_dataset
from adapters.errors import ConfigError, one_line

log = logging.getLogger(__name__)

_FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_rows(data_cfg: DataConfig) -> Dataset:
    """Rows of ``data.name``: a built-in name, a local csv/json/jsonl/parquet file, or a hub data set id.

    Raises ConfigError for a missing or unsupported file, or a name that loads as none of these.
    """
    name = data_cfg.name
    if name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name].load()
    path = Path(name).expanduser()
    if path.suffix.lower() in _FILE_FORMATS:
        return load_data_file(path)
    if path.exists():
        raise ConfigError(
            f"data.name: {path} is not a supported file; use .csv, .json, .jsonl or .parquet, "
            f"or a built-in: {', '.join(BUILTIN_DATASETS)}"
        )
    try:
        return load_dataset(name, split="train")
    except Exception as err:
        raise ConfigError(
            f"data.name {name!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}), "
            f"a local file, nor a loadable hub data set ({type(err).__name__}: {err})"
        ) from err


def load_data_file(path: Path) -> Dataset:
    """The rows of a local csv/json/jsonl/parquet file, read by the ``datasets`` library.

    Raises ConfigError naming the file (and the line, where one is to blame) for a missing file, a
    folder, an empty file, bytes that are not UTF-8, a line that is not JSON, a malformed CSV or
    Parquet file, or a file without rows.
    """
    fmt = _FILE_FORMATS[path.suffix.lower()]
    if path.is_dir():
        raise ConfigError(f"data.name: {path} is a folder; valid: a .csv, .json, .jsonl or .parquet file")
    if not path.is_file():
        raise ConfigError(f"data.name: file {path} does not exist")
    try:
        size = path.stat().st_size
        blank = size < 4096 and not path.read_bytes().strip()
    except OSError as err:
        raise ConfigError(f"data.name: {path} cannot be read ({err.strerror or err})") from None
    if blank:
        raise ConfigError(f"data.name: {path} is empty ({size} bytes); valid: a file with rows")
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)  # datasets logs the parser's error too: the user gets ours alone
    try:
        rows = load_dataset(fmt, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps the parser's error (pandas, pyarrow, json) in its own
        log.debug("loading %s failed", path, exc_info=True)
        if "corresponds to no data" in str(err):
            rows = []
        else:
            raise ConfigError(f"data.name: {path}: {_data_file_problem(path, fmt, err)}") from None
    finally:
        datasets_log.setLevel(level)
    if len(rows) == 0:
        raise ConfigError(f"data.name: {path} has no rows (a header alone?); valid: a file with rows")
    return rows


def _data_file_problem(path: Path, fmt: str, err: BaseException) -> str:
    """What is wrong with a data file `datasets` failed to read: the first line that is not UTF-8 or
    (json) not a JSON object, else the innermost error's own message."""
    if path.suffix.lower() == ".json":
        problem = _json_document_problem(path)
        if problem:
            return problem
    if fmt in ("csv", "json"):
        with path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return f"not UTF-8 text (byte 0x{line[bad.start]:02x} on line {number}); save the file as UTF-8"
                if fmt == "json" and text.strip():
                    problem = _json_line_problem(path, text, number)
                    if problem:
                        return problem
    cause = err
    while cause.__cause__ is not None or (cause.__context__ is not None and not str(cause).strip()):
        cause = cause.__cause__ or cause.__context__
    kind = {"csv": "CSV", "json": "JSON", "parquet": "Parquet"}[fmt]
    return f"not a readable {kind} file ({type(cause).__name__}: {one_line(str(cause), 300)})"


def _json_document_problem(path: Path) -> str | None:
    """Why a .json file that is one JSON document holds no rows (None: it is not one document, or it is
    a list of objects / an object of columns)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # not one document (JSON lines?) or not UTF-8: judged line by line
        return None
    if isinstance(value, dict) or (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
        return None
    return f"the top level is a JSON {type(value).__name__}; valid: a list of objects, or one object per line"


def _json_line_problem(path: Path, text: str, number: int) -> str | None:
    """Why line `number` of a JSON-lines file is not a row (None when it is one)."""
    try:
        value = json.loads(text)
    except ValueError as bad:
        if number == 1 and path.suffix.lower() == ".json":
            return None  # a pretty-printed document spans lines: the parser's own message says more
        return f"line {number} is not valid JSON ({bad})"
    if not isinstance(value, dict):
        return f"line {number} is a JSON {type(value).__name__}; valid: one JSON object per line"
    return None


def label_words(data_cfg: DataConfig) -> dict[str, str]:
    """How each label is written as a target (causal-lm): config first, then the built-in's words."""
    if data_cfg.label_names:
        return dict(data_cfg.label_names)
    builtin = BUILTIN_DATASETS.get(data_cfg.name)
    return dict(builtin.label_names) if builtin else {}


@dataclass
class PreparedData:
    """The splits of a run before tokenization, its class names and its data report."""

    splits: DatasetDict  # raw text rows: train / validation / test
    labels: list[str] | None  # class names (classification), index = class id
    report: DataReport | None = None
    format: str = "text"  # the rows' data format (adapters.data.formats)
    conversational: bool = False  # rows hold `messages`: tokenized with the chat template (adapters.data.chat)

    @property
    def label2id(self) -> dict[str, int] | None:
        """Class name -> class id (the head's row), or None for causal-lm."""
        return {label: i for i, label in enumerate(self.labels)} if self.labels else None


def prepare_splits(cfg: RunConfig, fold: int | None = None) -> PreparedData:
    """Rows -> their format's normalized columns -> dedupe -> split (no text in two splits) -> caps -> data report.

    With data.split.folds = k and `fold` = i, the test split is carved as usual and the rest is
    divided into k stratified folds: fold i validates, the others train. Raises ConfigError for
    missing columns, rows that match no data format, fewer than 2 classes, a fold without
    data.split.folds, and (data.strict) a data report with problems.
    """
    normalized = normalize_rows(load_rows(cfg.data), cfg.data, cfg.task)
    rows, data = normalized.rows, normalized.data  # data: with a built-in's own split when none is set
    target_field = data.response_field or data.label_field
    target_key = "data.response_field" if data.response_field else "data.label_field"
    for field, value in (("data.text_field", data.text_field), (target_key, target_field)):
        if value not in rows.column_names:
            raise ConfigError(
                f"{field} {value!r} is not a column of {data.name}; columns: {', '.join(rows.column_names)}"
            )
        check_scalar_column(rows, value, field, data.name)
    rows = rows.filter(lambda r: r[data.text_field] is not None and str(r[data.text_field]).strip() != "")
    if not len(rows):
        raise ConfigError(
            f"data.text_field {data.text_field!r}: every row of {data.name} has an empty text; valid: rows with text"
        )
    if data.dedupe:
        rows = _drop_exact_duplicates(rows, data.text_field)
    if cfg.task == "sequence-classification" or data.response_field is None:
        rows = rows.map(lambda r: {data.label_field: str(r[data.label_field])})
    splits = split_dataset(rows, data.split, label_field=target_field, seed=cfg.train.seed)
    if fold is not None:
        if not data.split.folds:
            raise ConfigError("a fold was requested but data.split.folds is not set")
        pool = concatenate_datasets([splits["train"], splits["validation"]])
        label = target_field if cfg.task == "sequence-classification" else None
        splits["train"], splits["validation"] = kfold_splits(pool, data.split.folds, label, cfg.train.seed)[fold]
    if data.dedupe:
        splits = dedupe_across_splits(splits, data.text_field)
    caps = (("train", data.max_train_samples), ("validation", data.max_eval_samples), ("test", data.max_test_samples))
    for split, cap in caps:
        if cap is not None and split in splits and len(splits[split]) > cap:
            splits[split] = splits[split].select(range(cap))  # splits are already shuffled
    labels = None
    if cfg.task == "sequence-classification":
        # Every class of every split gets a head row: a class missing from training stays
        # predictable-in-principle and scorable (the data report warns about it).
        labels = sorted({label for split in splits.values() for label in split[data.label_field]})
        if len(labels) < 2:
            raise ConfigError(
                f"data.label_field {data.label_field!r}: need at least 2 classes in training data, found {labels}"
            )
    report = build_data_report(splits, data.text_field, target_field)
    enforce(report, strict=data.strict)
    return PreparedData(
        splits=splits, labels=labels, report=report, format=normalized.format, conversational=normalized.conversational
    )


def check_scalar_column(rows: Dataset, column: str, field: str, source: str) -> None:
    """Raise ConfigError naming the first row whose `column` value is a list or object: texts and labels
    are strings or numbers (a JSON file may mix types across rows)."""
    for number, value in enumerate(rows[column], 1):
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ConfigError(
                f"{field} {column!r}: row {number} of {source} holds a {type(value).__name__} "
                f"({one_line(repr(value), 80)}); valid: text or a number"
            )


def _drop_exact_duplicates(rows: Dataset, text_field: str) -> Dataset:
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(rows[text_field]):
        key = " ".join(str(text).lower().split())
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(rows):
        log.info("dropped %d exact duplicate texts", len(rows) - len(keep))
    return rows.select(keep)


# ---------------------------------------------------------------- tokenization
# Per-row flags the encoders add; tokenize_splits counts them into the data report and drops them.
_FLAGS = ("input_truncated", "response_truncated")


def _classification_encoder(tokenizer, data: DataConfig, label2id: dict[str, int]):
    """batch of rows -> input_ids, attention_mask, labels (class id; -100 for an unknown class), length,
    and input_truncated (the text was longer than data.max_length and lost the end data.truncation says)."""
    side = data.truncation.side("sequence-classification")
    if tokenizer.truncation_side != side:
        tokenizer = copy.copy(tokenizer)
        tokenizer.truncation_side = side

    def encode(batch):
        enc = tokenizer(batch[data.text_field], truncation=True, max_length=data.max_length)
        full = tokenizer(batch[data.text_field])["input_ids"]  # untruncated, to count the cut rows
        enc["labels"] = [label2id.get(label, -100) for label in batch[data.label_field]]
        enc["length"] = [len(x) for x in enc["input_ids"]]
        enc["input_truncated"] = [len(ids) > data.max_length for ids in full]
        enc["response_truncated"] = [False] * len(full)
        return enc

    return encode


def _causal_lm_encoder(tokenizer, data: DataConfig, max_new_tokens: int):
    """batch of rows -> prompt + response token ids within data.max_length, labels on the response only,
    plus `prompt_ids` (the prompt as serving builds it with max_new_tokens left for the answer: what
    generation eval feeds the model) and `target` (the response text).

    Over-long rows follow data.truncation (adapters.data.prompts): the prompt's markup and the response
    are kept and the input text is cut; a response longer than the room the markup leaves is cut at
    its end, or its row is left out under long_response "drop". Flags input_truncated and
    response_truncated say what was cut. Raises ConfigError when the markup alone fills data.max_length.
    """
    words = label_words(data)
    target_field = data.response_field or data.label_field
    suffix = response_suffix_ids(tokenizer)
    fmt = PromptFormat.from_data_config(data)
    drop = data.truncation.long_response == "drop"
    eval_budget = prompt_budget(data.max_length, max_new_tokens)

    def encode(batch):
        out = {key: [] for key in ("input_ids", "attention_mask", "labels", "length", "prompt_ids", "target", *_FLAGS)}
        for text, target in zip(batch[data.text_field], batch[target_field]):
            target = words.get(str(target), str(target))
            answer = tokenizer(target, add_special_tokens=False)["input_ids"] + suffix
            full = build_prompt_ids(tokenizer, str(text), fmt)
            parts = None
            if len(full) + len(answer) > data.max_length or len(full) > eval_budget:
                parts = prompt_parts(tokenizer, str(text), fmt)
            room = data.max_length - (len(parts[0]) + len(parts[2]) if parts else 0)  # for text + response
            if parts and room < 1:
                raise ConfigError(
                    f"data.max_length={data.max_length} leaves no room for a response: the prompt format "
                    f"(chat markup, data.system_prompt, data.instruction) alone takes {data.max_length - room} "
                    f"tokens; raise data.max_length or shorten the system prompt / instruction"
                )
            if len(answer) > room and drop:
                continue
            response_cut = len(answer) > room
            answer = answer[:room]
            prompt = full if parts is None else cut_prompt(parts, data.max_length - len(answer), fmt.prompt_side)
            ids = prompt + answer
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            # Loss only on the response: the prompt is context, not something to learn to write.
            out["labels"].append([-100] * len(prompt) + answer)
            out["length"].append(len(ids))
            out["prompt_ids"].append(full if parts is None else cut_prompt(parts, eval_budget, fmt.prompt_side))
            out["target"].append(target)
            out["input_truncated"].append(len(prompt) < len(full))
            out["response_truncated"].append(response_cut)
        return out

    return encode


def tokenize_splits(prepared: PreparedData, cfg: RunConfig, tokenizer) -> DatasetDict:
    """Add model inputs to every split. Causal-lm rows keep `prompt_ids` and `target` for generation eval.

    Rows cut or dropped to fit data.max_length are counted per split into prepared.report (its
    ``truncation``) with one warning line. Raises ConfigError when dropping leaves the training or
    validation split empty, or the prompt format alone fills data.max_length.
    """
    if cfg.task == "sequence-classification":
        encode = _classification_encoder(tokenizer, cfg.data, prepared.label2id)
    elif cfg.train.objective in PREFERENCE_OBJECTIVES:
        columns = prepared.splits["train"].column_names
        check_preference_rows(columns, cfg.data, cfg.train.objective, prepared.conversational)
        encode = preference_encoder(tokenizer, cfg.data, cfg.eval.max_new_tokens, label_words(cfg.data))
    elif prepared.conversational:
        encode = chat_encoder(tokenizer, cfg.data)
    else:
        encode = _causal_lm_encoder(tokenizer, cfg.data, cfg.eval.max_new_tokens)
    columns = prepared.splits["train"].column_names
    out, counts = {}, {}
    for name, split in prepared.splits.items():
        encoded = split.map(encode, batched=True, remove_columns=columns, desc=f"tokenizing {name}")
        flags = {flag: encoded[flag][:] if flag in encoded.column_names else [] for flag in _FLAGS}
        counts[name] = {
            "rows": len(split),
            "input_truncated": sum(flags["input_truncated"]),
            "response_truncated": sum(flags["response_truncated"]),
            "dropped": len(split) - len(encoded),
        }
        if name in ("train", "validation") and len(split) and not len(encoded):
            raise ConfigError(
                f"data.truncation.long_response: 'drop' left the {name} split empty: every response is longer than "
                f"data.max_length={cfg.data.max_length} allows; raise data.max_length or use 'truncate'"
            )
        out[name] = encoded.remove_columns([flag for flag in _FLAGS if flag in encoded.column_names])
    line = record_truncation(
        prepared.report,
        counts,
        cfg.data.max_length,
        cfg.data.truncation.side(cfg.task),
        cfg.data.truncation.long_response,
    )
    if line:
        log.warning("data: %s", line)
    return DatasetDict(out)


# ---------------------------------------------------------------- batching
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "token_type_ids")


class LengthGroupedEpochSampler(torch.utils.data.Sampler):
    """Rows of similar length end up in the same batch (little padding), in a seeded order per epoch.

    Wraps transformers' LengthGroupedSampler and adds set_epoch so every process of a
    distributed run, and a resumed run, sees the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The order of epoch `epoch` (seed + epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(LengthGroupedSampler(self.batch_size, lengths=self.lengths, generator=g))


def collator_for(task: str, tokenizer):
    """rows -> a padded batch of input_ids / attention_mask [batch, longest], labels [batch, longest]
    (causal-lm, padding -100) or [batch] (classification), token_type_ids where the tokenizer makes them."""
    if task == "causal-lm":
        # On CPU, left padding puts every response at the end of its row, so the vocabulary
        # projection runs only there (adapters.modeling.losses). On CUDA, right padding: left-padded
        # rows start with fully masked queries, which some SDPA kernels turn into NaN under
        # bf16 autocast (seen on an H200), and the projection is cheap there anyway.
        padded = copy.copy(tokenizer)
        padded.padding_side = "right" if torch.cuda.is_available() else "left"
        inner = DataCollatorForSeq2Seq(padded, padding=True, label_pad_token_id=-100, return_tensors="pt")
    else:
        inner = DataCollatorWithPadding(tokenizer, padding=True, return_tensors="pt")

    def collate(rows):
        return inner([{k: r[k] for k in MODEL_INPUTS if k in r} for r in rows])

    return collate


def train_dataloader(
    ds: Dataset, task: str, tokenizer, batch_size: int, seed: int, group_by_length: bool, collate=None
):
    """Seeded training batches (set_epoch on the sampler reshuffles), length-grouped when `group_by_length`;
    `collate` (rows -> batch) defaults to the task's collator_for."""
    collate = collate or collator_for(task, tokenizer)
    if group_by_length:
        sampler = LengthGroupedEpochSampler(list(ds["length"]), batch_size, seed)
    else:
        sampler = _SeededRandomSampler(len(ds), seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=False)


class _SeededRandomSampler(torch.utils.data.Sampler):
    """A random permutation per epoch from seed + epoch (the same on every process)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def eval_dataloader(ds: Dataset, task: str, tokenizer, batch_size: int):
    """Sorted by length (least padding); order does not matter for metrics."""
    order = sorted(range(len(ds)), key=lambda i: ds[i]["length"]) if "length" in ds.column_names else None
    ds = ds.select(order) if order else ds
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, collate_fn=collator_for(task, tokenizer)
    )
