#!/usr/bin/env python3
"""The hot swap tables of docs/BENCHMARKS.md from what scripts/bench_hotswap.sh's runs print.

Usage::

    scripts/hotswap_tables.py WORKDIR/hotswap/bench.log

Each run (`bench_hotswap run BASE OUT REPEATS A [B [B_ON_A]]`) prints a block that starts with
`== BASE with A (...)`, and bench_hotswap.sh adds `# B BYTES_OF_B BYTES_OF_B_ON_A` after it;
the first table compares switching to A with `apply` of A, the second switching from A to B
with `apply` of B. bench_hotswap.sh calls this with TABLES=1.
"""

from __future__ import annotations

import os
import re
import sys

ROW = re.compile(r"^  (.+?)\s+([0-9.]+) s\s+([0-9.]+)x apply\s+peak \+\s*([0-9.]+) MB$")
DELTA = re.compile(r"^  delta A ([0-9.]+) MB; undo held at A ([0-9.]+) MB")


def name(path: str) -> str:
    stem = os.path.basename(path).removesuffix(".dpk")
    return {"ref-a": "reference pair", "ft-a": "ft-a-bf16", "ft-b": "ft-b-bf16-sharded"}.get(stem, stem)


def parse(text: str):
    runs, cur, load = [], None, None
    for line in text.splitlines():
        if line.startswith("# load "):
            load = line.split()[2:4]
        elif line.startswith("== "):
            m = re.match(r"^== (\S+) with (\S+) \(", line)
            cur = {"a": name(m.group(2)), "rows": {}, "b_part": False}
            runs.append(cur)
        elif cur is None:
            continue
        elif line.strip() == "against apply of B:":
            cur["b_part"] = True
        elif m := ROW.match(line):
            key = m.group(1)
            if key.startswith("apply A"):
                key = "apply A"
            elif key.startswith("apply B"):
                key = "apply B"
            cur["rows"][key] = (float(m.group(2)), float(m.group(3)), float(m.group(4)))
        elif line.startswith("# B "):
            cur["b_bytes"], cur["b_on_a_bytes"] = (int(x) for x in line.split()[2:4])
        elif m := DELTA.match(line):
            cur["delta_mb"], cur["undo_mb"] = float(m.group(1)), float(m.group(2))
    return runs, load


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    runs, load = parse(open(sys.argv[1]).read())
    if not runs:
        raise SystemExit("hotswap_tables.py: no runs in " + sys.argv[1])
    out = [
        "Switching to A, against `apply` of A's delta:",
        "",
        "| A | `apply` A | switch base -> A | A -> base | held at A (A's delta) | peak extra, base -> A |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        ap, up, down = r["rows"]["apply A"], r["rows"]["switch base -> A"], r["rows"]["switch A -> base"]
        out.append(
            f"| {r['a']} | {ap[0]:.3f} s | {up[0]:.3f} s (**{up[1]:.2f}x** faster) | {down[0]:.3f} s ({down[1]:.2f}x) "
            f"| {r['undo_mb']:.1f} MB ({r['delta_mb']:.1f} MB) | {up[2]:.0f} MB |"
        )
    rows_b = [r for r in runs if "apply B" in r["rows"]]
    if rows_b:
        out += [
            "",
            "Switching from A to B, against `apply` of B's delta against the base, in the same run:",
            "",
            "| A | `apply` B | A -> B (revert A, apply B) | A -> B as A's child (a link) | back to A "
            "| B's delta: against the base, against A |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows_b:
            rw = r["rows"]
            ab = rw["switch A -> B (revert A, apply B)"]
            cells = [r["a"], f"{rw['apply B'][0]:.3f} s", f"{ab[0]:.3f} s ({ab[1]:.2f}x)"]
            link, back = rw.get("switch A -> B as A's child (a link)"), rw.get("switch back to A (revert the link)")
            cells.append(f"{link[0]:.3f} s (**{link[1]:.2f}x** faster)" if link else "-")
            cells.append(f"{back[0]:.3f} s ({back[1]:.2f}x)" if back else "-")
            cells.append(f"{r['b_bytes'] / 1e6:.1f} MB, {r['b_on_a_bytes'] / 1e6:.1f} MB" if "b_bytes" in r else "-")
            out.append("| " + " | ".join(cells) + " |")
    note = 'Times: medians; "faster" is against `apply` in the same run (which writes every file to disk).'
    if load:
        note += f" Load average {load[0]} at the start, on {load[1]} cores."
    out += ["", note]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
