"""Preference data: the canonical record, readers, validation with quarantine, tokenization."""
