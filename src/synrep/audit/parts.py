"""The per-shard intermediate result of an audit (one ``.npz`` per shard: the resume unit).

Everything the report needs from a shard, and nothing that grows with image size except a bounded number
of candidate images (the worst agreement, the closest pairs, the diversity sample):

| array | shape | meaning |
|---|---|---|
| ``g_key``, ``g_caption_id``, ``g_concept``, ``g_template``, ``g_background``, ``g_relation``, ``g_caption`` | ``[G]`` | each caption group's provenance (strings; ``""`` for none) |
| ``g_div_pixel``, ``g_div_feature`` | ``[G]`` | within-caption mean pairwise distance (NaN for one image) |
| ``i_group``, ``i_j`` | ``[I]`` | each image's group row and index in its group |
| ``i_score`` | ``[I]`` | the scorer's agreement (NaN where it cannot judge the concept) |
| ``i_pred`` | ``[I]`` | the reference classifier's predicted class |
| ``i_pix_d``, ``i_pix_idx``, ``i_feat_d``, ``i_feat_idx`` | ``[I]`` | nearest train image: distance and index, pixel and feature space |
| ``worst_rows``, ``worst_images`` | ``[k]``, ``[k, h, w, c]`` | lowest-agreement images of the shard |
| ``close_rows``, ``close_images`` | ``[k]``, ``[k, h, w, c]`` | images closest to a train image |
| ``div_concept``, ``div_hash``, ``div_images``, ``div_features`` | ``[m]`` ... | the shard's within-concept sample |

Files are written to a temporary name and renamed, so a killed audit leaves whole files or none; the file
name carries the shard's sha256 (from its done-marker), so a regenerated shard is audited again.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes

REQUIRED = ("g_key", "g_caption_id", "g_concept", "g_template", "g_background", "g_relation", "g_caption", "g_div_pixel",
            "g_div_feature", "i_group", "i_j", "i_score", "i_pred", "i_pix_d", "i_pix_idx", "i_feat_d", "i_feat_idx",
            "worst_rows", "worst_images", "close_rows", "close_images", "div_concept", "div_hash", "div_images", "div_features")


def part_name(shard: str, fingerprint: str) -> str:
    return f"{Path(shard).stem}-{fingerprint[:12]}.npz"


def save_part(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_part(path: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of a part file, or None when it is missing, truncated or incomplete (then it is redone)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if any(k not in arrays for k in REQUIRED):
        return None
    return arrays


def image_ref(part: dict[str, np.ndarray], row: int, shard: str) -> dict:
    """Where image ``row`` of a part comes from: shard, sample key, caption id, image index, concept, caption."""
    g = int(part["i_group"][row])
    return {"shard": shard, "key": str(part["g_key"][g]), "caption_id": int(part["g_caption_id"][g]),
            "image": int(part["i_j"][row]), "concept": str(part["g_concept"][g]), "caption": str(part["g_caption"][g])}
