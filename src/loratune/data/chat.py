"""Conversations and their tokens: a row as a conversation (chat, instruction or completion form), rendered
with the model's chat template and tokenized at once, as generation and serving tokenize it, with labels
on the trained assistant tokens only.

The loss covers each trained assistant message up to and including its end-of-turn token (``<|im_end|>``
under ChatML), and nothing of the system, user or tool messages nor of the template's text around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from ..errors import LoratuneError, first_line

IGNORE = -100  # label value that the loss skips
FORMAT_FIELDS = {
    "chat": ("messages",),
    "instruction": ("instruction", "output"),
    "completion": ("prompt", "completion"),
}
STANDARD_COLUMNS = ("messages", "instruction", "input", "output", "prompt", "completion")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE everywhere but on the trained assistant tokens
    prompt: list[int] = field(default_factory=list)  # the last trained turn's generation prompt, tokenized alone
    reference: str = ""  # that turn's answer, as written: what a generated answer is scored against
    answer_end: int = 0  # tokens up to the last trained one (the end of turn), before data.max_length cut them

    def end_cut(self, max_length: int) -> bool:
        """Whether ``max_length`` tokens cut off the end of its last trained answer, its end of turn
        included: the model would learn an answer that does not end."""
        return self.answer_end > max_length

    def __len__(self) -> int:
        return len(self.input_ids)


def detect_format(rows: list[dict], fmt: str, where: str) -> str:
    if fmt != "auto":
        return fmt
    columns = set(rows[0])
    for name, needed in FORMAT_FIELDS.items():
        if set(needed) <= columns:
            return name
    raise LoratuneError(
        f"{where}: cannot tell the data format from columns {sorted(columns)}; expected 'messages', "
        "'instruction'/'output' or 'prompt'/'completion' (or map yours with data.columns)"
    )


def rename_columns(rows: list[dict], columns: dict | None, where: str) -> list[dict]:
    """``data.columns`` maps loratune's names to the dataset's: ``{prompt: question, completion: answer}``."""
    if not columns:
        return rows
    for ours, theirs in columns.items():
        if ours not in STANDARD_COLUMNS:
            raise LoratuneError(f"data.columns: '{ours}' is not a column loratune reads ({', '.join(STANDARD_COLUMNS)})")
        if theirs not in rows[0]:
            raise LoratuneError(f"data.columns.{ours}: {where} has no column '{theirs}' (it has {', '.join(rows[0])})")
    return [{**row, **{ours: row.get(theirs) for ours, theirs in columns.items()}} for row in rows]


def _text(value: Any, what: str) -> str:
    """A message's content as text: a string, or a list of text parts joined; never null or empty."""
    if isinstance(value, list):  # [{"type": "text", "text": "..."}, ...]
        parts = [p.get("text") if isinstance(p, dict) else p for p in value]
        if not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{what} has parts that are not text")
        value = "".join(parts)
    if value is None:
        raise ValueError(f"{what} is null")
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not text")
    return value


def to_messages(row: dict, fmt: str, system_prompt: str | None) -> list[dict]:
    """The row as a conversation of text messages; raises ValueError on a malformed row."""
    if fmt == "chat":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' is not a list of messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {i + 1} has no role")
            out.append({"role": m["role"], "content": _text(m.get("content"), f"message {i + 1}'s content")})
    else:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        if fmt == "instruction":
            extra = row.get("input")
            user = _text(row.get("instruction"), "'instruction'") + (f"\n\n{extra}" if isinstance(extra, str) and extra else "")
            answer = _text(row.get("output"), "'output'")
        else:
            user, answer = _text(row.get("prompt"), "'prompt'"), _text(row.get("completion"), "'completion'")
        out = [*system, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if out[-1]["role"] != "assistant":
        raise ValueError("the last message must have role 'assistant'")
    if not out[-1]["content"].strip():
        raise ValueError("the assistant's answer is empty")
    return out



#
# A conversation is rendered with the chat template and tokenized at once, as generation and serving
# tokenize it; the loss mask comes from character ranges of the text. Tokenizing the prompt and the
# answer apart would train on other ids: a SentencePiece tokenizer (Metaspace, Llama 2, Mistral) puts a
# word-boundary marker at the start of every piece, so "[/INST]Paris" would be trained as "▁Paris"
# where the whole conversation holds "P", "aris".

Trained = list[tuple[int, int]]  # character ranges [start, end) of a text that the loss covers


@dataclass
class Rendered:
    """A conversation as the model is served it, and what of it the loss covers."""

    text: str
    trained: Trained
    prompt: str  # what generation of the last trained turn starts from (the template's generation prompt)
    reference: str  # that turn's answer


def rendered(tokenizer, messages: list[dict], train_on: str, where: str = "model.name") -> list[Rendered]:
    """The text(s) the model is served for this conversation, each with the ranges the loss covers: the
    whole conversation once; or, where the template renders a conversation differently from its
    beginning (a reasoning block kept only after the last user message, as Qwen3's), one text per
    trained assistant turn, as the template renders the conversation at that turn. Raises ValueError
    when the template refuses the conversation, LoratuneError when no end of an answer can be marked."""
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant_turn":
        trained = trained[-1:]
    if not tokenizer.chat_template:
        return [_plain(tokenizer, messages, set(trained), where)]
    full = _render(tokenizer, messages, False)
    ranges: Trained = []
    for i in trained:
        prompt, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1], False)
        if not (turn.startswith(prompt) and full.startswith(turn)):  # the template rewrites earlier turns
            return [_turn_alone(tokenizer, messages, j, where) for j in trained]
        ranges.append((len(prompt), len(prompt) + _turn_end(turn[len(prompt):], messages[i]["content"],
                                                            tokenizer.eos_token, where)))
    return [Rendered(full, ranges, _render(tokenizer, messages[:trained[-1]], True), messages[trained[-1]]["content"])]


def _turn_alone(tokenizer, messages: list[dict], i: int, where: str) -> Rendered:
    """Turn ``i`` as the conversation is rendered when it is the last turn (what the model is served then)."""
    prompt, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1], False)
    if not turn.startswith(prompt):
        raise ValueError("the chat template renders an assistant turn that does not begin with its own generation "
                         "prompt, so the assistant's tokens cannot be told apart")
    end = len(prompt) + _turn_end(turn[len(prompt):], messages[i]["content"], tokenizer.eos_token, where)
    return Rendered(turn, [(len(prompt), end)], prompt, messages[i]["content"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _turn_end(turn: str, content: str, eos: str | None, where: str) -> int:
    """Where an assistant turn's trained text ends: just after its end-of-turn token (ChatML's
    ``<|im_end|>``, the tokenizer's eos), not after the line break a template puts between turns; without
    an eos in the turn, after the last text the template puts there."""
    start = turn.find(content)
    after = start + len(content) if start >= 0 else 0
    if eos and (end := turn.find(eos, after)) >= 0:
        return end + len(eos)
    if len(turn.rstrip()) <= after:
        fix = "use a chat template that closes each turn" if eos else \
            "set eos_token in its tokenizer_config.json (the token that ends a turn), or use a chat template that closes each turn"
        raise LoratuneError(f"{where}: the chat template puts nothing after an assistant's answer "
                            f"({f'not even the eos_token {eos!r}' if eos else 'and the tokenizer has no eos_token'}), so "
                            f"the model could not learn where an answer ends; {fix}")
    return len(turn.rstrip())


def _plain(tokenizer, messages: list[dict], trained: set[int], where: str) -> Rendered:
    """Without a chat template: each message's text on its own paragraph, an answer ended by eos."""
    eos = tokenizer.eos_token
    if not eos:
        raise LoratuneError(f"{where}: the tokenizer has neither a chat template nor an eos_token, so the model could "
                            "not learn where an answer ends; set eos_token (or a chat_template) in its "
                            "tokenizer_config.json")
    text, ranges = "", []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            if i in trained:
                ranges.append((len(text), len(text) + len(m["content"]) + len(eos)))
            text += m["content"] + eos + ("\n\n" if i < len(messages) - 1 else "")
        else:
            text += f"{m['content']}\n\n"
    last = max(trained)
    return Rendered(text, ranges, text[:ranges[-1][0]], messages[last]["content"])


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an assistant's answer, where generation stops: the token the chat template puts
    after an answer (ChatML's ``<|im_end|>``), and the tokenizer's eos."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if tokenizer.chat_template:
        probe = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]
        try:
            prompt, turn = _render(tokenizer, probe[:1], True), _render(tokenizer, probe, False)
        except Exception:  # a template that takes no such conversation: eos alone
            return ids
        after = turn[len(prompt):].split("Hi.", 1)[-1].strip()
        marker = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if marker and marker[0] not in ids:
            ids.append(marker[0])
    return ids


def _bos_to_add(tokenizer, text: str) -> int | None:
    """The BOS id to put before a text rendered without a chat template, when the tokenizer adds one
    (``tokenizer(text)`` at inference does); a chat template writes its own, as serving renders it."""
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer.chat_template or text.startswith(tokenizer.bos_token or "\0"):
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def trained_mask(tokenizer, text: str, trained: Trained) -> tuple[list[int], list[bool]]:
    """The ids of ``text`` tokenized at once (no special tokens added) and, for each, whether it overlaps
    a trained range: from the tokens' character offsets, or, for a tokenizer without offsets
    (SentencePiece in Python), from where the tokens of each range's boundary prefix part from the whole's."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        mask = [False] * len(ids)
        for begin, stop in trained:
            first, _ = _boundary(tokenizer, text, ids, begin)
            last, straddles = _boundary(tokenizer, text, ids, stop)
            mask[first:last + straddles] = [True] * (last + straddles - first)
        return ids, mask
    return list(enc["input_ids"]), [any(s < stop and e > begin for begin, stop in trained)
                                    for s, e in enc["offset_mapping"]]


def _boundary(tokenizer, text: str, ids: list[int], position: int) -> tuple[int, bool]:
    """How many of the whole text's tokens lie before ``position``, and whether the next one straddles it
    (the prefix's own tokens part from the whole's there)."""
    prefix = tokenizer(text[:position], add_special_tokens=False)["input_ids"]
    k = 0
    while k < min(len(prefix), len(ids)) and prefix[k] == ids[k]:
        k += 1
    return k, k < len(prefix)


def encode(tokenizer, conversation: Rendered, max_length: int) -> Example:
    """The conversation's text tokenized at once, its tokens labelled where they overlap a trained range;
    its generation prompt tokenized alone, as serving tokenizes a prompt."""
    ids, mask = trained_mask(tokenizer, conversation.text, conversation.trained)
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    prompt = list(tokenizer(conversation.prompt, add_special_tokens=False)["input_ids"])
    bos = _bos_to_add(tokenizer, conversation.text)
    if bos is not None:
        ids, labels, prompt = [bos, *ids], [IGNORE, *labels], [bos, *prompt]
    answer_end = max((i + 1 for i, label in enumerate(labels) if label != IGNORE), default=0)
    return Example(ids[:max_length], labels[:max_length], prompt[:max_length], conversation.reference, answer_end)


def tokenize_row(tokenizer, row: dict, fmt: str, cfg: DataConfig, at: str) -> list[Example]:
    """One row as the examples it trains: one, or one per assistant turn (see ``rendered``)."""
    import jinja2

    try:
        messages = to_messages(row, fmt, cfg.system_prompt)
        texts = rendered(tokenizer, messages, cfg.train_on)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoratuneError(f"{at}: not in {fmt} form: {first_line(exc)}") from None
    except jinja2.TemplateError as exc:
        hint = " (data.system_prompt adds a system message, which this template may not take)" \
            if cfg.system_prompt and fmt != "chat" else ""
        raise LoratuneError(f"{at}: the model's chat template refused it: {first_line(exc)}{hint}") from None
    examples = [encode(tokenizer, text, cfg.max_length) for text in texts]
    if any(all(label == IGNORE for label in e.labels) for e in examples):
        raise LoratuneError(f"data.max_length: {cfg.max_length} tokens is shorter than the prompt of {at} "
                            f"(no answer token is left to train on)")
    return examples


def tokenize_by_row(tokenizer, rows: list[dict], cfg: DataConfig, where: str,
                    numbers: list[int] | None = None) -> list[list[Example]]:
    """Each row's examples; ``numbers``: the rows' places in their file (0-based), for messages."""
    if not rows:
        return []
    rows = rename_columns(rows, cfg.columns, where)
    fmt = detect_format(rows, cfg.format, where)
    numbers = numbers or list(range(len(rows)))
    return [tokenize_row(tokenizer, row, fmt, cfg, f"{where}: row {k + 1}") for k, row in zip(numbers, rows, strict=True)]


def tokenize_rows(tokenizer, rows: list[dict], cfg: DataConfig, where: str) -> list[Example]:
    """Every row's examples, in order."""
    return [e for examples in tokenize_by_row(tokenizer, rows, cfg, where) for e in examples]
