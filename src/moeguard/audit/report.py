"""The audit report: ``report.json`` (every number) and a self-contained ``report.html``.

The HTML page embeds its figures as base64 PNG data, so it can be mailed or archived
alone; it reads top to bottom: the summary table, then attribution heatmaps,
knowledge-loss curves, recovery curves and the defense comparison.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeguard.audit.results import DefenseComparison, ModelAudit, TaskAudit, json_multiplier
from moeguard.io import atomic_write_text, read_json, write_json

REPORT_FORMAT = 1
REPORT_JSON, REPORT_HTML = "report.json", "report.html"


@dataclass
class AuditReport:
    """A finished audit: the configuration, the audited model, the defended one (if any) and the comparison."""

    config: dict[str, Any]
    model: ModelAudit
    compare: ModelAudit | None = None
    defense: dict[str, DefenseComparison] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    seconds: float = 0.0
    figures: dict[str, str] = field(default_factory=dict)
    out_dir: Path | None = None

    def headline(self) -> list[dict[str, Any]]:
        """One row per task with the numbers the summary table shows."""
        rows = []
        for name, task in self.model.tasks.items():
            cost = task.cost
            row: dict[str, Any] = {
                "task": name,
                "kind": task.kind,
                "metric": task.metric,
                "full_accuracy": task.full_accuracy,
                "reference": task.reference,
                "fraction_without": task.fraction_without,
                "keep_without": task.keep_without,
                "fraction_with": task.fraction_with,
                "keep_with": task.keep_with,
                "labels": cost.labels if cost else None,
                "steps": cost.steps if cost else None,
                "tokens": cost.tokens if cost else None,
                "seconds": cost.seconds if cost else None,
                "parameters_total": task.compressed.total if task.compressed else None,
                "parameters_active": task.compressed.active_per_token if task.compressed else None,
                "compression_ratio": task.compressed.ratio if task.compressed else None,
                "skipped": task.skipped,
                "detected": task.forensics["derived"] if task.forensics else None,
                "head_start": task.headstart["describe"] if task.headstart else None,
            }
            if name in self.defense:
                comparison = self.defense[name]
                row.update(cost_multiplier=json_multiplier(comparison.cost_multiplier), censored=comparison.censored,
                           utility_cost=comparison.utility_cost)
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "created": self.created,
            "seconds": self.seconds,
            "versions": self.versions,
            "config": self.config,
            "headline": self.headline(),
            "model": self.model.to_dict(),
            "compare": self.compare.to_dict() if self.compare else None,
            "defense": {name: c.to_dict() for name, c in self.defense.items()},
            "figures": self.figures,
        }

    def describe(self) -> str:
        """The summary table as text (what the command prints)."""
        target = self.config["realign"]["target_retention"]
        lines = [f"prunability audit of {self.model.source} (fingerprint {self.model.fingerprint[:12]}), target "
                 f"{target:.0%} of each task's score:"]
        header = (f"  {'task':<12}{'type':<10}{'metric':<17}{'full':>7}{'keep w/o':>10}{'keep with':>11}{'labels':>8}"
                  f"{'steps':>7}{'params':>12}{'ratio':>7}{'head start':>34}")
        if self.defense:
            header += f"{'cost x':>8}{'utility':>9}"
        lines.append(header)
        notes = []
        for row in self.headline():
            start = f"  {row['task']:<12}{row['kind']:<10}{row['metric']:<17}{row['full_accuracy']:>7.3f}"
            if row["metric"] == "loss":
                notes.append(f"  {row['task']}: loss in nats per token (lower is better); retention is the share of the full "
                             f"model's improvement over the unigram entropy of the text, {row['reference']:.3f}; its "
                             "labels are texts trained on")
            if row["skipped"]:
                lines.append(f"{start}  skipped: {row['skipped']}")
                continue
            line = (f"{start}{row['fraction_without']:>10.0%}{row['fraction_with']:>11.0%}"
                    f"{_num(row['labels']):>8}{_num(row['steps']):>7}{_num(row['parameters_total'], ','):>12}"
                    f"{_num(row['compression_ratio'], '.2f'):>7}{_num(row['head_start']):>34}")
            if row["task"] in self.defense:
                comparison = self.defense[row["task"]]
                line += f"{comparison.describe_multiplier():>8}{comparison.utility_cost:>+9.3f}"
            lines.append(line)
        lines += notes
        if self.out_dir is not None:
            lines.append(f"report: {self.out_dir / REPORT_HTML} (numbers: {self.out_dir / REPORT_JSON})")
        return "\n".join(lines)


def _num(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def load_report(path: str | Path) -> dict[str, Any]:
    """``report.json`` read back (a directory holding it may be given)."""
    path = Path(path)
    return read_json(path / REPORT_JSON if path.is_dir() else path, what="audit report")


def write_report(report: AuditReport, out: Path) -> None:
    """Write report.json and report.html (atomically; the figures must already be in ``out``)."""
    write_json(out / REPORT_JSON, report.to_dict())
    atomic_write_text(out / REPORT_HTML, render_html(report, out))


# ---------------------------------------------------------------------------- HTML
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1b1b1b; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.4rem 0; }
.meta { color: #555; font-size: 0.9rem; } .note { color: #555; font-size: 0.88rem; max-width: 60rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 0.8rem; }
.wide figure { margin: 0.6rem 0; } figure { margin: 0; } figcaption { font-size: 0.85rem; color: #444; }
.bad { color: #a63603; font-weight: 600; } .good { color: #08519c; font-weight: 600; }
"""


def _image(out: Path, relative: str, caption: str) -> str:
    data = base64.b64encode((out / relative).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _cell(value: Any, spec: str = "") -> str:
    return html.escape(_num(value, spec))


def _summary_table(report: AuditReport) -> str:
    compare = bool(report.defense)
    head = ["task", "type / metric", "full-model score", "experts kept, pruning alone", "experts kept, with re-alignment",
            "re-alignment cost", "carved model: parameters total / active per token",
            "head start H (FLOPs) [95% CI]"]
    if compare:
        head += ["defense cost multiplier", "utility cost"]
    rows = []
    for row in report.headline():
        kind = f"{html.escape(row['kind'])}<br><span class='meta'>{html.escape(row['metric'])}</span>"
        full = _cell(row["full_accuracy"], ".3f")
        if row["metric"] == "loss":
            full += f"<br><span class='meta'>nats/token; unigram {_cell(row['reference'], '.3f')}</span>"
        if row["skipped"]:
            cells = [html.escape(row["task"]), kind, full,
                     f'<td colspan="{len(head) - 3}" style="text-align:left">skipped: {html.escape(row["skipped"])}</td>']
            rows.append("<tr><td>" + "</td><td>".join(cells[:3]) + "</td>" + cells[3] + "</tr>")
            continue
        cells = [
            html.escape(row["task"]), kind, full,
            f"{_pct(row['fraction_without'])} ({_cell(row['keep_without'])} per layer)" if row["keep_without"] else "100% (no prune kept it)",
            f"{_pct(row['fraction_with'])} ({_cell(row['keep_with'])} per layer)" if row["keep_with"] else "100%",
            "-" if row["labels"] is None else (f"{row['labels']} {'texts' if row['kind'] == 'lm' else 'labels'}, "
                                               f"{row['steps']} steps<br><span class='meta'>"
                                               f"{_cell(row['tokens'], ',')} tokens, {_cell(row['seconds'], '.1f')} s</span>"),
            f"{_cell(row['parameters_total'], ',')} / {_cell(row['parameters_active'], ',')}<br>"
            f"<span class='meta'>{_cell(row['compression_ratio'], '.2f')}x smaller</span>",
            _cell(row["head_start"]),
        ]
        if compare and row["task"] in report.defense:
            comparison = report.defense[row["task"]]
            cells += [comparison.describe_multiplier(markup=True), _cell(comparison.utility_cost, "+.3f")]
        rows.append("<tr><td>" + "</td><td>".join(cells) + "</td></tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f'<table id="summary">{header}{"".join(rows)}</table>'


def _sweep_table(task: TaskAudit) -> str:
    """Target retention per criterion (rows) and keep count (columns)."""
    keeps = sorted({row["keep"] for row in task.sweep if row["criterion"] != "full"}, reverse=True)
    labels = list(dict.fromkeys(row["criterion"] for row in task.sweep if row["criterion"] != "full"))
    head = "<tr><th>criterion</th>" + "".join(f"<th>keep {k}</th>" for k in keeps) + "</tr>"
    body = []
    for label in labels:
        cells = []
        for keep in keeps:
            values = [r["target_retained"] for r in task.sweep if r["criterion"] == label and r["keep"] == keep]
            cells.append(_cell(sum(values) / len(values) if values else None, ".2f"))
        body.append(f"<tr><td>{html.escape(label)}</td><td>" + "</td><td>".join(cells) + "</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _realign_table(task: TaskAudit) -> str:
    head = ("<tr><th>keep</th><th>criterion</th><th>acquisition</th><th>retention after pruning</th>"
            "<th>final retention</th><th>labels to target</th><th>steps</th><th>tokens</th></tr>")
    body = []
    for run in task.realign_runs:
        body.append(
            f"<tr><td>{run.keep}</td><td>{html.escape(run.criterion)}</td><td>{html.escape(run.acquisition)}</td>"
            f"<td>{run.pruned_retention:.2f}</td><td>{run.final_retention:.2f}</td>"
            f"<td>{run.labels if run.reached else f'not reached ({run.budget})'}</td><td>{_cell(run.steps)}</td>"
            f"<td>{_cell(run.tokens, ',')}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _figures_section(out: Path, audits: list[ModelAudit], kind: str, caption: str, *, wide: bool = False) -> str:
    parts = []
    for audit in audits:
        for name, task in audit.tasks.items():
            if kind in task.figures:
                who = "defended model, " if audit.role == "compare" else ""
                parts.append(_image(out, task.figures[kind], f"{who}{name}: {caption}"))
    layout = "wide" if wide else "grid"
    return f'<div class="{layout}">{"".join(parts)}</div>' if parts else "<p>No figures (every task was skipped).</p>"


def _forensics_section(audits: list[ModelAudit]) -> str:
    rows = []
    for audit in audits:
        who = "defended model: " if audit.role == "compare" else ""
        for name, task in audit.tasks.items():
            found = task.forensics
            if found is None:
                continue
            verdict = "<span class='good'>derived</span>" if found["derived"] else "<span class='bad'>not recognised</span>"
            rows.append(
                f"<tr><td>{html.escape(who + name)}</td><td>{verdict}</td><td>{_cell(found['z'], '.1f')} "
                f"(threshold {found['z_threshold']:.1f})</td><td>{found['layers_recovered']} of {found['layers']}</td>"
                f"<td>{found['seconds']:.1f}</td></tr>"
            )
    if not rows:
        return ""
    head = ("<tr><th>task</th><th>verdict of moeguard detect</th><th>score z</th><th>layers whose kept experts and order "
            "were traced exactly</th><th>seconds</th></tr>")
    return ("<h2>Forensics: would the owner recognise the carved model?</h2><p class='note'>The attacker's smallest plan "
            "is carved out of a copy (pruned, experts shuffled with their router rows; not re-aligned) and compared with "
            "the audited model by <code>moeguard detect</code>.</p>" + f"<table id='forensics'>{head}{''.join(rows)}</table>")


def _tables_section(audits: list[ModelAudit], shown, table, heading) -> str:
    """One heading (``heading(task)``, after the task's name) and ``table(task)`` for every task of every model
    where ``shown(task)``."""
    parts = []
    for audit in audits:
        who = "defended model: " if audit.role == "compare" else ""
        for name, task in audit.tasks.items():
            if shown(task):
                parts.append(f"<h3>{html.escape(who + name + heading(task))}</h3>{table(task)}")
    return "".join(parts)


def _flat(config: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted name, value)`` of every setting, nested settings (re-alignment, loading) included."""
    items = []
    for key, value in config.items():
        if isinstance(value, dict):
            items += _flat(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def render_html(report: AuditReport, out: Path) -> str:
    """The report page, self-contained (figures read from ``out`` and embedded)."""
    config, model = report.config, report.model
    attacker = config["realign"]
    audits = [model] + ([report.compare] if report.compare else [])
    target = attacker["target_retention"]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>moeguard audit: {esc(model.source)}</title><style>{STYLE}</style></head><body>",
        "<h1>MoE prunability audit</h1>",
        f"<p class='meta'>Model <code>{esc(model.source)}</code> ({esc(model.model_type)}, {len(model.num_experts)} MoE layers x "
        f"{max(model.num_experts)} experts, top-{max(model.top_k)}, {model.parameters['total']:,} parameters, "
        f"{model.parameters['active_per_token']:,} active per token), weights fingerprint <code>{esc(model.fingerprint[:16])}</code>. "
        f"Audited {esc(report.created)} in {report.seconds / 60:.1f} min with moeguard {esc(report.versions.get('moeguard', '?'))}"
        f"{' (quick mode)' if config.get('quick') else ''}.</p>",
        "<h2>Summary</h2>",
        f"<p class='note'>How cheaply can a task model be carved out of this MoE? For each task: the smallest share of experts "
        f"an attacker (attribution by {esc(', '.join(model.criteria))}) must keep so that the pruned model still keeps "
        f"{target:.0%} of the full model's score (of a language-modelling task: of its loss improvement over the unigram "
        "entropy of the text), by pruning alone "
        f"and with re-alignment (fine-tuning the pruned model on at most {attacker['budget']} labelled examples chosen by "
        f"{esc(attacker['acquisition'])} active learning, scope {esc(attacker['scope'])}); the labels, optimizer steps and tokens "
        "that re-alignment needed; and the size of the model the attacker ends up with. Lower shares and fewer labels mean "
        "the model is cheaper to steal.</p>",
        _summary_table(report),
    ]
    if "headline" in report.figures:
        parts.append(_image(out, report.figures["headline"], "Share of experts an attacker keeps per task"))
    parts.append("<h2>Attribution: which experts each task uses</h2>")
    parts.append("<p class='note'>Routing frequency of every expert (MoE layer x expert) on each task's examples: the share "
                 "of routing decisions sent to it. A few bright cells per row mean the task lives in a few experts, "
                 "which is what makes it easy to isolate.</p>")
    parts.append(_figures_section(out, audits, "attribution", "routing frequency per layer and expert"))
    parts.append("<h2>Knowledge loss: the task kept as experts are pruned</h2>")
    parts.append("<p class='note'>Each point masks all but the kept experts (the same function as the physically pruned model). "
                 "Retention is the pruned model's score over the full model's (for a language-modelling loss: the share of "
                 "the full model's improvement over the unigram entropy that it keeps). A real criterion should stay well "
                 "above the random and least-used baselines.</p>")
    parts.append(_figures_section(out, audits, "knowledge_loss", "retention vs share of experts kept", wide=True))
    parts.append(_tables_section(audits, lambda task: bool(task.sweep), _sweep_table,
                                 lambda task: f": {task.metric} retained (pruned vs full)"))
    parts.append("<h2>Re-alignment: what fine-tuning wins back</h2>")
    parts.append(f"<p class='note'>Recovery curves of the best plan at the keep counts where pruning alone fell below "
                 f"{target:.0%}: {esc(attacker['acquisition'])} active learning against {esc(config['baseline_acquisition'])} "
                 "selection of the examples to label (same seed set, steps and learning rate).</p>")
    parts.append(_figures_section(out, audits, "recovery", "retention vs labelled examples", wide=True))
    parts.append(_tables_section(audits, lambda task: bool(task.realign_runs), _realign_table, lambda task: ""))
    parts.append(_forensics_section(audits))
    if "headstart" in report.figures:
        hs = config["headstart_attack"]
        parts.append("<h2>Head start: what the stolen weights save in compute</h2>")
        parts.append(
            "<p class='note'>Whoever holds the weights holds a free teacher, so labels cost the carver nothing; what the "
            "weights give is compute. At the attacker's keep count, a carve (experts chosen by attribution on the model "
            f"itself) and a freshly initialised model of the carved architecture both train on the full model's own answers "
            f"(batch {hs['student_batch']}, lr {', '.join(f'{v:g}' for v in hs['carve_lrs'])}) until they reach "
            f"{target:.0%} of its accuracy. H = compute from scratch / compute to carve and re-align (FLOPs: 6 x active "
            "parameters x training tokens, 2 x for the teacher's labels and logits and the carve's attribution). This is "
            f"the audit's reduced measurement (one configuration, seeds {list(hs['report_seeds'])}, caps of "
            f"{hs['scratch_steps']} scratch / {hs['carve_steps']} carve steps"
            + (f", and a scratch run stops once its compute reaches {hs['scratch_compute_multiple']:g}x the carve's, "
               "marked 'cap'" if hs.get("scratch_compute_multiple") else "")
            + "; '&ge;': a lower bound, scratch stopped before reaching the target); <code>moeguard defense-eval</code> "
            "tunes both arms on tuning seeds and reports fresh seeds with intervals, without the compute cap.</p>")
        parts.append(_image(out, report.figures["headstart"], "Head start per task"))
    parts.append("<h2>Defense comparison</h2>")
    if report.compare is None:
        parts.append("<p class='note'>No defended model was given. Run <code>moeguard harden</code> and audit again with "
                     "<code>--compare DEFENDED_MODEL</code> to measure what the defense changes.</p>")
    else:
        parts.append(f"<p class='note'>Defended model <code>{esc(report.compare.source)}</code> (fingerprint "
                     f"<code>{esc(report.compare.fingerprint[:16])}</code>), attacked the same way. Cost multiplier = labels "
                     "the attacker needs on the defended model / on the undefended one, at the undefended attack's keep "
                     "count (&ge;: not reached within the budget, a lower bound; &infin;: the undefended attack needed no labels "
                     "at all, pruning alone kept the task). Utility cost = how much worse the defended full model scores "
                     "(in the task's metric).</p>")
        head = ("<tr><th>task</th><th>keep</th><th>labels (undefended)</th><th>labels (defended)</th><th>cost multiplier</th>"
                "<th>utility cost</th><th>experts kept w/o re-alignment (undef. / def.)</th><th>with (undef. / def.)</th><th>note</th></tr>")
        body = []
        for comparison in report.defense.values():
            body.append(
                f"<tr><td>{esc(comparison.task)}</td><td>{_cell(comparison.keep)}</td><td>{_cell(comparison.undefended_labels)}</td>"
                f"<td>{_cell(comparison.defended_labels)}</td>"
                f"<td>{comparison.describe_multiplier(markup=True)}</td>"
                f"<td>{comparison.utility_cost:+.3f}</td><td>{_pct(comparison.fraction_without[0])} / {_pct(comparison.fraction_without[1])}</td>"
                f"<td>{_pct(comparison.fraction_with[0])} / {_pct(comparison.fraction_with[1])}</td>"
                f"<td style='text-align:left'>{esc(comparison.note)}</td></tr>"
            )
        parts.append(f"<table id='defense'>{head}{''.join(body)}</table>")
        if "defense" in report.figures:
            parts.append(_image(out, report.figures["defense"], "Labels to re-align, undefended vs defended"))
    parts.append("<h2>Configuration</h2>")
    parts.append("<table>" + "".join(f"<tr><td>{esc(str(k))}</td><td style='text-align:left'>{esc(str(v))}</td></tr>"
                                     for k, v in _flat(config)) + "</table>")
    parts.append("<table>" + "".join(f"<tr><td>{esc(k)}</td><td style='text-align:left'>{esc(v)}</td></tr>"
                                     for k, v in report.versions.items()) + "</table>")
    parts.append("<p class='meta'>Every number on this page is in report.json beside it.</p></body></html>")
    return "\n".join(parts)
