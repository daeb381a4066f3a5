"""Data: load rows, carve leak-free splits, tokenize for the task, and batch without padding waste."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets

from adapters.data.builtins import BUILTIN_DATASETS
from adapters.config import DataConfig, RunConfig
from adapters.errors import ConfigError

log = logging.getLogger(__name__)

_FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_rows(data_cfg: DataConfig) -> Dataset:
    """A built-in name, a local csv/json/jsonl/parquet file, or a hub data set id."""
    from datasets import load_dataset

    name = data_cfg.name
    if name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name].load()
    path = Path(name).expanduser()
    if path.suffix.lower() in _FILE_FORMATS:
        if not path.is_file():
            raise ConfigError(f"data.name: file {path} does not exist")
        return load_dataset(_FILE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
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


def label_words(data_cfg: DataConfig) -> dict[str, str]:
    """How each label is written as a target (causal-lm): config first, then the built-in's words."""
    if data_cfg.label_names:
        return dict(data_cfg.label_names)
    builtin = BUILTIN_DATASETS.get(data_cfg.name)
    return dict(builtin.label_names) if builtin else {}


@dataclass
class PreparedData:
    splits: DatasetDict  # raw text rows: train / validation / test
    labels: list[str] | None  # class names (classification), index = class id
    report: object | None = None  # adapters.data.report.DataReport

    @property
    def label2id(self) -> dict[str, int] | None:
        return {l: i for i, l in enumerate(self.labels)} if self.labels else None


def prepare_splits(cfg: RunConfig, fold: int | None = None) -> PreparedData:
    """Rows -> dedupe -> split (no text in two splits) -> caps -> data report.

    With data.split.folds = k and `fold` = i, the test split is carved as usual and the rest is
    divided into k stratified folds: fold i validates, the others train.
    """
    from adapters.data.report import build_data_report, dedupe_across_splits, enforce
    from adapters.data.splits import kfold_splits, split_dataset

    data = cfg.data
    rows = load_rows(data)
    target_field = data.response_field or data.label_field
    for field, value in (("data.text_field", data.text_field), ("data.label_field", target_field)):
        if value not in rows.column_names:
            raise ConfigError(f"{field} {value!r} is not a column of {data.name}; columns: {', '.join(rows.column_names)}")
    rows = rows.filter(lambda r: r[data.text_field] is not None and str(r[data.text_field]).strip() != "")
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
    for split, cap in (("train", data.max_train_samples), ("validation", data.max_eval_samples), ("test", data.max_test_samples)):
        if cap is not None and split in splits and len(splits[split]) > cap:
            splits[split] = splits[split].select(range(cap))  # splits are already shuffled
    labels = None
    if cfg.task == "sequence-classification":
        # Every class of every split gets a head row: a class missing from training stays
        # predictable-in-principle and scorable (the data report warns about it).
        labels = sorted({l for split in splits.values() for l in split[data.label_field]})
        if len(labels) < 2:
            raise ConfigError(f"data.label_field {data.label_field!r}: need at least 2 classes in training data, found {labels}")
    report = build_data_report(splits, data.text_field, target_field)
    enforce(report, strict=data.strict)
    return PreparedData(splits=splits, labels=labels, report=report)


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
def build_prompt_ids(tokenizer, text: str, data_cfg: DataConfig) -> list[int]:
    """The prompt a causal LM sees: the chat template when the tokenizer has one, else plain text."""
    content = f"{data_cfg.instruction}\n{text}" if data_cfg.instruction else text
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if data_cfg.system_prompt:
            messages.append({"role": "system", "content": data_cfg.system_prompt})
        messages.append({"role": "user", "content": content})
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    prefix = f"{data_cfg.system_prompt}\n" if data_cfg.system_prompt else ""
    return tokenizer(f"{prefix}{content}\nAnswer:", add_special_tokens=True)["input_ids"]


def response_suffix_ids(tokenizer) -> list[int]:
    """Tokens that end a response: the end-of-turn/EOS token, so generation knows when to stop."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_splits(prepared: PreparedData, cfg: RunConfig, tokenizer) -> DatasetDict:
    """Add model inputs to every split. Causal-lm rows keep `prompt_ids` and `target` for generation eval."""
    data = cfg.data
    max_len = data.max_length
    if cfg.task == "sequence-classification":
        label2id = prepared.label2id

        def encode(batch):
            enc = tokenizer(batch[data.text_field], truncation=True, max_length=max_len)
            enc["labels"] = [label2id.get(l, -100) for l in batch[data.label_field]]
            enc["length"] = [len(x) for x in enc["input_ids"]]
            return enc

    else:
        words = label_words(data)
        target_field = data.response_field or data.label_field
        suffix = response_suffix_ids(tokenizer)

        def encode(batch):
            out = {"input_ids": [], "attention_mask": [], "labels": [], "length": [], "prompt_ids": [], "target": []}
            for text, target in zip(batch[data.text_field], batch[target_field]):
                target = words.get(str(target), str(target))
                prompt = build_prompt_ids(tokenizer, str(text), data)
                answer = tokenizer(target, add_special_tokens=False)["input_ids"] + suffix
                prompt = prompt[: max(1, max_len - len(answer))]  # keep the answer, trim the prompt
                ids = prompt + answer
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                # Loss only on the response: the prompt is context, not something to learn to write.
                out["labels"].append([-100] * len(prompt) + answer)
                out["length"].append(len(ids))
                out["prompt_ids"].append(prompt)
                out["target"].append(target)
            return out

    columns = prepared.splits["train"].column_names
    return DatasetDict(
        {name: split.map(encode, batched=True, remove_columns=columns, desc=f"tokenizing {name}") for name, split in prepared.splits.items()}
    )


# ---------------------------------------------------------------- batching
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "token_type_ids")


class LengthGroupedEpochSampler(torch.utils.data.Sampler):
    """Rows of similar length end up in the same batch (little padding), in a seeded order per epoch.

    Wraps transformers' LengthGroupedSampler and adds set_epoch so every process of a
    distributed run, and a resumed run, sees the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0
        self._cls = LengthGroupedSampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self._cls(self.batch_size, lengths=self.lengths, generator=g))


def collator_for(task: str, tokenizer):
    import copy

    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

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


def train_dataloader(ds: Dataset, task: str, tokenizer, batch_size: int, seed: int, group_by_length: bool):
    collate = collator_for(task, tokenizer)
    if group_by_length:
        sampler = LengthGroupedEpochSampler(list(ds["length"]), batch_size, seed)
    else:
        sampler = _SeededRandomSampler(len(ds), seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=False)


class _SeededRandomSampler(torch.utils.data.Sampler):
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
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collator_for(task, tokenizer))
