#!/usr/bin/env python3
"""Turns the raw measurements of scripts/fsbench into a table, a chart and JSON.

    fsbench-report.py DIR [--publish REPO]

Reads DIR/raw.csv (round,filesystem,metric,value) and DIR/meta.json; writes
DIR/results.md (Markdown: medians with min-max ranges, the best peer of each row, and
the ratios of every xtsfs mount to the plain directory and to the best peer),
DIR/summary.md (xtsfs, the plain directory and the best peer only), DIR/results.json
(the same numbers) and DIR/chart.svg (one panel per workload, a bar per filesystem with
its range; standard library only). With DIR/requests.csv (fsbench's untimed pass
counting each xtsfs mount's FUSE requests per small-file phase) and DIR/profile.csv
(the daemon's perf samples by library in the same pass), results.md also has tables of
those. --publish REPO copies the chart to REPO/docs/fsbench.svg
and the tables into REPO/docs/BENCHMARKS.md and REPO/README.md between their
"fsbench results" markers.

A ratio above 1 always means xtsfs did better: for throughput it is xtsfs / reference,
for times, CPU and memory it is reference / xtsfs.
"""
import csv
import html
import json
import math
import os
import re
import statistics
import sys

PEERS = ["gocryptfs", "securefs", "cryfs", "encfs"]
# Not xtsfs, not peers: the backing directory without FUSE, and FUSE without encryption.
REFERENCES = ["plain", "ceiling"]
# metric, label, unit, higher is better, decimals
ROWS = [
    ("seqwrite", "seqwrite {size} dd + fdatasync", "MB/s", True, 0),
    ("seqread", "seqread after drop_caches", "MB/s", True, 0),
    ("cached", "seqread again (page cache)", "MB/s", True, 0),
    ("randread", "fio 4 KiB randread", "IOPS", True, 0),
    ("randwrite", "fio 4 KiB randwrite + final fsync", "IOPS", True, 0),
    ("untar", "untar {tree}", "s", False, 2),
    ("ls", "ls -lR", "s", False, 2),
    ("read", "read every file (md5sum)", "s", False, 2),
    ("rm", "rm -rf", "s", False, 2),
    ("cpu_seqwrite", "daemon CPU per GiB, seqwrite", "s", False, 2),
    ("cpu_seqread", "daemon CPU per GiB, seqread", "s", False, 2),
    ("rss_peak_mib", "daemon peak RSS (VmHWM)", "MiB", False, 0),
]
COLORS = {"plain": "#9e9e9e", "ceiling": "#616161", "xtsfs": "#1565c0", "integrity": "#42a5f5", "uring": "#0d47a1", "gocryptfs": "#ef6c00",
          "securefs": "#2e7d32", "cryfs": "#8e24aa", "encfs": "#c62828"}
EXTRA_COLORS = ["#00838f", "#5d4037", "#283593", "#827717"]


def number(v, decimals):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if decimals == 0:
        return f"{v:,.0f}"
    return f"{v:,.{decimals}f}"


def ratio(x, ref, higher):
    if x is None or ref is None or x <= 0 or ref <= 0:
        return None
    return x / ref if higher else ref / x


def ratio_text(r):
    if r is None:
        return "–"
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def main():
    out = sys.argv[1]
    meta = json.load(open(os.path.join(out, "meta.json")))
    values = {}
    with open(os.path.join(out, "raw.csv")) as f:
        for row in csv.DictReader(f):
            try:
                v = float(row["value"])
            except ValueError:
                continue
            if math.isnan(v):
                continue
            values.setdefault((row["filesystem"], row["metric"]), []).append(v)

    order = meta["order"]
    measured = {fs for fs, _ in values}
    xts = [fs for fs in order if fs not in PEERS and fs not in REFERENCES and fs in measured]
    peers = [fs for fs in order if fs in PEERS]
    size = meta["size_mib"]
    size_text = f"{size // 1024} GiB" if size % 1024 == 0 else f"{size} MiB"
    m = re.fullmatch(r"([\d,]+ files), ([\d,]+ directories), (\d+ MiB)", meta["tree"])
    tree_text = f"{m[1]} / {m[2]} ({m[3]})" if m else meta["tree"]

    rows = []
    for metric, label, unit, higher, decimals in ROWS:
        stats = {}
        for fs in order:
            vs = values.get((fs, metric))
            if vs:
                stats[fs] = {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}
        if not stats:
            continue
        pick = max if higher else min
        ranked = [fs for fs in peers if fs in stats]
        best = pick(ranked, key=lambda fs: stats[fs]["median"]) if ranked else None
        ratios = {}
        for fs in xts:
            if fs not in stats:
                continue
            m = stats[fs]["median"]
            ratios[fs] = {
                "vs_plain": ratio(m, stats.get("plain", {}).get("median"), higher),
                "vs_ceiling": ratio(m, stats.get("ceiling", {}).get("median"), higher),
                "vs_best_peer": ratio(m, stats[best]["median"], higher) if best else None,
            }
        rows.append({"metric": metric, "label": label.format(size=size_text, tree=tree_text), "unit": unit,
                     "higher_is_better": higher, "decimals": decimals, "values": stats, "best_peer": best,
                     "ratios": ratios})

    json.dump({"meta": meta, "rows": rows}, open(os.path.join(out, "results.json"), "w"), indent=2)

    # Markdown
    lines = []
    rounds = meta["rounds"]
    lines.append(f"fsbench, {meta['date']}: {meta['host_cores']} cores ({meta['cpu']}), kernel {meta['kernel']}, "
                 f"backing filesystem {meta['backing']}; {rounds} interleaved round{'s' if rounds != 1 else ''}, "
                 f"order rotated each round; median (min–max); load average {meta.get('load_start', '?')} at the start, "
                 f"{meta.get('load_end', meta.get('load_before', '?'))} at the end; "
                 f"{meta['seconds']} s.")
    rt = meta.get("roundtrip_us")
    if rt and rt.get("unpinned") is not None:
        def us(v):
            return "?" if v is None else f"{v:.0f} µs"
        poll = meta.get("guest_halt_poll_ns")
        lines.append("")
        lines.append(f"One FUSE round trip here (a request xtsfs answers without the backing filesystem, "
                     f"`scripts/fuse-roundtrip.c`, after the rounds): {us(rt.get('unpinned'))} as the rounds ran, "
                     f"{us(rt.get('one_cpu'))} with the caller and the daemon on one CPU, "
                     f"{us(rt.get('two_cpus'))} on two"
                     + (f"; guest halt polling {poll} ns" if poll is not None else "") + ". "
                     "Each small-file phase is a chain of such round trips (see the request counts below).")
    lines.append("")
    head = ["workload", "unit"] + order + ["best peer"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|---|" + "---:|" * len(order) + "---|")
    for r in rows:
        cells = [r["label"], r["unit"] + (" ↑" if r["higher_is_better"] else " ↓")]
        for fs in order:
            s = r["values"].get(fs)
            if not s:
                cells.append("–")
            elif s["n"] > 1 and s["min"] != s["max"]:
                cells.append(f"{number(s['median'], r['decimals'])} ({number(s['min'], r['decimals'])}–{number(s['max'], r['decimals'])})")
            else:
                cells.append(number(s["median"], r["decimals"]))
        cells.append(r["best_peer"] or "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("↑ higher is better, ↓ lower is better. CPU is the daemon's utime+stime per GiB moved; "
                 "RSS is the daemon's peak resident set at the end of the run (the plain directory has no daemon).")
    if xts:
        lines.append("")
        lines.append("Ratios of the medians (above 1: xtsfs did better; for times, CPU and RSS the reference divided by xtsfs's figure):")
        lines.append("")
        ceiling = "ceiling" in order
        head = ["workload"]
        for fs in xts:
            head += [f"{fs} ÷ plain"] + ([f"{fs} ÷ FUSE ceiling"] if ceiling else []) + [f"{fs} ÷ best peer"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "---:|" * ((3 if ceiling else 2) * len(xts)))
        for r in rows:
            cells = [r["label"]]
            for fs in xts:
                q = r["ratios"].get(fs, {})
                cells += [ratio_text(q.get("vs_plain"))] + ([ratio_text(q.get("vs_ceiling"))] if ceiling else []) + \
                         [ratio_text(q.get("vs_best_peer"))]
            lines.append("| " + " | ".join(cells) + " |")
    lines += requests_table(out, meta)
    lines += profile_table(out, meta)
    lines.append("")
    lines.append("Versions: " + "; ".join(f"{fs}: {meta['versions'].get(fs, '?')}" for fs in order) + ".")
    if meta.get("missing"):
        lines.append("")
        lines.append("Missing (could not be set up or failed during the run): " +
                     "; ".join(f"{fs} ({why.strip()})" for fs, why in meta["missing"].items()) + ".")
    open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")

    # The short form for README.md: xtsfs's mounts, the plain directory, the best peer.
    short = []
    refs = [fs for fs in REFERENCES if fs in order]
    head = ["workload"] + ["FUSE ceiling" if fs == "ceiling" else fs for fs in refs] + xts + ["best peer"] + [f"{fs} ÷ best peer" for fs in xts]
    short.append("| " + " | ".join(head) + " |")
    short.append("|---|" + "---:|" * (len(refs) + len(xts)) + "---|" + "---:|" * len(xts))
    for r in rows:
        cells = [f"{r['label']}, {r['unit']}"]
        for fs in refs + xts:
            s = r["values"].get(fs)
            cells.append(number(s["median"], r["decimals"]) if s else "–")
        b = r["best_peer"]
        cells.append(f"{number(r['values'][b]['median'], r['decimals'])} ({b})" if b else "–")
        cells += [ratio_text(r["ratios"].get(fs, {}).get("vs_best_peer")) for fs in xts]
        short.append("| " + " | ".join(cells) + " |")
    open(os.path.join(out, "summary.md"), "w").write("\n".join(short) + "\n")

    write_svg(os.path.join(out, "chart.svg"), rows, order, meta)
    if len(sys.argv) > 3 and sys.argv[2] == "--publish":
        publish(out, sys.argv[3], meta)


PHASES = ["untar", "ls", "read", "rm"]


def requests_table(out, meta):
    """The FUSE requests each xtsfs mount received per small-file phase (requests.csv,
    from fsbench's untimed counting pass), as Markdown lines; none without the file."""
    path = os.path.join(out, "requests.csv")
    if not os.path.exists(path):
        return []
    counts = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            counts.setdefault((row["filesystem"], row["phase"]), {})[row["operation"]] = int(row["count"])
    systems = [fs for fs in meta["order"] if any((fs, p) in counts for p in PHASES)]
    if not systems:
        return []
    m = re.fullmatch(r"([\d,]+) files, ([\d,]+) directories, .*", meta["tree"])
    entries = int(m[1].replace(",", "")) + int(m[2].replace(",", "")) if m else None
    lines = ["", "FUSE requests per small-file phase (one more pass, untimed, on a fresh volume; counted by "
             "the daemon, `kill -USR1`)" + (f", and per file or directory of the tree ({entries:,} entries)" if entries else "") +
             "; the operations that make up most of them:", ""]
    lines.append("| phase | " + " | ".join(systems) + " |")
    lines.append("|---|" + "---|" * len(systems))
    for phase in PHASES:
        cells = [phase]
        for fs in systems:
            ops = counts.get((fs, phase), {})
            total = sum(ops.values())
            top = sorted(ops.items(), key=lambda kv: -kv[1])[:5]
            per = f" ({total / entries:.1f} per entry)" if entries else ""
            cells.append(f"{total:,}{per}: " + ", ".join(f"{op} {n:,}" for op, n in top) if ops else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


PROFILE_GROUPS = [("kernel", lambda d: d.startswith("[kernel")), ("libcrypto", lambda d: d.startswith("libcrypto")),
                  ("libc", lambda d: d.startswith("libc.so") or d.startswith("libc-")),
                  ("Swift runtime", lambda d: d.startswith("libswift") or d.startswith("libFoundation")),
                  ("libfuse", lambda d: d.startswith("libfuse")), ("xtsfs", lambda d: d.startswith("xtsfs"))]


def profile_table(out, meta):
    """Where each xtsfs daemon's CPU went in each small-file phase (profile.csv: perf
    samples at 999 Hz by library), as Markdown lines; none without samples."""
    path = os.path.join(out, "profile.csv")
    if not os.path.exists(path):
        return []
    samples = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            group = next((g for g, match in PROFILE_GROUPS if match(row["dso"])), "other")
            key = (row["filesystem"], row["phase"])
            samples.setdefault(key, {}).setdefault(group, 0)
            samples[key][group] += int(row["samples"])
    systems = [fs for fs in meta["order"] if any((fs, p) in samples for p in PHASES)]
    if not systems:
        return []
    groups = [g for g, _ in PROFILE_GROUPS] + ["other"]
    lines = ["", "The daemon's CPU in the same pass (perf at 999 Hz; CPU seconds, then the share of each part: the "
             "kernel's share is the system calls, FUSE's and the backing filesystem's; `profile-FS-PHASE.txt` lists "
             "the top symbols):", ""]
    lines.append("| filesystem | phase | CPU s | " + " | ".join(groups) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(groups))
    for fs in systems:
        for phase in PHASES:
            g = samples.get((fs, phase))
            if not g:
                continue
            total = sum(g.values())
            lines.append(f"| {fs} | {phase} | {total / 999:.2f} | " +
                         " | ".join(f"{100 * g.get(x, 0) / total:.0f}%" for x in groups) + " |")
    return lines


def replace_between(path, begin, end, text):
    doc = open(path).read()
    a, b = doc.find(begin), doc.find(end)
    if a < 0 or b < a:
        raise SystemExit(f"fsbench-report: {path} has no {begin} ... {end} section to replace")
    open(path, "w").write(doc[:a + len(begin)] + "\n" + text + doc[b:])


def publish(out, repo, meta):
    """Copies the chart to docs/fsbench.svg and the tables into docs/BENCHMARKS.md and
    README.md, between their "fsbench results" markers."""
    import shutil
    shutil.copyfile(os.path.join(out, "chart.svg"), os.path.join(repo, "docs", "fsbench.svg"))
    full = open(os.path.join(out, "results.md")).read()
    short = open(os.path.join(out, "summary.md")).read()
    replace_between(os.path.join(repo, "docs", "BENCHMARKS.md"), "<!-- fsbench results begin -->",
                    "<!-- fsbench results end -->", full + "\n![fsbench chart](fsbench.svg)\n")
    replace_between(os.path.join(repo, "README.md"), "<!-- fsbench results begin -->", "<!-- fsbench results end -->",
                    f"{meta['date'][:10]}, {meta['host_cores']} cores, kernel {meta['kernel']}, medians of "
                    f"{meta['rounds']} interleaved rounds ({meta['tree']} in the small-file rows):\n\n" + short)


def write_svg(path, rows, order, meta):
    colors = {}
    extra = iter(EXTRA_COLORS * 4)
    for fs in order:
        colors[fs] = COLORS.get(fs) or next(extra)
    panels = [r for r in rows if r["metric"] not in ("cpu_seqread",)]
    cols = 2
    panel_w, bar_h, gap = 470, 16, 4
    label_w, value_w = 80, 120
    panel_h = 34 + len(order) * (bar_h + gap)
    title_h = 54
    width = cols * panel_w + 20
    height = title_h + math.ceil(len(panels) / cols) * (panel_h + 16) + 10
    e = html.escape
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">xtsfs and peers: scripts/fsbench, {e(meta["date"][:10])}</text>',
           f'<text x="10" y="38" fill="#555">{meta["host_cores"]} cores, kernel {e(meta["kernel"])}, '
           f'median of {meta["rounds"]} interleaved round(s); the whisker is the min–max range; '
           f'bars are scaled to the largest value of their panel.</text>']
    for i, r in enumerate(panels):
        x0 = 10 + (i % cols) * panel_w
        y0 = title_h + (i // cols) * (panel_h + 16)
        better = "higher is better" if r["higher_is_better"] else "lower is better"
        svg.append(f'<text x="{x0}" y="{y0 + 12}" font-weight="bold">{e(r["label"])}</text>')
        svg.append(f'<text x="{x0}" y="{y0 + 25}" fill="#555">{e(r["unit"])}, {better}</text>')
        vals = r["values"]
        top = max([s["max"] for s in vals.values()] + [1e-9])
        span = panel_w - label_w - value_w - 10
        for j, fs in enumerate(order):
            y = y0 + 32 + j * (bar_h + gap)
            svg.append(f'<text x="{x0 + label_w - 6}" y="{y + bar_h - 4}" text-anchor="end">{e(fs)}</text>')
            s = vals.get(fs)
            if not s:
                svg.append(f'<text x="{x0 + label_w}" y="{y + bar_h - 4}" fill="#999">–</text>')
                continue
            w = max(1.0, span * s["median"] / top)
            svg.append(f'<rect x="{x0 + label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colors[fs]}"/>')
            if s["n"] > 1 and s["max"] > s["min"]:
                a = x0 + label_w + span * s["min"] / top
                b = x0 + label_w + span * s["max"] / top
                ym = y + bar_h / 2
                svg.append(f'<path d="M{a:.1f} {ym:.1f}H{b:.1f}M{a:.1f} {y + 3}V{y + bar_h - 3}M{b:.1f} {y + 3}V{y + bar_h - 3}" '
                           f'stroke="#222" stroke-width="1" fill="none"/>')
            mark = " ★" if fs == r["best_peer"] else ""
            svg.append(f'<text x="{x0 + label_w + max(w, span * s["max"] / top) + 4:.1f}" y="{y + bar_h - 4}">'
                       f'{number(s["median"], r["decimals"])}{mark}</text>')
    svg.append(f'<text x="10" y="{height - 4}" fill="#555">★ best peer of the row (gocryptfs, securefs, cryfs, encfs)</text>')
    svg.append("</svg>")
    open(path, "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
