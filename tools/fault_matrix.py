"""Run the fault-injection matrix of trl_kl's trainers and write its table of counts into docs/reliability.md.

    python tools/fault_matrix.py            # all of it (about 10 minutes on 2 CPU cores), rewrites the table
    python tools/fault_matrix.py --quick    # a few cases of each kind (about 30 s); exits 1 on a bad outcome

The cases and their outcomes are defined in tests/fault_injection.py. The full run rewrites the part of
docs/reliability.md between the ``fault-matrix`` markers; ``--json`` also keeps every case's outcome and detail.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import fault_injection as fi  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- fault-matrix:begin -->", "<!-- fault-matrix:end -->"
RANDOM_KILLS = 15
MANIFEST = f"checkpoint-{fi.TARGET_STEP}/trl_kl_checkpoint.json"


def kill_matrix(kind: str, work: Path, quick: bool, rows: dict, log) -> None:
    ref = fi.reference(kind, work)
    if "events" not in ref:
        raise RuntimeError(f"{kind}: the uninterrupted run failed: {ref}")
    events = ref["events"]
    log(f"{kind}: {len(events)} file events in the save at step {fi.TARGET_STEP}: {[path for _, path in events]}")
    chosen = range(1, len(events) + 1)
    weights_file = next((i for i, (_, path) in enumerate(events, 1) if path.endswith("model.safetensors")), 1)
    if quick:  # around the manifest (trl_kl's state, the manifest, rotation) and a torn weights file
        manifest = next((i for i, e in enumerate(events, 1) if e == ["rename", MANIFEST]), len(events))
        chosen = sorted({weights_file, max(1, manifest - 2), manifest, min(len(events), manifest + 1)})
    for event in chosen:
        variants = [] if quick and event == weights_file else [("after", False, None), ("after, save_total_limit=1", False, 1)]
        if events[event - 1][0] == "write" and (not quick or event == weights_file):
            variants.append(("torn", True, None))
        for name, torn, limit in variants:
            out = fi.kill_at_event(kind, work, event, torn=torn, limit=limit)
            if not out["killed"]:
                continue
            for resume in ("resume_true", "resume_path"):
                label = f"kill -9 {name}, resume {'True' if resume == 'resume_true' else 'checkpoint-' + str(fi.TARGET_STEP)}"
                rows.setdefault((label, kind), []).append({"event": events[event - 1], **out[resume]})
                log(f"  {label} at {events[event - 1]}: {out[resume]['outcome']} ({out[resume]['detail'][:120]})")
    sanity = fi.reference(kind, work, save_steps=1, record=False)
    rng = random.Random(f"{kind}-0")
    window = sanity["after_first_save"] * 1.1
    for _ in range(2 if quick else RANDOM_KILLS):
        out = fi.random_kill(kind, work, rng, window)
        if out["killed"]:
            rows.setdefault(("kill -9 at a random time, resume True", kind), []).append(out["resume_true"])
            log(f"  random kill at +{out['delay']:.2f}s ({out['saves_done']} saves done): {out['resume_true']['outcome']}")


def reward_matrix(work: Path, quick: bool, rows: dict, log) -> None:
    kinds = ("grpo", "ppo") if quick else fi.REWARD_KINDS
    cases = ("none", "inf", "wrong_length") if quick else fi.REWARD_CASES
    for kind in kinds:
        for case in cases:
            if kind == "dpo" and case == "huge":
                continue  # DPO ranks float64 rewards: 1e39 is a valid reward there (it overflows float32 only)
            out = fi.bad_reward(kind, case, work)
            out["expected"] = fi.reward_expected(kind, case)
            rows.setdefault(("bad reward function", kind), []).append({"case": case, **out})
            log(f"  reward {kind} {case}: {out['outcome']} ({out['detail'][:120]})")


def numeric_matrix(work: Path, quick: bool, rows: dict, log) -> None:
    for kind in ("grpo",) if quick else fi.KINDS:
        for case in ("nan_grad",) if quick else fi.NUMERIC_CASES:
            out = fi.numeric_fault(kind, case, work)
            out["expected"] = fi.NUMERIC_EXPECTED[case]
            rows.setdefault(("NaN loss / gradient, lr 1e30, NaN config", kind), []).append({"case": case, **out})
            log(f"  numeric {kind} {case}: {out['outcome']} ({out['detail'][:120]})")


def table(rows: dict) -> str:
    lines = [
        "| fault | trainer | cases | " + " | ".join(fi.OUTCOMES) + " |",
        "|---|---|---|" + "---|" * len(fi.OUTCOMES),
    ]
    for (fault, kind), cases in rows.items():
        counts = Counter(case["outcome"] for case in cases)
        cells = [str(counts.get(o, 0)) if counts.get(o) else "" for o in fi.OUTCOMES]
        lines.append(f"| {fault} | {kind} | {len(cases)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bad_cases(rows: dict) -> list[str]:
    """Outcomes that are not good, or not the documented one."""
    bad = []
    for (fault, kind), cases in rows.items():
        for case in cases:
            expected = case.get("expected")
            if case["outcome"] not in fi.GOOD or (expected and case["outcome"] != expected):
                where = case.get("case", case.get("event"))
                bad.append(f"{fault} / {kind} / {where}: {case['outcome']} ({case['detail'][:200]})")
    return bad


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases of each kind; does not touch the docs")
    parser.add_argument("--json", type=Path, help="also write every case's outcome here")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    parser.add_argument("--kinds", default=",".join(fi.KINDS), help="trainers of the kill matrix (grpo,ppo,dpo)")
    parser.add_argument("--parts", default="kill,rewards,numeric", help="which parts to run (kill,rewards,numeric)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    fi.preload()
    rows: dict = {}
    log = lambda line: print(line, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="trl_kl_faults_") as tmp:
        work = Path(tmp)
        parts = args.parts.split(",")
        for kind in (["grpo"] if args.quick else args.kinds.split(",")) if "kill" in parts else []:
            kill_matrix(kind, work / kind, args.quick, rows, log)
        if "rewards" in parts:
            reward_matrix(work / "rewards", args.quick, rows, log)
        if "numeric" in parts:
            numeric_matrix(work / "numeric", args.quick, rows, log)
    minutes = (time.monotonic() - start) / 60
    text = table(rows)
    print(f"\n{text}\n\n({sum(len(c) for c in rows.values())} cases, {minutes:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps({f"{f} | {k}": v for (f, k), v in rows.items()}, indent=1, default=str))
    bad = bad_cases(rows)
    for line in bad:
        print("BAD:", line)
    complete = set(parts) == {"kill", "rewards", "numeric"} and set(args.kinds.split(",")) == set(fi.KINDS)
    if not args.quick and not args.no_doc and complete:
        write_doc(f"{text}\n\n{sum(len(c) for c in rows.values())} cases, {minutes:.0f} min on this machine "
                  f"(`python tools/fault_matrix.py`).")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
