"""``prepare``: datasets -> OUT (shards/, manifest.json, splits.json), in parallel on Ray.

Cases run as Ray tasks (one per case, a bounded number in flight), so the same call scales
from a laptop to a cluster. The driver writes the shards as results arrive. Everything is
written into a temporary sibling of OUT and swapped in only when complete, so a failed run
leaves the previous OUT untouched; an unchanged input (same files, sizes, modification times
and options) reuses OUT without work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import ray
from tqdm.auto import tqdm

from data_prep import SCHEMA_VERSION, locations
from data_prep.case_task import process_case
from data_prep.corpus import check_corpus, expand_dataset_args
from data_prep.errors import DataPrepError
from data_prep.layouts import (
    SourceDataset,
    read_dataset,
)
from data_prep.output import check_out, swap_in, upload
from data_prep.preprocess import (
    Preset,
    check_modality,
    get_preset,
)
from data_prep.reader import MANIFEST, SPLITS
from data_prep.splits import LABEL_FRACTIONS, make_splits
from data_prep.writer import ShardWriter


@dataclass(frozen=True)
class PrepareOptions:
    preset: str = "auto"
    spacing: tuple[float, float, float] | None = None
    seed: int = 0
    val_ratio: float = 0.2
    test_ratio: float = 0.2
    label_fractions: tuple[float, ...] = LABEL_FRACTIONS
    skip_bad: bool = False
    cases_per_shard: int = 8
    target: str | None = None


@dataclass
class PrepareResult:
    out: Path
    reused: bool
    num_cases: int
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    input_bytes: int = 0


def build_class_map(datasets: list[SourceDataset]) -> dict[str, int]:
    """Union of class names over sources; background is 0, then order of first appearance."""
    class_map = {"background": 0}
    for ds in datasets:
        for value, name in ds.labels.items():
            if value and name not in class_map:
                class_map[name] = len(class_map)
    if len(class_map) > 255:
        raise DataPrepError(f"{len(class_map)} classes do not fit the uint8 label format")
    return class_map


def _lookup(ds: SourceDataset, class_map: dict[str, int]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    for value, name in ds.labels.items():
        lut[value] = class_map[name] if value else 0
    return lut


def input_fingerprint(
    datasets: list[SourceDataset], options: PrepareOptions, preset: Preset
) -> str:
    """Hash of everything that determines OUT: options, preset, and each input file's stat."""
    items = []
    for ds in datasets:
        files = []
        for case in ds.cases:
            for path in (case.image, case.label):
                if path is not None:
                    st = path.stat()
                    files.append((str(path), st.st_size, st.st_mtime_ns))
        items.append([ds.name, ds.layout, ds.modality, sorted(ds.labels.items()), files])
    blob = json.dumps(
        [SCHEMA_VERSION, asdict(options), preset.as_dict(), items], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


_remote_process_case = ray.remote(num_cpus=1, max_retries=2)(process_case)


def _source_summary(ds: SourceDataset, infos: dict[str, dict], class_map: dict[str, int]) -> dict:
    mine = [i for cid, i in infos.items() if i["source"] == ds.name]
    intensity = {}
    if mine:
        for key in mine[0]["intensity"]:
            intensity[key] = float(np.mean([i["intensity"][key] for i in mine]))
    return {
        "root": str(ds.root),
        "layout": ds.layout,
        "modality": ds.modality,
        "dataset_file": str(ds.dataset_file) if ds.dataset_file else None,
        "labels": {str(v): n for v, n in ds.labels.items()},
        "annotated_classes": {n: class_map[n] for v, n in ds.labels.items() if v},
        "num_cases": len(mine),
        "num_labelled": sum(i["labelled"] for i in mine),
        "intensity": intensity,
    }


def _run_tasks(jobs, total: int, max_in_flight: int, progress: bool):
    """Yield results of (function args) jobs as they finish, a bounded number in flight."""
    pending: list = []
    jobs = iter(jobs)
    bar = tqdm(total=total, desc="preparing cases", unit="case", disable=not progress)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < max_in_flight:
                args = next(jobs, None)
                if args is None:
                    exhausted = True
                    break
                pending.append(_remote_process_case.remote(*args))
            if not pending:
                return
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        bar.close()


def prepare(
    datasets: list[str | os.PathLike],
    out: str | os.PathLike,
    options: PrepareOptions | None = None,
    *,
    progress: bool = True,
) -> PrepareResult:
    """Prepare one corpus from several datasets. Ray must be initialised or is started locally."""
    import time

    start = time.perf_counter()
    options = options or PrepareOptions()
    preset = get_preset(options.preset, options.spacing)
    out = locations.as_location(out)
    remote = locations.is_remote(out)
    folders, bench_target = expand_dataset_args(list(datasets))
    sources = [read_dataset(f) for f in folders]
    for ds in sources:
        check_modality(preset, ds.modality, dataset=ds.name, path=str(ds.dataset_file or ds.root))
    missing = check_corpus(sources)
    if missing and not options.skip_bad:
        raise next(iter(missing.values()))
    skipped = [{"case": c, "path": e.path, "problem": str(e)} for c, e in missing.items()]
    sources = [
        replace(s, cases=tuple(c for c in s.cases if c.case_id not in missing)) for s in sources
    ]
    target = options.target or bench_target
    if target is not None and target not in {s.name for s in sources}:
        raise DataPrepError(f"target source '{target}' is not among {[s.name for s in sources]}")
    class_map = build_class_map(sources)
    fingerprint = input_fingerprint(sources, options, preset)
    check_out(out)
    if locations.exists(locations.join(out, MANIFEST)):
        try:
            old = json.loads(locations.read_text(locations.join(out, MANIFEST)))
            if not locations.exists(locations.join(out, old.get("splits", SPLITS))):
                old = {}
        except (OSError, json.JSONDecodeError):
            old = {}
        if (
            old.get("input_fingerprint") == fingerprint
            and old.get("schema_version") == SCHEMA_VERSION
        ):
            return PrepareResult(out, True, len(old.get("cases", {})), old.get("skipped", []))

    started_ray = not ray.is_initialized()  # a Ray started here is shut down here: the
    if started_ray:  # caller's own ray.init (another address, other resources) comes after
        ray.init(logging_level="WARNING", log_to_driver=False)
    try:
        max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        if remote:  # staged on local disk, uploaded once every case is written
            tmp = Path(tempfile.mkdtemp(prefix="mixcl-prepare-"))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir()
        try:
            infos, input_bytes = {}, 0
            writer = ShardWriter(tmp, options.cases_per_shard)
            try:
                jobs = (
                    (case, ds.labels, _lookup(ds, class_map), preset, ds.modality)
                    for ds in sources
                    for case in ds.cases
                )
                total = sum(len(ds.cases) for ds in sources)
                for result in _run_tasks(jobs, total, max_in_flight, progress):
                    if "error" in result:
                        if not options.skip_bad:
                            raise DataPrepError(result["error"])
                        skipped.append(
                            {
                                "case": result["case"],
                                "path": result["path"],
                                "problem": result["error"],
                            }
                        )
                        continue
                    info = result["info"]
                    info["shard"] = writer.add(result["row"])
                    input_bytes += info.pop("input_bytes")
                    infos[result["row"]["case_id"]] = info
            finally:
                writer.close()
            if not infos:
                raise DataPrepError("no case could be prepared; see the skipped cases above")
            infos = dict(sorted(infos.items()))
            splits = make_splits(
                ((cid, i["source"], i["labelled"], i["given_split"]) for cid, i in infos.items()),
                seed=options.seed,
                val_ratio=options.val_ratio,
                test_ratio=options.test_ratio,
                fractions=options.label_fractions,
            )
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "input_fingerprint": fingerprint,
                "options": asdict(options),
                "preset": preset.as_dict(),
                "spacing": list(preset.spacing),
                "class_map": class_map,
                "target_source": target,
                "sources": {s.name: _source_summary(s, infos, class_map) for s in sources},
                "shards": writer.shards,
                "cases": infos,
                "skipped": sorted(skipped, key=lambda s: s["case"]),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            (tmp / SPLITS).write_text(json.dumps(splits, indent=1))
            if remote:
                upload(tmp, out, writer.shards)
            else:
                swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if remote:
            shutil.rmtree(tmp, ignore_errors=True)
        return PrepareResult(
            out, False, len(infos), manifest["skipped"], time.perf_counter() - start, input_bytes
        )
    finally:
        if started_ray:
            ray.shutdown()
