"""The gallery site in a real browser (issue 12, item 4): Debian's headless chromium opens the
generated index.html from disk, runs its script, and the test reads the rendered DOM — every cell
with its scores, sorting and filtering driven through the URL hash, the compare view, and a prompt
carrying markup that must show as text and run nothing. A screenshot is saved as a test artefact
(``artifacts/gallery.png``, git-ignored, and the test's tmp folder).

CI (.ci/run) installs chromium; elsewhere the browser tests skip when it is missing."""

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from flowrl import TrainConfig
from flowrl.rewards.digits import DigitsJudge
from flowrl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "assets" / "configs" / "digits.yaml"
ATTACK = "<script>document.body.dataset.pwned='1'</script><img src=x onerror=\"document.body.dataset.pwned='2'\"> & </script> \u2028"
EVAL_PROMPTS = ["a 3 left of a 7", "two 5s", "a 1 above a 4", ATTACK]


class LenientDigits(DigitsJudge):
    """The digits judge, scoring prompts outside its grammar 0 instead of raising (so a prompt
    carrying markup can sit in the evaluation set)."""

    def __call__(self, images, prompts, meta=None):
        from flowrl.digits_data import parse_prompt

        ok = []
        for p in prompts:
            try:
                parse_prompt(p)
                ok.append(True)
            except ValueError:
                ok.append(False)
        safe = [p if good else "a 0" for p, good in zip(prompts, ok)]
        out = super().__call__(images, safe, meta)
        mask = torch.tensor(ok, dtype=torch.float32)
        return {k: v * mask for k, v in out.items()}


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI installs it in .ci/run (apt-get install -y chromium).")
    pytest.skip("chromium is not installed (apt-get install -y chromium); the browser test needs it")


def _chromium(url: str, tmp_path: Path, *, screenshot: Path | None = None) -> str:
    """Load ``url`` headless, let its scripts run (virtual time), and return the DOM (or screenshot)."""
    profile = tmp_path / f"profile-{os.getpid()}-{len(list(tmp_path.glob('profile-*')))}"
    args = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--allow-file-access-from-files"]
    args += [f"--screenshot={screenshot}", "--window-size=1280,1000", url] if screenshot else ["--dump-dom", url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class _Grid(HTMLParser):
    """Rows (in DOM order) of the rendered table: data-row, hidden?, prompt text, cells with scores."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.body: dict = {}
        self.title = ""
        self._in: list[str] = []
        self.compare_hidden = None
        self.compare_sides = 0
        self.scripts = 0
        self.table_done = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "body":
            self.body = a
        if tag == "script":
            self.scripts += 1
        if self.table_done:
            pass
        elif tag == "tr" and "row" in cls:
            self.rows.append({"row": int(a["data-row"]), "hidden": "hidden" in cls, "prompt": "", "cells": [], "markup": []})
        elif self.rows and tag == "td" and "cell" in cls:
            self.rows[-1]["cells"].append({"col": int(a["data-col"]), "scores": {}, "images": 0})
        elif self.rows and tag == "div" and "score" in cls and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1]["scores"][a["data-reward"]] = a["data-value"]
        elif self.rows and tag == "img" and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1]["images"] += 1
        elif self.rows and tag == "div" and "prompt" in cls:
            self._in.append("prompt")
            return
        elif self._in and self._in[-1] == "prompt":
            self.rows[-1]["markup"].append(tag)  # an element inside a prompt: markup was parsed
        if tag == "div" and a.get("id") == "compare":
            self.compare_hidden = "hidden" in a
        if tag == "div" and "side" in cls:
            self.compare_sides += 1
        if tag == "title":
            self._in.append("title")

    def handle_endtag(self, tag):
        if tag == "tbody":
            self.table_done = True
        if self._in and tag in ("div", "title") and (tag == "title") == (self._in[-1] == "title"):
            self._in.pop()

    def handle_data(self, data):
        if self._in and self._in[-1] == "prompt":
            self.rows[-1]["prompt"] += data
        elif self._in and self._in[-1] == "title":
            self.title += data


def _parse(dom: str) -> _Grid:
    g = _Grid()
    g.feed(dom)
    return g


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A short digits run (LoRA + EMA, a checkpoint every iteration) and its gallery with --checkpoints."""
    from flowrl.gallery import build_gallery

    base = tmp_path_factory.mktemp("gallery")
    cfg = TrainConfig.from_yaml(CONFIG).override([
        f"train.output_dir={base / 'run'}", "train.iterations=2", "train.save_every=1", "train.prompts_per_iteration=2",
        "train.num_generations=4", "train.train_batch_size=8", "train.eval_every=0", "train.progress=false",
        "train.eval_samples_per_prompt=2", f"train.eval_prompts={json.dumps(EVAL_PROMPTS)}",
        "train.lora_rank=4", "train.lora_alpha=4", "train.learning_rate=3e-3",
        "reward.rewards=" + json.dumps({"tests.test_gallery:LenientDigits": {"weight": 1.0, "component": "prob"}}),
    ])
    Trainer(cfg).train()
    index = build_gallery([base / "run"], base / "site", intermediate=True)
    data = json.loads(_embedded(index.read_text()))
    return index, data


def _embedded(page: str) -> str:
    start = page.index('<script type="application/json" id="gallery-data">') + len('<script type="application/json" id="gallery-data">')
    return page[start : page.index("</script>", start)]


def test_page_is_self_contained_and_escapes_untrusted_text(site):
    index, data = site
    page = index.read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    for m in (index.parent / "media").iterdir():
        assert f"media/{m.name}" in page
    assert ATTACK not in page and "<script>document" not in page
    embedded = _embedded(page)
    assert "<" not in embedded and ">" not in embedded and "\u2028" not in embedded
    assert data["rows"][3]["prompt"] == ATTACK  # the JSON still carries the exact text
    assert [c["title"] for c in data["columns"]][0] == "base model"
    assert data["columns"][1]["iteration"] == 1 and data["columns"][2]["iteration"] == 2 and data["columns"][2]["ema"]


def test_every_cell_is_rendered_with_its_scores_in_a_browser(site, tmp_path):
    index, data = site
    g = _parse(_chromium(index.as_uri(), tmp_path))
    assert g.body.get("data-ready") == "1"  # the page's script ran
    assert "data-pwned" not in g.body  # ... and the prompt's script and onerror did not
    assert g.title == "flowrl gallery"
    assert [r["row"] for r in g.rows] == [0, 1, 2, 3] and not any(r["hidden"] for r in g.rows)
    rewards = ["digits/correct", "digits/prob"]
    for r in g.rows:
        assert [c["col"] for c in r["cells"]] == [0, 1, 2]  # base, checkpoint iter 1, final weights
        for c in r["cells"]:
            assert c["images"] == 2  # 2 samples per prompt
            assert list(c["scores"]) == rewards
            for v in c["scores"].values():
                float(v)  # a number, not "n/a"
    row = g.rows[3]
    assert row["prompt"] == ATTACK and row["markup"] == []  # shown as text: no element was parsed from it
    for r, d in zip(g.rows, data["rows"]):
        for c, dc in zip(r["cells"], d["cells"]):
            assert float(c["scores"]["digits/prob"]) == pytest.approx(dc["scores"]["digits/prob"], abs=5e-4)


def test_sorting_and_filtering_through_the_url_hash(site, tmp_path):
    index, data = site
    probs = [r["cells"][0]["scores"]["digits/prob"] for r in data["rows"]]
    want_desc = sorted(range(4), key=lambda i: (-probs[i], i))
    want_asc = sorted(range(4), key=lambda i: (probs[i], i))
    assert want_asc[0] == 3 and want_asc != [0, 1, 2, 3]  # the markup prompt scores 0: sorting moves it first
    desc = _parse(_chromium(index.as_uri() + "#sort=v:0:digits/prob&order=desc", tmp_path))
    asc = _parse(_chromium(index.as_uri() + "#sort=v:0:digits/prob&order=asc", tmp_path))
    assert [r["row"] for r in desc.rows] == want_desc
    assert [r["row"] for r in asc.rows] == want_asc
    change = [r["cells"][2]["delta"]["digits/prob"] for r in data["rows"]]
    by_change = _parse(_chromium(index.as_uri() + "#sort=d:2:digits/prob", tmp_path))
    assert [r["row"] for r in by_change.rows] == sorted(range(4), key=lambda i: (-change[i], i))
    filtered = _parse(_chromium(index.as_uri() + "#q=two", tmp_path))
    assert [r["row"] for r in filtered.rows if not r["hidden"]] == [1]
    by_score = _parse(_chromium(index.as_uri() + "#fkey=v:0:digits/prob&fmin=0.0001", tmp_path))
    assert 3 not in [r["row"] for r in by_score.rows if not r["hidden"]]  # the markup prompt scores 0


def test_compare_view_and_screenshot(site, tmp_path):
    index, _ = site
    g = _parse(_chromium(index.as_uri() + "#compare=0.0,0.2", tmp_path))
    assert g.compare_hidden is False and g.compare_sides == 2
    closed = _parse(_chromium(index.as_uri(), tmp_path))
    assert closed.compare_hidden is True and closed.compare_sides == 0
    shot = tmp_path / "gallery.png"
    _chromium(index.as_uri() + "#sort=d:2:digits/prob", tmp_path, screenshot=shot)
    from PIL import Image

    im = Image.open(shot).convert("L")
    assert im.size == (1280, 1000)
    lo, hi = im.getextrema()
    assert hi - lo > 100  # something was drawn, not a blank page
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copyfile(shot, artifacts / "gallery.png")


def test_video_cells_and_categories_without_a_browser(tmp_path):
    """write_site on hand-made results: video samples become players (mp4) or animated WebP,
    categories reach the filter, and NaN scores show as n/a."""
    from flowrl import runs
    from flowrl.gallery import write_site

    def result(j, scale):
        table = torch.tensor([[0.5 * scale], [float("nan")], [0.25 * scale], [0.75 * scale]])
        w = runs.Weights("base") if j == 0 else runs.Weights("lora", Path("x/lora"), run="x", iteration=5)
        return runs.EvalResult(w, {}, table, ["r"], ["p <i>0</i>", "p1"], [{"category": "a&b"}, {"category": "c"}], 2,
                               outputs=torch.rand(4, 3, 3, 8, 8))  # 4 videos of 3 frames
    index = write_site([result(0, 1.0), result(1, 2.0)], [], tmp_path / "site")
    page = index.read_text()
    media = sorted(p.suffix for p in (tmp_path / "site" / "media").iterdir() if ".poster" not in p.name)
    assert len(media) == 8 and set(media) <= {".mp4", ".webp"}
    if ".mp4" in media:
        assert page.count("<video") == 8 and "controls muted loop" in page
    else:
        assert page.count('.webp"') >= 8
    assert '<option value="a&amp;b">a&amp;b</option>' in page and "p &lt;i&gt;0&lt;/i&gt;" in page
    assert 'data-value="n/a"' not in page  # a prompt's mean ignores its failed sample ...
    # p0: base (0.5, NaN) → 0.5, tuned (1.0, NaN) → 1.0; p1: base (0.25, 0.75) → 0.5, tuned → 1.0
    assert page.count('r <b>1.000</b> <span class="delta up">+0.500</span>') == 2
