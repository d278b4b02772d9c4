"""The canonical preference record that every input shape is turned into.

Input shapes (README.md, "Preference data"):
- standard:        {"prompt": str, "chosen": str, "rejected": str}
- conversational:  the same keys, each a list of {"role", "content"} messages; rendered to text
                   with the tokenizer's chat template.
- implicit prompt: {"chosen", "rejected"} only; the prompt is their shared prefix.
An optional "id" travels along. Column names are configurable (`data.columns`).

SFT sources (methods that train on texts) hold {"text"} or {"prompt", "completion"} rows instead;
each becomes a TextRecord.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair as text: `prompt + chosen` is preferred over `prompt + rejected`."""

    prompt: str
    chosen: str
    rejected: str
    id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TextRecord:
    """One SFT example as text: train on `completion` after `prompt` ("" when the row is one text)."""

    prompt: str
    completion: str
    id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class BadRow(Exception):
    """A row that cannot become a PreferenceRecord. `reason` is a short code, `detail` prose."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Quarantine reason codes (the `reason` of BadRow and of every quarantine line).
REASONS = (
    "undecodable",  # the line or row cannot be parsed (bad JSON, bad UTF-8)
    "missing_field",  # a required column is absent or null
    "wrong_type",  # a column has a type other than str / list of messages
    "bad_message",  # a conversational message lacks role/content or has wrong types
    "empty_text",  # a required text is empty or whitespace only
    "identical",  # chosen == rejected
    "no_shared_prompt",  # implicit prompt: no shared prefix, or a response is empty
    "chat_template",  # conversational row, but the chat template failed or is missing
    "empty_after_truncation",  # tokenization left no response tokens
)
