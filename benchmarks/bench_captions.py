"""Captions per second: the template backend, and SmolLM2-135M batched vs one prompt at a time."""

from __future__ import annotations

import time

from common import report
from synrep.captions.concepts import generic_backgrounds, load_concepts
from synrep.captions.llm_backends import SamplingSettings, make_backend
from synrep.captions.prompts import load_example_pools
from synrep.captions.requests import plan_requests


def _requests(n: int):
    concepts = load_concepts("fashion-mnist")
    pools = load_example_pools()
    out = []
    for i in range(n):
        c = concepts.concepts[i % 10]
        out += plan_requests(concepts, c, 1, 0, {"c": 0.44, "c+bg": 0.45, "c+rel": 0.11}, generic_backgrounds(), pools, 3, start=i)
    return out


def main(llm_requests: int = 16) -> dict:
    rows, ratios = [], {}
    template = make_backend("template", SamplingSettings())
    reqs = _requests(2000)
    start = time.perf_counter()
    template.generate(reqs)
    rows.append({"backend": "template", "mode": "batch of 2000", "captions_s": 2000 / (time.perf_counter() - start)})
    try:
        llm = make_backend("smollm2", SamplingSettings(max_new_tokens=32, batch_size=llm_requests))
    except Exception as err:  # noqa: BLE001
        print(f"smollm2 skipped: {err}")
        return report("captions", rows, ratios)
    reqs = _requests(llm_requests)
    llm.generate(reqs[:2])  # warm-up
    start = time.perf_counter()
    llm.generate(reqs)
    batched = llm_requests / (time.perf_counter() - start)
    start = time.perf_counter()
    for r in reqs[: llm_requests // 2]:
        llm.generate([r])
    single = (llm_requests // 2) / (time.perf_counter() - start)
    rows += [{"backend": "smollm2", "mode": f"batch of {llm_requests}", "captions_s": batched},
             {"backend": "smollm2", "mode": "one at a time", "captions_s": single}]
    ratios["smollm2 batched / one-at-a-time"] = batched / single
    return report("captions", rows, ratios)


if __name__ == "__main__":
    main()
