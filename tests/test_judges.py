"""Tests for raydpo.evaluate.judges: reward, reward-model and pairwise LLM judges, and the registry.

Expected VADER outcomes (compound scores, see raydpo.tasks.sentiment.SentimentReward):
    "i loved it, wonderful." (+0.82) vs "what a waste of time, i hated it." (−0.79)  → 1.0
    the same pair swapped                                                             → 0.0
    "it runs about two hours." (0.0) vs "the film is in color." (0.0): no lexicon word → 0.5 (tie)

Pairwise LLM judge, both orders per prompt, outcome = (v(A=a, B=b) + 1 − v(A=b, B=a)) / 2:
    server answers "A" iff Response A contains "great":
        (great, bad): "A" then "B" → (1 + 1 − 0) / 2 = 1.0;   (bad, great): "B" then "A" → (0 + 0) / 2 = 0.0
    server always answers "A" (pure position bias): (1 + 1 − 1) / 2 = 0.5 for every pair
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raydpo.errors import ConfigError, UserError
from raydpo.evaluate.judges import JUDGES, LLMJudge, Verdicts, make_judge, parse_verdict

POS, NEG = "i loved it, wonderful.", "what a waste of time, i hated it."
NEUTRAL_1, NEUTRAL_2 = "it runs about two hours.", "the film is in color."


# ---------------------------------------------------------------- pointwise judges


def test_reward_judge_vader_outcomes_and_ties():
    judge = make_judge({"kind": "reward", "name": "vader"})
    judge.check()
    v = judge.compare(["p1", "p2", "p3"], [POS, NEG, NEUTRAL_1], [NEG, POS, NEUTRAL_2])
    assert isinstance(v, Verdicts)
    assert v.outcomes == [1.0, 0.0, 0.5]
    assert v.scores_a[0] > 0 > v.scores_b[0] and v.scores_a[2] == v.scores_b[2] == 0.0


def test_reward_judge_unknown_reward_is_config_error():
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        make_judge({"kind": "reward", "name": "nope"}).check()


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    """A random-init tiny Llama sequence classifier (num_labels=1) saved with its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from raydpo.models.tiny import build_tokenizer

    tok = build_tokenizer("llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, num_labels=1,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(cfg)
    path = tmp_path_factory.mktemp("tiny-rm")
    tok.save_pretrained(path)
    rm.save_pretrained(path)
    return path


def test_reward_model_judge_shapes_values_and_self_tie(tiny_rm_dir):
    judge = make_judge({"kind": "reward_model", "path": str(tiny_rm_dir), "batch_size": 2})
    judge.check()
    prompts = ["The movie was", "I thought the plot", "Honestly,"]
    a, b = [" great fun.", " dull", " a masterpiece of cinema."], [" bad.", " wonderful and moving", " meh"]
    v = judge.compare(prompts, a, b)
    assert len(v.outcomes) == len(v.scores_a) == len(v.scores_b) == 3
    assert set(v.outcomes) <= {0.0, 0.5, 1.0}
    assert judge.compare(prompts, a, a).outcomes == [0.5, 0.5, 0.5]


def test_reward_model_judge_missing_dir_fails_check(tmp_path):
    with pytest.raises(UserError, match="not a Hugging Face model directory") as e:
        make_judge({"kind": "reward_model", "path": str(tmp_path / "missing")}).check()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- LLM judge over a fake OpenAI server


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1: records requests, answers with `policy(content)`."""

    def __init__(self, policy):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"data": [{"id": "fake-judge"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                answer = policy(body["messages"][0]["content"])
                self._send({"choices": [{"message": {"role": "assistant", "content": answer}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def first_has_great(content: str) -> str:
    first = re.search(r"Response A:\n(.*?)\n\nResponse B:", content, re.S).group(1)
    return "A" if re.search(r"\bgreat\b", first) else "B"


@pytest.fixture
def fake_server():
    servers = []

    def start(policy=first_has_great):
        servers.append(FakeOpenAI(policy))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_llm_judge_asks_both_orders_and_maps_back(fake_server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-secret-123")
    srv = fake_server()
    spec = {"kind": "llm", "endpoint": srv.endpoint, "model": "fake-judge", "api_key_env": "JUDGE_TEST_KEY"}
    judge = make_judge(spec)
    judge.check()
    v = judge.compare(["p1", "p2"], ["a great film", "a bad film"], ["a bad film", "a great film"])
    assert v.outcomes == [1.0, 0.0] and v.scores_a is None and judge.unparsed == 0
    assert len(srv.requests) == 4  # 2 per prompt
    firsts = sorted(
        re.search(r"Response A:\n(.*?)\n", r["messages"][0]["content"]).group(1) for r in srv.requests
    )
    assert firsts == [
        "a bad film",
        "a bad film",
        "a great film",
        "a great film",
    ]  # each side shown first once
    for r in srv.requests:
        assert r["path"] == "/v1/chat/completions" and r["model"] == "fake-judge"
        assert r["max_tokens"] == 1 and r["temperature"] == 0
        assert r["auth"] == "Bearer sk-test-secret-123"


def test_llm_judge_key_never_stored(fake_server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-secret-123")
    srv = fake_server()
    judge = make_judge(
        {"kind": "llm", "endpoint": srv.endpoint, "model": "m", "api_key_env": "JUDGE_TEST_KEY"}
    )
    judge.compare(["p"], ["great"], ["bad"])
    for obj in (judge, judge.backend):
        assert "sk-test-secret-123" not in repr(obj)
        for value in vars(obj).values():
            assert "sk-test-secret-123" not in repr(value)


def test_llm_judge_position_bias_cancels(fake_server):
    srv = fake_server(lambda content: "A")
    judge = make_judge({"kind": "llm", "endpoint": srv.endpoint, "model": "m"})
    v = judge.compare(["p1", "p2"], ["a great film", "a bad film"], ["a bad film", "a great film"])
    assert v.outcomes == [0.5, 0.5]
    assert all(r["auth"] is None for r in srv.requests)  # no api_key_env → no Authorization header


def test_llm_judge_unparsed_answers_are_ties_and_counted(fake_server):
    srv = fake_server(lambda content: "I cannot decide")
    judge = make_judge(
        {"kind": "llm", "endpoint": srv.endpoint, "model": "m", "question": "Which is kinder?"}
    )
    v = judge.compare(["p1", "p2", "p3"], ["x", "y", "z"], ["u", "v", "w"])
    assert v.outcomes == [0.5, 0.5, 0.5] and judge.unparsed == 6
    assert all("Which is kinder?" in r["messages"][0]["content"] for r in srv.requests)


def test_parse_verdict():
    assert parse_verdict(" A") == 1.0 and parse_verdict("B.\n") == 0.0 and parse_verdict("[[B]]") == 0.0
    assert parse_verdict("Response A") == 1.0
    assert parse_verdict("Apple") is None and parse_verdict("") is None and parse_verdict(None) is None


def test_llm_judge_unreachable_endpoint_fails_check():
    with socket.socket() as s:  # a port that was free a moment ago and is now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = make_judge({"kind": "llm", "endpoint": f"http://127.0.0.1:{port}/v1", "model": "m"})
    with pytest.raises(UserError, match=r"LLM judge endpoint http://127.0.0.1:\d+/v1 is not reachable") as e:
        judge.check()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- LLM judge with a local tiny model


@pytest.mark.parametrize("style", ["llama", "qwen"])  # plain text / chat template
def test_llm_judge_local_model_runs_and_is_deterministic(tmp_path, style):
    from raydpo.models.tiny import save_tiny

    path = save_tiny(tmp_path / style, style=style, arch="llama", hidden=32, layers=1)
    judge = make_judge({"kind": "llm", "model": str(path)})
    judge.check()
    prompts, a, b = ["The movie was", "I felt"] * 2, [" great.", " bored."] * 2, [" awful.", " happy."] * 2
    v1, v2 = judge.compare(prompts, a, b), judge.compare(prompts, a, b)
    assert len(v1.outcomes) == 4 and set(v1.outcomes) <= {0.0, 0.5, 1.0}
    assert v1 == v2 and v1.outcomes[:2] == v1.outcomes[2:]


def test_llm_judge_local_missing_dir_fails_check(tmp_path):
    with pytest.raises(UserError, match="LLM judge model"):
        LLMJudge(model=str(tmp_path / "nope")).check()


# ---------------------------------------------------------------- registry


def test_registry_kinds():
    assert set(JUDGES) == {"reward", "reward_model", "llm"}


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ({"kind": "gpt5"}, r"unknown kind 'gpt5'; allowed kinds: llm, reward, reward_model"),
        ({"name": "vader"}, r"unknown kind None; allowed kinds: llm, reward, reward_model"),
        ({"kind": "reward"}, r"judge kind 'reward': missing field 'name'"),
        ({"kind": "reward_model"}, r"missing field 'path'"),
        ({"kind": "llm", "endpoint": "http://127.0.0.1:1/v1"}, r"missing field 'model'"),
        ({"kind": "reward", "name": "vader", "path": "x"}, r"unknown field 'path'"),
        ("vader", r"expected a mapping"),
    ],
)
def test_make_judge_errors(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make_judge(spec)
