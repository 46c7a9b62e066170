"""How the CLI prints stage reports and profiles: every table and summary line in one place."""

from __future__ import annotations

from pathlib import Path

from edgepipe.metrics import unresolved_text


def session_label(sessions: dict | None) -> str:
    """{"1": {"threads": 1, "spinning": False}, "32": ...} -> "1t/2t" (one per batch; s: spinning)."""
    if not sessions:
        return "-"
    return "/".join(f"{v['threads']}t" + ("s" if v["spinning"] else "") for v in sessions.values())


def candidate_table(report) -> str:
    """Every quantize candidate: accuracy, relative L2 error vs FP32, speedup per batch, session
    setting, size, verdict."""
    batches = list(report.fp32.p50_ms)
    w = max([19, *(len(c.recipe) for c in report.candidates)])  # recipe column: the longest name
    head = (f"{'recipe':{w}} {'acc/agree':>9} {'drop [95% interval]':>24} {'relL2':>7} "
            + " ".join(f"{'x@b' + b:>8}" for b in batches) + f" {'session':>8} {'size':>8}  verdict")
    lines = [head, "-" * len(head)]
    for c in report.candidates:
        metric = c.accuracy if c.accuracy is not None else c.agreement
        metric_s = f"{metric:.4f}" if metric is not None else "-"
        speed = " ".join(f"{c.speedup.get(b, 0):>7.2f}x" if c.speedup else f"{'-':>8}" for b in batches)
        size = f"{c.size_bytes / 1e6:.2f}MB" if c.size_bytes else "-"
        verdict = c.verdict + (f": {c.error}" if c.error else "") + (
            f" (timing of its kernel twin {c.timed_as})" if c.timed_as else "")
        if c.accuracy_resolution == "unresolved" and not c.verdict.startswith("accuracy"):
            verdict += (" (accuracy unresolved: "
                        f"{f'~{c.rows_needed} more rows needed' if c.rows_needed else 'on the budget'})")
        rel_l2 = f"{c.rel_l2:.4f}" if c.rel_l2 is not None else "-"
        lines.append(f"{c.recipe:{w}} {metric_s:>9} {_drop(c.accuracy_drop_interval):>24} {rel_l2:>7} {speed} "
                     f"{session_label(c.sessions):>8} {size:>8}  {verdict}")
    for s in report.skipped_recipes:
        lines.append(f"{s['recipe']:{w}} skipped: {s['why']}")
    fp32 = report.fp32
    own = f"{fp32.accuracy:.4f}" if fp32.accuracy is not None else ""
    lines.append(f"{'FP32 (the baseline)':{w}} {own:>9} {'':24} {'':7} "
                 + " ".join(f"{fp32.p50_ms[b]:>6.3f}ms" for b in batches) + f" {session_label(fp32.sessions):>8}")
    lines.append(f"timing: {report.timing}")
    if report.judged_on:
        lines.append(f"accuracy: {report.judged_on}")
    if fp32.scores:
        lines.append("scores (95% interval): " + score_line("FP32", fp32.scores) + "".join(
            f"; {score_line(c.recipe, c.scores)}" for c in report.candidates if c.scores and c.verdict in
            ("chosen", "ok")))
    return "\n".join(lines)


def score_line(name: str, scores: dict) -> str:
    return f"{name} " + ", ".join(f"{k.replace('_', '-')} {v['value']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
                                  for k, v in scores.items())


def _drop(interval: dict | None) -> str:
    if not interval:
        return "-"
    return f"{interval['value']:+.4f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"



def quantize_summary(report, output: Path) -> str:
    """The candidate table, then what was chosen and how to deploy it."""
    chosen = report.chosen
    lines = [candidate_table(report)]
    opt = report.transformer_optimizer
    if opt.get("tried"):
        lines.append(f"transformer graph fusions: {'kept' if opt['kept'] else 'not kept'} ({opt['why']})")
    if chosen.excluded_nodes:
        lines.append(f"kept in FP32 for accuracy: {', '.join(chosen.excluded_nodes)}")
    if chosen.accuracy_resolution == "unresolved":
        lines.append(f"warning: the chosen model's accuracy drop is {unresolved_text(chosen.rows_needed)}: judge it "
                     "on more labelled rows (--data, --eval-rows), or refuse such a drop with --require-resolved")
    lines.append(f"chosen: {chosen.recipe} ({report.recipe_reason}); "
                 f"{report.fp32.size_bytes / 1e6:.2f} MB -> {report.size_bytes / 1e6:.2f} MB -> {output}")
    if chosen.backend != "onnxruntime":
        lines.append(f"runs on {chosen.backend}: the file is standard QDQ ONNX, and its speed was measured on "
                     f"{chosen.backend} (Engine(path, backend=\"{chosen.backend}\"); "
                     f"edgepipe profile {output} --backend {chosen.backend}; Engine.from_run picks it up); "
                     "for a device with onnxruntime only, quantize with --backend onnxruntime")
        twin = next((c for c in report.candidates if c.backend == "onnxruntime"
                     and chosen.recipe == f"{c.recipe}/{chosen.backend}"), None)
        if twin is not None and twin.verdict.startswith("accuracy"):
            lines.append(f"on onnxruntime the same file is out of the accuracy budget ({twin.verdict}): "
                         f"deploy it on {chosen.backend} only")
    if report.device:
        lines.append(f"measured on {report.device['provider'][0]} ({report.device.get('gpu') or 'GPU unnamed'}) "
                     "against "
                     "FP32 there: deploy it with Engine(path, providers=\"cuda\") or --provider cuda")
    elif chosen.sessions:
        per_batch = ", ".join(f"batch {b}: {v['threads']} thread(s)" + (" spinning" if v["spinning"] else "")
                              for b, v in chosen.sessions.items())
        lines.append(f"fastest session settings: {per_batch} (Engine(..., batch_sessions=...); "
                     f"Engine.from_run applies them)")
    if report.choice and report.choice != "the fastest confirmed candidate":
        lines.append(f"why this one: {report.choice}")
    ceiling = report.ceiling or {}
    if "fraction_of_ceiling" in ceiling:
        lines.append(f"INT8 ceiling here: {ceiling['op']} {ceiling['input_shape']} x {ceiling['weight_shape']} alone "
                     "runs "
                     f"{ceiling['kernel_speedup']:.2f}x in INT8 at batch {ceiling['batch']}; the model's "
                     f"{ceiling['model_speedup']:.2f}x is {ceiling['fraction_of_ceiling']:.0%} of it")
    elif "error" in ceiling:
        lines.append(f"INT8 ceiling not measured: {ceiling['error']}")
    if report.phases:
        peaks = report.phase_peak_mb or {}
        lines.append(f"search took {report.seconds} s: " + ", ".join(
            f"{k} {v} s" + (f" ({peaks[k]:.0f} MB peak)" if k in peaks else "") for k, v in report.phases.items()))
    return "\n".join(lines)


def prune_summary(report, output: Path) -> str:
    lines = [f"accuracy {report.accuracy_before:.4f} -> {report.accuracy_after:.4f}; params "
             f"{report.params_before:,} -> {report.params_after:,}; MACs {report.macs_before:,} -> "
             f"{report.macs_after:,}"]
    for b, p50 in report.p50_ms.items():
        ratio_text = (f"{report.speedup[b]:.2f}x faster" if report.speedup
                      else f"dense latency ratio {report.dense_latency_ratio[b]:.2f}x (no speedup claimed)")
        lines.append(f"ORT p50 at batch {b}: {p50['unpruned']:.4f} -> {p50['pruned']:.4f} ms, {ratio_text}")
    if report.method == "unstructured":
        lines.append(f"sparsity {report.sparsity:.1%}; compressed state_dict {report.compressed_bytes_before:,} -> "
                     f"{report.compressed_bytes_after:,} bytes. {report.note}")
    lines.append(f"-> {output} ({report.seconds} s)")
    return "\n".join(lines)


def latency_table(record: dict, by_label: dict[str, list[dict]]) -> str:
    """p50/p90/p99 and throughput per model and batch, with the ratio against the baseline."""
    width = max([28, *map(len, by_label)])  # labels are never cut: they tell the rows apart
    lines = [f"{'model':{width}} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'samples/s':>11} "
             f"{'vs base':>8}"]
    for label, rows in by_label.items():
        for stats in rows:
            ratio = record.get("speedup", {}).get(label, {}).get(str(stats["batch"]))
            lines.append(f"{label:{width}} {stats['batch']:>5} {stats['p50_ms']:>9.4f} {stats['p90_ms']:>9.4f} "
                         f"{stats['p99_ms']:>9.4f} {stats['throughput']:>11.1f} "
                         f"{(f'{ratio:.2f}x' if ratio else '-'):>8}")
    return "\n".join(lines)


def placement_lines(placement: dict, provider: str) -> list[str]:
    fell = placement["fell_back"]
    lines = [f"placement: {placement['nodes_per_provider']}; {len(fell)} node(s) fell back from "
             f"{provider}, {placement['memcpy_nodes']} device copies"]
    lines += [f"  fell back: {row['node'][:40]:40} {row['op']:14} -> {row['provider']}" for row in fell[:10]]
    return lines


def operator_lines(operators: dict, batch: int) -> list[str]:
    lines = [f"\ntop operators at batch {batch} (onnxruntime profiler):"]
    lines += [f"  {row['op']:28} {row['us_per_run']:>10.1f} us/run {row['share']:>7.1%}"
              for row in operators["by_op_type"][:8]]
    lines += [f"  node {row['node'][:40]:40} {row['op']:14} {row['provider']:22} {row['share']:>7.1%}"
              for row in operators["by_node"][:5]]
    return lines


def merged_table(rows: list[dict]) -> str:
    """One table for single-pass models and one for decoders (generation), as present."""
    passes = [r for r in rows if r.get("kind") != "decoder"]
    decoders = [r for r in rows if r.get("kind") == "decoder"]
    lines = []
    if passes:
        lines = [f"{'device':48} {'model':24} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'samples/s':>11}"]
        lines += [f"{r['device'][:48]:48} {Path(r['model']).name[:24]:24} {r['batch']:>5} {r['p50_ms']:>9.4f} "
                  f"{r['p99_ms']:>9.4f} {r['throughput']:>11.1f}" for r in passes]
    if decoders:
        lines += [""] * bool(lines) + [f"{'device':48} {'decoder':24} {'batch':>5} {'prompt':>6} {'TTFT ms':>9} "
                                       f"{'TPOT p50':>9} {'tokens/s':>9}"]
        lines += [f"{r['device'][:48]:48} {Path(r['model']).name[:24]:24} {r['batch']:>5} {r['prompt']:>6} "
                  f"{r['ttft_ms']:>9.2f} {r['tpot_ms']:>9.3f} {r['tokens_per_s']:>9.1f}" for r in decoders]
    return "\n".join(lines)


def compare_summary(report) -> str:
    """Per-output error metrics of `compare`, and where two graphs start to diverge."""
    lines = [f"inputs: {report.inputs}; judged by {report.criteria}",
             f"{'output':16} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'cosine':>9} {'SQNR dB':>8} "
             f"{'top-1':>7}  verdict"]
    for o in report.outputs:
        top1 = f"{o.top1_agreement:.4f}" if o.top1_agreement is not None else "-"
        cos = f"{o.cosine:.6f}" if o.cosine is not None else "-"
        sqnr = f"{o.sqnr_db:.1f}" if o.sqnr_db is not None else "-"
        lines.append(f"{o.name[:16]:16} {o.max_abs_diff:>10.3g} {o.max_rel_diff:>10.3g} {o.mean_abs_diff:>10.3g} "
                     f"{cos:>9} {sqnr:>8} {top1:>7}  {'ok' if o.ok else 'VIOLATED'}"
                     + (f" ({o.note})" if o.note else ""))
    if report.first_divergence:
        d = report.first_divergence
        lines.append(f"first divergence: node '{d.node}' ({d.op}), tensor '{d.tensor}', max abs diff "
                     f"{d.max_abs_diff:.3g}")
        lines += [f"  adds noise: '{off.node}' ({off.op}) channel-averaged NSR +{off.added_nsr:.3g}"
                  for off in report.offenders]
    if report.localized:
        lines.append(f"note: {report.localized}")
    return "\n".join(lines)


def decoder_table(report) -> str:
    """Every decoder quantize candidate: perplexity increase, greedy agreement, speedup in time
    per output token per batch, time to first token, size, verdict."""
    batches = list(report.fp32["tpot_ms"])
    w = max([19, *(len(c["recipe"]) for c in report.candidates)])
    head = (f"{'recipe':{w}} {'+nll [95% interval]':>26} {'agree':>6} "
            + " ".join(f"{'tpot x@b' + b:>10}" for b in batches) + f" {'ttft ms':>8} {'size':>9}  verdict")
    lines = [head, "-" * len(head)]
    for c in report.candidates:
        band = c.get("nll_increase_interval")
        nll = (f"{c['nll_increase']:+.4f}" + (f" [{band['low']:+.3f}, {band['high']:+.3f}]" if band else "")
               if "nll_increase" in c else "-")
        agree = f"{c['agreement']:.3f}" if "agreement" in c else "-"
        speed = " ".join(f"{c['speedup'][b]:>9.2f}x" if "speedup" in c else f"{'-':>10}" for b in batches)
        ttft = f"{c['ttft_ms']:.2f}" if "ttft_ms" in c else "-"
        size = f"{c['size_bytes'] / 1e6:.2f}MB" if "size_bytes" in c else "-"
        lines.append(f"{c['recipe']:{w}} {nll:>26} {agree:>6} {speed} {ttft:>8} {size:>9}  {c.get('verdict', '')}")
    fp32 = report.fp32
    lines.append(f"{'FP32 (the baseline)':{w}} {'':26} {'':6} "
                 + " ".join(f"{fp32['tpot_ms'][b]:>8.3f}ms" for b in batches)
                 + f" {fp32['ttft_ms']:>8.2f} {fp32['size_bytes'] / 1e6:>7.2f}MB  nll {fp32['nll']:.4f} nats/token")
    lines.append(f"quality: {report.judged_on}")
    if "perplexity" in fp32:
        lines.append("scores (95% interval over windows): " + score_line("FP32", {
            k: fp32[k] for k in ("perplexity", "token_accuracy")}) + "".join(
            f"; {score_line(c['recipe'], {k: c[k] for k in ('perplexity', 'token_accuracy')})}"
            for c in report.candidates if "perplexity" in c))
    budgets = report.budgets
    margin = budgets.get('speedup_margin', budgets.get('noise_band', 0))  # noise_band: older records
    lines.append(f"budgets: perplexity +{report.budgets['max_nll_increase']} nats/token, greedy agreement >= "
                 f"{report.budgets['min_agreement']}, faster by {margin:.0%} (time per token "
                 f"after {report.budgets['past_length']} cached positions; TTFT: prefill of "
                 f"{report.budgets['ttft_prompt']})")
    return "\n".join(lines)
