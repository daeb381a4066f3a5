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
        out, prefix, read = [], 0, 0
        for i in range(len(ids)):
            before = self.decode(ids[prefix:read])
            after = self.decode(ids[prefix : i + 1])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                out.append(after[len(before) :])
                prefix, read = read, i + 1
            else:
                out.append("")
        return out

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


def prompt_text(tokenizer, prompt_ids: list[int]) -> str:
    """The prompt as the model saw it (special tokens included), as echoed before a completion."""
    return "".join(_Detokenizer(tokenizer, skip_special_tokens=False).pieces(prompt_ids))


def completion_logprobs(
    tokenizer, completion: TokenLogprobs | None, prompt: TokenLogprobs | None = None
) -> CompletionLogprobs:
    """Legacy logprobs of a choice: the ``prompt``'s tokens (when echoed; special tokens kept) then the
    ``completion``'s (special tokens skipped, as in the choice's text), with offsets into the choice's text."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = 0
    for part, skip in ((prompt, False), (completion, True)):
        if part is None:
            continue
        detok = _Detokenizer(tokenizer, skip)
        for i, piece in enumerate(detok.pieces(part.token_ids)):
            logprob, top = part.logprobs[i], part.top[i]
            out.tokens.append(piece)
            out.token_logprobs.append(None if logprob is None else _finite(logprob))
            out.top_logprobs.append(None if top is None else detok.top(part.token_ids, i, top))
            out.text_offset.append(offset)
            offset += len(piece)
    return out


def chat_logprobs(tokenizer, completion: TokenLogprobs) -> ChatLogprobs:
    """Chat logprobs of a choice: each generated token with its bytes (UTF-8 of its text) and alternatives."""
    detok = _Detokenizer(tokenizer, skip_special_tokens=True)
    ids = completion.token_ids
    content = []
    for i, piece in enumerate(detok.pieces(ids)):
        top = [
            TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")))
            for token, logprob in completion.top[i] or []
            for text in [detok.alternative(ids, i, token)]
        ]
        content.append(
            ChatTokenLogprob(
                token=piece,
                logprob=_finite(completion.logprobs[i]),
                bytes=list(piece.encode("utf-8")),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)
