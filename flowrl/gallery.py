"""Evaluation artefacts: an HTML gallery of runs (the image grids, before/after comparisons and
reward curves it draws live in :mod:`flowrl.reporting`, re-exported here)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl.reporting import (  # noqa: F401  (re-exported: the plotting helpers lived here)
    _to_pil, _wrap, before_after_grid, image_grid, labeled_table, plot_reward_curve, save_image, save_labeled_grid,
)

# ------------------------------------------------------------------------ the static site
def json_for_script(data: Any) -> str:
    """JSON safe to embed in ``<script type="application/json">``: ``<``, ``>`` and ``&`` are
    written as ``\\u003c`` etc. (so neither ``</script>`` nor ``<!--`` can end or change the block),
    non-ASCII as ``\\uXXXX`` (U+2028/U+2029 included); NaN/inf become null."""
    import json

    text = json.dumps(_finite(data), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(x: Any) -> Any:
    import math

    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Tensor):
        return _finite(x.tolist())
    return str(x)


def _save_media(sample: Any, stem: Path) -> tuple[str, int, int] | None:
    """Write one sample under ``stem`` (suffix chosen here): image → PNG, video ``[F, C, H, W]`` →
    mp4/animated WebP (through :mod:`flowrl.media` when present); text → None (shown inline).
    Returns ``(file name, height, width)``."""
    if not isinstance(sample, Tensor):
        return None
    if sample.dim() == 4:  # a video
        try:
            from flowrl import media  # the video helpers, when installed
        except ImportError:
            media = None
        writer = getattr(media, "save_video", None) if media is not None else None
        if writer is not None:  # mp4 when an H.264 encoder is installed, else animated WebP
            written = writer(sample, stem.with_suffix(".mp4"))
            path = Path(written["video"] if isinstance(written, dict) else written)
            return path.name, int(sample.shape[-2]), int(sample.shape[-1])  # (+ <stem>.poster.png, the first frame)
        frames = [_to_pil(f, 1) for f in sample]
        path = stem.with_suffix(".webp")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0, lossless=True)
        return path.name, int(sample.shape[-2]), int(sample.shape[-1])
    save_image(sample.float(), stem.with_suffix(".png"))
    return stem.with_suffix(".png").name, int(sample.shape[-2]), int(sample.shape[-1])


def _prompt_rows(config: Any) -> list[tuple[str, dict]]:
    """The evaluation prompts of ``config`` with their metadata (when prompt sources carry it)."""
    from flowrl import prompts as P

    spec, column = config.train.eval_prompts, getattr(config.train, "prompt_column", "prompt")
    loader = getattr(P, "load_prompt_set", None)
    if loader is not None:
        ps = loader(spec, field="train.eval_prompts", column=column)
        return list(zip(ps.prompts, ps.metadata))
    return [(p, {}) for p in P.load_prompts(spec, field="train.eval_prompts")]


def _redacted_yaml(text: str) -> str:
    """A run's config as shown on the page: secrets (``api_key``, ``token``...) redacted, also in
    records written before flowrl redacted them."""
    import yaml

    from flowrl.secrets import redact

    try:
        return yaml.safe_dump(redact(yaml.safe_load(text)), sort_keys=False)
    except yaml.YAMLError:
        return "(unreadable config.yaml)"


def build_gallery(run_dirs: Sequence[str | Path], out: str | Path, *, config: str | Path | None = None, overrides: Sequence[str] = (),
                  loras: Sequence[str | Path] = (), checkpoints: Sequence[str | Path] = (), intermediate: bool = False,
                  prompts: Sequence[str] | None = None, seed: int | None = None, samples_per_prompt: int | None = None,
                  max_prompts: int | None = None) -> Path:
    """Write the comparison site ``out/index.html`` (see :func:`write_site`) for ``run_dirs``.

    Columns: the base model (the first run's), each run's evaluated weights, with ``intermediate``
    each run's earlier checkpoints, then every extra ``loras`` / ``checkpoints`` folder. Every
    column samples the same prompts with the same evaluation settings (the first run's, or the
    given ``prompts`` / ``seed`` / ``samples_per_prompt``) and is scored by the first run's rewards,
    so cells in a row start from the same noise and their scores are comparable."""
    import dataclasses

    from flowrl import runs as R
    from flowrl.config import ConfigError, TrainConfig

    run_list = [R.load_run(d) for d in run_dirs]
    extra_dirs = [Path(p).parent for p in loras] + [Path(p).parents[1] for p in checkpoints]
    if not run_list:  # a run's own lora/ or checkpoint names the run
        owner = next((d for d in extra_dirs if (d / "config.yaml").is_file()), None)
        if owner is not None and config is None:
            ref = R.load_run(owner)
        else:
            ref = R.Run.from_config(TrainConfig.from_yaml(config) if config else TrainConfig())
    else:
        ref = run_list[0]
    if config is not None and run_list:
        ref = dataclasses.replace(ref, config=TrainConfig.from_yaml(config))
    cfg = ref.config.override(list(overrides)) if overrides else ref.config
    if prompts is None and cfg.train.eval_prompts is None:
        cfg = R.with_eval_overrides(cfg, prompts=cfg.train.prompts)
    cfg = R.with_eval_overrides(cfg, prompts=list(prompts) if prompts else None, seed=seed, samples_per_prompt=samples_per_prompt)
    if max_prompts is not None:
        rows = _prompt_rows(cfg)[:max_prompts]
        column = getattr(cfg.train, "prompt_column", "prompt")
        cfg = R.with_eval_overrides(cfg, prompts=[{**m, column: p} if m else p for p, m in rows])

    def column_config(run: Any) -> Any:
        """The run's model and weights, the reference's evaluation settings and rewards."""
        c = run.config
        t = dataclasses.replace(c.train, eval_prompts=cfg.train.eval_prompts, seed=cfg.train.seed,
                                eval_samples_per_prompt=cfg.train.eval_samples_per_prompt)
        if hasattr(cfg.train, "prompt_column"):
            t = dataclasses.replace(t, prompt_column=cfg.train.prompt_column)
        return dataclasses.replace(c, train=t, reward=cfg.reward, sampler=dataclasses.replace(c.sampler, eval_num_steps=cfg.sampler.eval_num_steps))

    columns: list[tuple[Any, Any, Any]] = [(ref, ref.base_weights(), cfg)]
    for run in run_list:  # earlier checkpoints first (with --checkpoints), then the evaluated weights
        if intermediate:
            columns += [(run, w, column_config(run)) for w in run.intermediate_weights()]
        columns.append((run, run.evaluated_weights(), column_config(run)))
    for p in loras:
        owner = R.load_run(Path(p).parent) if (Path(p).parent / "config.yaml").is_file() else ref
        columns.append((owner, owner.lora_weights(p), column_config(owner)))
    for p in checkpoints:
        owner = R.load_run(Path(p).parents[1]) if (Path(p).parents[1] / "config.yaml").is_file() else ref
        columns.append((owner, owner.checkpoint_weights(p), column_config(owner)))
    if cfg.train.eval_prompts is None:
        raise ConfigError("no prompts to show: the run has no train.eval_prompts; give --prompt.")
    results = [R.evaluate(run, w, config=c, keep_outputs=True) for run, w, c in columns]
    shown_runs = run_list or ([ref] if ref.dir is not None else [])
    return write_site(results, shown_runs, out, settings=R.Run(cfg).eval_settings, reported=[run.reported(w) for run, w, _ in columns])


def write_site(results: Sequence[Any], runs: Sequence[Any], out: str | Path, *, settings: dict | None = None,
               reported: Sequence[dict | None] | None = None) -> Path:
    """Write ``out/index.html`` and ``out/media/`` from evaluation results (one per column, the first
    the base) and the runs' curves and configs (``out/runs/``). Self-contained: relative paths,
    no network; prompts and metadata are escaped everywhere (HTML text, attributes, embedded JSON)."""
    import shutil

    out = Path(out)
    (out / "media").mkdir(parents=True, exist_ok=True)
    base = results[0]
    names = list(base.names)
    k = base.samples_per_prompt
    category = None
    try:
        from flowrl.runs import category_key, mean_ci95

        category = category_key(base.metadata)
    except ImportError:  # pragma: no cover
        pass
    cols = []
    for j, r in enumerate(results):
        per_prompt = r.per_prompt()
        agg = {}
        for i, n in enumerate(r.names):
            mean = float(r.table[:, i].nanmean())
            _, ci, _ = mean_ci95(per_prompt[:, i])
            b = base.names.index(n) if n in base.names else None
            delta = mean - float(base.table[:, b].nanmean()) if b is not None and j > 0 else None
            agg[n] = {"mean": mean, "ci95": ci, "delta": delta}
        w = r.weights
        cols.append({"title": "base model" if j == 0 else w.title, "run": w.run, "kind": w.kind, "iteration": w.iteration,
                     "ema": w.ema, "path": str(w.path) if w.path is not None else None, "aggregate": agg,
                     "reported": (reported[j] if reported else None) or None})
    rows = []
    base_pp = base.per_prompt()
    for i, prompt in enumerate(base.prompts):
        meta = base.metadata[i] if i < len(base.metadata) else {}
        cells = []
        for j, r in enumerate(results):
            pp = r.per_prompt()
            media, texts = [], []
            for s in range(k):
                idx = i * k + s
                sample = r.outputs[idx] if r.outputs is not None else None
                if isinstance(sample, Tensor):
                    saved = _save_media(sample, out / "media" / f"c{j}_p{i}_s{s}")
                    if saved:
                        media.append({"src": f"media/{saved[0]}", "h": saved[1], "w": saved[2]})
                elif sample is not None:
                    texts.append(str(sample))
            scores = {n: float(pp[i, c]) for c, n in enumerate(r.names)}
            deltas = {n: (scores[n] - float(base_pp[i, base.names.index(n)])) if j > 0 and n in base.names else None for n in r.names}
            samples = {n: [float(x) for x in r.table[i * k : (i + 1) * k, c]] for c, n in enumerate(r.names)}
            cells.append({"media": media, "text": texts, "scores": scores, "delta": deltas, "samples": samples})
        rows.append({"prompt": prompt, "category": None if category is None else meta.get(category), "metadata": meta, "cells": cells})
    run_info = []
    for q, run in enumerate(runs):
        info = {"name": run.name, "dir": str(run.dir), "curve": None, "config": ""}
        if run.dir is not None:
            dest = out / "runs" / f"{q}"
            dest.mkdir(parents=True, exist_ok=True)
            curve = run.dir / "reward_curve.png"
            try:
                if curve.is_file():
                    shutil.copyfile(curve, dest / "reward_curve.png")
                elif run.history:
                    plot_reward_curve([r for r in run.history if "reward/mean" in r], dest / "reward_curve.png")
                if (dest / "reward_curve.png").is_file():
                    info["curve"] = f"runs/{q}/reward_curve.png"
            except Exception as exc:  # a curve is a convenience: never lose the page for it
                print(f"[flowrl] no reward curve for {run.dir}: {exc}")
            cfg_path = run.dir / "config.yaml"
            info["config"] = _redacted_yaml(cfg_path.read_text() if cfg_path.is_file() else run.config.to_yaml())
        run_info.append(info)
    data = {"columns": cols, "rewards": names, "rows": rows, "runs": run_info, "settings": settings or {},
            "category_column": category, "samples_per_prompt": k}
    path = out / "index.html"
    path.write_text(_render_page(data, out), encoding="utf-8")
    return path


def _fmt(v: Any, signed: bool = False) -> str:
    import math

    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if signed:
        return "±0.000" if abs(v) < 5e-4 else f"{v:+.3f}"
    return f"{v:.3f}"


def _render_page(data: dict, out_dir: Path) -> str:
    """The page: controls, a header row with each column's aggregate, one table row per prompt
    (rendered here, so the page is complete before any script runs), the runs' curves and
    configs, and the script for sorting, filtering and comparing (state in the URL hash)."""
    e = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    cols, names, rows = data["columns"], data["rewards"], data["rows"]
    head = ['<th class="prompt-col">prompt</th>']
    for j, c in enumerate(cols):
        agg = []
        for n in names:
            a = c["aggregate"].get(n, {})
            ci = "" if a.get("ci95") is None else f" ± {_fmt(a['ci95'])}"
            d = a.get("delta")
            delta = f' <span class="delta {"up" if d and d > 0 else "down" if d and d < 0 else ""}">{e(_fmt(d, True))}</span>' if d is not None else ""
            agg.append(f'<div class="agg" data-reward="{e(n)}" data-value="{e(_fmt(a.get("mean")))}">{e(n)} <b>{e(_fmt(a.get("mean")))}</b>{e(ci)}{delta}</div>')
        head.append(f'<th class="col-head" data-col="{j}"><div class="col-title">{e(c["title"])}</div>{"".join(agg)}</th>')
    body = []
    for i, r in enumerate(rows):
        cat = r.get("category")
        meta = "".join(f"<div class=meta>{e(key)}: {e(val)}</div>" for key, val in (r.get("metadata") or {}).items())
        tds = [f'<td class="prompt-cell"><div class="prompt">{e(r["prompt"])}</div>{meta}</td>']
        for j, c in enumerate(r["cells"]):
            many = len(c["media"]) > 1
            media = []
            for m in c["media"]:
                small = m["h"] < 128
                scale = max(1, (64 if many else 128) // max(m["h"], 1)) if small else 1
                w = m["w"] * scale if small else min(m["w"], 256 if not many else 128)
                cls = "pix" if small else "thumb"
                if m["src"].endswith((".mp4", ".webm")):
                    poster = m["src"].rsplit(".", 1)[0] + ".poster.png"
                    has_poster = f' poster="{e(poster)}"' if (out_dir / poster).is_file() else ""
                    media.append(f'<video class="{cls}" src="{e(m["src"])}" width="{w}"{has_poster} controls muted loop playsinline></video>')
                elif small:  # shown enlarged, pixelated; a click picks the cell for comparison
                    media.append(f'<img class="{cls}" src="{e(m["src"])}" width="{w}" alt="sample">')
                else:  # shown as a thumbnail, linked at full size
                    media.append(f'<a href="{e(m["src"])}" target="_blank"><img class="{cls}" src="{e(m["src"])}" width="{w}" alt="sample"></a>')
            media += [f"<pre class=text>{e(t)}</pre>" for t in c["text"]]
            scores = []
            for n in names:
                v, d = c["scores"].get(n), c["delta"].get(n)
                ds = f' <span class="delta {"up" if d and d > 0 else "down" if d and d < 0 else ""}">{e(_fmt(d, True))}</span>' if d is not None else ""
                scores.append(f'<div class="score" data-reward="{e(n)}" data-value="{e(_fmt(v))}">{e(n)} <b>{e(_fmt(v))}</b>{ds}</div>')
            tds.append(f'<td class="cell" data-row="{i}" data-col="{j}" title="click to compare"><div class="media">{"".join(media)}</div>{"".join(scores)}</td>')
        body.append(f'<tr class="row" data-row="{i}" data-category="{e("" if cat is None else cat)}">{"".join(tds)}</tr>')
    cats = sorted({str(r["category"]) for r in rows if r.get("category") is not None})
    sort_opts = ['<option value="index">prompt order</option>', '<option value="prompt">prompt text</option>']
    for j, c in enumerate(cols):
        for n in names:
            sort_opts.append(f'<option value="v:{j}:{e(n)}">{e(n)} — {e(c["title"])}</option>')
            if j > 0:
                sort_opts.append(f'<option value="d:{j}:{e(n)}">change in {e(n)} — {e(c["title"])}</option>')
    runs_html = []
    for q, info in enumerate(data["runs"]):
        curve = f'<img class="curve" src="{e(info["curve"])}" alt="reward curve">' if info.get("curve") else "<p>(no reward curve)</p>"
        runs_html.append(f'<section class="run"><h3>run {e(info["name"])} <small>{e(info["dir"])}</small></h3>{curve}'
                         f'<details><summary>resolved config</summary><pre class="config">{e(info["config"])}</pre></details></section>')
    s = data.get("settings") or {}
    settings = ", ".join(f"{e(key)} {e(val)}" for key, val in s.items() if key != "eval_prompts")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>flowrl gallery</title>
<style>{_CSS}</style></head>
<body>
<h1>flowrl gallery</h1>
<p class="settings">{len(rows)} prompts × {data['samples_per_prompt']} samples per column; the same noise in every column ({settings}). Scores: mean over a prompt's samples; change against the base in color. Header: mean over all samples ± 95% CI over prompts.</p>
<div id="controls">
 <label>prompt <input id="q" type="search" placeholder="filter prompt text"></label>
 <label>category <select id="cat"><option value="">all</option>{"".join(f'<option value="{e(c)}">{e(c)}</option>' for c in cats)}</select></label>
 <label>sort by <select id="sort">{"".join(sort_opts)}</select></label>
 <label><select id="order"><option value="desc">high → low</option><option value="asc">low → high</option></select></label>
 <label>show where <select id="fkey"><option value="">(no score filter)</option>{"".join(o for o in sort_opts[2:])}</select></label>
 <label>≥ <input id="fmin" type="number" step="any" size="6"></label>
 <label>≤ <input id="fmax" type="number" step="any" size="6"></label>
 <span id="count"></span>
</div>
<table id="grid"><thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(body)}</tbody></table>
<div id="compare" hidden><div class="cmp-bar">comparing two cells <button id="cmp-close" type="button">close</button></div><div id="cmp-body"></div></div>
<h2>runs</h2>{"".join(runs_html)}
<script type="application/json" id="gallery-data">{json_for_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
body{font-family:system-ui,sans-serif;margin:12px;color:#222}
h1{font-size:20px;margin:4px 0}
.settings{color:#555;font-size:13px}
#controls{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd;z-index:2;font-size:13px}
#controls label{margin-right:10px}
table{border-collapse:collapse}
th,td{border:1px solid #ddd;padding:4px;vertical-align:top;font-size:12px}
th{background:#f6f6f6}
#controls select{max-width:360px}
.col-title{font-weight:600;max-width:280px}
.prompt-cell{max-width:220px}
.prompt{font-size:13px;white-space:pre-wrap;word-break:break-word}
.meta{color:#777}
.cell{cursor:pointer}
.cell.picked{outline:3px solid #1a73e8}
.media{display:flex;gap:2px;flex-wrap:wrap}
img.pix,video.pix{image-rendering:pixelated;image-rendering:crisp-edges}
.delta.up{color:#127a12}.delta.down{color:#b3261e}
.text{max-width:320px;white-space:pre-wrap;font-size:11px}
tr.hidden{display:none}
#compare{position:fixed;inset:5% 5%;background:#fff;border:2px solid #333;overflow:auto;z-index:5;padding:10px;box-shadow:0 0 40px rgba(0,0,0,.4)}
#cmp-body{display:flex;gap:24px}
#cmp-body .side{flex:1}
#cmp-body img{image-rendering:pixelated;width:100%;max-width:512px}
.curve{max-width:600px}
.config{max-height:400px;overflow:auto;background:#f8f8f8;padding:6px}
"""

# Everything the script shows comes from the embedded JSON through textContent / attributes,
# never innerHTML, so no prompt or metadata is ever parsed as markup.
_JS = r"""
(function(){
 const data = JSON.parse(document.getElementById('gallery-data').textContent);
 const tbody = document.querySelector('#grid tbody');
 const rows = Array.from(tbody.querySelectorAll('tr.row'));
 const $ = id => document.getElementById(id);
 function value(key, i){
  if(key === 'index') return i;
  if(key === 'prompt') return data.rows[i].prompt.toLowerCase();
  const m = /^([vd]):(\d+):(.*)$/.exec(key); if(!m) return null;
  const cell = data.rows[i].cells[+m[2]]; if(!cell) return null;
  const v = m[1] === 'v' ? cell.scores[m[3]] : cell.delta[m[3]];
  return (v === null || v === undefined) ? null : v;
 }
 function readHash(){
  const p = new URLSearchParams(location.hash.slice(1));
  return {q:p.get('q')||'', cat:p.get('cat')||'', sort:p.get('sort')||'index', order:p.get('order')||(p.get('sort')?'desc':'asc'),
          fkey:p.get('fkey')||'', fmin:p.get('fmin')||'', fmax:p.get('fmax')||'', compare:p.get('compare')||''};
 }
 function writeHash(){
  const p = new URLSearchParams();
  const s = {q:$('q').value, cat:$('cat').value, sort:$('sort').value, order:$('order').value, fkey:$('fkey').value, fmin:$('fmin').value, fmax:$('fmax').value};
  for(const k in s){ if(s[k] && !(k==='sort' && s[k]==='index')) p.set(k, s[k]); }
  if(picked.length) p.set('compare', picked.map(c => c.join('.')).join(','));
  history.replaceState(null, '', '#' + p.toString());
 }
 let picked = [];
 function apply(st){
  $('q').value = st.q; $('cat').value = st.cat; $('sort').value = st.sort; $('order').value = st.order;
  $('fkey').value = st.fkey; $('fmin').value = st.fmin; $('fmax').value = st.fmax;
  const order = rows.map((r, i) => i);
  const dir = st.order === 'asc' ? 1 : -1;
  order.sort((a, b) => {
   const va = value(st.sort, a), vb = value(st.sort, b);
   if(va === null && vb === null) return a - b;
   if(va === null) return 1; if(vb === null) return -1;
   if(va < vb) return -dir; if(va > vb) return dir; return a - b;
  });
  const q = st.q.toLowerCase(), lo = st.fmin === '' ? null : parseFloat(st.fmin), hi = st.fmax === '' ? null : parseFloat(st.fmax);
  let shown = 0;
  for(const i of order){
   const r = rows[i], d = data.rows[i];
   let ok = (!q || d.prompt.toLowerCase().includes(q)) && (!st.cat || String(d.category) === st.cat);
   if(ok && st.fkey){ const v = value(st.fkey, i); ok = v !== null && (lo === null || v >= lo) && (hi === null || v <= hi); }
   r.classList.toggle('hidden', !ok); if(ok) shown++;
   tbody.appendChild(r);
  }
  $('count').textContent = shown + ' of ' + rows.length + ' prompts';
  picked = st.compare ? st.compare.split(',').map(s => s.split('.').map(Number)).filter(c => c.length === 2 && data.rows[c[0]] && data.rows[c[0]].cells[c[1]]).slice(0, 2) : [];
  showPicked();
 }
 function panel(rc){
  const [i, j] = rc, cell = data.rows[i].cells[j], col = data.columns[j];
  const side = document.createElement('div'); side.className = 'side';
  const h = document.createElement('h3'); h.textContent = col.title; side.appendChild(h);
  const p = document.createElement('div'); p.className = 'prompt'; p.textContent = data.rows[i].prompt; side.appendChild(p);
  for(const m of cell.media){
   const a = document.createElement('a'); a.href = m.src; a.target = '_blank';
   let el;
   if(/\.(mp4|webm)$/.test(m.src)){ el = document.createElement('video'); el.controls = true; el.muted = true; el.loop = true; }
   else { el = document.createElement('img'); el.alt = 'sample'; }
   el.src = m.src; a.appendChild(el); side.appendChild(a);
  }
  for(const t of cell.text){ const pre = document.createElement('pre'); pre.className = 'text'; pre.textContent = t; side.appendChild(pre); }
  for(const n of data.rewards){
   const d = document.createElement('div'); d.className = 'score';
   const v = cell.scores[n], dv = cell.delta[n];
   d.textContent = n + ' ' + (v === null || v === undefined ? 'n/a' : v.toFixed(3)) + (dv === null || dv === undefined ? '' : ' (' + (dv >= 0 ? '+' : '') + dv.toFixed(3) + ' vs base)');
   side.appendChild(d);
  }
  return side;
 }
 function showPicked(){
  document.querySelectorAll('td.cell.picked').forEach(c => c.classList.remove('picked'));
  for(const [i, j] of picked){ const td = document.querySelector('td.cell[data-row="' + i + '"][data-col="' + j + '"]'); if(td) td.classList.add('picked'); }
  const box = $('compare'), body = $('cmp-body');
  body.replaceChildren();
  if(picked.length === 2){ body.appendChild(panel(picked[0])); body.appendChild(panel(picked[1])); box.hidden = false; }
  else box.hidden = true;
 }
 tbody.addEventListener('click', ev => {
  if(ev.target.closest('a')) return;  // the image link opens the full-size file
  const td = ev.target.closest('td.cell'); if(!td) return;
  const rc = [+td.dataset.row, +td.dataset.col];
  const k = picked.findIndex(c => c[0] === rc[0] && c[1] === rc[1]);
  if(k >= 0) picked.splice(k, 1); else { if(picked.length === 2) picked = []; picked.push(rc); }
  showPicked(); writeHash();
 });
 $('cmp-close').addEventListener('click', () => { picked = []; showPicked(); writeHash(); });
 for(const id of ['q', 'cat', 'sort', 'order', 'fkey', 'fmin', 'fmax'])
  $(id).addEventListener('input', () => { writeHash(); apply(readHash()); });
 window.addEventListener('hashchange', () => apply(readHash()));
 apply(readHash());
 document.body.dataset.ready = '1';
})();
"""
