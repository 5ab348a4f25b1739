"""``python -m data_prep inspect OUT``: a readable summary of a prepared folder."""

from __future__ import annotations

import os

from data_prep import locations
from data_prep.reader import read_manifest, read_splits


def _disk_bytes(out) -> int:
    import pyarrow.fs as pafs

    fs, path = locations.resolve(out)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def summarise(out: str | os.PathLike) -> str:
    out = locations.as_location(out)
    manifest = read_manifest(out)
    splits = read_splits(out)
    cases = manifest["cases"]
    names = {v: k for k, v in manifest["class_map"].items()}
    lines = [
        f"prepared folder: {locations.describe(out)}",
        f"schema version {manifest['schema_version']}, created {manifest['created']}, "
        f"{len(cases)} cases, {_disk_bytes(out) / 1e6:.1f} MB on disk",
        f"preset: {manifest['preset']['name']}, spacing {manifest['spacing']} mm",
        f"target source: {manifest.get('target_source') or '-'}",
        "",
        "sources:",
    ]
    lines.append(
        f"  {'source':<28}{'layout':<8}{'modality':<10}{'cases':>6}{'labelled':>10}  classes"
    )
    for name, src in manifest["sources"].items():
        classes = ", ".join(src["annotated_classes"]) or "(unlabelled)"
        lines.append(
            f"  {name:<28}{src['layout']:<8}{src['modality']:<10}{src['num_cases']:>6}"
            f"{src['num_labelled']:>10}  {classes}"
        )
    totals: dict[int, int] = {}
    per_class_cases: dict[int, int] = {}
    for info in cases.values():
        for cls, count in info["voxels_per_class"].items():
            totals[int(cls)] = totals.get(int(cls), 0) + count
            per_class_cases[int(cls)] = per_class_cases.get(int(cls), 0) + 1
    lines += ["", "classes (global id, name, labelled cases, voxels):"]
    for cls in sorted(names):
        lines.append(
            f"  {cls:>3} {names[cls]:<16}{per_class_cases.get(cls, 0):>6} cases"
            f"{totals.get(cls, 0):>14,} voxels"
        )
    lines += [
        "",
        f"splits (seed {splits['seed']}): train {len(splits['train'])}, val "
        f"{len(splits['val'])}, test {len(splits['test'])}, unlabelled {len(splits['unlabelled'])}",
    ]
    for name, src in splits["sources"].items():
        given = " (given by the dataset file)" if src["given_split"] else ""
        lines.append(
            f"  {name:<28} train {len(src['train']):>3}  val {len(src['val']):>3}  "
            f"test {len(src['test']):>3}  unlabelled {len(src['unlabelled']):>3}{given}"
        )
    lines += ["", "label fractions (training cases used for supervision):"]
    for key, ids in sorted(splits["label_fractions"].items(), key=lambda kv: float(kv[0])):
        target = manifest.get("target_source")
        extra = ""
        if target in splits["sources"]:
            extra = (
                f"   ({len(splits['sources'][target]['label_fractions'][key])} of them in {target})"
            )
        lines.append(f"  {float(key) * 100:>5.0f} %  {len(ids):>4} cases{extra}")
    if manifest["skipped"]:
        lines += ["", f"skipped {len(manifest['skipped'])} bad cases:"]
        lines += [f"  {s['problem']}" for s in manifest["skipped"]]
    return "\n".join(lines)
