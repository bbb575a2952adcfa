"""Decode one WebDataset sample (a dict of raw members: bytes, or MemberRefs into a local shard) into typed values,
or say why it is skipped.

Each configured modality decodes its own members (pipeline.modalities); this module adds what every
sample shares: its key, JSON metadata, the integer label (`.cls`) and hard-negative members. Pickled
members (.pyd/.pickle/.pth/.pkl/.pt) are refused without being read.
"""
from __future__ import annotations

import json
from typing import Optional

from pipeline.modalities.base import ModalityData, Skip
from pipeline.registry import MODALITIES

PICKLE_SUFFIXES = ("pyd", "pickle", "pth", "pkl", "pt")


def decode_sample(sample: dict, sections: dict[str, ModalityData], negatives=None) -> dict:
    """-> {"key", modality: decoded value, "label", "negatives"} for the modalities in `sections`.

    `negatives` (data.hard_negatives) names the member holding hard negatives and their modality."""
    for name in sample:
        if name.rsplit(".", 1)[-1].lower() in PICKLE_SUFFIXES:
            raise Skip("pickle_member_refused")
    meta: Optional[dict] = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Skip("bad_json") from exc
    out = {"key": sample.get("__key__", "")}
    for name, section in sections.items():
        value = MODALITIES.get(name, "data").obj.extract(sample, meta, section)
        if value is not None:
            out[name] = value
    if "cls" in sample:
        try:
            out["label"] = int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError) as exc:
            raise Skip("bad_label") from exc
    if negatives is not None and negatives.extension in sample:
        out["negatives"] = MODALITIES.get(negatives.modality, "data.hard_negatives.modality").obj.decode(
            sample[negatives.extension], sections.get(negatives.modality))
    return out


def lazy_extensions(sections: dict[str, ModalityData]) -> frozenset[str]:
    """The members local shards hand over unread (pipeline.data.tars): those of the modalities in `sections`
    that read by reference, unless another of them reads the same extension as bytes."""
    by_reference = {name: MODALITIES.get(name, "data").obj.reads_by_reference for name in sections}
    lazy = {ext for name, section in sections.items() if by_reference[name] for ext in section.extensions}
    eager = {ext for name, section in sections.items() if not by_reference[name] for ext in section.extensions}
    return frozenset(lazy - eager)
