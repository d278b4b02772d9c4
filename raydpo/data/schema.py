"""The canonical preference record that every input shape is turned into.

Input shapes (README.md, "Preference data"):
- standard:        {"prompt": str, "chosen": str, "rejected": str}
- conversational:  the same keys, each a list of {"role", "content"} messages; rendered to text
                   with the tokenizer's chat template.
- implicit prompt: {"chosen", "rejected"} only; the prompt is their shared prefix.
An optional "id" travels along. Column names are configurable (`data.columns`). One source holds
one shape: its first valid row decides standard or conversational (`validate.first_format`).

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


@dataclass(frozen=True)
class ChatRecord:
    """A conversational pair whose structure was checked but which was not rendered to text (no chat
    template was given: `raydpo data validate` without --tokenizer). Lists of {"role", "content"}
    messages; with an implicit prompt, the shared messages have already moved to `prompt`."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# The format of a preference source, decided by its first row whose structure is valid
# (`validate.first_format`); a row of the other format is quarantined as "mixed_format".
STANDARD, CONVERSATIONAL = "standard", "conversational"


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
    "chat_template",  # conversational row, but the chat template failed on it
    "mixed_format",  # a conversational row in a source of strings, or the reverse
    "empty_after_truncation",  # tokenization left no response tokens
)
