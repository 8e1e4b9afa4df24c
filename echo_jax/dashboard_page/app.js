// Live dashboard page: polls the JSON API and redraws uPlot charts in place.
// Every string from the server reaches the page through textContent or an attribute set by the DOM API, never
// through markup, so a run's text (events, sample transcripts) can never inject elements.
'use strict';

(() => {
  const POLL_MS = 1500;
  const MAX_POINTS = 2000;
  const EVENTS_SHOWN = 200;
  const RUN_COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf'];
  const KEY_COLORS = ['#0b3d91', '#1f77b4', '#2ca02c', '#bcbd22', '#ff7f0e', '#d62728', '#9467bd', '#8c564b'];
  const DASHES = [[], [6, 3], [2, 3], [10, 3, 2, 3], [1, 2]];
  const CHARTS = [
    {id: 'loss', title: 'Training loss (raw + smoothed)', keys: ['loss'], smooth: true},
    {id: 'eval', title: 'Eval loss per timestep', match: (k) => k === 'eval_loss' || k.startsWith('eval_loss_')},
    {id: 'lr', title: 'Learning rate', keys: ['lr']},
    {id: 'grad_norm', title: 'Gradient norm', keys: ['grad_norm']},
    {id: 'throughput', title: 'Throughput: samples/s (left), steps/s (right, dashed)',
     keys: ['samples_per_sec', 'steps_per_sec'], rightAxis: ['steps_per_sec']},
    {id: 'mfu', title: 'MFU', keys: ['mfu']},
    {id: 'data_wait', title: 'Data wait (fraction of step time)', keys: ['data_wait']},
    {id: 'skipped', title: 'Skipped samples (cumulative)', keys: ['skipped_samples'], stepped: true},
  ];

  const state = {
    runs: [],
    series: {},  // run index -> key -> {step, time, value}
    charts: {},  // chart id -> {plot, signature, box}
    samplesSignature: '',
    smoothing: 0.6,
    logScale: false,
    xMode: 'step',
    xRange: [0, 1],
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function fmtNumber(v) {
    if (typeof v === 'string') return v;  // 'nan', 'inf' or '-inf': the latest value logged was not finite
    if (v === null || v === undefined || !Number.isFinite(v)) return '–';
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(3);
    if (Number.isInteger(v)) return v.toLocaleString('en-US');
    return v.toPrecision(4);
  }

  // Axis ticks: as few characters as tell the value apart, so labels never get clipped.
  function fmtTick(v) {
    if (v === null || !Number.isFinite(v)) return '';
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1).replace('.0e', 'e');
    return String(Number(v.toPrecision(3)));
  }

  function fmtDuration(s) {
    if (s === null || s === undefined || !Number.isFinite(s)) return '–';
    s = Math.max(0, Math.round(s));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  function fmtTime(t) {
    if (!Number.isFinite(t)) return '–';
    return new Date(t * 1000).toLocaleString('en-GB', {hour12: false});
  }

  async function getJson(url) {
    const response = await fetch(url, {cache: 'no-store'});
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  // TensorBoard's smoothing: an exponential moving average debiased for its zero start.
  function smooth(values, weight) {
    const out = new Array(values.length);
    let last = 0, count = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v === null || !Number.isFinite(v)) { out[i] = null; continue; }
      last = last * weight + (1 - weight) * v;
      count++;
      out[i] = weight === 0 ? v : last / (1 - Math.pow(weight, count));
    }
    return out;
  }

  // Sorted by x, keeping the last value logged for a repeated x (a run resumed from a checkpoint repeats steps).
  function table(xs, ys) {
    const byX = new Map();
    for (let i = 0; i < xs.length; i++) byX.set(xs[i], ys[i]);
    const sortedX = Array.from(byX.keys()).sort((a, b) => a - b);
    return [sortedX, sortedX.map((x) => byX.get(x))];
  }

  function chartKeys(def, runKeys) {
    if (def.keys) return def.keys;
    return runKeys.filter(def.match).sort((a, b) => (a === 'eval_loss' ? -1 : b === 'eval_loss' ? 1 : a < b ? -1 : 1));
  }

  function requestedKeys(run) {
    const keys = new Set(['skipped_samples']);
    for (const def of CHARTS) for (const k of chartKeys(def, run.keys)) if (run.keys.includes(k)) keys.add(k);
    return Array.from(keys);
  }

  // Where the keys of a chart were logged non-finite: {x, value, label}. uPlot cannot draw NaN or infinity, so the
  // chart marks these steps with vertical lines instead of leaving a silent gap.
  function collectNonfinite(def) {
    const marks = [];
    for (const run of state.runs) {
      const data = state.series[run.index] || {};
      for (const key of chartKeys(def, run.keys)) {
        const nf = data[key] && data[key].nonfinite;
        if (!nf) continue;
        const xs = state.xMode === 'step' ? nf.step : nf.time;
        xs.forEach((x, i) => marks.push({x, value: nf.value[i], step: nf.step[i], label: `${run.name} ${key}`}));
      }
    }
    return marks;
  }

  function drawNonfinite(entry) {
    return (u) => {
      const ctx = u.ctx;
      const [lo, hi] = [u.scales.x.min, u.scales.x.max];
      ctx.save();
      ctx.strokeStyle = '#cf222e';
      ctx.fillStyle = '#cf222e';
      ctx.lineWidth = Math.max(1, devicePixelRatio);
      ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
      ctx.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
      ctx.textBaseline = 'top';
      let lastLabelX = -Infinity;
      for (const mark of entry.marks) {
        if (!(mark.x >= lo && mark.x <= hi)) continue;
        const x = Math.round(u.valToPos(mark.x, 'x', true));
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
        if (x - lastLabelX > 30 * devicePixelRatio) {  // one label per cluster of marks, so they stay readable
          ctx.fillText(mark.value, x + 2 * devicePixelRatio, u.bbox.top + 2 * devicePixelRatio);
          lastLabelX = x;
        }
      }
      ctx.restore();
    };
  }

  function nonfiniteSummary(marks) {
    const last = marks.reduce((a, m) => (a === null || m.step > a.step ? m : a), null);
    return `${marks.length} non-finite value${marks.length > 1 ? 's' : ''} (dashed red lines), ` +
           `the last ${last.label} ${last.value} at step ${fmtNumber(last.step)}`;
  }

  function collectSeries(def) {
    const out = [];
    const multiRun = state.runs.length > 1;
    for (const run of state.runs) {
      const data = state.series[run.index] || {};
      const keys = chartKeys(def, run.keys.concat(['skipped_samples']));
      keys.forEach((key, k) => {
        const s = data[key];
        if (!s || !s.value.length) return;
        const xs = state.xMode === 'step' ? s.step : s.time;
        const color = multiRun || keys.length === 1 ? RUN_COLORS[run.index % RUN_COLORS.length]
                                                     : KEY_COLORS[k % KEY_COLORS.length];
        let dash = multiRun ? DASHES[k % DASHES.length] : [];
        if (def.rightAxis && def.rightAxis.includes(key)) dash = [6, 3];
        const scale = def.rightAxis && def.rightAxis.includes(key) ? 'y2' : 'y';
        const [tx, ty] = table(xs, s.value);
        if (def.smooth) {
          out.push({label: `${run.name} ${key} (raw)`, color, dash, scale, alpha: 0.28, xs: tx, ys: ty});
          out.push({label: `${run.name} ${key} (smoothed)`, color, dash, scale, alpha: 1,
                    xs: tx, ys: smooth(ty, state.smoothing)});
        } else {
          out.push({label: multiRun || keys.length > 1 ? `${run.name} ${key}` : run.name,
                    color, dash, scale, alpha: 1, xs: tx, ys: ty});
        }
      });
    }
    return out;
  }

  function withAlpha(hex, alpha) {
    if (alpha >= 1) return hex;
    const n = parseInt(hex.slice(1), 16);
    return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
  }

  function chartBox(def) {
    let entry = state.charts[def.id];
    if (!entry) {
      const box = el('div', 'chart');
      box.id = `chart-${def.id}`;
      box.appendChild(el('h2', null, def.title));
      const empty = el('div', 'empty', 'No data yet.');
      box.appendChild(empty);
      const nonfinite = el('div', 'nonfinite-note');
      nonfinite.hidden = true;
      box.appendChild(nonfinite);
      const holder = el('div');
      box.appendChild(holder);
      $('charts').appendChild(box);
      entry = state.charts[def.id] = {box, empty, nonfinite, holder, plot: null, signature: '', marks: []};
    }
    return entry;
  }

  function plotWidth(entry) {
    return Math.max(300, entry.box.clientWidth - 24);
  }

  function updateXRange() {
    let lo = Infinity, hi = -Infinity;
    for (const byKey of Object.values(state.series)) {
      for (const s of Object.values(byKey)) {
        for (const part of [s, s.nonfinite || {step: [], time: []}]) {  // a run's last steps may all be non-finite
          const xs = state.xMode === 'step' ? part.step : part.time;
          for (const x of xs) { if (x < lo) lo = x; if (x > hi) hi = x; }
        }
      }
    }
    if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
    if (hi - lo < 1) hi = lo + 1;
    state.xRange = [lo, hi];
  }

  function renderChart(def) {
    const entry = chartBox(def);
    const series = collectSeries(def);
    const points = series.reduce((n, s) => n + s.ys.filter((v) => v !== null).length, 0);
    entry.marks = collectNonfinite(def);
    entry.box.dataset.points = String(points);
    entry.box.dataset.nonfinite = String(entry.marks.length);
    entry.box.dataset.lastX = series.length ? String(Math.max(...series.map((s) => s.xs[s.xs.length - 1]))) : '';
    entry.empty.hidden = points > 0;
    entry.empty.textContent = entry.marks.length ? 'No finite value yet.' : 'No data yet.';
    entry.nonfinite.hidden = !entry.marks.length;
    if (entry.marks.length) entry.nonfinite.textContent = nonfiniteSummary(entry.marks);
    if (!points) {
      if (entry.plot) { entry.plot.destroy(); entry.plot = null; entry.signature = ''; }
      return;
    }
    const log = state.logScale && def.id !== 'skipped';
    const joined = uPlot.join(series.map((s) => [s.xs, log ? s.ys.map((v) => (v > 0 ? v : null)) : s.ys]));
    const signature = JSON.stringify([series.map((s) => s.label), log, state.xMode]);
    if (entry.plot && entry.signature === signature) {
      entry.plot.setData(joined);
      return;
    }
    if (entry.plot) entry.plot.destroy();
    const usesRight = series.some((s) => s.scale === 'y2');
    const yScale = log ? {distr: 3, log: 10} : {};
    const opts = {
      width: plotWidth(entry),
      height: 230,
      // Every chart spans the same x range, so a sparse series (eval, skipped samples) lines up with the others.
      scales: {x: {time: state.xMode === 'time', range: () => state.xRange}, y: yScale, y2: yScale},
      series: [{label: state.xMode === 'step' ? 'step' : 'time'}].concat(series.map((s) => ({
        label: s.label, stroke: withAlpha(s.color, s.alpha), width: s.alpha < 1 ? 1 : 1.6, dash: s.dash,
        scale: s.scale, spanGaps: true, paths: def.stepped ? uPlot.paths.stepped({align: 1}) : undefined,
        value: (u, v) => fmtNumber(v),
      }))),
      axes: [
        {grid: {stroke: '#eef0f2'}},
        {grid: {stroke: '#eef0f2'}, size: 56, values: (u, vals) => vals.map(fmtTick)},
      ].concat(usesRight ? [{scale: 'y2', side: 1, grid: {show: false}, size: 56,
                               values: (u, vals) => vals.map(fmtTick)}] : []),
      legend: {live: true},
      // No drag-to-zoom: the next live update would reset it, which is more confusing than no zoom.
      cursor: {drag: {x: false, y: false}},
      hooks: {draw: [drawNonfinite(entry)]},
    };
    entry.holder.replaceChildren();
    entry.plot = new uPlot(opts, joined, entry.holder);
    entry.signature = signature;
  }

  function statusField(dl, name, value) {
    const field = el('div');
    field.appendChild(el('dt', null, name));
    field.appendChild(el('dd', null, value));
    dl.appendChild(field);
  }

  function processError(e) {
    const where = e.host ? `process ${e.process} (${e.host})` : `process ${e.process}`;
    const step = e.step === null || e.step === undefined ? '' : `, step ${fmtNumber(e.step)}`;
    const item = el('li');
    item.appendChild(el('div', 'error-head', `${where} stopped ${fmtTime(e.time)}${step}`));
    item.appendChild(el('div', 'error-message', e.message));
    return item;
  }

  // The errors that stopped processes, each written by the process itself: on a pod the first to fail usually holds
  // the cause, and the others' errors (a lost peer in a collective) are its consequences.
  function renderProcessErrors(card, run) {
    const errors = run.process_errors || [];
    const current = errors.filter((e) => !e.earlier_launch);
    const earlier = errors.filter((e) => e.earlier_launch);
    if (current.length) {
      const box = el('div', 'alert process-errors');
      box.appendChild(el('div', null, current.length > 1
          ? `${current.length} processes stopped with an error, in the order they stopped (the first usually holds ` +
            'the cause):'
          : '1 process stopped with an error:'));
      const list = el('ul');
      for (const e of current) list.appendChild(processError(e));
      box.appendChild(list);
      card.appendChild(box);
    }
    if (earlier.length) {
      const details = el('details', 'earlier-errors');
      details.appendChild(el('summary', null, `${earlier.length} error${earlier.length > 1 ? 's' : ''} of launches ` +
                                              'before the latest start'));
      const list = el('ul');
      for (const e of earlier) list.appendChild(processError(e));
      details.appendChild(list);
      card.appendChild(details);
    }
  }

  // The card's badge and its kind: 'alarm' (red), 'ended' (grey) or '' (live). A read error comes first: whatever
  // else the card shows is what was read before it. A run that is not training (finished, stopped) is never stale.
  function runBadge(run) {
    if (run.error) return ['READ ERROR', 'alarm'];
    if (run.loading) return ['loading…', ''];
    if (run.state === 'failed' || run.failed_processes > 0) return ['FAILED', 'alarm'];
    if (run.state === 'finished' || run.state === 'stopped') return [run.state, 'ended'];
    return run.stale ? ['STALE', 'alarm'] : ['live', ''];
  }

  function renderStatus(now) {
    const strip = $('status');
    strip.replaceChildren();
    for (const run of state.runs) {
      const [badge, kind] = runBadge(run);
      const card = el('div', `run-card${kind === 'alarm' ? ' stale' : ''}`);
      card.id = `run-${run.index}`;
      card.style.setProperty('--run-color', RUN_COLORS[run.index % RUN_COLORS.length]);
      const title = el('div', 'title');
      title.appendChild(el('span', null, run.name));
      title.appendChild(el('span', kind === 'ended' ? 'badge ended' : 'badge', badge));
      card.appendChild(title);
      // A run directory that cannot be read would otherwise stay "loading…" (or show its last lines) with no reason.
      if (run.error) card.appendChild(el('div', 'alert read-error', `Cannot read the run directory: ${run.error}`));
      renderProcessErrors(card, run);
      const nonfinite = Object.keys(run.nonfinite || {}).sort();
      if (nonfinite.length) {
        card.appendChild(el('div', 'alert nonfinite', 'Latest value not finite: ' + nonfinite.map(
            (key) => `${key} ${run.latest[key]} at step ${fmtNumber(run.nonfinite[key])}`).join('; ')));
      }
      const dl = el('dl');
      const total = run.total_steps ? ` / ${fmtNumber(run.total_steps)}` : '';
      statusField(dl, 'Step', `${fmtNumber(run.step)}${total}`);
      statusField(dl, 'ETA', fmtDuration(run.eta_seconds));
      statusField(dl, 'Steps/s', fmtNumber(run.steps_per_sec));
      statusField(dl, 'Samples seen', fmtNumber(run.samples_seen));
      const ckpt = run.last_checkpoint;
      let ckptText = '–';
      if (ckpt && ckpt.step !== undefined && ckpt.step !== null) {
        ckptText = `step ${fmtNumber(ckpt.step)}`;
        if (Number.isFinite(ckpt.time)) ckptText += ` (${fmtDuration(now - ckpt.time)} ago)`;
      } else if (run.listed_checkpoint_step !== null && run.listed_checkpoint_step !== undefined) {
        ckptText = `step ${fmtNumber(run.listed_checkpoint_step)}`;
      }
      statusField(dl, 'Last checkpoint', ckptText);
      statusField(dl, 'Last metric', run.seconds_since_metric === null ? 'none yet'
                                                                       : `${fmtDuration(run.seconds_since_metric)} ago`);
      statusField(dl, 'Skipped samples', fmtNumber(run.skipped_samples));
      statusField(dl, 'Loss', fmtNumber(run.latest.loss));
      statusField(dl, 'Non-finite lines', fmtNumber(run.nonfinite_lines));
      statusField(dl, 'Bad lines', fmtNumber(run.bad_lines));
      card.appendChild(dl);
      strip.appendChild(card);
    }
  }

  function renderEvents(events) {
    const body = $('events').tBodies[0];
    body.replaceChildren();
    for (const e of events.slice(0, EVENTS_SHOWN)) {
      const row = el('tr', `event-${String(e.event).replace(/[^a-z_]/gi, '')}`);
      row.appendChild(el('td', null, fmtTime(e.time)));
      row.appendChild(el('td', null, e.run));
      row.appendChild(el('td', null, e.event));
      row.appendChild(el('td', null, e.step === undefined ? '' : e.step));
      const details = Object.keys(e).filter((k) => !['time', 'event', 'step', 'run'].includes(k))
          .map((k) => `${k}=${typeof e[k] === 'string' ? e[k] : JSON.stringify(e[k])}`).join('  ');
      row.appendChild(el('td', 'details', details));
      body.appendChild(row);
    }
    if (!events.length) {
      const row = el('tr');
      const cell = el('td', 'muted', 'No events yet.');
      cell.colSpan = 5;
      row.appendChild(cell);
      body.appendChild(row);
    }
  }

  function renderSamples(listings) {
    const signature = JSON.stringify(listings);
    if (signature === state.samplesSignature) return;  // rebuilding would stop audio that is playing
    state.samplesSignature = signature;
    const root = $('samples');
    root.replaceChildren();
    for (const {run, steps} of listings) {
      for (const {step, items} of steps) {
        const block = el('div', 'sample-step');
        block.appendChild(el('h3', null, `${run.name} · step ${fmtNumber(step)}`));
        const row = el('div', 'sample-row');
        for (const item of items) {
          const card = el('div', 'sample');
          if (item.text !== undefined) card.appendChild(el('p', 'sample-text', item.text));
          if (item.image) {
            const img = el('img');
            img.alt = `spectrogram ${item.name}`;
            img.src = `/files/${run.index}/${item.image.split('/').map(encodeURIComponent).join('/')}`;
            card.appendChild(img);
          }
          if (item.audio) {
            const audio = el('audio');
            audio.controls = true;
            audio.preload = 'none';
            audio.src = `/files/${run.index}/${item.audio.split('/').map(encodeURIComponent).join('/')}`;
            card.appendChild(audio);
          }
          row.appendChild(card);
        }
        block.appendChild(row);
        root.appendChild(block);
      }
    }
    if (!root.childElementCount) root.appendChild(el('p', 'muted', 'No samples yet.'));
  }

  async function poll() {
    try {
      const {now, runs} = await getJson('/api/runs');
      state.runs = runs;
      const metrics = await Promise.all(runs.map((run) => getJson(
          `/api/metrics?run=${run.index}&max_points=${MAX_POINTS}&keys=${encodeURIComponent(requestedKeys(run).join(','))}`)));
      metrics.forEach((m, i) => { state.series[runs[i].index] = m.series; });
      const events = await Promise.all(runs.map((run) => getJson(`/api/events?run=${run.index}&limit=${EVENTS_SHOWN}`)));
      const samples = await Promise.all(runs.map((run) => getJson(`/api/samples?run=${run.index}`)));
      renderStatus(now);
      updateXRange();
      for (const def of CHARTS) renderChart(def);
      const merged = [];
      events.forEach((e, i) => e.events.forEach((ev) => merged.push(Object.assign({}, ev, {run: runs[i].name}))));
      merged.sort((a, b) => (b.time || 0) - (a.time || 0));
      renderEvents(merged);
      renderSamples(samples.map((s, i) => ({run: runs[i], steps: s.steps})));
      $('connection').textContent = `updated ${new Date().toLocaleTimeString('en-GB', {hour12: false})}`;
      $('connection').className = 'connection';
    } catch (err) {
      $('connection').textContent = `connection lost: ${err.message}`;
      $('connection').className = 'connection error';
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function redrawAll() {
    updateXRange();
    for (const def of CHARTS) {
      const entry = state.charts[def.id];
      if (entry) entry.signature = '';
      if (state.runs.length) renderChart(def);
    }
  }

  $('smoothing').addEventListener('input', (e) => {
    state.smoothing = Number(e.target.value);
    $('smoothing-value').textContent = state.smoothing.toFixed(2);
    renderChart(CHARTS[0]);
  });
  $('log-scale').addEventListener('change', (e) => { state.logScale = e.target.checked; redrawAll(); });
  $('x-axis').addEventListener('change', (e) => { state.xMode = e.target.value; redrawAll(); });
  window.addEventListener('resize', () => {
    for (const entry of Object.values(state.charts)) {
      if (entry.plot) entry.plot.setSize({width: plotWidth(entry), height: 230});
    }
  });
  for (const def of CHARTS) chartBox(def);
  poll();
})();
