"""``synrep generate``: captions in, image shards out (StableRep/SynCLR stage 2).

Captions are cut into shards of ``captions_per_shard`` in file order; shard k is drawn by rank
``k mod world_size`` (static), which reads only that shard's lines of the captions file (found through
the file's line-offset sidecar; no rank reads the file whole), in pipeline calls of ``batch_captions``
captions x n images. Image j of caption i starts from noise seeded by ``stable_seed("image", seed, i, j)`` (recorded in the metadata), so a
rerun, a resumed run, or a run on any number of ranks gives the same bytes. With ``views=latent``
(GenRep) a caption's images start from one anchor noise z and its neighbours: image 0 is the anchor itself
(``latent_anchor_view``) and image j starts from ``(z + sigma * eps_j) / sqrt(1 + sigma^2 * var(eps))``,
eps_j a standard normal truncated to [-2, 2] as in GenRep (``latent_noise``); the division keeps the
sampler's N(0, I) input scale, which a diffusion model needs and GenRep's GANs did not.
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from ..captions.files import CaptionsFileError
from ..captions.stage import captions_path, count_captions, iter_captions
from ..config import changed_settings, check_config, config_to_dict, read_yaml, require, save_config
from ..distributed import all_reduce_sum_, barrier, init_distributed
from ..errors import SettingsChanged, SynrepError
from ..plots import save_image_grid
from ..shards import (INDEX_FILE, ShardWriter, encode_image, iter_tar_samples, list_shards, marker_path, read_shard, shard_done,
                      shard_name, write_index)
from ..atomic import atomic_write_json, remove_stale_temps
from ..utils import set_threads, stable_seed
from .curation import CurationConfig, Curator, count_outcomes, curation_totals, new_counts, redraw_noise, redraw_seed
from .generators import GENERATORS, DrawSettings, GeneratorSpecError, make_generator

LOG = logging.getLogger("synrep.generate")
SUMMARY_FILE = "generate_summary.json"
CONFIG_FILE = "config.yaml"
RUN_ONLY_KEYS = ("num_threads", "preview", "device", "out_dir", "writer_threads")  # where and how fast, not what
RESUMABLE_CHANGES = ("batch_captions",)
# Var of a standard normal truncated to [-2, 2]: 1 - 4 phi(2) / (Phi(2) - Phi(-2)) = 0.7737
OFFSET_VARIANCE = {"gaussian": 1.0, "truncated": 1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2))}  # settings a resume may change: the images stay byte-identical


class GenerateError(SynrepError, RuntimeError):
    """The generate stage cannot finish: shards failed, or there is nothing to preview."""


@dataclass
class GenerateConfig:
    captions: str = "runs/captions/captions.jsonl"  # captions.jsonl (or its folder) from `synrep captions`
    out_dir: str = "runs/shards"  # shard folder to write (shard-*.tar + markers + index.json)
    generator: str = "embedded"  # embedded, embedded:<folder>, or diffusers:<folder-or-hub-id>
    images_per_caption: int = 4  # images drawn per caption (each from its own seed)
    guidance_scale: float = 2.5  # classifier-free guidance (StableRep 2, SynCLR 2.5)
    steps: int = 10  # denoising steps
    scheduler: Literal["ddim", "dpm", "euler"] = "ddim"  # sampler: ddim, dpm (DPM-Solver++) or euler
    negative_prompt: str = ""  # text for the unconditional branch ('' as in StableRep)
    height: int = 0  # generation height in px (0 = the model's default)
    width: int = 0  # generation width in px (0 = the model's default)
    store_size: int = 0  # resize to this square size before storing (0 = keep)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # model precision: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    views: Literal["independent", "latent"] = "independent"  # independent seeds per image, or GenRep latent neighbours of one anchor
    sigma: float = 0.5  # GenRep latent views: neighbour spread around the anchor noise
    latent_anchor_view: bool = True  # GenRep latent views: image 0 is drawn from the anchor itself (GenRep: true)
    latent_noise: Literal["truncated", "gaussian"] = "truncated"  # GenRep latent views: neighbour offsets, a normal truncated to [-2, 2] (GenRep) or a plain normal
    captions_per_shard: int = 100  # captions (groups) per tar shard
    batch_captions: int = 16  # captions per pipeline call (each with all its images)
    writer_threads: int = 2  # threads that encode images and write the tar while the generator draws (0 = inline)
    curate: CurationConfig = field(default_factory=CurationConfig)  # drop or redraw images that do not show their caption's concept
    image_format: Literal["png", "jpg"] = "png"  # stored image format: png or jpg
    seed: int = 0  # run seed: image j of caption i uses stable_seed("image", seed, i, j)
    preview: bool = True  # write preview.png (captions x images) at the end
    attention_slicing: bool = False  # diffusers attention slicing (less memory, slower)
    vae_slicing: bool = False  # diffusers VAE slicing (less memory)
    cpu_offload: bool = False  # diffusers model CPU offload
    limit_captions: int = 0  # draw only the first N captions (0 = all)
    num_threads: int = 0  # torch CPU threads (0 = torch's default)

    @classmethod
    def key_help(cls) -> dict[str, str]:
        """``--help`` text for keys whose choices come from a registry."""
        return {"generator": GENERATORS.describe()}

    def check(self) -> None:
        problem = GENERATORS.problem(self.generator)
        require(problem is None, "generator", problem or "")
        for key in ("images_per_caption", "steps", "captions_per_shard", "batch_captions"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("height", "width", "store_size", "limit_captions", "num_threads", "writer_threads"):
            require(getattr(self, key) >= 0, key, f"must be >= 0 (0 = the default), got {getattr(self, key)}")
        require(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0, "guidance_scale",
                f"must be a finite number >= 0, got {self.guidance_scale}")
        require(math.isfinite(self.sigma) and (self.sigma > 0 or self.views != "latent"), "sigma",
                f"must be a finite number > 0 for latent views, got {self.sigma}")


def validate(cfg: GenerateConfig) -> None:
    """Check every value (also done when the config loads; here for configs built in code)."""
    check_config(cfg)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def image_seeds(seed: int, caption_id: int, n: int) -> list[int]:
    return [stable_seed("image", seed, caption_id, j) % 2**63 for j in range(n)]


def initial_noise(cfg: GenerateConfig, caption_id: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """Initial noise ``[n, *shape]`` for one caption's images, plus the seeds that made it."""
    seeds = image_seeds(cfg.seed, caption_id, cfg.images_per_caption)
    eps = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    if cfg.views == "independent":
        return eps, {"image_seeds": seeds}
    anchor_seed = stable_seed("anchor", cfg.seed, caption_id) % 2**63
    z = torch.randn(shape, generator=torch.Generator().manual_seed(anchor_seed))
    if cfg.latent_noise == "truncated":
        eps = torch.stack([torch.nn.init.trunc_normal_(torch.empty(shape), a=-2.0, b=2.0, generator=torch.Generator().manual_seed(s))
                           for s in seeds])
    members = (z.unsqueeze(0) + cfg.sigma * eps) / math.sqrt(1 + cfg.sigma ** 2 * OFFSET_VARIANCE[cfg.latent_noise])
    if cfg.latent_anchor_view:
        members[0] = z
    return members, {"image_seeds": seeds, "anchor_seed": anchor_seed, "sigma": cfg.sigma,
                     "latent_noise": cfg.latent_noise, "anchor_view": cfg.latent_anchor_view}


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[B, H, W, C]`` -> ``[B, size, size, C]`` (Lanczos), unchanged when already that size."""
    if size == 0 or images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    out = []
    for img in images:
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        arr = np.asarray(pil.resize((size, size), Image.LANCZOS))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out)


def regenerate_image(cfg: GenerateConfig, caption: str, caption_id: int, index: int, generator=None) -> np.ndarray:
    """Redraw image ``index`` of caption ``caption_id`` alone: uint8 ``[H, W, C]``."""
    generator = generator or make_generator(cfg.generator, resolve_device(cfg.device), cfg.dtype, scheduler=cfg.scheduler)
    settings = _settings(cfg)
    generator.check(settings)
    noise, _ = initial_noise(cfg, caption_id, generator.noise_shape(settings))
    image = generator.draw([caption], noise[index:index + 1], settings)
    return resize_images(image, cfg.store_size)[0]


def _settings(cfg: GenerateConfig) -> DrawSettings:
    return DrawSettings(cfg.guidance_scale, cfg.steps, cfg.scheduler, cfg.negative_prompt, cfg.height, cfg.width)


def _curate(cfg: GenerateConfig, generator, settings: DrawSettings, curator: Curator, chunk: list[dict], images: np.ndarray,
            provenance: list[dict], shape: tuple[int, ...], counts: dict[str, int]) -> list[tuple[np.ndarray, dict]]:
    """Score a chunk's images ``[C * n, H, W, ch]``; drop or redraw the failing ones. Returns, per caption, the images
    to keep and the provenance to add (scores, redraws, dropped image numbers); adds to ``counts``
    (:func:`curation.count_outcomes`)."""
    n = cfg.images_per_caption
    concepts = [rec.get("concept", "") for rec in chunk for _ in range(n)]
    scores = curator.scores(images, concepts)
    first_scores = scores
    redraws = np.zeros(len(images), dtype=int)
    if cfg.curate.mode == "redraw":
        best_images, best_scores = images.copy(), scores.copy()
        for attempt in range(1, cfg.curate.redraws + 1):
            failing = np.flatnonzero(~curator.passes(best_scores))
            if not len(failing):
                break
            noise = []
            for i in failing:
                rec, prov = chunk[i // n], provenance[i // n]
                anchor = None
                if cfg.views == "latent":
                    anchor = torch.randn(shape, generator=torch.Generator().manual_seed(prov["anchor_seed"]))
                noise.append(redraw_noise(shape, redraw_seed(cfg.seed, int(rec["id"]), int(i % n), attempt), anchor, cfg.sigma,
                                          OFFSET_VARIANCE["gaussian"]))
            drawn = resize_images(generator.draw([chunk[i // n]["caption"] for i in failing], torch.stack(noise), settings), cfg.store_size)
            new_scores = curator.scores(drawn, [concepts[i] for i in failing])
            better = np.isnan(best_scores[failing]) | (new_scores > best_scores[failing])
            for k in np.flatnonzero(better):
                best_images[failing[k]], best_scores[failing[k]], redraws[failing[k]] = drawn[k], new_scores[k], attempt
        images, scores = best_images, best_scores
    keep = curator.passes(scores) if cfg.curate.mode == "drop" else np.ones(len(images), bool)
    count_outcomes(counts, curator, first_scores, scores, redraws, keep)
    out = []
    for k in range(len(chunk)):
        rows = np.arange(k * n, (k + 1) * n)
        extra = {"agreement": [None if np.isnan(v) else round(float(v), 4) for v in scores[rows]],
                 "curation": {"mode": cfg.curate.mode, "threshold": cfg.curate.threshold}}
        if cfg.curate.mode == "redraw":
            extra["redraws"] = [int(r) for r in redraws[rows]]
        if cfg.curate.mode == "drop":
            extra["dropped"] = [int(j) for j in range(n) if not keep[k * n + j]]
        out.append((images[rows[keep[rows]]], extra))
    return out


def _write_shard(cfg: GenerateConfig, generator, settings: DrawSettings, records: list[dict], path: Path, bar,
                 curator: Curator | None = None) -> int:
    """Draw ``records``' images batch by batch; PNG/JPEG encoding and tar writing run on background threads,
    in caption order, so the generator never waits for them (the bytes are those of an inline writer)."""
    shape = generator.noise_shape(settings)
    n = cfg.images_per_caption
    encoders = ThreadPoolExecutor(max_workers=cfg.writer_threads) if cfg.writer_threads else None
    tar_writer = ThreadPoolExecutor(max_workers=1) if cfg.writer_threads else None  # one thread: members stay in order
    pending: list[Future] = []
    written = 0
    counts = new_counts()
    stats = {"first_caption": records[0]["id"], "last_caption": records[-1]["id"], **({"curation": counts} if curator else {})}
    with ShardWriter(path, cfg.image_format, extra_stats=stats) as writer:  # counts are filled in before the marker is written
        try:
            for start in range(0, len(records), cfg.batch_captions):
                chunk = records[start:start + cfg.batch_captions]
                noises, provenance = [], []
                for rec in chunk:
                    noise, prov = initial_noise(cfg, int(rec["id"]), shape)
                    noises.append(noise)
                    provenance.append(prov)
                images = generator.draw([rec["caption"] for rec in chunk], torch.cat(noises), settings, per_caption=n)
                images = resize_images(images, cfg.store_size)
                curated = _curate(cfg, generator, settings, curator, chunk, images, provenance, shape, counts) if curator else \
                    [(images[k * n:(k + 1) * n], {}) for k in range(len(chunk))]
                for k, (rec, prov) in enumerate(zip(chunk, provenance)):
                    meta = {"caption": rec["caption"], "caption_id": int(rec["id"]), "concept": rec.get("concept", ""),
                            "template": rec.get("template"), "background": rec.get("background"), "relation": rec.get("relation"),
                            "caption_backend": rec.get("backend"), "generator": generator.name,
                            "guidance_scale": cfg.guidance_scale, "steps": cfg.steps, "scheduler": cfg.scheduler,
                            "negative_prompt": cfg.negative_prompt, "views": cfg.views, "run_seed": cfg.seed,
                            "precision": generator.precision, **prov, **curated[k][1]}
                    key, group = f"{int(rec['id']):09d}", curated[k][0]
                    written += len(group)
                    if not len(group):  # curation dropped every image of this caption
                        continue
                    if encoders is None:
                        writer.add(key, group, meta)
                        continue
                    encoded = [encoders.submit(encode_image, image, cfg.image_format) for image in group]
                    pending.append(tar_writer.submit(lambda key=key, encoded=encoded, meta=meta:
                                                     writer.add_encoded(key, [f.result() for f in encoded], meta)))
                while len(pending) > 4 * cfg.batch_captions:  # bound the images held while the writer catches up
                    pending.pop(0).result()
                bar.update(len(chunk) * n)
            for future in pending:
                future.result()  # re-raises a failed encode or write before the shard is renamed
        finally:  # before the writer closes (or discards) the tar, no thread may still be writing to it
            for pool in (encoders, tar_writer):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
    return written


def outputs(out_dir: str | Path) -> dict[str, Path]:
    """What the generate stage writes in ``out_dir``: ``config`` (its settings, first), shards and their markers,
    ``index`` (the dataset's facts), ``preview``, and ``done`` (generate_summary.json: counts and speed, last)."""
    out = Path(out_dir)
    return {"config": out / CONFIG_FILE, "index": out / INDEX_FILE, "summary": out / SUMMARY_FILE,
            "preview": out / "preview.png", "done": out / SUMMARY_FILE}


def run_settings(config: dict) -> dict:
    """The keys of a generate config that decide the images (not where or how fast they are made)."""
    return {k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}


def saved_settings(out_dir: str | Path) -> dict | None:
    """The settings the shards in ``out_dir`` were made with (from its ``config.yaml``), or None if unreadable."""
    try:
        saved = read_yaml(outputs(out_dir)["config"], "generate config", ValueError)
    except ValueError:
        return None
    return run_settings(saved) if isinstance(saved, dict) else None


def stored_precision(out_dir: str | Path) -> str | None:
    """The precision recorded with the first stored image in ``out_dir`` (None: no shards, or from before it was recorded)."""
    for shard in list_shards(out_dir):
        for _, fields in iter_tar_samples(shard, 0, 1):
            try:
                return json.loads(fields["json"]).get("precision")
            except (KeyError, ValueError, AttributeError):
                return None
    return None


def is_complete(out_dir: str | Path) -> bool:
    return outputs(out_dir)["done"].is_file() and outputs(out_dir)["index"].is_file()


def run_generate(cfg: GenerateConfig) -> Path:
    """Draw every caption's images into ``out_dir``; returns ``out_dir``. Raises if any shard failed."""
    validate(cfg)
    set_threads(cfg.num_threads)
    info = init_distributed()  # gloo, for the barrier before rank 0 merges/indexes (no-op in one process)
    captions = captions_path(cfg.captions)
    total = count_captions(captions)
    if not total:
        raise CaptionsFileError(f"captions file {captions} is empty")
    if cfg.limit_captions:
        total = min(total, cfg.limit_captions)
    out = Path(cfg.out_dir)
    shard_ranges = [(k, s, min(s + cfg.captions_per_shard, total)) for k, s in enumerate(range(0, total, cfg.captions_per_shard))]
    mine = [r for r in shard_ranges if r[0] % info.world_size == info.rank]
    todo = [r for r in mine if not shard_done(out / shard_name(r[0]))]
    # This rank's captions, one shard at a time; the first is read before anything is written, so a bad
    # line there fails the run with nothing touched (a bad line further on fails it when its shard comes).
    first = list(iter_captions(captions, todo[0][1], todo[0][2])) if todo else []
    out.mkdir(parents=True, exist_ok=True)
    settings_now = run_settings(config_to_dict(cfg))
    if list_shards(out) and outputs(out)["config"].exists():
        before = saved_settings(out)
        if before is None:
            raise SettingsChanged(f"{outputs(out)['config']} is unreadable, so the shards in {out} cannot be resumed; "
                                  "use a new out_dir or delete the old shards")
        changed = changed_settings(before, settings_now, RESUMABLE_CHANGES)
        if changed:
            raise SettingsChanged(f"{out} already holds shards made with different settings ({'; '.join(changed)}); "
                                  "use a new out_dir or delete the old shards")
    pending = int(all_reduce_sum_(torch.tensor([len(todo)])).item())  # shards still to write, over every rank
    if info.is_main:
        save_config(cfg, out)  # the stage's one record of its settings (a resume is checked against it)
        if pending:  # the done-marker of an earlier run must not outlive a run that has more to write
            outputs(out)["done"].unlink(missing_ok=True)
    barrier()  # no rank writes a shard before the settings are recorded
    for k, _, _ in mine:  # partial files of this rank's shards left by a killed run (never visible as shards)
        remove_stale_temps(out / shard_name(k))
    if len(todo) < len(mine):
        LOG.info("resuming: %d of %d shards already complete", len(mine) - len(todo), len(mine))
    device = resolve_device(cfg.device)
    generator = None
    failed: list[str] = []
    images_made, start = 0, time.time()
    if todo:
        generator = make_generator(cfg.generator, device, cfg.dtype, cfg.attention_slicing, cfg.vae_slicing, cfg.cpu_offload, cfg.scheduler)
        settings = _settings(cfg)
        generator.check(settings)
        stored = stored_precision(out)
        if stored not in (None, generator.precision):
            raise SettingsChanged(f"{out} holds images drawn in {stored}, but this run would draw in {generator.precision} "
                                  f"(dtype={cfg.dtype} on {device}); resume with dtype={stored}, or use a new out_dir")
        curator = Curator(cfg.curate, out, device) if cfg.curate.mode != "off" else None
        images = sum(stop - begin for _, begin, stop in todo) * cfg.images_per_caption
        with tqdm(total=images, desc=f"generate ({generator.name})", unit="img", disable=not info.is_main, dynamic_ncols=True) as bar:
            for n, (k, begin, stop) in enumerate(todo):
                path = out / shard_name(k)
                recs = first if n == 0 else list(iter_captions(captions, begin, stop))
                try:
                    images_made += _write_shard(cfg, generator, settings, recs, path, bar, curator)
                except (GeneratorSpecError, KeyboardInterrupt):
                    raise
                except (OSError, RuntimeError, ValueError) as err:
                    failed.append(path.name)
                    LOG.error("shard %s failed and was discarded (rerun to retry it): %s: %s", path.name, type(err).__name__, err)
                bar.set_postfix(img_per_s=f"{images_made / max(time.time() - start, 1e-9):.1f}")
    seconds = time.time() - start
    failed_anywhere = int(all_reduce_sum_(torch.tensor([len(failed)])).item())  # also the barrier before rank 0 indexes
    if failed:
        raise GenerateError(f"{len(failed)} shard(s) failed: {', '.join(failed)}; completed shards are kept, rerun the same command")
    if failed_anywhere:  # another rank's shard failed: the set is incomplete, so no rank may mark it done
        raise GenerateError(f"{failed_anywhere} shard(s) failed on other ranks (their logs name them); completed shards are "
                            "kept, rerun the same command")
    if info.is_main:
        gen_name = generator.name if generator else cfg.generator
        image_size = next((list(sample.images.shape[1:]) for shard in list_shards(out) for sample in read_shard(shard)), None)
        if image_size is None:
            raise GenerateError(f"{out} holds no images: curation (curate.mode={cfg.curate.mode}, threshold "
                                f"{cfg.curate.threshold}) dropped every one; lower curate.threshold or use curate.mode=redraw")
        index = write_index(out, {"generator": gen_name, "images_per_caption": cfg.images_per_caption,
                                  "image_format": cfg.image_format, "image_shape": image_size})
        idx = json.loads(index.read_text())
        summary = {"captions": idx["num_groups"], "images": idx["num_images"], "shards": idx["num_shards"],
                   "generator": gen_name, "image_shape": image_size, "images_this_run": images_made,
                   "seconds_this_run": round(seconds, 2),
                   "images_per_second": round(images_made / seconds, 2) if images_made and seconds > 0 else None}
        if cfg.curate.mode != "off":
            summary["curation"] = curation_totals(cfg.curate, [json.loads(marker_path(shard).read_text()) for shard in list_shards(out)])
            LOG.info("curation (%s below %g): %s", cfg.curate.mode, cfg.curate.threshold, summary["curation"])
        if cfg.preview:
            write_preview(out)
        atomic_write_json(out / SUMMARY_FILE, summary)  # the stage's done-marker: written last
        LOG.info("generated %d images this run (%d total in %d shards) -> %s", images_made, idx["num_images"], idx["num_shards"], out)
    return out


def write_preview(folder: str | Path, captions: int = 10, path: str | Path | None = None) -> Path:
    """PNG grid: rows = up to ``captions`` caption groups, one per concept first, columns = their images."""
    folder = Path(folder)
    shards = list_shards(folder)
    if not shards:
        raise GenerateError(f"shard folder {folder} holds no finished shards; nothing to preview")
    picked, extra, seen = [], [], set()
    for shard in shards:
        for sample in read_shard(shard):
            concept = sample.meta.get("concept", "")
            if concept not in seen:
                seen.add(concept)
                picked.append(sample)
            elif len(extra) < captions:
                extra.append(sample)
        if len(picked) >= captions:
            break
    rows = (picked + extra)[:captions]
    return save_image_grid(path or folder / "preview.png", [list(s.images) for s in rows],
                           [s.meta.get("caption", s.key) for s in rows], title=f"{folder.name}: captions x images")
