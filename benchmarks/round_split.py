"""Where a round's time goes, per task, measured on the code paths a round runs.

    python benchmarks/round_split.py [--sites 3] [--local-steps 20] [--out benchmarks/results/round-split]

At one simulated site (the project's simulator: 4 subjects × 4 slices; CT 128×128, the
image-to-image tasks at their own pixels on 64×64 patches, the whole-slice tasks resized
to 64×64), with DP-SGD on as a study runs by default:
- data loading: decoding the site's images into the site cache (first round), and opening
  that cache again (every later round in another worker);
- training: ``train_site_round`` (Opacus set-up, the local steps, the accountant);
- serialisation: the reply (``client.payload.train_reply``) to Flower's protobuf bytes and
  back, as it crosses a process or the network;
- aggregation: the coordinator combining ``--sites`` such replies (``aggregate_by_policy``).
Transport itself is the network's (the bytes are in the table); in the simulation engine it
is what ``benchmarks/scale.py`` shows beyond the site's work. Also the peak memory of this
process (one site at a time) and the bytes a site sends. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from client.payload import train_reply
from medgan_core.config import AggregationConfig, PrivacyConfig, SiteConfig
from medgan_core.data.simulate import DEFAULT_SITES, simulate_site
from medgan_core.site_round import shared_weights, train_site_round
from medgan_core.tasks.registry import build_task, load_task_data, task_class, task_config, task_names
from speed import machine
from strategies.aggregation import aggregate_by_policy


def _seconds(fn) -> tuple[object, float]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def split(name: str, site: Path, steps: int, n_sites: int, work: Path) -> dict[str, float]:
    modality = "MR" if name == "recon" else "CT"
    config = task_config(name=name, modality=modality, image_size=64, width=16, batch_size=16, local_steps=steps)
    cache = work / f"cache-{name}"
    data, decode = _seconds(lambda: load_task_data(site, config, cache))
    _, reopen = _seconds(lambda: load_task_data(site, config, cache))
    task = build_task(config)
    privacy = PrivacyConfig(enabled=True, target_epsilon=8.0)
    state = work / f"state-{name}"
    metrics, train = _seconds(lambda: train_site_round(
        task, data, SiteConfig(str(site), state_dir=str(state)), privacy, planned_rounds=10,  # type: ignore[arg-type]
        study_id=name, seed=0, aggregation=AggregationConfig(), server_round=1))
    weights, shapes = shared_weights(task, AggregationConfig())
    reply = train_reply(weights, shapes, metrics, data.num_train)  # type: ignore[arg-type, union-attr]
    payload, serialise = _seconds(lambda: recorddict_to_proto(reply).SerializeToString())
    _, deserialise = _seconds(lambda: recorddict_from_proto(type(recorddict_to_proto(reply)).FromString(payload)))
    groups = {group: "average" for group in task.groups}
    _, aggregate = _seconds(lambda: aggregate_by_policy([weights] * n_sites, [1.0] * n_sites, groups,
                                                         AggregationConfig()))
    return {"decode": decode, "reopen-cache": reopen, "train": train, "serialise": serialise,
            "deserialise": deserialise, "aggregate": aggregate, "bytes": float(len(payload)),  # type: ignore[arg-type]
            "records": float(data.num_train), "clinical": float(getattr(task_class(name), "clinical", False))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3, help="Replies the coordinator combines.")
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/round-split"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="round-split-"))
    try:
        site = simulate_site(DEFAULT_SITES[0], work / "site", n_subjects=4, n_slices=4, size=128, seed=0)
        rows = {}
        for name in task_names():
            rows[name] = split(name, site, args.local_steps, args.sites, work)
            print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    command = f"python benchmarks/round_split.py --sites {args.sites} --local-steps {args.local_steps}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "machine": machine(), "rows": rows,
                                                       "peak-rss-mib": peak}, indent=2) + "\n")
    lines = ["# Where a round's time goes", "",
             f"Command: `{command}`. Machine: {machine()}. One simulated site (4 subjects × 4 slices, CT 128×128), "
             f"DP-SGD on, {args.local_steps} local steps of batch 16 at 64×64, width 16; aggregation of "
             f"{args.sites} replies. Seconds; peak memory of the process (one site at a time) {peak:.0f} MiB.", "",
             "| task | decode (first round) | open cache (later rounds) | train | serialise | deserialise | "
             "aggregate | share not training | bytes sent |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        around = r["reopen-cache"] + r["serialise"] + r["deserialise"] + r["aggregate"]
        lines.append(f"| {name} | {r['decode']:.3f} | {r['reopen-cache']:.4f} | {r['train']:.2f} | "
                     f"{r['serialise']:.4f} | {r['deserialise']:.4f} | {r['aggregate']:.4f} | "
                     f"{around / (around + r['train']):.1%} | {r['bytes'] / 1e6:.2f} MB |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
