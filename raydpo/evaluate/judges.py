"""Judges for win-rate evaluation: per prompt, which of two completions A and B is better.

Every judge has one interface (`Judge`): `check()` fails fast with a one-line `UserError` when the
judge cannot be used (before any generation starts), and `compare(prompts, a, b)` returns `Verdicts`,
one outcome per prompt from A's point of view (1.0 = A better, 0.0 = B better, 0.5 = tie), the
convention of `raydpo.evaluate.metrics`. Judges are looked up by kind in `JUDGES` (see `make_judge`):

- "reward":       a ground-truth reward function (`raydpo.models.rewards`, e.g. VADER), pointwise.
- "reward_model": a raydpo reward model directory (sequence classifier, num_labels=1), pointwise.
- "llm":          a pairwise LLM judge, a local Hugging Face causal LM or an OpenAI-compatible endpoint.

Pointwise judges score A and B separately and compare the scores; the pairwise judge sees both and
answers "A" or "B". LLM judges prefer whichever answer is shown first or second (position bias, Zheng
et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot Arena", arXiv 2306.05685, Sec. 3.3), so
each pair is asked in both orders and the two verdicts are averaged (Sec. 3.4, "swapping positions").
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from raydpo.errors import ConfigError, UserError
from raydpo.evaluate.metrics import outcomes_from_scores
from raydpo.models.rewards import get_reward
from raydpo.models.scoring import score_texts
from raydpo.ops.logprobs import token_logps


class Verdicts(NamedTuple):
    """One judge's verdicts on n prompts."""

    outcomes: list[float]  # (n,) per prompt: 1.0 A better, 0.0 B better, 0.5 tie
    scores_a: list[float] | None  # (n,) scores of A; pointwise judges only
    scores_b: list[float] | None  # (n,) scores of B; pointwise judges only


class Judge(Protocol):
    name: str

    def check(self) -> None:
        """Raise UserError (one line) if the judge cannot be used: unreachable endpoint, missing model."""

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> Verdicts:
        """Per-prompt outcomes of completion a[i] against b[i] for prompts[i]."""


def _same_lengths(prompts: list[str], a: list[str], b: list[str]) -> None:
    if not len(prompts) == len(a) == len(b):
        raise ValueError(
            f"prompts, a and b must have the same length, got {len(prompts)}, {len(a)}, {len(b)}"
        )


def _require_model_dir(path: str, what: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{what} {path!r} is not a Hugging Face model directory (no config.json)")


class RewardJudge:
    """Ground-truth reward function by name (`raydpo.models.rewards.REWARDS`), applied to completions only.

    Measures which completion has the higher true reward, e.g. VADER compound sentiment for the
    controlled-sentiment task (the DPO paper's Sec. 6.1 judge). Scores within `tie_tol` are ties.
    """

    required, optional = ("name",), ("tie_tol",)

    def __init__(self, name: str, tie_tol: float = 0.0) -> None:
        self.reward_name, self.tie_tol = name, float(tie_tol)
        self.name = f"reward:{name}"
        self._fn = None

    def check(self) -> None:
        self._fn = self._fn or get_reward(self.reward_name)  # ConfigError (a UserError) if unknown

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> Verdicts:
        _same_lengths(prompts, a, b)
        self.check()
        scores_a, scores_b = list(self._fn(list(a))), list(self._fn(list(b)))
        return Verdicts(outcomes_from_scores(scores_a, scores_b, self.tie_tol), scores_a, scores_b)


class RewardModelJudge:
    """A trained raydpo reward model (method=reward_model): r(prompt + completion), higher is better.

    Measures the learned Bradley-Terry preference, the same signal PPO and Best-of-N optimize, so it is
    a proxy judge: a policy can win against it by exploiting the reward model. A and B are scored in
    separate, identically built batches, so identical texts get bit-identical scores (a tie).
    """

    required, optional = ("path",), ("tie_tol", "batch_size")

    def __init__(self, path: str, tie_tol: float = 0.0, batch_size: int = 16) -> None:
        self.path, self.tie_tol, self.batch_size = str(path), float(tie_tol), int(batch_size)
        self.name = f"reward_model:{self.path}"
        self._model = self._tokenizer = None

    def check(self) -> None:
        _require_model_dir(self.path, "reward model")

    def _load(self) -> None:
        if self._model is not None:
            return
        self.check()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
            self._model = AutoModelForSequenceClassification.from_pretrained(
                self.path, trust_remote_code=False
            ).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load reward model {self.path!r}: {str(e).splitlines()[0]}") from None

    def _scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        return score_texts(self._model, self._tokenizer, prompts, responses, self.batch_size)

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> Verdicts:
        _same_lengths(prompts, a, b)
        if not prompts:
            return Verdicts([], [], [])
        self._load()
        scores_a, scores_b = self._scores(prompts, a), self._scores(prompts, b)
        return Verdicts(outcomes_from_scores(scores_a, scores_b, self.tie_tol), scores_a, scores_b)


DEFAULT_QUESTION = "Which response better completes the prompt with positive sentiment?"

# The fixed judge prompt. The pair is shown twice per prompt, (A=a, B=b) and (A=b, B=a); the plain-text
# backend appends "\nAnswer:" and reads the next token, chat models get it as one user message.
JUDGE_TEMPLATE = """You are comparing two responses to the same prompt.

Prompt:
{prompt}

Response A:
{first}

Response B:
{second}

{question} Answer with a single letter: A or B."""

_LETTER = re.compile(r"\b([AB])\b")


def parse_verdict(answer: str | None) -> float | None:
    """1.0 for "A", 0.0 for "B" (the first standalone capital A or B after stripping), else None."""
    m = _LETTER.search((answer or "").strip())
    return None if m is None else (1.0 if m.group(1) == "A" else 0.0)


class _LocalBackend:
    """A local causal LM directory answers by comparing log p(" A") and log p(" B") after the prompt.

    Deterministic (no sampling). With a chat template the prompt is one user message plus the generation
    prompt and the candidates are "A" / "B"; without one it is plain text ending in "Answer:" and the
    candidates are " A" / " B". A candidate of several tokens is scored by its summed log-prob.
    """

    def __init__(self, model: str, device: str | None = None) -> None:
        self.model_dir, self.device = str(model), device
        self._model = self._tokenizer = None

    def check(self) -> None:
        _require_model_dir(self.model_dir, "LLM judge model")

    def _load(self) -> None:
        if self._model is not None:
            return
        self.check()
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False)
        self._model = (
            AutoModelForCausalLM.from_pretrained(self.model_dir, trust_remote_code=False)
            .to(self.device)
            .eval()
        )

    def ask(self, text: str) -> str:
        self._load()
        tok = self._tokenizer
        if tok.chat_template:
            messages = [{"role": "user", "content": text}]
            context = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ctx, letters = tok(context, add_special_tokens=False)["input_ids"], ("A", "B")
        else:
            ctx, letters = tok(text + "\nAnswer:", add_special_tokens=True)["input_ids"], (" A", " B")
        conts = [tok(s, add_special_tokens=False)["input_ids"] for s in letters]
        width = len(ctx) + max(len(c) for c in conts)
        ids = torch.zeros((2, width), dtype=torch.long)  # right-padded; padding is after every scored token
        for i, c in enumerate(conts):
            ids[i, : len(ctx) + len(c)] = torch.tensor(ctx + c)
        ids = ids.to(self.device)
        with torch.no_grad():
            logits = self._model(input_ids=ids).logits  # (2, T, V)
            logps = token_logps(logits[:, :-1], ids[:, 1:])  # (2, T-1): logps[i, t] = log p(ids[i, t+1])
        lp = [sum(logps[i, len(ctx) + j - 1].item() for j in range(len(c))) for i, c in enumerate(conts)]
        return "A" if lp[0] > lp[1] else "B" if lp[1] > lp[0] else "tie"


class _OpenAIBackend:
    """An OpenAI-compatible server (vLLM, TGI, OpenAI): POST {endpoint}/chat/completions, one token, T=0.

    The API key is read from the environment variable named `api_key_env` at each request and never
    stored, logged or put into an error message.
    """

    def __init__(self, endpoint: str, model: str, api_key_env: str | None = None, timeout: float = 60.0):
        self.endpoint, self.model, self.api_key_env = endpoint.rstrip("/"), model, api_key_env
        self.timeout = float(timeout)

    def _request(self, path: str, body: dict | None, timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint + path, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    def check(self) -> None:
        try:
            self._request("/models", None, timeout=5.0)
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts are OSErrors; bad JSON ValueError
            reason = " ".join(str(getattr(e, "reason", e) or type(e).__name__).split())
            hint = ""
            if self.api_key_env and not os.environ.get(self.api_key_env):
                hint = f" (environment variable {self.api_key_env} is not set)"
            raise UserError(f"LLM judge endpoint {self.endpoint} is not reachable: {reason}{hint}") from None

    def ask(self, text: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": text}]}
        body |= {"max_tokens": 1, "temperature": 0}
        try:
            out = self._request("/chat/completions", body, timeout=self.timeout)
        except (OSError, ValueError) as e:
            reason = " ".join(str(getattr(e, "reason", e)).split())
            raise UserError(f"LLM judge endpoint {self.endpoint} failed: {reason}") from None
        return (out.get("choices") or [{}])[0].get("message", {}).get("content") or ""


class LLMJudge:
    """Pairwise LLM judge: asks `question` about each pair, in both orders, and averages.

    For prompt x, completions a and b: v1 = verdict(A=a, B=b) and v2 = verdict(A=b, B=a), each 1.0 / 0.0
    for "A" / "B". Mapped back to a, outcome = (v1 + (1 − v2)) / 2: agreement gives 1.0 or 0.0, a judge
    that always picks the same position gives 0.5 (position bias cancels, Zheng et al. 2023, arXiv
    2306.05685, Sec. 3.4). An answer with no standalone "A" or "B" counts as a tie (0.5 for that order)
    and is counted in `unparsed` (per `compare` call). Measures the judge model's preference, not a
    ground truth: report which model judged.
    """

    required, optional = (
        ("model",),
        ("endpoint", "api_key_env", "question", "timeout", "max_workers", "device"),
    )

    def __init__(self, model: str, endpoint: str | None = None, api_key_env: str | None = None,
                 question: str = DEFAULT_QUESTION, timeout: float = 60.0, max_workers: int = 8,
                 device: str | None = None) -> None:  # fmt: skip
        if endpoint:
            self.backend = _OpenAIBackend(endpoint, model, api_key_env, timeout)
            self.max_workers = int(max_workers)  # concurrent HTTP requests
        else:
            self.backend, self.max_workers = _LocalBackend(model, device), 1
        self.name, self.question, self.unparsed = f"llm:{model}", question, 0

    def check(self) -> None:
        self.backend.check()

    def _verdict(self, answer: str) -> float:
        v = parse_verdict(answer)
        if v is None:
            self.unparsed += 1
            return 0.5
        return v

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> Verdicts:
        _same_lengths(prompts, a, b)
        self.unparsed = 0
        fill = lambda p, x, y: JUDGE_TEMPLATE.format(prompt=p, first=x, second=y, question=self.question)
        pairs = list(zip(prompts, a, b))
        texts = [fill(p, x, y) for p, x, y in pairs] + [fill(p, y, x) for p, x, y in pairs]  # (2n,)
        with ThreadPoolExecutor(self.max_workers) as pool:
            answers = list(pool.map(self.backend.ask, texts))  # order kept: [a first ..., b first ...]
        v = [self._verdict(s) for s in answers]
        n = len(prompts)
        outcomes = [(v[i] + (1.0 - v[n + i])) / 2 for i in range(n)]
        return Verdicts(outcomes, None, None)


JUDGES: dict[str, type] = {"reward": RewardJudge, "reward_model": RewardModelJudge, "llm": LLMJudge}


def make_judge(spec: dict) -> Judge:
    """A judge from a spec; the kind picks the class in `JUDGES`, the other keys are its arguments:

        {"kind": "reward", "name": "vader"}, {"kind": "reward_model", "path": DIR},
        {"kind": "llm", "model": LOCAL_DIR},
        {"kind": "llm", "endpoint": URL, "model": NAME, "api_key_env": VAR, "question": TEXT}.

    ConfigError (one line) for a non-mapping, an unknown kind, a missing or an unknown field.
    """
    allowed = ", ".join(sorted(JUDGES))
    if not isinstance(spec, dict):
        raise ConfigError(f"judge: expected a mapping with a 'kind' ({allowed}), got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in JUDGES:
        raise ConfigError(f"judge: unknown kind {kind!r}; allowed kinds: {allowed}")
    cls = JUDGES[kind]
    for field in cls.required:
        if spec.get(field) in (None, ""):
            raise ConfigError(f"judge kind {kind!r}: missing field {field!r} (allowed kinds: {allowed})")
    unknown = sorted(set(spec) - {"kind", *cls.required, *cls.optional})
    if unknown:
        fields = ", ".join((*cls.required, *cls.optional))
        raise ConfigError(f"judge kind {kind!r}: unknown field {unknown[0]!r}; allowed fields: {fields}")
    return cls(**{k: v for k, v in spec.items() if k != "kind"})
