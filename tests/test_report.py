"""report.html for runs and workflows: what the HTML holds, and what a real browser draws from it."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from posttrain.report import COLOURS, run_report_html, workflow_report_html, write_run_report, write_workflow_report
from tests.helpers import chat_rows, write_jsonl

CONFIG = "method: dpo\noutput_dir: runs/x\nmodel:\n  name: embedded\ndpo:\n  beta: 0.1\n"


def make_run(root: Path, *, dpo: bool = True, samples: bool = True) -> Path:
    """A run folder with known numbers: 6 train records, 2 held-out evals (steps 0 and 5)."""
    root.mkdir(parents=True, exist_ok=True)
    recs = [{"step": 0, "eval/loss": 0.6931, **({"eval/rewards/margin": 0.0, "eval/accuracy": 0.5} if dpo else {})}]
    for s in range(1, 7):
        r = {"step": s, "loss": 0.7 - 0.01 * s, "lr": 1e-4 * s / 6, "tokens_per_s": 100.0 + s, "grad_norm": 1.0}
        if dpo:
            r.update({"rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s, "rewards/margin": 0.2 * s,
                      "accuracy": 0.5 + 0.05 * s, "kl_to_ref": 0.01 * s})
        recs.append(r)
    recs.append({"step": 6, "eval/loss": 0.5432, **({"eval/rewards/margin": 1.25, "eval/accuracy": 0.875}
                                                     if dpo else {})})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    evals = [r for r in recs if "eval/loss" in r]
    (root / "summary.json").write_text(json.dumps({"steps": 6, "seconds": 12.5, "trainable": 1000,
                                                   "eval_before": evals[0], "eval_after": evals[-1],
                                                   "data": ["train.jsonl: 10 pairs"]}))
    (root / "config.yaml").write_text(CONFIG if dpo else CONFIG.replace("dpo", "sft"))
    if samples:
        (root / "samples.jsonl").write_text(json.dumps({"prompt": "say <script>alert(1)</script>",
                                                        "reference": "R & D", "output": "<b>hi</b>"}) + "\n")
    return root


def panel_titles(html: str) -> list[str]:
    return re.findall(r'<text x="\d+" y="[\d.]+" font-weight="bold">([^<]*)</text>', html)


def test_run_report_draws_the_present_metrics_and_only_those(tmp_path):
    html = run_report_html(make_run(tmp_path / "my-run"))
    assert "<h1>my-run \u00b7 DPO</h1>" in html
    titles = panel_titles(html)
    for t in ("loss", "learning rate", "chosen and rejected rewards", "reward margin", "accuracy", "kl_to_ref",
              "tokens per second"):
        assert t in titles, t
    for t in ("policy and value loss", "reward (trained on)", "watch (never trained on)", "held-out perplexity",
              "critic: value and return"):
        assert t not in titles, t
    for fig in ("my-run: loss and learning rate", "my-run: rewards and margins", "my-run: KL"):
        assert fig in html
    assert "reward curves" not in html  # no reward key: no figure
    # one polyline per series: loss, eval/loss, lr, chosen, rejected, margin, eval/margin, accuracy, eval/accuracy,
    # kl_to_ref, grad_norm, tokens_per_s
    assert html.count("<polyline") == 12
    assert 'stroke="#1f77b4"' in html and 'stroke="#d62728"' in html
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert "<script" not in html


def test_run_report_before_after_table_config_and_escaped_samples(tmp_path):
    html = run_report_html(make_run(tmp_path / "r"))
    row = re.search(r"<tr><td>eval/loss</td>(.*?)</tr>", html).group(1)
    assert "0.6931" in row and "0.5432" in row and "-0.1499" in row and "better" in row
    row = re.search(r"<tr><td>eval/accuracy</td>(.*?)</tr>", html).group(1)
    assert "0.5" in row and "0.875" in row and "+0.375" in row and "better" in row
    assert "before (step 0)" in html and "after (step 6)" in html
    assert "<pre>method: dpo\noutput_dir: runs/x" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "R &amp; D" in html and "&lt;b&gt;hi&lt;/b&gt;" in html
    assert "<script>" not in html and "<b>hi" not in html


def test_sft_run_without_preference_keys_or_samples(tmp_path):
    run = make_run(tmp_path / "sft-run", dpo=False, samples=False)
    path = write_run_report(run)
    assert path == run / "report.html" and path.exists()
    html = path.read_text()
    assert "sft-run \u00b7 SFT" in html
    assert "rewards and margins" not in html and ": KL" not in html and "samples" not in html
    assert html.count("<polyline") == 5  # loss, eval/loss, lr, grad_norm, tokens_per_s
    assert not list(run.glob(".report.html.*"))  # the atomic write left no temporary file


def test_run_report_of_a_folder_with_nothing_in_it_still_renders(tmp_path):
    html = run_report_html(tmp_path)
    assert "no metrics.jsonl" in html and "no held-out evaluation" in html


def workflow_inputs(tmp_path: Path) -> dict:
    runs = {"sft": make_run(tmp_path / "wf" / "sft", dpo=False), "dpo": make_run(tmp_path / "wf" / "dpo")}
    return dict(
        title="demo <wf>",
        stages=[{"name": "baseline", "status": "cached", "seconds": None, "detail": "eval only"},
                {"name": "sft", "status": "ran", "seconds": 75.0, "detail": "2 steps"},
                {"name": "dpo", "status": "blocked", "seconds": 3.2, "detail": "gate_dpo <failed>"}],
        evals={"columns": ["baseline", "sft", "dpo"],
               "rows": {"in_domain/exact": {"baseline": 0.12, "sft": 0.9, "dpo": 0.92},
                        "ood/loss": {"baseline": 2.0, "sft": 2.5},
                        "refusal/rate": {"sft": 0.3, "dpo": -0.1}},
               "higher_is_better": {"in_domain/exact": True, "ood/loss": False, "refusal/rate": True}},
        gates=[{"name": "gate_sft", "candidate": "sft", "baseline": "baseline", "passed": True,
                "checks": [{"metric": "in_domain/exact", "baseline": 0.12, "candidate": 0.9, "change": 0.78,
                            "rule": ">= +0.05", "passed": True}]},
               {"name": "gate_dpo", "candidate": "dpo", "baseline": "sft", "passed": False,
                "checks": [{"metric": "ood/loss", "baseline": 2.5, "candidate": None, "change": None,
                            "rule": "<= +0.1", "passed": False, "note": "dpo lacks ood/loss"}]}],
        runs=runs, config_text="name: demo\nstages: [sft, dpo] # <&>\n")


def test_workflow_report_stages_evals_gates_and_runs(tmp_path):
    kw = workflow_inputs(tmp_path)
    path = write_workflow_report(tmp_path / "wf" / "report.html", **kw)
    html = path.read_text()
    assert "<h1>demo &lt;wf&gt; \u00b7 workflow</h1>" in html
    assert re.search(r"<td>sft</td><td class=\"ran\">ran</td><td class=\"num\">1 min 15 s</td>", html)
    assert "gate_dpo &lt;failed&gt;" in html
    # the eval table: values, the change against the first column, a missing cell as an em dash, colours
    row = re.search(r"<tr><td>in_domain/exact</td>(.*?)</tr>", html).group(1)
    assert '<td class="num">0.12</td>' in row and 'class="num better">0.9' in row and "+0.78" in row
    row = re.search(r"<tr><td>ood/loss</td>(.*?)</tr>", html).group(1)
    assert 'class="num worse">2.5' in row and row.endswith("<td class=\"num\">\u2014</td>")
    row = re.search(r"<tr><td>refusal/rate</td>(.*?)</tr>", html).group(1)
    assert row.count("\u2014") == 1  # no baseline: values shown, nothing coloured
    assert "better" not in row and "worse" not in row
    # the grouped bar chart: one bar per present cell (3 + 2 + 2), a dash per missing one, a label per metric
    bars = re.search(r"held-out evals by stage.*?</svg>", html, re.S).group(0)
    assert bars.count("<rect x=") - 3 == 7  # minus the three legend swatches
    assert bars.count(">\u2014</text>") == 2
    assert ">in_domain/<" in bars and ">exact \u2191<" in bars and ">ood/loss \u2193<" in bars  # long names: 2 lines
    # gates: both verdicts, each with its table
    assert '<span class="badge pass">PASS</span> gate_sft' in html
    assert '<span class="badge blocked">BLOCKED</span> gate_dpo' in html
    assert "BLOCKED</span> at gate_dpo" in html and "dpo lacks ood/loss" in html
    # runs: their curves under a heading, a relative link to their own report (written when missing)
    assert '<a href="sft/report.html">' in html and '<a href="dpo/report.html">' in html
    assert (tmp_path / "wf" / "sft" / "report.html").exists()
    assert "sft: loss and learning rate" in html and "dpo: rewards and margins" in html
    assert "stages: [sft, dpo] # &lt;&amp;&gt;" in html


def test_workflow_report_with_no_gates_passes_and_empty_inputs(tmp_path):
    html = workflow_report_html(title="t", stages=[], evals={"columns": [], "rows": {}, "higher_is_better": {}},
                                gates=[], runs={}, config_text="")
    assert "no stage" in html and "no evaluation" in html and "no gate" in html and "BLOCKED" not in html


def test_a_training_run_writes_its_report(tiny_dir, tmp_path, capsys):
    from posttrain.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(12))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data}, eval_fraction: 0.25}}\n"
                   f"output_dir: {tmp_path / 'run'}\ntrain: {{max_steps: 2, micro_batch_size: 2}}\neval_samples: 1\n")
    assert main(["sft", str(cfg), "lora.r=4"]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "run \u00b7 SFT" in html and "loss and learning rate" in html and "samples (held-out, greedy)" in html
    err = capsys.readouterr().err
    assert "report:" in err and "report.html" in err


def test_a_failing_report_only_warns(tmp_path, monkeypatch, capsys):
    import posttrain.recipes._common as common
    from posttrain.recipes._common import write_report

    def broken(run_dir):
        raise ValueError("bad metrics")

    monkeypatch.setattr(common, "write_run_report", broken)  # the name write_report looks up
    assert write_report(make_run(tmp_path / "r")) is None
    assert "report.html not written: ValueError: bad metrics" in capsys.readouterr().err


# --- what headless Chromium actually draws ---------------------------------------------------------------------

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or \
        (str(Path("/usr/bin/chromium")) if Path("/usr/bin/chromium").exists() else None)


def browser(*args: str) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (as root, `make test` installs it with apt-get install chromium)")
    return subprocess.run([binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):  # undo the filter (PNG spec 9.2): a = left, b = up, c = up-left
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 3 else bytes(v for k, v in enumerate(line) if k % 4 != 3))
        prev = line
    return width, height, rows


def colour_counts(rows: list[bytes], colours: list[str], tol: int = 12) -> dict[str, int]:
    """Pixels within ``tol`` per channel of each colour (anti-aliasing blends the edges of a line)."""
    want = {c: bytes.fromhex(c[1:]) for c in colours}
    counts = dict.fromkeys(colours, 0)
    for row in rows:
        for i in range(0, len(row), 3):
            r, g, b = row[i], row[i + 1], row[i + 2]
            if r > 240 and g > 240 and b > 240:
                continue  # the white page, quickly
            for c, (wr, wg, wb) in want.items():
                if abs(r - wr) <= tol and abs(g - wg) <= tol and abs(b - wb) <= tol:
                    counts[c] += 1
    return counts


def test_png_reader_against_a_handmade_image(tmp_path):
    # 2x2 RGB, one row with filter 1 (sub) and one with filter 2 (up): red, green / blue, white.
    # Encoded bytes are the pixel minus its left (sub) or upper (up) neighbour, mod 256.
    raw = bytes([1, 255, 0, 0, 1, 255, 0, 2, 1, 0, 255, 255, 0, 255])
    png = b"\x89PNG\r\n\x1a\n"
    for kind, body in ((b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)), (b"IDAT", zlib.compress(raw)),
                       (b"IEND", b"")):
        png += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    (tmp_path / "x.png").write_bytes(png)
    assert read_png(tmp_path / "x.png") == (2, 2, [bytes([255, 0, 0, 0, 255, 0]), bytes([0, 0, 255, 255, 255, 255])])


@pytest.mark.parametrize("kind", ["workflow", "run"])
def test_chromium_draws_the_curves(tmp_path, kind):
    if kind == "workflow":
        page = write_workflow_report(tmp_path / "wf" / "report.html", **workflow_inputs(tmp_path))
    else:
        page = write_run_report(make_run(tmp_path / "run"))
    shot = tmp_path / "shot.png"
    proc = browser("--window-size=1000,3000", f"--screenshot={shot}", page.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    width, height, rows = read_png(shot)
    assert (width, height) == (1000, 3000)
    counts = colour_counts(rows, list(COLOURS[:2]))
    # Each curve colour covers at least a few hundred pixels (a 1.6-px line across a 560-px panel, several panels;
    # in the workflow page also the bars); a blank page, a broken SVG or an unstyled error page has ~none.
    assert all(n > 300 for n in counts.values()), counts
    non_white = sum(1 for row in rows for i in range(0, len(row), 3) if min(row[i:i + 3]) < 200)
    assert non_white > 20000, non_white

    dom = browser("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") >= (4 if kind == "workflow" else 3)
    assert "<polyline" in dom.stdout


def test_compare_two_runs_curves_differences_and_halves(tmp_path):
    import json as _json

    from posttrain.cli import main as cli_main

    for name, lr, rewards in [("a", 1e-4, [0.0, 0.2, 0.4, 0.6]), ("b", 3e-4, [0.1, 0.1, 0.3, 0.5])]:
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": i + 1, "reward": r, "loss": 1.0 - r} for i, r in enumerate(rewards)]
        (run / "metrics.jsonl").write_text("".join(_json.dumps(x) + "\n" for x in lines))
        (run / "config.yaml").write_text(f"method: grpo\noutput_dir: runs/{name}\ntrain: {{lr: {lr}, seed: 1}}\n")
        (run / "summary.json").write_text(_json.dumps({"steps": 4, "seconds": 75.0}))
    out = tmp_path / "cmp.html"
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    html = out.read_text()
    assert html.count("<polyline") == 4  # two panels (loss, reward), a line per run in each
    assert "train.lr" in html and "train.seed" not in html and "output_dir" not in html  # only what differs
    # reward halves: a (0 + 0.2) / 2 = 0.1 -> 0.5, b 0.1 -> 0.4
    assert ('<td>rollout reward</td><td>a</td><td class="num">4</td><td class="num">0.1</td><td class="num">0.5</td>'
            in html)
    assert '<td>b</td><td class="num">4</td><td class="num">0.1</td><td class="num">0.4</td>' in html
    assert cli_main(["compare", str(tmp_path / "a"), "--out", str(out)]) == 2  # one run is no comparison
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "nope")]) == 2


def test_grouped_bar_value_labels_are_compact_and_never_overlap():
    from posttrain.report.svg import compact, eval_bars_svg

    assert [compact(v) for v in (1253.0, -1253.0, 0.5, 2.5e6, 0.000123, 999.0)] == \
        ["1.25k", "-1.25k", "0.5", "2.5M", "0.000123", "999"]
    svg = eval_bars_svg({"columns": ["base", "sft", "dpo"], "rows": {
        "cards_loss/tokens": {"base": 1253.0, "sft": 1187.0, "dpo": 1249.0},
        "heldout/loss": {"base": 2.3456, "sft": 1.987654, "dpo": 0.000123456}}})
    labels = [(float(x), t) for x, t in re.findall(r'<text x="([\d.]+)"[^>]*font-size="9">([^<]+)</text>', svg)]
    assert [t for _, t in labels] == ["1.25k", "1.19k", "1.25k", "2.35", "1.99", "0.000123"]
    for (xa, ta), (xb, tb) in zip(labels, labels[1:]):  # centred labels: half of each width between the centres
        assert xb - xa >= 5.4 * (len(ta) + len(tb)) / 2, (ta, tb)


def test_tick_labels_get_the_digits_that_tell_neighbouring_ticks_apart():
    from posttrain.report.svg import tick_labels

    assert tick_labels([10.38, 10.41, 10.44, 10.47, 10.5]) == ["10.38", "10.41", "10.44", "10.47", "10.5"]
    assert tick_labels([0, 1.5, 3, 4.5, 6]) == ["0", "1.5", "3", "4.5", "6"]  # 3 digits when they suffice
    assert tick_labels([1.00001, 1.00002]) == ["1", "1"]  # past 5 digits: left as they are, never wider
