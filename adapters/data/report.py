"""The data report: what is wrong with the splits before any training time is spent.

- label distribution per split, and its shift from train (total variation distance, PSI);
- leakage: held-out rows whose text also occurs in an earlier split, exactly (after
  normalization: lowercase, whitespace collapsed) or nearly (TF-IDF cosine of character
  3-grams >= ``near_duplicate_threshold``);
- empty inputs, inputs longer than ``max_length`` tokens, labels in validation/test that
  training never shows.

Leakage and unseen labels are *problems*: ``enforce`` logs them as warnings, or raises
ConfigError under ``data.strict``. ``dedupe_across_splits`` removes the leaked rows.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from datasets import DatasetDict
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

from adapters.data.splits import column_values
from adapters.errors import ConfigError

log = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "validation", "test")
# (earlier, later): rows of `later` that also occur in `earlier`. Train<->held-out overlap is
# leakage (the model saw the answer); validation<->test overlap biases model selection.
PAIRS = (("train", "validation"), ("train", "test"), ("validation", "test"))
LEAKAGE_PAIRS = (("train", "validation"), ("train", "test"))
PSI_WARNING = 0.25  # conventional threshold for a significant population shift
MAX_EXAMPLES = 5


def normalize_text(text: Any) -> str:
    """Lowercase, whitespace collapsed: 'What  is X ?' == 'what is x ?' (exact duplicates)."""
    return " ".join(str(text if text is not None else "").lower().split())


_NON_WORD = re.compile(r"[\W_]+")


def _fuzzy_text(text: str) -> str:
    """For near-duplicate search: punctuation is noise too ('Moby-Dick?' ~ 'Moby Dick ?')."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


# ---------------------------------------------------------------- near duplicates
class TextSimilarity:
    """Cosine similarity of TF-IDF character 3-gram vectors (within word boundaries) over a
    fixed list of texts, with a fast best-match search between two subsets of them.

    Small edits (a typo, punctuation, a word more or less) keep the cosine high, while texts
    that only share common n-grams ('what is the') stay low. Comparing every pair exactly is
    a near-dense sparse product (slow at 10k x 10k), so the search runs in two stages:
    candidates from vectors without the common n-grams (document frequency above ~1%), whose
    products are very sparse, then the exact cosine of the top candidates. Texts with too few
    rare n-grams for that (short or boilerplate ones) are compared exactly with every text of
    the other side.
    """

    TOP_CANDIDATES = 5
    MIN_RARE_NGRAMS = 3

    def __init__(self, texts: list[str]):
        self.n = len(texts)
        self.full = self.rare = None
        fuzzy = [_fuzzy_text(t) for t in texts]
        if not any(fuzzy):
            return
        vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), lowercase=True, dtype=np.float32)
        self.full = vectorizer.fit_transform(fuzzy).tocsr()
        df = np.bincount(self.full.indices, minlength=self.full.shape[1])
        cap = max(50, int(0.01 * self.n))
        self.rare = normalize(self.full[:, np.nonzero(df <= cap)[0]]).tocsr()

    def best_matches(
        self, queries: list[int], corpus: list[int], threshold: float, chunk: int = 4096
    ) -> list[tuple[int, int, float]]:
        """(position in queries, position in corpus, cosine) of each query's most similar corpus
        text, for the queries where that cosine reaches `threshold`."""
        if self.full is None or not queries or not corpus:
            return []
        corpus_rows = self.full[corpus]
        corpus_full = corpus_rows.T.tocsr()
        corpus_rare = self.rare[corpus].T.tocsr()
        weak_corpus = np.nonzero(np.diff(self.rare[corpus].indptr) < self.MIN_RARE_NGRAMS)[0]
        weak_corpus_full = corpus_rows[weak_corpus].T.tocsr()
        found: list[tuple[int, int, float]] = []
        for start in range(0, len(queries), chunk):
            rows = queries[start : start + chunk]
            q_full, q_rare = self.full[rows], self.rare[rows]
            weak = np.diff(q_rare.indptr) < self.MIN_RARE_NGRAMS
            pairs_q, pairs_c = [], []
            cand = (q_rare @ corpus_rare).tocsr()
            for i in np.nonzero(~weak)[0]:
                lo, hi = cand.indptr[i], cand.indptr[i + 1]
                if hi == lo:
                    continue
                vals, cols = cand.data[lo:hi], cand.indices[lo:hi]
                top = cols[np.argsort(-vals)[: self.TOP_CANDIDATES]]
                pairs_q += [i] * len(top)
                pairs_c += top.tolist()
            best: dict[int, tuple[int, float]] = {}
            if pairs_q:
                pq, pc = np.array(pairs_q), np.array(pairs_c)
                sims = np.asarray(q_full[pq].multiply(corpus_rows[pc]).sum(axis=1)).ravel()
                for i, c, sim in zip(pq, pc, sims):
                    if sim > best.get(int(i), (-1, -1.0))[1]:
                        best[int(i)] = (int(c), float(sim))
            if len(weak_corpus):
                exact = (q_full @ weak_corpus_full).tocsr()
                top_c = np.asarray(exact.argmax(axis=1)).ravel()
                top_s = np.asarray(exact.max(axis=1).todense()).ravel()
                for i in np.nonzero(top_s > 0)[0]:
                    if top_s[i] > best.get(int(i), (-1, -1.0))[1]:
                        best[int(i)] = (int(weak_corpus[top_c[i]]), float(top_s[i]))
            weak_rows = np.nonzero(weak)[0]
            if len(weak_rows):
                exact = (q_full[weak_rows] @ corpus_full).tocsr()
                top_c = np.asarray(exact.argmax(axis=1)).ravel()
                top_s = np.asarray(exact.max(axis=1).todense()).ravel()
                for i, c, sim in zip(weak_rows, top_c, top_s):
                    if sim > best.get(int(i), (-1, -1.0))[1]:
                        best[int(i)] = (int(c), float(sim))
            found += [(start + i, c, sim) for i, (c, sim) in sorted(best.items()) if sim >= threshold - 1e-6]
        return found


def near_duplicate_matches(queries: list[str], corpus: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """(query index, best corpus index, cosine) for every query whose most similar corpus text
    reaches `threshold` (see TextSimilarity)."""
    index = TextSimilarity(corpus + queries)
    return index.best_matches(list(range(len(corpus), len(corpus) + len(queries))), list(range(len(corpus))), threshold)


# ---------------------------------------------------------------- the report
@dataclass
class DataReport:
    """What build_data_report found, per split and per pair of splits (see the module docstring)."""

    text_field: str
    label_field: str | None
    sizes: dict[str, int]
    label_distribution: dict[str, dict[str, int]] = field(default_factory=dict)
    label_shift: dict[str, dict[str, float]] = field(default_factory=dict)
    duplicates_within: dict[str, int] = field(default_factory=dict)
    exact_duplicates: dict[str, dict[str, Any]] = field(default_factory=dict)
    near_duplicates: dict[str, dict[str, Any]] = field(default_factory=dict)
    near_duplicate_threshold: float = 0.9
    empty_inputs: dict[str, int] = field(default_factory=dict)
    overlong_inputs: dict[str, dict[str, int]] | None = None
    max_length: int | None = None
    unseen_labels: dict[str, list[str]] = field(default_factory=dict)
    # Per split, once tokenized (record_truncation): rows, input_truncated, response_truncated, dropped.
    truncation: dict[str, dict[str, int]] = field(default_factory=dict)
    # train.packing (adapters.data.packing.packing_stats): rows before/after and the padding share both ways.
    packing: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    # -- verdicts ------------------------------------------------------------------
    def leaked_rows(self, pair: str) -> int:
        """Exact plus near duplicates for `pair` ("train/test", ...)."""
        return self.exact_duplicates.get(pair, {}).get("count", 0) + self.near_duplicates.get(pair, {}).get("count", 0)

    @property
    def has_leakage(self) -> bool:
        """Whether a validation or test row duplicates (exactly or nearly) a training row."""
        return any(self.leaked_rows(f"{a}/{b}") for a, b in LEAKAGE_PAIRS)

    def problems(self) -> list[str]:
        """What `strict` refuses: train/held-out leakage and held-out labels training never shows."""
        out = []
        for a, b in LEAKAGE_PAIRS:
            pair = f"{a}/{b}"
            exact = self.exact_duplicates.get(pair, {}).get("count", 0)
            near = self.near_duplicates.get(pair, {}).get("count", 0)
            if exact or near:
                out.append(
                    f"leakage: {exact} {b} row(s) have an exact duplicate in {a} and {near} more a near duplicate "
                    f"(cosine >= {self.near_duplicate_threshold})"
                )
        for split, labels in self.unseen_labels.items():
            if labels:
                shown = ", ".join(labels[:10]) + ("..." if len(labels) > 10 else "")
                out.append(f"unseen labels: {split} has {len(labels)} label(s) never seen in train: {shown}")
        return out

    # -- output --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, plus has_leakage and problems (JSON-able)."""
        out = asdict(self)
        out["has_leakage"] = self.has_leakage
        out["problems"] = self.problems()
        return out

    def to_markdown(self) -> str:
        """The report as Markdown tables: sizes, labels, duplicates across splits, problems and warnings."""
        lines = ["# Data report", ""]
        lines += [
            "| split | rows | empty | within-split duplicates |" + (" over-long |" if self.overlong_inputs else ""),
            "|---|---|---|---|" + ("---|" if self.overlong_inputs else ""),
        ]
        for split, n in self.sizes.items():
            row = f"| {split} | {n} | {self.empty_inputs.get(split, 0)} | {self.duplicates_within.get(split, 0)} |"
            if self.overlong_inputs:
                row += f" {self.overlong_inputs.get(split, {}).get('count', 0)} |"
            lines.append(row)
        if self.label_distribution:
            labels = sorted({label for dist in self.label_distribution.values() for label in dist})
            lines += [
                "",
                f"## Labels ({self.label_field})",
                "",
                "| label | " + " | ".join(self.label_distribution) + " |",
                "|---|" + "---|" * len(self.label_distribution),
            ]
            for label in labels:
                cells = []
                for dist in self.label_distribution.values():
                    total = max(1, sum(dist.values()))
                    cells.append(f"{dist.get(label, 0)} ({100 * dist.get(label, 0) / total:.1f}%)")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            if self.label_shift:
                lines += ["", "| shift | TVD | PSI |", "|---|---|---|"]
                lines += [f"| {pair} | {s['tvd']:.3f} | {s['psi']:.3f} |" for pair, s in self.label_shift.items()]
        lines += [
            "",
            "## Duplicates across splits",
            "",
            f"| pair | exact | near (cosine >= {self.near_duplicate_threshold}) |",
            "|---|---|---|",
        ]
        for a, b in PAIRS:
            pair = f"{a}/{b}"
            if pair in self.exact_duplicates:
                near = self.near_duplicates.get(pair, {}).get("count", 0)
                lines.append(f"| {pair} | {self.exact_duplicates[pair]['count']} | {near} |")
        if self.truncation:
            lines += [
                "",
                f"## Truncation (data.max_length={self.max_length})",
                "",
                "| split | rows | input cut | response cut | dropped |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {split} | {c['rows']} | {c['input_truncated']} | {c['response_truncated']} | {c['dropped']} |"
                for split, c in self.truncation.items()
            ]
        if self.packing:
            p = self.packing
            lines += [
                "",
                f"## Packing (train.packing, {p['max_length']} tokens per row)",
                "",
                f"{p['rows']} training rows in {p['packed_rows']} packed rows; padding share "
                f"{p['padding_share']:.1%} (unpacked: {p['padding_share_unpacked']:.1%})",
            ]
        for title, items in (("Problems", self.problems()), ("Warnings", self.warnings)):
            lines += ["", f"## {title}", ""] + ([f"- {w}" for w in items] if items else ["none"])
        return "\n".join(lines) + "\n"


def _distribution(labels: Iterable[Any]) -> dict[str, int]:
    return dict(sorted(Counter(str(v) for v in labels).items()))


def label_shift(p_counts: dict[str, int], q_counts: dict[str, int], eps: float = 1e-4) -> dict[str, float]:
    """{"tvd", "psi"}: total variation distance (0..1) and population stability index (>= 0) between
    two label distributions given as counts; eps floors empty classes so that PSI stays finite."""
    labels = sorted(set(p_counts) | set(q_counts))
    p_total, q_total = max(1, sum(p_counts.values())), max(1, sum(q_counts.values()))
    p = np.array([p_counts.get(label, 0) / p_total for label in labels])
    q = np.array([q_counts.get(label, 0) / q_total for label in labels])
    tvd = 0.5 * float(np.abs(p - q).sum())
    ps, qs = np.clip(p, eps, None), np.clip(q, eps, None)  # PSI is infinite for an empty class otherwise
    psi = float(((qs - ps) * np.log(qs / ps)).sum())
    return {"tvd": tvd, "psi": psi}


def _is_categorical(train_labels: list[Any]) -> bool:
    """Classification-like targets: at most 1000 distinct values that repeat (at most half as
    many values as rows) or are short (<= 24 characters on average). Free-text responses are
    not checked for unseen labels or label shift (every response would be 'unseen')."""
    values = [str(v) for v in train_labels]
    distinct = set(values)
    if not values or len(distinct) > 1000:
        return False
    short = sum(len(v) for v in distinct) / len(distinct) <= 24
    return len(distinct) <= len(values) / 2 or short


def _present_splits(splits: DatasetDict) -> list[str]:
    return [s for s in SPLIT_ORDER if s in splits] + [s for s in splits if s not in SPLIT_ORDER]


def build_data_report(
    splits: DatasetDict,
    text_field: str,
    label_field: str | None,
    tokenizer=None,
    max_length: int | None = None,
    near_duplicate_threshold: float = 0.9,
    categorical: bool | None = None,
) -> DataReport:
    """Check `splits` (train / validation / test) for leakage, label problems and bad inputs.

    tokenizer, max_length: both given, inputs longer than max_length tokens are counted.
    near_duplicate_threshold: TF-IDF cosine (0..1) from which two texts count as near duplicates.
    categorical: whether label_field holds class labels (default: guessed from the number
    of distinct training values); only then are label shift and unseen labels reported.
    Raises ConfigError without a train split or when a split lacks text_field / label_field.
    """
    names = _present_splits(splits)
    if "train" not in splits:
        raise ConfigError(f"the data report needs a 'train' split; got {', '.join(names)}")
    for name in names:
        for column, what in ((text_field, "data.text_field"), (label_field, "data.label_field")):
            if column is not None and len(splits[name]) and column not in splits[name].column_names:
                raise ConfigError(
                    f"{what} {column!r} is not a column of the {name} split; "
                    f"columns: {', '.join(splits[name].column_names)}"
                )
    report = DataReport(
        text_field=text_field,
        label_field=label_field,
        sizes={name: len(splits[name]) for name in names},
        near_duplicate_threshold=near_duplicate_threshold,
        max_length=max_length,
    )
    texts = {name: ["" if t is None else str(t) for t in column_values(splits[name], text_field)] for name in names}
    normalized = {name: [normalize_text(t) for t in texts[name]] for name in names}
    _report_inputs(report, texts, normalized, tokenizer, max_length)
    if label_field is not None:
        _report_labels(report, splits, label_field, categorical)
    _report_leakage(report, texts, normalized)
    return report


def _report_inputs(report: DataReport, texts: dict, normalized: dict, tokenizer, max_length: int | None) -> None:
    """Empty inputs, within-split duplicates and (with a tokenizer) over-long inputs per split."""
    for name in texts:
        report.empty_inputs[name] = sum(1 for t in normalized[name] if not t)
        report.duplicates_within[name] = len(normalized[name]) - len(set(normalized[name]))
        if report.empty_inputs[name]:
            report.warnings.append(f"{name}: {report.empty_inputs[name]} empty input(s)")
    if report.duplicates_within.get("train"):
        report.warnings.append(f"train: {report.duplicates_within['train']} row(s) repeat an earlier train text")
    if tokenizer is None or max_length is None:
        return
    report.overlong_inputs = {}
    for name in texts:
        encoded = tokenizer(texts[name], add_special_tokens=True)["input_ids"] if texts[name] else []
        lengths = [len(ids) for ids in encoded]
        over = sum(1 for n in lengths if n > max_length)
        report.overlong_inputs[name] = {"count": over, "max_tokens": max(lengths, default=0)}
        if over:
            report.warnings.append(
                f"{name}: {over} input(s) longer than data.max_length={max_length} tokens will be truncated"
            )


def _report_labels(report: DataReport, splits: DatasetDict, label_field: str, categorical: bool | None) -> None:
    """Label distribution per split, its shift from train and labels train never shows (class labels only)."""
    if categorical is None:
        categorical = _is_categorical(column_values(splits["train"], label_field))
    if not categorical:
        return
    for name in report.sizes:
        report.label_distribution[name] = _distribution(column_values(splits[name], label_field))
    seen = set(report.label_distribution["train"])
    for name in report.sizes:
        if name == "train" or not report.sizes[name]:
            continue
        report.unseen_labels[name] = sorted(set(report.label_distribution[name]) - seen)
        shift = label_shift(report.label_distribution["train"], report.label_distribution[name])
        report.label_shift[f"train->{name}"] = shift
        if shift["psi"] > PSI_WARNING:
            report.warnings.append(
                f"label shift train->{name}: PSI {shift['psi']:.2f} (> {PSI_WARNING}), TVD {shift['tvd']:.2f}"
            )


def _report_leakage(report: DataReport, texts: dict, normalized: dict) -> None:
    """Exact and near duplicates of each later split's rows in each earlier split (PAIRS)."""
    # One vector space for all splits: fitted once, searched per pair.
    offsets, all_texts = {}, []
    for name in normalized:
        offsets[name] = len(all_texts)
        all_texts += normalized[name]
    similarity = TextSimilarity(all_texts)
    for a, b in PAIRS:
        if a not in normalized or b not in normalized:
            continue
        pair = f"{a}/{b}"
        earlier = set(normalized[a])
        exact_rows = [i for i, t in enumerate(normalized[b]) if t and t in earlier]
        report.exact_duplicates[pair] = {
            "count": len(exact_rows),
            "examples": [texts[b][i] for i in exact_rows[:MAX_EXAMPLES]],
        }
        exact_set = set(exact_rows)
        query_rows = [i for i, t in enumerate(normalized[b]) if t and i not in exact_set]
        corpus_rows = [i for i, t in enumerate(normalized[a]) if t]
        matches = similarity.best_matches(
            [offsets[b] + i for i in query_rows], [offsets[a] + i for i in corpus_rows], report.near_duplicate_threshold
        )
        report.near_duplicates[pair] = {
            "count": len(matches),
            "examples": [
                {"text": texts[b][query_rows[q]], "match": texts[a][corpus_rows[c]], "similarity": round(sim, 4)}
                for q, c, sim in sorted(matches, key=lambda m: -m[2])[:MAX_EXAMPLES]
            ],
        }
        if (a, b) not in LEAKAGE_PAIRS and (len(exact_rows) or matches):
            report.warnings.append(
                f"{len(exact_rows)} exact and {len(matches)} near duplicate(s) between {a} and {b}: "
                "model selection is biased"
            )


_TRUNCATION_WORDS = (("input_truncated", "input cut"), ("response_truncated", "response cut"), ("dropped", "dropped"))


def record_truncation(
    report: DataReport | None, counts: dict[str, dict[str, int]], max_length: int, side: str, long_response: str
) -> str | None:
    """Store per-split truncation counts on `report` (when given) and return the one-line warning
    about them, or None when no row was cut or dropped.

    counts: {split: {"rows", "input_truncated", "response_truncated", "dropped"}} as tokenization
    found them; max_length: data.max_length; side, long_response: the data.truncation policy applied.
    """
    line = None
    cut = sum(c["input_truncated"] for c in counts.values())
    responses = sum(c["response_truncated"] for c in counts.values())
    dropped = sum(c["dropped"] for c in counts.values())
    if cut or responses or dropped:
        total = sum(c["rows"] for c in counts.values())
        per_split = "; ".join(
            f"{split}: " + ", ".join(f"{c[key]} {what}" for key, what in _TRUNCATION_WORDS if c[key])
            for split, c in counts.items()
            if any(c[key] for key, _ in _TRUNCATION_WORDS)
        )
        line = (
            f"data.max_length={max_length}: of {total} row(s), {cut} had their input text cut from the {side}, "
            f"{responses} their response cut at the end, {dropped} were dropped "
            f"(data.truncation.long_response={long_response}) ({per_split})"
        )
    if report is not None:
        report.truncation = {split: dict(c) for split, c in counts.items()}
        report.max_length = report.max_length or max_length
        if line:
            report.warnings.append(line)
    return line


def enforce(report: DataReport, strict: bool) -> list[str]:
    """Raise ConfigError listing the problems under `strict`; otherwise log them (and the warnings)."""
    problems = report.problems()
    if strict and problems:
        raise ConfigError(
            "data.strict: the data report found problems:\n- "
            + "\n- ".join(problems)
            + "\nremove leaked rows with data.dedupe: true (exact duplicates), fix the data, or set data.strict: false"
        )
    for line in problems + report.warnings:
        log.warning("data report: %s", line)
    return problems


def dedupe_across_splits(
    splits: DatasetDict,
    text_field: str,
    near_duplicates: bool = False,
    threshold: float = 0.9,
) -> DatasetDict:
    """Drop every validation row whose normalized text occurs in train, and every test row whose
    text occurs in train or validation (with near_duplicates: also rows with cosine >= threshold)."""
    out = DatasetDict({name: ds for name, ds in splits.items()})
    for later, earlier_names in (("validation", ("train",)), ("test", ("train", "validation"))):
        if later not in out or not len(out[later]):
            continue
        earlier = [
            normalize_text(t) for name in earlier_names if name in out for t in column_values(out[name], text_field)
        ]
        earlier_set = set(earlier)
        rows = [normalize_text(t) for t in column_values(out[later], text_field)]
        drop = {i for i, t in enumerate(rows) if t in earlier_set}
        n_exact = len(drop)
        if near_duplicates:
            candidates = [i for i in range(len(rows)) if i not in drop and rows[i]]
            matches = near_duplicate_matches([rows[i] for i in candidates], [t for t in earlier if t], threshold)
            drop |= {candidates[q] for q, _, _ in matches}
        if drop:
            log.info(
                "dedupe: dropped %d %s row(s) also in %s (%d exact, %d near)",
                len(drop),
                later,
                "/".join(earlier_names),
                n_exact,
                len(drop) - n_exact,
            )
            out[later] = out[later].select([i for i in range(len(rows)) if i not in drop])
        if later == "validation" and not len(out[later]):
            raise ConfigError(
                "data.dedupe: every validation row duplicates a training row; the data has too few distinct texts"
            )
    return out
