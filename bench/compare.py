"""What comparing two answers costs: bascule's engine against deepdiff, on refapi-like pages.

Pages of dcir records rendered as the reference API renders them, each record also carrying its
own `served_at` (as an answer assembled record by record would), of about 1 KB, 100 KB and 5 MB:
  equal   the same page served twice: only the `served_at` values differ
  diff    the records in another order, one amount changed, one record missing, one extra, and
          one amount turned into a string
Both engines get the same rules: /served_at and /records/*/served_at ignored, records matched by
id whatever their order. deepdiff: exclude_regex_paths, and ignore_order=True with an
iterable_compare_func matching records by id. (Its group_by="id" only groups a list at the
root, and ignore_order alone pairs the missing record with the extra one and calls every field
changed.) Each pair goes through both, and the bench fails unless both report the expected
(pointer, kind) set, deepdiff's paths mapped to pointers.

MB/s is one answer's size over the time to compare the pair, parsing both bodies included
(deepdiff's time includes an orjson parse of both). Time is the process's CPU time by default
(`--clock cpu`): on a machine shared with other work, elapsed time also counts the time spent
waiting for a core, which moved a 5 MB comparison from 85 to 155 ms between two runs here;
`--clock wall` measures elapsed time. Each engine's figure is the median of its
runs: deepdiff 5 per small pair and `--deepdiff-repeat` per 5 MB pair (a single 5-second run
moved the ratio by a quarter between runs), bascule 20x `--repeat` per small pair and
`--repeat` per 5 MB pair. "decode floor" is what msgspec alone takes to parse both bodies.
"full path" is bascule with shadow.masking and shadow.slices turned off (both bodies decoded in
full, prepared and walked), timed in the same run: on a shared machine the two columns compare
better than two runs do. It must find what the fast paths find; the bench fails otherwise.

    .venv/bin/python bench/compare.py [--repeat 9] [--deepdiff-repeat 3] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import orjson
from deepdiff import DeepDiff
from deepdiff.helper import CannotCompare

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from bascule.config import CompareRules
from refapi.columns import format_timestamp
from refapi.datasets import DCIR
from refapi.records import render
from refapi.synth import dcir_rows
from shadow.compare import Answer, Rules, _compare, compare, compile_rules

SIZES = (("1 KB", 1_000), ("100 KB", 100_000), ("5 MB", 5_000_000))
RECORD_BYTES = 290  # one rendered dcir record with its served_at, about
IGNORE = ("/served_at", "/records/*/served_at")
DEEPDIFF_EXCLUDE = [r"^root\['served_at'\]$", r"^root\['records'\]\[\d+\]\['served_at'\]$"]
HEADERS = {"Content-Type": "application/json"}
Found = set[tuple[str, str]]


@dataclass
class Row:
    size: str
    case: str
    answer_bytes: int
    bascule_s: float
    deepdiff_s: float
    floor_s: float
    full_s: float

    @property
    def ratio(self) -> float:
        return self.deepdiff_s / self.bascule_s

    def mbps(self, seconds: float) -> float:
        return self.answer_bytes / seconds / 1e6


def page(count: int, served: datetime) -> dict[str, Any]:
    stamp = format_timestamp(served)
    names = [c.name for c in DCIR.all_columns]
    records = []
    for row in dcir_rows(7, count):
        record = render(DCIR, dict(zip(names, row, strict=True)))
        record["served_at"] = stamp
        records.append(record)
    return {"records": records, "next_after": count, "served_at": stamp}


def pairs(count: int) -> dict[str, tuple[bytes, bytes, Found]]:
    """The equal and the different pair for a page of ``count`` records, with what to find.

    Bodies only: the pages themselves are dropped, so that the bench's own objects do not
    weigh on the collector while the engines run.
    """
    noon = datetime(2024, 5, 1, 12, tzinfo=UTC)
    serving = page(count, noon)
    equal = page(count, noon + timedelta(milliseconds=37))
    other = page(count, noon + timedelta(milliseconds=41))
    records = other["records"]
    changed, missing, typed = records[0], records[1], records[2]
    changed["amount"] = round(changed["amount"] + 1.25, 2)
    typed["amount"] = str(typed["amount"])
    records.remove(missing)
    records.append({**records[-1], "id": count + 1, "patient_id": "P00000000000000ff"})
    random.Random(count).shuffle(records)
    ids = sorted({r["id"] for r in serving["records"]} | {r["id"] for r in records})
    at = {i: f"/records/{p}" for p, i in enumerate(ids)}
    expected = {
        (at[changed["id"]] + "/amount", "changed"),
        (at[missing["id"]], "missing"),
        (at[count + 1], "extra"),
        (at[typed["id"]] + "/amount", "type"),
    }
    body = orjson.dumps(serving)
    return {
        "equal": (body, orjson.dumps(equal), set()),
        "diff": (body, orjson.dumps(other), expected),
    }


def token(name: str) -> str:
    return hashlib.blake2b(name.encode(), key=b"bench", digest_size=8).hexdigest()


def run_bascule(a: bytes, b: bytes, rules: Rules) -> Found:
    diff = compare(Answer(200, HEADERS, a), Answer(200, HEADERS, b), rules, token)
    return {(d.pointer, d.kind) for d in diff.differences}


def run_full_path(a: bytes, b: bytes, rules: Rules) -> Found:
    diff = _compare(Answer(200, HEADERS, a), Answer(200, HEADERS, b), rules, token, 100, None)
    return {(d.pointer, d.kind) for d in diff.differences}


def _same_record(x: Any, y: Any, level: Any = None) -> bool:
    try:
        return bool(x["id"] == y["id"])
    except (KeyError, TypeError):
        raise CannotCompare() from None


_DEEPDIFF_KINDS = {
    "values_changed": "changed",
    "type_changes": "type",
    "iterable_item_removed": "missing",
    "dictionary_item_removed": "missing",
    "iterable_item_added": "extra",
    "dictionary_item_added": "extra",
}


def run_deepdiff(a: bytes, b: bytes) -> Found:
    t1, t2 = orjson.loads(a), orjson.loads(b)
    diff = DeepDiff(
        t1,
        t2,
        ignore_order=True,
        iterable_compare_func=_same_record,
        exclude_regex_paths=DEEPDIFF_EXCLUDE,
    )
    ids = sorted({r["id"] for r in t1["records"]} | {r["id"] for r in t2["records"]})
    position = {i: p for p, i in enumerate(ids)}
    found: Found = set()
    for report, items in diff.tree.items():
        if report not in _DEEPDIFF_KINDS:
            raise SystemExit(f"deepdiff reported {report!r}, which this bench cannot map")
        for item in items:
            # Indexes are into the side the element is on: t2 for an added one, else t1.
            added = _DEEPDIFF_KINDS[report] == "extra"
            path = item.path(output_format="list", use_t2=added)
            side = t2 if added else t1
            segments = []
            for n, segment in enumerate(path):
                if n == 1 and path[0] == "records":  # an index: name it as bascule does
                    segment = position[side["records"][segment]["id"]]
                segments.append(str(segment))
            found.add(("".join("/" + s for s in segments), _DEEPDIFF_KINDS[report]))
    return found


def decode_both(decoder: msgspec.json.Decoder[Any], a: bytes, b: bytes) -> Found:
    decoder.decode(a), decoder.decode(b)
    return set()


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed(fn: Callable[[], Found], repeat: int, clock: Callable[[], float]) -> tuple[float, Found]:
    times, result = [], set()
    for _ in range(repeat):
        started = clock()
        result = fn()
        times.append(clock() - started)
    return statistics.median(times), result


def main(args: argparse.Namespace) -> int:
    clock = CLOCKS[args.clock]
    rules = compile_rules(CompareRules(ignore=IGNORE, unordered={"/records": "id"}))
    decoder = msgspec.json.Decoder()
    rows: list[Row] = []
    for label, size in SIZES:
        for case, (a, b, expected) in pairs(max(4, size // RECORD_BYTES)).items():
            big = len(a) > 1_000_000
            floor, _ = timed(partial(decode_both, decoder, a, b), args.repeat, clock)
            repeat = args.repeat if big else args.repeat * 20
            ours_s, ours = timed(partial(run_bascule, a, b, rules), repeat, clock)
            full_s, full = timed(partial(run_full_path, a, b, rules), repeat, clock)
            theirs_s, theirs = timed(
                partial(run_deepdiff, a, b), args.deepdiff_repeat if big else 5, clock
            )
            if not ours == full == theirs == expected:
                print(f"{label} {case}: the engines disagree")
                print(f"  expected  {sorted(expected)}\n  bascule   {sorted(ours)}")
                print(f"  full path {sorted(full)}\n  deepdiff  {sorted(theirs)}")
                return 1
            rows.append(Row(label, case, len(a), ours_s, theirs_s, floor, full_s))
            print(f"  {label} {case}: {len(ours)} differences, both engines agree", flush=True)
    report(rows, args.clock)
    return 0


def report(rows: list[Row], clock: str) -> None:
    print(
        f"\ncompare engine — {os.cpu_count()} cores; MB/s = one answer's bytes / pair time"
        f" ({'CPU' if clock == 'cpu' else 'elapsed'} time)"
    )
    head = (
        f"{'size':<8}{'case':<7}{'answer B':>10}{'bascule ms':>12}{'MB/s':>8}"
        f"{'deepdiff ms':>13}{'MB/s':>8}{'ratio':>8}{'decode floor MB/s':>19}"
        f"{'full path ms':>14}{'MB/s':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.size:<8}{r.case:<7}{r.answer_bytes:>10}{r.bascule_s * 1e3:>12.2f}"
            f"{r.mbps(r.bascule_s):>8.1f}{r.deepdiff_s * 1e3:>13.1f}{r.mbps(r.deepdiff_s):>8.2f}"
            f"{r.ratio:>7.0f}x{r.mbps(r.floor_s):>19.1f}{r.full_s * 1e3:>14.2f}"
            f"{r.mbps(r.full_s):>8.1f}"
        )
    big = [r for r in rows if r.size != "1 KB"]
    worst = min(big, key=lambda r: r.ratio)
    equal_5mb = next(r for r in rows if r.size == "5 MB" and r.case == "equal")
    print(
        f"\ntargets: >= 50x deepdiff on 100 KB and 5 MB pairs: "
        f"{'holds' if worst.ratio >= 50 else 'MISSED'} (lowest {worst.ratio:.0f}x, "
        f"{worst.size} {worst.case})"
    )
    speed = equal_5mb.mbps(equal_5mb.bascule_s)
    print(
        f"         >= 100 MB/s on equal 5 MB answers with the rules applied: "
        f"{'holds' if speed >= 100 else 'MISSED'} ({speed:.0f} MB/s per answer, "
        f"{2 * speed:.0f} MB/s of both bodies; decoding alone allows "
        f"{equal_5mb.mbps(equal_5mb.floor_s):.0f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="bascule runs per 5 MB pair")
    parser.add_argument(
        "--deepdiff-repeat", type=int, default=3, help="deepdiff runs per 5 MB pair (median)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu (default): this process's CPU time, which other processes on a shared "
        "machine do not inflate; wall: elapsed time",
    )
    sys.exit(main(parser.parse_args()))
