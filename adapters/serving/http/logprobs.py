"""Token log-probabilities in OpenAI's two formats (legacy completions, chat), with each token's text.

A token's text is what it adds to the decoded text before it (incremental detokenization with the prefix and
read offsets of Hugging Face's text-generation-inference): the texts of a sequence's tokens join to its decoded
text, and a token ending inside a multi-byte character adds "" (the next token adds the character). An
alternative's text is what it would add after the few tokens before its position. JSON has no infinity: a
log-probability below -9999 (or not a number) is given as -9999.0, as vLLM does.
"""

from __future__ import annotations

from adapters.modeling.generation import TokenLogprobs
from adapters.serving.http.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

LOGPROB_FLOOR = -9999.0
_CONTEXT = 4  # tokens before a position that an alternative's text is decoded after


def _finite(value: float) -> float:
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor


class _Detokenizer:
    """Token texts of one tokenizer, special tokens kept or skipped."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def pieces(self, ids: list[int]) -> list[str]:
        """The text each of ``ids`` adds; "".join(result) == decode(ids) unless ids end inside a character."""
        texts = _Pieces(self)
        return [texts.push(token) for token in ids]

    def alternative(self, ids: list[int], position: int, token: int) -> str:
        """The text ``token`` would add in place of ids[position]."""
        context = ids[max(0, position - _CONTEXT) : position]
        before, after = self.decode(context), self.decode([*context, token])
        if after.startswith(before) and not after.endswith("\ufffd"):
            return after[len(before) :]
        return self.decode([token])

    def top(self, ids: list[int], position: int, alternatives: list[tuple[int, float]]) -> dict[str, float]:
        """{text: log-probability} of the alternatives, best first; of two with one text the better is kept."""
        out: dict[str, float] = {}
        for token, logprob in alternatives:
            out.setdefault(self.alternative(ids, position, token), _finite(logprob))
        return out


class _Pieces:
    """The text each token adds, one token at a time (the prefix and read offsets of the module doc)."""

    def __init__(self, detok: _Detokenizer):
        self.detok, self.ids, self.prefix, self.read = detok, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.detok.decode(self.ids[self.prefix : self.read])
        after = self.detok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


# One token's entry: completions (text, log-probability or None, {text: log-probability} or None, text offset);
# chat: a ChatTokenLogprob.
CompletionEntry = tuple[str, "float | None", "dict[str, float] | None", int]


class LogprobStream:
    """The log-probabilities of one sequence's tokens, one token at a time, in the completions (``chat=False``)
    or chat format: for streaming, where each chunk carries its own tokens' entries. Pushing every token of a
    sequence gives exactly what completion_logprobs / chat_logprobs give for it.

    ``offset``: the character offset of the first token in the choice's text (completions: after an echoed
    prompt). ``skip_special_tokens``: as the text the tokens make (False for an echoed prompt).
    """

    def __init__(self, tokenizer, chat: bool, offset: int = 0, skip_special_tokens: bool = True):
        self.chat, self.offset = chat, offset
        self.detok = _Detokenizer(tokenizer, skip_special_tokens)
        self.texts = _Pieces(self.detok)

    def push(
        self, token: int, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> CompletionEntry | ChatTokenLogprob:
        """The entry of the next token, scored ``logprob`` with alternatives ``top`` [(token id, log-probability)]."""
        piece = self.texts.push(token)
        ids, i = self.texts.ids, len(self.texts.ids) - 1
        if self.chat:
            alternatives = [
                TopLogprob(token=text, logprob=_finite(value), bytes=list(text.encode("utf-8")))
                for alt, value in top or []
                for text in [self.detok.alternative(ids, i, alt)]
            ]
            return ChatTokenLogprob(
                token=piece, logprob=_finite(logprob), bytes=list(piece.encode("utf-8")), top_logprobs=alternatives
            )
        entry = (
            piece,
            None if logprob is None else _finite(logprob),
            None if top is None else self.detok.top(ids, i, top),
            self.offset,
        )
        self.offset += len(piece)
        return entry

    def push_all(self, part: TokenLogprobs) -> list:
        """The entries of every token of ``part``."""
        return [self.push(t, lp, top) for t, lp, top in zip(part.token_ids, part.logprobs, part.top)]


def completion_format(entries: list[CompletionEntry]) -> CompletionLogprobs:
    """Completions entries (LogprobStream) as OpenAI's legacy logprobs object."""
    return CompletionLogprobs(
        tokens=[e[0] for e in entries],
        token_logprobs=[e[1] for e in entries],
        top_logprobs=[e[2] for e in entries],
        text_offset=[e[3] for e in entries],
    )


def prompt_text(tokenizer, prompt_ids: list[int]) -> str:
    """The prompt as the model saw it (special tokens included), as echoed before a completion."""
    return "".join(_Detokenizer(tokenizer, skip_special_tokens=False).pieces(prompt_ids))


def completion_logprobs(
    tokenizer, completion: TokenLogprobs | None, prompt: TokenLogprobs | None = None
) -> CompletionLogprobs:
    """Legacy logprobs of a choice: the ``prompt``'s tokens (when echoed; special tokens kept) then the
    ``completion``'s (special tokens skipped, as in the choice's text), with offsets into the choice's text."""
    entries: list[CompletionEntry] = []
    offset = 0
    for part, skip in ((prompt, False), (completion, True)):
        if part is not None:
            stream = LogprobStream(tokenizer, chat=False, offset=offset, skip_special_tokens=skip)
            entries.extend(stream.push_all(part))
            offset = stream.offset
    return completion_format(entries)


def chat_logprobs(tokenizer, completion: TokenLogprobs) -> ChatLogprobs:
    """Chat logprobs of a choice: each generated token with its bytes (UTF-8 of its text) and alternatives."""
    return ChatLogprobs(content=LogprobStream(tokenizer, chat=True).push_all(completion))
