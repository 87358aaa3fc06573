"""Copy a pre-training run's backbone into the package as shipped weights, with a full model card.

The card records what the weights are trained on (sources and image counts from the corpus
manifest), how (objective, epochs, wall time, hardware, the resolved config) and why they were
chosen (the linear-probe comparison of the objectives), plus the corpus fingerprint for leakage
checks. Usage (from the repository root)::

    .venv/bin/python scripts/ship_weights.py --run runs/pt_gray_supervised \
        --corpus runs/corpus_gray64_v1 --tag sup_cpu64_v1 \
        --comparison runs/compare_gray_small/report.json runs/compare_gray_large/report.json
    .venv/bin/python scripts/ship_weights.py --run runs/pt_gray128_v2 --corpus runs/corpus_gray128_v2 \
        --tag distill_cpu128_v2 --no-default --build scripts/build_release_corpora_v2.sh \
        --command "scripts/pretrain_release_v2.sh gray" --license "research use only: ..." \
        --comparison runs/probe_v2_gray_small/report.json runs/probe_v2_gray_large/report.json

``--default`` makes the new set what ``pretrained=True`` loads and clears the flag on the other
cards of the same architecture (they stay loadable by tag); ``--no-default`` ships it by tag only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import yaml

from openmednet.config import from_dict
from openmednet.data.fingerprint import save_corpus_fingerprint
from openmednet.data.shards import CorpusManifest
from openmednet.engine.precision import cpu_capability
from openmednet.engine.pretrain import PretrainConfig, objective_label
from openmednet.models import load_pretrained, save_pretrained

ASSETS = Path(__file__).resolve().parents[1] / "src" / "openmednet" / "assets" / "weights"


def _epochs(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "epoch"]


def _earlier_stage(config: dict) -> dict | None:
    """The run whose backbone started this one (``model.init``) in a progressive schedule, with its
    own earlier stage nested the same way (64 px -> 128 px -> a continuation), or ``None``."""
    init = (config.get("model") or {}).get("init")
    if not init:
        return None
    run = Path(init).parent
    stage_config = yaml.safe_load((run / "config.yaml").read_text())
    epochs = _epochs(run)
    return {
        "run": run.name,
        "config": stage_config,
        "epochs": len(epochs),
        "wall_time_s": round(sum(e.get("time_s", 0.0) for e in epochs), 1),
        "earlier_stage": _earlier_stage(stage_config),
    }


def _stage_epochs(stage: dict | None) -> int:
    """Epochs of all earlier stages together."""
    return 0 if stage is None else stage["epochs"] + _stage_epochs(stage["earlier_stage"])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _comparison(reports: list[Path]) -> list[dict]:
    """Summary rows (target, init, budget, mean test AUROC over seeds) of the comparison studies."""
    rows = []
    for path in reports:
        report = json.loads(path.read_text())
        for row in report.get("summary", []):
            rows.append({k: row[k] for k in ("target", "init", "strategy", "budget", "n_seeds") if k in row}
                        | {"auroc_macro": row.get("auroc_macro", {}).get("mean")})
    return rows


def _clear_other_defaults(out: Path, architecture: str, tag: str) -> None:
    """Unset ``default`` on the other shipped cards of ``architecture`` (one default per arch)."""
    for card_path in sorted(out.glob(f"{architecture}.*.json")):
        card = json.loads(card_path.read_text())
        if card.get("architecture") == architecture and card.get("tag") != tag and card.get("default"):
            card["default"] = False
            card_path.write_text(json.dumps(card, indent=2) + "\n")
            print(f"{card_path.name}: no longer the default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="pre-training run directory")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus it was trained on")
    parser.add_argument("--tag", required=True, help="weight-set tag, e.g. sup_cpu64_v1")
    parser.add_argument("--comparison", type=Path, nargs="*", default=[], help="report.json of the objective comparison")
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--default", action=argparse.BooleanOptionalAction, default=True,
                        help="make it the architecture's default weight set (pretrained=True)")
    parser.add_argument("--build", default="scripts/build_release_corpora.sh", help="script that built the corpus")
    parser.add_argument("--command", default=None, help="command that pre-trained it (default: the v1 script)")
    parser.add_argument("--selection", default="linear probe on the public targets (scripts/compare_objectives.sh), "
                        "mean test AUROC over 3 seeds", help="how this weight set was chosen")
    parser.add_argument("--license", required=True,
                        help="licence line of the card, naming the terms of the sources it was trained on")
    args = parser.parse_args()

    model = load_pretrained(args.run / "backbone")
    manifest = CorpusManifest.load(args.corpus)
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    epochs = _epochs(args.run)
    last = epochs[-1]
    details = {
        "corpus": {
            "name": args.corpus.name,
            "images": manifest.num_images,
            "image_size": manifest.image_size,
            "build": args.build,
            "excluded_targets": manifest.build.get("exclude", []),
        },
        "sources": {s["name"]: {k: s.get(k) for k in ("modality", "license", "images") if k in s}
                    for s in manifest.sources},
        "per_source_images": manifest.stats.get("per_source", {}),
        "training": {
            "command": args.command or "scripts/pretrain_release.sh " + ("gray" if model.in_chans == 1 else "color"),
            "config": config,
            "wall_time_s": round(sum(e.get("time_s", 0.0) for e in epochs), 1),
            "earlier_stage": _earlier_stage(config),
            "hardware": f"{os.cpu_count()} CPU cores ({_cpu_model()}, torch CPU capability {cpu_capability()}), no GPU",
            "precision": config.get("train", {}).get("precision"),
        },
        "selection": {
            "how": args.selection,
            "comparison": _comparison(args.comparison),
        },
    }
    fingerprint = args.run / "backbone" / "model.corpus.npz"
    if not fingerprint.is_file():  # runs made before pretrain exported fingerprints
        save_corpus_fingerprint(args.corpus, fingerprint)
    metrics = {k: float(v) for k, v in last.items() if k.startswith("knn/") or k == "train/loss"}
    saved = save_pretrained(
        model, args.out, tag=args.tag, default=args.default,
        data=tuple(s["name"] for s in manifest.sources),
        # From the resolved config, not the run's card: runs made before the card named the map
        # target of distillation would otherwise ship a label that hides it.
        objective=objective_label(from_dict(PretrainConfig, config).objective),
        epochs=len(epochs) + _stage_epochs(details["training"]["earlier_stage"]), metrics=metrics,
        license=args.license, corpus_fingerprint=fingerprint,
        details=details,
    )
    if args.default:
        _clear_other_defaults(args.out, saved.architecture, saved.tag)
    print(f"shipped {saved.architecture}.{saved.tag}: {saved.num_params:,} parameters, sha256 {saved.sha256}")


if __name__ == "__main__":
    main()
