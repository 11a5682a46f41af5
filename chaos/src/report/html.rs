//! The report as one self-contained HTML page: inline CSS, inline SVG plots drawn here, no
//! script, no font, no image, no reference to anything outside the file. Tooltips are SVG
//! `<title>` elements, which browsers show without script.

use std::collections::HashSet;
use std::fmt::Write;

use super::svg::{
    self, Linear, Log, PALETTE, escape, human, linear_ticks, log_ticks, ms, nice_step, num,
    step_path, text, tick_label,
};
use super::{
    CallRow, FaultSeries, FaultTableRow, InvariantRow, PaperFigure, Protocol, Spread, Timeline,
    TunnelsReport, percentile, sorted_finite,
};

/// Width of every plot's coordinate system (the SVGs scale to the page).
const WIDTH: f64 = 1080.0;
/// Box colour per protocol (UDP blue, TCP bluish green).
const UDP_COLOUR: &str = PALETTE[0];
const TCP_COLOUR: &str = PALETTE[2];
/// The paper's figures: vermillion, which neither box colour resembles.
const PAPER_COLOUR: &str = PALETTE[5];

const CSS: &str = r#"
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #d9dce1; --bg-soft: #f6f7f9;
        --pass: #0b6e4f; --pass-bg: #e3f4ec; --fail: #b3261e; --fail-bg: #fbe4e2; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1160px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 40px 0 10px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 26px 0 4px; }
p, li { max-width: 80ch; }
.meta { color: var(--muted); margin: 0 0 12px; }
pre.cmd { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px;
          padding: 8px 12px; overflow-x: auto; white-space: pre-wrap; word-break: break-all;
          font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
nav { margin: 14px 0 0; font-size: 14px; }
nav a { color: #0b57d0; text-decoration: none; margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
th.group { text-align: center; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.wide { width: 100%; }
tr.pass td { background: var(--pass-bg); }
tr.fail td { background: var(--fail-bg); }
.badge { display: inline-block; font-weight: 700; font-size: 12px; padding: 1px 8px; border-radius: 10px;
         white-space: nowrap; }
.badge.pass { color: #fff; background: var(--pass); }
.badge.fail { color: #fff; background: var(--fail); }
.detail { white-space: pre-wrap; font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.verdict { font-weight: 600; }
.verdict.pass { color: var(--pass); }
.verdict.fail { color: var(--fail); }
.empty { color: var(--muted); font-style: italic; }
figure { margin: 10px 0 22px; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 2px; max-width: 110ch; }
svg { display: block; width: 100%; height: auto; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 18px; font-size: 13px; color: var(--fg); margin: 4px 0 2px; }
.legend span.key { display: inline-flex; align-items: center; gap: 6px; }
.swatch { display: inline-block; width: 22px; height: 0; border-top: 3px solid; vertical-align: middle; }
.swatch.box { height: 12px; width: 16px; border: 2px solid; }
.swatch.area { height: 12px; width: 16px; border: 0; background: #e6e6e6; }
.delta-bad { color: var(--fail); font-weight: 600; }
footer { margin-top: 48px; color: var(--muted); font-size: 13px; }
@media print { main { max-width: none; } h2 { break-after: avoid; } figure { break-inside: avoid; } }
"#;

/// The report as one HTML document.
pub fn render_html(report: &TunnelsReport) -> String {
    let mut out = String::with_capacity(256 * 1024);
    let title = if report.title.trim().is_empty() {
        "evpc tunnels report"
    } else {
        report.title.as_str()
    };
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        escape(title)
    );
    header(&mut out, report, title);
    summary(&mut out, report);
    invariants(&mut out, &report.invariants);
    interruptions(&mut out, &report.interruptions, &report.paper);
    per_fault(&mut out, &report.per_fault);
    timelines(&mut out, &report.timelines);
    calls(&mut out, &report.calls);
    methods(&mut out);
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

fn header(out: &mut String, report: &TunnelsReport, title: &str) {
    let _ = writeln!(out, "<header>\n<h1>{}</h1>", escape(title));
    let meta: Vec<String> = [&report.date, &report.machine]
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| escape(s))
        .collect();
    if !meta.is_empty() {
        let _ = writeln!(out, "<p class=\"meta\">{}</p>", meta.join(" · "));
    }
    if !report.command.trim().is_empty() {
        let _ = writeln!(
            out,
            "<pre class=\"cmd\"><code>{}</code></pre>",
            escape(&report.command)
        );
    }
    if !report.topology.trim().is_empty() {
        let _ = writeln!(out, "<p>{}</p>", escape(&report.topology));
    }
    out.push_str(
        "<nav><a href=\"#summary\">Summary</a><a href=\"#invariants\">Invariants</a>\
         <a href=\"#interruptions\">Interruptions</a><a href=\"#per-fault\">Per fault</a>\
         <a href=\"#timelines\">Timelines</a><a href=\"#calls\">Call quality</a>\
         <a href=\"#methods\">Methods</a></nav>\n</header>\n",
    );
}

fn summary(out: &mut String, report: &TunnelsReport) {
    out.push_str("<section id=\"summary\">\n<h2>Summary</h2>\n");
    if report.summary.is_empty() {
        out.push_str("<p class=\"empty\">No summary figures in this report.</p>\n");
    } else {
        out.push_str("<table>\n<tbody>\n");
        for row in &report.summary {
            let _ = writeln!(
                out,
                "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
                escape(&row.label),
                escape(&row.value)
            );
        }
        out.push_str("</tbody>\n</table>\n");
    }
    out.push_str("</section>\n");
}

fn invariants(out: &mut String, rows: &[InvariantRow]) {
    out.push_str("<section id=\"invariants\">\n<h2>Invariants</h2>\n");
    if rows.is_empty() {
        out.push_str("<p class=\"empty\">No invariants were checked in this run.</p>\n");
        out.push_str("</section>\n");
        return;
    }
    let failed = rows.iter().filter(|r| !r.passed).count();
    if failed == 0 {
        let _ = writeln!(
            out,
            "<p class=\"verdict pass\">✔ All {} invariants held.</p>",
            rows.len()
        );
    } else {
        let _ = writeln!(
            out,
            "<p class=\"verdict fail\">✘ {failed} of {} invariants FAILED.</p>",
            rows.len()
        );
    }
    out.push_str(
        "<table class=\"wide\">\n<thead><tr><th>Invariant</th><th>Measured</th><th>Result</th>\
         <th>Detail</th></tr></thead>\n<tbody>\n",
    );
    for row in rows {
        let (class, badge) = if row.passed {
            ("pass", "✔ pass")
        } else {
            ("fail", "✘ FAIL")
        };
        let _ = writeln!(
            out,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td><span class=\"badge {class}\">{badge}\
             </span></td><td class=\"detail\">{}</td></tr>",
            escape(&row.name),
            escape(&row.value),
            escape(&row.detail)
        );
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

/// The fault kinds in the order they first appear: in the interruptions, then in the paper.
fn kinds(series: &[FaultSeries], paper: &[&PaperFigure]) -> Vec<String> {
    let mut kinds: Vec<String> = Vec::new();
    for kind in series
        .iter()
        .map(|s| &s.kind)
        .chain(paper.iter().map(|p| &p.kind))
    {
        if !kinds.contains(kind) {
            kinds.push(kind.clone());
        }
    }
    kinds
}

/// What a box of the box-and-whisker plot shows.
#[derive(Debug)]
struct BoxStats {
    n: usize,
    min: f64,
    p5: f64,
    p25: f64,
    p50: f64,
    p75: f64,
    p95: f64,
    max: f64,
    /// The samples below p5 or above p95.
    outliers: Vec<f64>,
}

impl BoxStats {
    fn of(samples: &[f64]) -> Option<BoxStats> {
        let sorted: Vec<f64> = sorted_finite(samples)
            .into_iter()
            .filter(|v| *v >= 0.0)
            .collect();
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        let p5 = percentile(&sorted, 5.0);
        let p95 = percentile(&sorted, 95.0);
        Some(BoxStats {
            n: sorted.len(),
            min,
            p5,
            p25: percentile(&sorted, 25.0),
            p50: percentile(&sorted, 50.0),
            p75: percentile(&sorted, 75.0),
            p95,
            max,
            outliers: sorted
                .iter()
                .copied()
                .filter(|v| *v < p5 || *v > p95)
                .collect(),
        })
    }
}

/// The samples and target of one (kind, protocol), merged over the series that carry it.
fn merged(series: &[FaultSeries], kind: &str, protocol: Protocol) -> (Vec<f64>, Option<f64>) {
    let mut samples = Vec::new();
    let mut target = None;
    for s in series
        .iter()
        .filter(|s| s.kind == kind && s.protocol == protocol)
    {
        samples.extend_from_slice(&s.samples_ms);
        target = target.or(s.target_p99_ms.filter(|t| t.is_finite() && *t > 0.0));
    }
    (samples, target)
}

fn interruptions(out: &mut String, series: &[FaultSeries], paper: &[PaperFigure]) {
    out.push_str("<section id=\"interruptions\">\n<h2>Interruptions per fault kind</h2>\n");
    let paper: Vec<&PaperFigure> = paper
        .iter()
        .filter(|p| p.ms.is_finite() && p.ms > 0.0)
        .collect();
    let kinds = kinds(series, &paper);
    if kinds.is_empty() {
        out.push_str("<p class=\"empty\">No fault was measured in this run.</p>\n</section>\n");
        return;
    }
    // One log scale for both panels, so that UDP and TCP compare at a glance.
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.samples_ms.iter().copied().chain(s.target_p99_ms))
        .chain(paper.iter().map(|p| p.ms))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = values
        .iter()
        .copied()
        .min_by(f64::total_cmp)
        .map_or(1.0, svg::step125_below);
    let hi = values
        .iter()
        .copied()
        .max_by(f64::total_cmp)
        // Some headroom, so that the largest value does not sit on the frame.
        .map_or(1000.0, |max| svg::step125_above(max * 1.1))
        .max(lo * 10.0);
    out.push_str(
        "<p>Each box gathers one interruption per affected SA per fault of that kind: for UDP the \
         longest gap in the voice-like stream beyond its 20&nbsp;ms spacing, for TCP the longest \
         time without progress. The 2014 paper's 2-node strongSwan prototype is drawn beside \
         the fault kind it compares with (planned transfer, TM ↔ <em>transfer</em>; failover, \
         HA ↔ <em>kill-owner</em>).</p>\n",
    );
    out.push_str(
        "<div class=\"legend\">\
         <span class=\"key\"><span class=\"swatch box\" style=\"border-color:#0072B2;background:#0072B233\"></span>UDP: p25–p75, median line</span>\
         <span class=\"key\"><span class=\"swatch box\" style=\"border-color:#009E73;background:#009E7333\"></span>TCP: p25–p75, median line</span>\
         <span class=\"key\"><span class=\"swatch\" style=\"border-color:#444;border-top-width:2px\"></span>whiskers: p5–p95</span>\
         <span class=\"key\"><svg width=\"12\" height=\"12\" viewBox=\"0 0 12 12\" style=\"display:inline;width:12px\"><circle cx=\"6\" cy=\"6\" r=\"3\" fill=\"none\" stroke=\"#444\" stroke-width=\"1.3\"/></svg>outside p5–p95</span>\
         <span class=\"key\"><svg width=\"14\" height=\"14\" viewBox=\"0 0 14 14\" style=\"display:inline;width:14px\"><path d=\"M7 1L13 7L7 13L1 7Z\" fill=\"#D55E00\"/></svg>paper (2014), dashed across the kind</span>\
         <span class=\"key\"><span class=\"swatch\" style=\"border-color:#000;border-top-style:dashed;border-top-width:2px\"></span>p99 target</span>\
         </div>\n",
    );
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let what = match protocol {
            Protocol::Udp => "UDP interruption",
            Protocol::Tcp => "TCP stall",
        };
        let _ = writeln!(out, "<figure>\n<h3>{what}</h3>");
        let has_any = kinds.iter().any(|k| {
            !merged(series, k, protocol).0.is_empty()
                || paper.iter().any(|p| p.kind == *k && p.protocol == protocol)
        });
        if has_any {
            box_panel(out, series, &paper, &kinds, protocol, lo, hi);
        } else {
            let _ = writeln!(
                out,
                "<p class=\"empty\">No {protocol} samples in this report.</p>"
            );
        }
        let _ = writeln!(
            out,
            "<figcaption>{what} per fault kind, milliseconds on a log scale; n is the number of \
             samples. Percentiles by nearest rank.{}</figcaption>\n</figure>",
            if series
                .iter()
                .any(|s| s.protocol == protocol && s.samples_ms.contains(&0.0))
            {
                format!(
                    " Interruptions of 0&nbsp;ms are drawn on the bottom line ({}&nbsp;ms).",
                    tick_label(lo, lo)
                )
            } else {
                String::new()
            }
        );
    }
    if !paper.is_empty() {
        out.push_str(
            "<h3>The paper's figures</h3>\n<table>\n<thead><tr><th>Figure</th><th>Compared with</th>\
             <th>Protocol</th><th class=\"num\">Interruption (ms)</th></tr></thead>\n<tbody>\n",
        );
        for p in &paper {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
                escape(&p.label),
                escape(&p.kind),
                p.protocol,
                ms(p.ms)
            );
        }
        out.push_str(
            "</tbody>\n</table>\n<p class=\"meta\">Palomares, Migault, Laurent, “Elastic Virtual \
             Private Cloud”, Q2SWINET 2014: a 2-node strongSwan prototype.</p>\n",
        );
    }
    out.push_str("</section>\n");
}

/// One panel of box-and-whisker plots, one box per fault kind, on a log scale [`lo`, `hi`] ms.
fn box_panel(
    out: &mut String,
    series: &[FaultSeries],
    paper: &[&PaperFigure],
    kinds: &[String],
    protocol: Protocol,
    lo: f64,
    hi: f64,
) {
    let colour = match protocol {
        Protocol::Udp => UDP_COLOUR,
        Protocol::Tcp => TCP_COLOUR,
    };
    let (left, right, top) = (74.0, 16.0, 14.0);
    let slot = (WIDTH - left - right) / kinds.len() as f64;
    let longest = kinds.iter().map(|k| k.chars().count()).max().unwrap_or(0) as f64;
    let rotate = longest * 6.8 > slot - 8.0;
    let bottom = if rotate { 40.0 + longest * 5.2 } else { 52.0 };
    let height = 400.0 + bottom;
    let y_bottom = height - bottom;
    let y = Log {
        d0: lo,
        d1: hi,
        r0: y_bottom,
        r1: top,
    };
    let x = |i: usize| left + (i as f64 + 0.5) * slot;
    let _ = writeln!(
        out,
        "<svg viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"{} per fault kind, box plots\">",
        num(WIDTH),
        num(height),
        escape(&protocol.to_string())
    );
    let _ = writeln!(
        out,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fbfbfc\" stroke=\"#c8ccd2\"/>",
        num(left),
        num(top),
        num(WIDTH - left - right),
        num(y_bottom - top)
    );
    // Grid and y ticks.
    for (v, labelled) in log_ticks(lo, hi) {
        let py = y.map(v);
        let _ = writeln!(
            out,
            "<line x1=\"{}\" y1=\"{p}\" x2=\"{}\" y2=\"{p}\" stroke=\"{}\" stroke-width=\"1\"/>",
            num(left),
            num(WIDTH - right),
            if labelled { "#dde0e5" } else { "#eef0f2" },
            p = num(py)
        );
        if labelled {
            out.push_str(&text(
                left - 8.0,
                py + 4.0,
                "text-anchor=\"end\" font-size=\"12\"",
                &tick_label(v, v),
            ));
            out.push('\n');
        }
    }
    let axis_title = match protocol {
        Protocol::Udp => "UDP interruption (ms, log scale)",
        Protocol::Tcp => "TCP stall (ms, log scale)",
    };
    let mid = (top + y_bottom) / 2.0;
    let _ = writeln!(
        out,
        "<text x=\"18\" y=\"{m}\" transform=\"rotate(-90 18 {m})\" text-anchor=\"middle\" \
         font-size=\"13\" font-weight=\"600\">{}</text>",
        escape(axis_title),
        m = num(mid)
    );
    let box_w = (slot * 0.34).clamp(8.0, 46.0);
    for (i, kind) in kinds.iter().enumerate() {
        let cx = x(i);
        let (samples, target) = merged(series, kind, protocol);
        let stats = BoxStats::of(&samples);
        if i > 0 {
            let sx = left + i as f64 * slot;
            let _ = writeln!(
                out,
                "<line x1=\"{s}\" y1=\"{}\" x2=\"{s}\" y2=\"{}\" stroke=\"#eceef1\"/>",
                num(top),
                num(y_bottom),
                s = num(sx)
            );
        }
        // The paper's figure: a dashed line across the kind's slot and a diamond by the box.
        let half = slot * 0.46;
        for p in paper
            .iter()
            .filter(|p| p.kind == *kind && p.protocol == protocol)
        {
            let py = y.map(p.ms);
            let dx = cx + box_w / 2.0 + 12.0;
            let _ = writeln!(
                out,
                "<g><title>{}: {} ms (2014 paper)</title>\
                 <line x1=\"{}\" y1=\"{p}\" x2=\"{}\" y2=\"{p}\" stroke=\"{PAPER_COLOUR}\" \
                 stroke-width=\"1.6\" stroke-dasharray=\"5 3\"/>\
                 <path d=\"M{} {}L{} {}L{} {}L{} {}Z\" fill=\"{PAPER_COLOUR}\"/>",
                escape(&p.label),
                ms(p.ms),
                num(cx - half),
                num(cx + half),
                num(dx),
                num(py - 7.0),
                num(dx + 7.0),
                num(py),
                num(dx),
                num(py + 7.0),
                num(dx - 7.0),
                num(py),
                p = num(py)
            );
            let label = format!("{} {} ms", p.label, ms(p.ms));
            // Centred over the kind, but kept inside the plot.
            let half_text = label.chars().count() as f64 * 3.3;
            let lx = if WIDTH - right - left > 2.0 * half_text + 4.0 {
                cx.clamp(left + half_text + 2.0, WIDTH - right - half_text - 2.0)
            } else {
                cx
            };
            out.push_str(&text(
                lx,
                py - 12.0,
                &format!("text-anchor=\"middle\" font-size=\"11\" fill=\"{PAPER_COLOUR}\" font-weight=\"600\""),
                &label,
            ));
            out.push_str("</g>\n");
        }
        if let Some(t) = target {
            let py = y.map(t);
            let _ = writeln!(
                out,
                "<g><title>p99 target for {}: {} ms</title><line x1=\"{}\" y1=\"{p}\" x2=\"{}\" \
                 y2=\"{p}\" stroke=\"#000\" stroke-width=\"1.4\" stroke-dasharray=\"3 3\"/>{}</g>",
                escape(kind),
                ms(t),
                num(cx - half),
                num(cx + half),
                text(
                    cx - half + 2.0,
                    py + 12.0,
                    "font-size=\"10\"",
                    &format!("target {}", ms(t))
                ),
                p = num(py)
            );
        }
        match &stats {
            Some(s) => {
                let _ = write!(
                    out,
                    "<g><title>{} · {}: n = {}\nmin {} · p5 {} · p25 {} · median {} · p75 {} · \
                     p95 {} · max {} (ms)</title>",
                    escape(kind),
                    protocol,
                    s.n,
                    ms(s.min),
                    ms(s.p5),
                    ms(s.p25),
                    ms(s.p50),
                    ms(s.p75),
                    ms(s.p95),
                    ms(s.max)
                );
                let (y5, y25, y50, y75, y95) = (
                    y.map(s.p5),
                    y.map(s.p25),
                    y.map(s.p50),
                    y.map(s.p75),
                    y.map(s.p95),
                );
                let cap = box_w / 4.0;
                let _ = write!(
                    out,
                    "<line x1=\"{c}\" y1=\"{}\" x2=\"{c}\" y2=\"{}\" stroke=\"#444\" stroke-width=\"1.4\"/>\
                     <line x1=\"{c}\" y1=\"{}\" x2=\"{c}\" y2=\"{}\" stroke=\"#444\" stroke-width=\"1.4\"/>\
                     <line x1=\"{}\" y1=\"{w5}\" x2=\"{}\" y2=\"{w5}\" stroke=\"#444\" stroke-width=\"1.4\"/>\
                     <line x1=\"{}\" y1=\"{w95}\" x2=\"{}\" y2=\"{w95}\" stroke=\"#444\" stroke-width=\"1.4\"/>",
                    num(y5),
                    num(y25),
                    num(y75),
                    num(y95),
                    num(cx - cap),
                    num(cx + cap),
                    num(cx - cap),
                    num(cx + cap),
                    c = num(cx),
                    w5 = num(y5),
                    w95 = num(y95)
                );
                // A box at least 2 px tall, so that a tight distribution still shows.
                let (box_top, box_h) = if y25 - y75 < 2.0 {
                    ((y25 + y75) / 2.0 - 1.0, 2.0)
                } else {
                    (y75, y25 - y75)
                };
                let _ = write!(
                    out,
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{colour}\" \
                     fill-opacity=\"0.22\" stroke=\"{colour}\" stroke-width=\"1.8\"/>\
                     <line x1=\"{}\" y1=\"{m}\" x2=\"{}\" y2=\"{m}\" stroke=\"{colour}\" stroke-width=\"3\"/>",
                    num(cx - box_w / 2.0),
                    num(box_top),
                    num(box_w),
                    num(box_h),
                    num(cx - box_w / 2.0),
                    num(cx + box_w / 2.0),
                    m = num(y50)
                );
                // Each circle spread over the box's width, deterministically, so that equal
                // values do not all hide one another; a circle that would land exactly on one
                // already drawn is left out (with thousands of samples, most would).
                let mut drawn = HashSet::new();
                for (j, v) in s.outliers.iter().enumerate() {
                    let slot = (j * 7919) % 13;
                    let py = y.map(*v);
                    if !drawn.insert((slot, (py * 2.0).round() as i64)) {
                        continue;
                    }
                    let jitter = slot as f64 / 12.0 - 0.5;
                    let _ = write!(
                        out,
                        "<circle cx=\"{}\" cy=\"{}\" r=\"2\" fill=\"none\" stroke=\"{colour}\" \
                         stroke-width=\"1\" stroke-opacity=\"0.7\"/>",
                        num(cx + jitter * box_w * 0.7),
                        num(py)
                    );
                }
                out.push_str("</g>\n");
            }
            None => {
                out.push_str(&text(
                    cx,
                    mid,
                    "text-anchor=\"middle\" font-size=\"12\" font-style=\"italic\" fill=\"#5f6368\"",
                    "no samples",
                ));
                out.push('\n');
            }
        }
        // The kind's label and sample count.
        let n = stats.as_ref().map_or(0, |s| s.n);
        if rotate {
            let ly = y_bottom + 14.0;
            let _ = writeln!(
                out,
                "<text x=\"{c}\" y=\"{l}\" transform=\"rotate(-35 {c} {l})\" text-anchor=\"end\" \
                 font-size=\"12\">{} <tspan fill=\"#5f6368\">(n = {n})</tspan></text>",
                escape(kind),
                c = num(cx),
                l = num(ly)
            );
        } else {
            out.push_str(&text(
                cx,
                y_bottom + 18.0,
                "text-anchor=\"middle\" font-size=\"12\" font-weight=\"600\"",
                kind,
            ));
            out.push_str(&text(
                cx,
                y_bottom + 34.0,
                "text-anchor=\"middle\" font-size=\"11\" fill=\"#5f6368\"",
                &format!("n = {}", human(n as f64, 0)),
            ));
            out.push('\n');
        }
    }
    out.push_str("</svg>\n");
}

fn spread_cells(s: &Spread) -> String {
    if s.count == 0 {
        return "<td class=\"num\">—</td><td class=\"num\">—</td><td class=\"num\">—</td>"
            .to_owned();
    }
    format!(
        "<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
        ms(s.p50_ms),
        ms(s.p99_ms),
        ms(s.max_ms)
    )
}

fn per_fault(out: &mut String, rows: &[FaultTableRow]) {
    out.push_str("<section id=\"per-fault\">\n<h2>Per fault kind</h2>\n");
    if rows.is_empty() {
        out.push_str("<p class=\"empty\">No fault was run.</p>\n</section>\n");
        return;
    }
    out.push_str(
        "<table class=\"wide\">\n<thead>\
         <tr><th rowspan=\"2\">Fault</th><th class=\"num\" rowspan=\"2\">Runs</th>\
         <th class=\"group\" colspan=\"3\">UDP interruption (ms)</th>\
         <th class=\"group\" colspan=\"3\">TCP stall (ms)</th>\
         <th class=\"num\" rowspan=\"2\">UDP packets lost</th>\
         <th class=\"num\" rowspan=\"2\">Faults with 0 loss</th></tr>\
         <tr><th class=\"num\">p50</th><th class=\"num\">p99</th><th class=\"num\">max</th>\
         <th class=\"num\">p50</th><th class=\"num\">p99</th><th class=\"num\">max</th></tr>\
         </thead>\n<tbody>\n",
    );
    for row in rows {
        let zero = row
            .zero_loss_pct
            .filter(|v| v.is_finite())
            .map_or("—".to_owned(), |v| format!("{} %", human(v, 1)));
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"num\">{}</td>{}{}<td class=\"num\">{}</td>\
             <td class=\"num\">{zero}</td></tr>",
            escape(&row.kind),
            human(row.count as f64, 0),
            spread_cells(&row.udp),
            spread_cells(&row.tcp),
            human(row.packets_lost as f64, 0)
        );
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

fn timelines(out: &mut String, timelines: &[Timeline]) {
    out.push_str("<section id=\"timelines\">\n<h2>Timelines</h2>\n");
    if timelines.is_empty() {
        out.push_str("<p class=\"empty\">No timeline was recorded.</p>\n</section>\n");
        return;
    }
    out.push_str(
        "<p>One fault of each kind, seen from the nodes: the downstream ESP packets each node \
         sent to clients per time bin, stacked (the top edge is the cluster's total), the fault \
         instant (solid line) and the moment every affected stream flowed again (dashed line); \
         the shaded span between them is the interruption. Where the runner recorded client \
         streams, the strip below shows each one: a bar while its packets arrive, blank where \
         they stopped.</p>\n",
    );
    for t in timelines {
        timeline(out, t);
    }
    out.push_str("</section>\n");
}

/// Left margin of the timeline charts: room for the y ticks and title, or the streams' labels.
const TIMELINE_LEFT: f64 = 124.0;
const TIMELINE_RIGHT: f64 = 16.0;

/// The x axis of a timeline: time from the fault, in seconds when the window is long.
#[derive(Debug)]
struct TimeAxis {
    /// Milliseconds per unit.
    unit_ms: f64,
    unit: &'static str,
    lo: f64,
    hi: f64,
    scale: Linear,
    ticks: Vec<f64>,
    step: f64,
}

impl TimeAxis {
    fn new(lo_ms: f64, hi_ms: f64) -> TimeAxis {
        let (unit_ms, unit) = if hi_ms - lo_ms >= 2000.0 {
            (1000.0, "s")
        } else {
            (1.0, "ms")
        };
        let (lo, hi) = (lo_ms / unit_ms, hi_ms / unit_ms);
        let step = nice_step(hi - lo, 10);
        let (_, _, ticks) = linear_ticks(lo, hi, step);
        let ticks = ticks
            .into_iter()
            .filter(|v| *v >= lo - step * 1e-6 && *v <= hi + step * 1e-6)
            .collect();
        TimeAxis {
            unit_ms,
            unit,
            lo,
            hi,
            scale: Linear {
                d0: lo,
                d1: hi,
                r0: TIMELINE_LEFT,
                r1: WIDTH - TIMELINE_RIGHT,
            },
            ticks,
            step,
        }
    }

    /// Pixel of a time in ms from the fault.
    fn px(&self, ms_from_fault: f64) -> f64 {
        self.scale.map(ms_from_fault / self.unit_ms)
    }
}

/// The vertical extent of a chart's plot area.
#[derive(Clone, Copy, Debug)]
struct Frame {
    top: f64,
    bottom: f64,
}

/// A timeline chart's background, shaded interruption and time axis (drawn under the data).
fn time_frame(out: &mut String, axis: &TimeAxis, t: &Timeline, frame: Frame, height: f64) {
    let (left, right) = (axis.scale.r0, axis.scale.r1);
    let _ = writeln!(
        out,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#fbfbfc\" stroke=\"#c8ccd2\"/>",
        num(left),
        num(frame.top),
        num(right - left),
        num(frame.bottom - frame.top)
    );
    let (fx, recovered) = event_xs(axis, t);
    if let Some(rx) = recovered
        && rx > fx.max(left)
    {
        let _ = writeln!(
            out,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#e3e3e3\"/>",
            num(fx.max(left)),
            num(frame.top),
            num(rx - fx.max(left)),
            num(frame.bottom - frame.top)
        );
    }
    for v in &axis.ticks {
        let px = axis.scale.map(*v);
        let _ = writeln!(
            out,
            "<line x1=\"{p}\" y1=\"{}\" x2=\"{p}\" y2=\"{}\" stroke=\"#eceef1\"/>\
             <line x1=\"{p}\" y1=\"{}\" x2=\"{p}\" y2=\"{}\" stroke=\"#888\"/>{}",
            num(frame.top),
            num(frame.bottom),
            num(frame.bottom),
            num(frame.bottom + 5.0),
            text(
                px,
                frame.bottom + 19.0,
                "text-anchor=\"middle\" font-size=\"12\"",
                &tick_label(*v, axis.step)
            ),
            p = num(px)
        );
    }
    out.push_str(&text(
        (left + right) / 2.0,
        height - 6.0,
        "text-anchor=\"middle\" font-size=\"12\" font-weight=\"600\"",
        &format!("time from the fault ({})", axis.unit),
    ));
    out.push('\n');
}

/// Pixels of the fault (possibly outside the plot) and of the recovery (clamped into it).
fn event_xs(axis: &TimeAxis, t: &Timeline) -> (f64, Option<f64>) {
    let recovered = t.recovered_at_ms.filter(|r| r.is_finite()).map(|r| {
        axis.px(r - t.fault_at_ms)
            .clamp(axis.scale.r0, axis.scale.r1)
    });
    (axis.px(0.0), recovered)
}

/// The fault and recovery lines, over the data; labelled on the first chart of a timeline.
fn event_lines(out: &mut String, axis: &TimeAxis, t: &Timeline, frame: Frame, label: bool) {
    let (fault_x, recovered_x) = event_xs(axis, t);
    if fault_x >= axis.scale.r0 - 0.5 && fault_x <= axis.scale.r1 + 0.5 {
        let _ = writeln!(
            out,
            "<line x1=\"{f}\" y1=\"{}\" x2=\"{f}\" y2=\"{}\" stroke=\"#000\" stroke-width=\"1.8\"/>",
            num(frame.top - if label { 6.0 } else { 0.0 }),
            num(frame.bottom),
            f = num(fault_x)
        );
        if label {
            out.push_str(&text(
                fault_x - 4.0,
                frame.top - 8.0,
                "text-anchor=\"end\" font-size=\"12\" font-weight=\"600\"",
                &format!("fault: {}", t.kind),
            ));
            out.push('\n');
        }
    }
    if let Some(rx) = recovered_x {
        let _ = writeln!(
            out,
            "<line x1=\"{r}\" y1=\"{}\" x2=\"{r}\" y2=\"{}\" stroke=\"#000\" stroke-width=\"1.5\" \
             stroke-dasharray=\"5 3\"/>",
            num(frame.top - if label { 6.0 } else { 0.0 }),
            num(frame.bottom),
            r = num(rx)
        );
        if label {
            let after = t.recovered_at_ms.unwrap_or(0.0) - t.fault_at_ms;
            out.push_str(&text(
                rx + 4.0,
                frame.top - 8.0,
                "text-anchor=\"start\" font-size=\"12\" font-weight=\"600\"",
                &format!("recovered +{} ms", ms(after)),
            ));
            out.push('\n');
        }
    }
}

/// Runs of equal values: (first bin, bin after the last, value).
fn runs(values: &[f64]) -> Vec<(usize, usize, f64)> {
    let mut runs: Vec<(usize, usize, f64)> = Vec::new();
    for (i, &v) in values.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if run.2 == v => run.1 = i + 1,
            _ => runs.push((i, i + 1, v)),
        }
    }
    runs
}

/// A closed step-shaped band between `lower` and `upper` (same length, not empty).
fn band_path(
    lower: &[f64],
    upper: &[f64],
    x: impl Fn(usize) -> f64,
    y: impl Fn(f64) -> f64,
) -> String {
    let mut d = String::new();
    for (k, (start, end, v)) in runs(upper).into_iter().enumerate() {
        if k == 0 {
            let _ = write!(d, "M{} {}", num(x(start)), num(y(v)));
        } else {
            let _ = write!(d, "V{}", num(y(v)));
        }
        let _ = write!(d, "H{}", num(x(end)));
    }
    for (start, _, v) in runs(lower).into_iter().rev() {
        let _ = write!(d, "V{}H{}", num(y(v)), num(x(start)));
    }
    d.push('Z');
    d
}

/// The nodes' packets per bin, stacked.
fn nodes_chart(out: &mut String, axis: &TimeAxis, t: &Timeline, bins: usize) {
    let height = 310.0;
    let frame = Frame {
        top: 24.0,
        bottom: height - 44.0,
    };
    let mut lower = vec![0.0; bins];
    let mut bands = Vec::new();
    for n in &t.nodes {
        let upper: Vec<f64> = (0..bins)
            .map(|i| lower[i] + f64::from(n.packets.get(i).copied().unwrap_or(0)))
            .collect();
        bands.push((lower.clone(), upper.clone()));
        lower = upper;
    }
    let total = lower;
    let max = total.iter().copied().fold(0.0, f64::max).max(1.0);
    let step = nice_step(max, 5).max(1.0);
    let (_, y_hi, y_ticks) = linear_ticks(0.0, max, step);
    let y = Linear {
        d0: 0.0,
        d1: y_hi,
        r0: frame.bottom,
        r1: frame.top,
    };
    let title = format!("ESP packets sent / {} ms", human(t.bin_ms, 0));
    let _ = writeln!(
        out,
        "<svg viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"{}\">",
        num(WIDTH),
        num(height),
        escape(&title)
    );
    time_frame(out, axis, t, frame, height);
    let x_of_bin = |i: usize| axis.px(t.start_ms + i as f64 * t.bin_ms - t.fault_at_ms);
    for (i, (node, (lower, upper))) in t.nodes.iter().zip(&bands).enumerate() {
        let peak = node.packets.iter().copied().max().unwrap_or(0);
        let _ = writeln!(
            out,
            "<path d=\"{}\" fill=\"{}\" fill-opacity=\"0.8\" stroke=\"none\"><title>{}: up to {} \
             packets per bin</title></path>",
            band_path(lower, upper, x_of_bin, |v| y.map(v)),
            PALETTE[i % PALETTE.len()],
            escape(&node.node),
            peak
        );
    }
    // The total's edge, and the y grid over the bands (faint, so that levels read across).
    let total_bins: Vec<u32> = total.iter().map(|v| *v as u32).collect();
    let _ = writeln!(
        out,
        "<path d=\"{}\" fill=\"none\" stroke=\"#1d1d1f\" stroke-width=\"1.1\"><title>all nodes</title></path>",
        step_path(&total_bins, x_of_bin, |v| y.map(v))
    );
    for v in &y_ticks {
        let py = y.map(*v);
        let _ = writeln!(
            out,
            "<line x1=\"{}\" y1=\"{p}\" x2=\"{}\" y2=\"{p}\" stroke=\"#ffffff\" stroke-opacity=\"0.55\"/>{}",
            num(axis.scale.r0),
            num(axis.scale.r1),
            text(
                axis.scale.r0 - 8.0,
                py + 4.0,
                "text-anchor=\"end\" font-size=\"12\"",
                &tick_label(*v, step)
            ),
            p = num(py)
        );
    }
    let mid = (frame.top + frame.bottom) / 2.0;
    let _ = writeln!(
        out,
        "<text x=\"{x}\" y=\"{m}\" transform=\"rotate(-90 {x} {m})\" text-anchor=\"middle\" \
         font-size=\"12\" font-weight=\"600\">{}</text>",
        escape(&title),
        x = num(axis.scale.r0 - 56.0),
        m = num(mid)
    );
    event_lines(out, axis, t, frame, true);
    out.push_str("</svg>\n");
}

/// The rows of the streams' strip at most.
const MAX_STREAM_ROWS: usize = 24;

/// The bins of a stream that lie in a gap: a run of empty bins longer than twice the stream's
/// usual run of empty bins (its packet spacing), and at least 3 bins.
fn gaps(received: &[u32]) -> Vec<(usize, usize)> {
    let empty_runs: Vec<(usize, usize)> = runs(
        &received
            .iter()
            .map(|&v| f64::from(u8::from(v == 0)))
            .collect::<Vec<_>>(),
    )
    .into_iter()
    .filter(|r| r.2 == 1.0)
    .map(|r| (r.0, r.1))
    .collect();
    let mut lengths: Vec<f64> = empty_runs.iter().map(|r| (r.1 - r.0) as f64).collect();
    lengths.sort_by(f64::total_cmp);
    let usual = percentile(&lengths, 50.0);
    let threshold = (2.0 * usual).max(2.0);
    empty_runs
        .into_iter()
        .filter(|r| (r.1 - r.0) as f64 > threshold)
        .collect()
}

/// The client streams as a strip: one row per stream, a bar while packets arrive.
fn streams_chart(out: &mut String, axis: &TimeAxis, t: &Timeline, bins: usize) {
    let rows = t.streams.len().min(MAX_STREAM_ROWS);
    let row_h = 16.0;
    let frame = Frame {
        top: 8.0,
        bottom: 8.0 + rows as f64 * row_h,
    };
    let height = frame.bottom + 44.0;
    let _ = writeln!(
        out,
        "<svg viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"client streams\">",
        num(WIDTH),
        num(height)
    );
    time_frame(out, axis, t, frame, height);
    let x_of_bin = |i: usize| axis.px(t.start_ms + i as f64 * t.bin_ms - t.fault_at_ms);
    for (r, stream) in t.streams.iter().take(rows).enumerate() {
        let y0 = frame.top + r as f64 * row_h + 3.0;
        let h = row_h - 6.0;
        let n = stream.received.len().min(bins);
        let gaps = gaps(&stream.received[..n]);
        out.push_str(&text(
            axis.scale.r0 - 6.0,
            y0 + h - 1.0,
            "text-anchor=\"end\" font-size=\"11\"",
            &stream.label,
        ));
        // The bar: from the first bin to the last, less the gaps.
        let mut segments = Vec::new();
        let mut from = 0;
        for &(g0, g1) in &gaps {
            segments.push((from, g0));
            from = g1;
        }
        segments.push((from, n));
        let mut d = String::new();
        for (s0, s1) in segments.into_iter().filter(|(a, b)| b > a) {
            let _ = write!(
                d,
                "M{} {}H{}V{}H{}Z",
                num(x_of_bin(s0)),
                num(y0),
                num(x_of_bin(s1)),
                num(y0 + h),
                num(x_of_bin(s0))
            );
        }
        let longest = gaps
            .iter()
            .map(|(a, b)| (b - a) as f64 * t.bin_ms)
            .fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "<path d=\"{d}\" fill=\"{}\" fill-opacity=\"0.75\"><title>{}: {} gap(s), longest \
             {} ms</title></path>",
            PALETTE[4],
            escape(&stream.label),
            gaps.len(),
            ms(longest)
        );
    }
    event_lines(out, axis, t, frame, false);
    out.push_str("</svg>\n");
}

fn timeline(out: &mut String, t: &Timeline) {
    let heading = if t.label.trim().is_empty() {
        &t.kind
    } else {
        &t.label
    };
    let _ = writeln!(out, "<figure>\n<h3>{}</h3>", escape(heading));
    let bins = t
        .nodes
        .iter()
        .map(|n| n.packets.len())
        .chain(t.streams.iter().map(|s| s.received.len()))
        .max()
        .unwrap_or(0);
    let usable = bins > 0
        && t.bin_ms.is_finite()
        && t.bin_ms > 0.0
        && t.start_ms.is_finite()
        && t.fault_at_ms.is_finite();
    if !usable {
        out.push_str(
            "<p class=\"empty\">No packet counts were recorded for this fault.</p>\n</figure>\n",
        );
        return;
    }
    let axis = TimeAxis::new(
        t.start_ms - t.fault_at_ms,
        t.start_ms + bins as f64 * t.bin_ms - t.fault_at_ms,
    );
    out.push_str("<div class=\"legend\">");
    for (i, n) in t.nodes.iter().enumerate() {
        let _ = write!(
            out,
            "<span class=\"key\"><span class=\"swatch box\" style=\"border-color:{c};background:{c}\"></span>{}</span>",
            escape(&n.node),
            c = PALETTE[i % PALETTE.len()]
        );
    }
    out.push_str(
        "<span class=\"key\"><span class=\"swatch\" style=\"border-color:#000;border-top-width:2px\"></span>fault</span>",
    );
    match t.recovered_at_ms.filter(|r| r.is_finite()) {
        Some(r) => {
            let _ = write!(
                out,
                "<span class=\"key\"><span class=\"swatch\" style=\"border-color:#000;border-top-style:dashed;border-top-width:2px\"></span>recovered, {} ms after the fault</span>\
                 <span class=\"key\"><span class=\"swatch area\"></span>interruption</span>",
                ms(r - t.fault_at_ms)
            );
        }
        None => out.push_str(
            "<span class=\"key\"><strong>not recovered within the window</strong></span>",
        ),
    }
    out.push_str("</div>\n");
    if t.nodes.is_empty() {
        out.push_str("<p class=\"empty\">No per-node counts for this fault.</p>\n");
    } else {
        nodes_chart(out, &axis, t, bins);
    }
    if !t.streams.is_empty() {
        let shown = t.streams.len().min(MAX_STREAM_ROWS);
        let _ = writeln!(
            out,
            "<div class=\"legend\"><span class=\"key\"><span class=\"swatch box\" \
             style=\"border-color:{c};background:{c}\"></span>client streams ({}): a bar while \
             packets arrive, blank in a gap</span></div>",
            if shown < t.streams.len() {
                format!("{shown} of {}", t.streams.len())
            } else {
                shown.to_string()
            },
            c = PALETTE[4]
        );
        streams_chart(out, &axis, t, bins);
    }
    let _ = writeln!(
        out,
        "<figcaption>{} bins of {} ms, from {} to {} {} around the fault.</figcaption>\n</figure>",
        human(bins as f64, 0),
        human(t.bin_ms, 0),
        tick_label(axis.lo, axis.step),
        tick_label(axis.hi, axis.step),
        axis.unit
    );
}

/// G.109's category of speech transmission quality for a rating R.
fn g109_category(r: f64) -> &'static str {
    match r {
        r if r >= 90.0 => "best",
        r if r >= 80.0 => "high",
        r if r >= 70.0 => "medium",
        r if r >= 60.0 => "low",
        r if r >= 50.0 => "poor",
        _ => "not recommended",
    }
}

fn calls(out: &mut String, rows: &[CallRow]) {
    out.push_str("<section id=\"calls\">\n<h2>Call quality (E-model)</h2>\n");
    if rows.is_empty() {
        out.push_str("<p class=\"empty\">No call was rated.</p>\n</section>\n");
        return;
    }
    let baseline = rows
        .iter()
        .find(|r| r.fault.is_none())
        .map(|r| r.quality.mos);
    out.push_str(
        "<table class=\"wide\">\n<thead><tr><th>Call</th><th>Fault</th><th class=\"num\">Packets</th>\
         <th class=\"num\">Lost</th><th class=\"num\">Late</th><th class=\"num\">Ppl</th>\
         <th class=\"num\">BurstR</th><th class=\"num\">Ta (ms)</th><th class=\"num\">R</th>\
         <th>G.109</th><th class=\"num\">MOS</th><th class=\"num\">ΔMOS</th></tr></thead>\n<tbody>\n",
    );
    for row in rows {
        let q = &row.quality;
        let delta = match (baseline, &row.fault) {
            (Some(_), None) => "baseline".to_owned(),
            (Some(base), Some(_)) => {
                let d = q.mos - base;
                let cell = if d >= 0.0 {
                    format!("+{}", human(d, 2))
                } else {
                    human(d, 2)
                };
                if d <= -0.1 {
                    format!("<span class=\"delta-bad\">{cell}</span>")
                } else {
                    cell
                }
            }
            (None, _) => "—".to_owned(),
        };
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{} %</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\"><strong>{}</strong></td>\
             <td class=\"num\">{delta}</td></tr>",
            escape(&row.label),
            row.fault.as_deref().map_or("none".to_owned(), escape),
            human(q.packets as f64, 0),
            human(q.lost as f64, 0),
            human(q.late as f64, 0),
            human(q.loss_ratio * 100.0, 2),
            human(q.burst_r, 2),
            human(q.mean_one_way_delay_ms, 0),
            human(q.r, 1),
            g109_category(q.r),
            human(q.mos, 2)
        );
    }
    out.push_str(
        "</tbody>\n</table>\n<p class=\"meta\">ITU-T G.107 (06/2015) E-model for G.711 with packet-loss \
         concealment (Ie = 0, Bpl = 25.1, G.113 Appendix I), every other parameter at its default. \
         Ppl counts lost packets and packets too late for the de-jitter buffer; Ta is the \
         mouth-to-ear delay (network, buffer, packetization). The E-model rates a whole call: a \
         single gap of a few hundred milliseconds costs a two-minute call only a few hundredths \
         of a MOS point, however audible it is; the interruption plots show it.</p>\n</section>\n",
    );
}

fn methods(out: &mut String) {
    out.push_str(
        "<section id=\"methods\">\n<h2>Methods</h2>\n<ul>\n\
         <li><strong>UDP interruption</strong>: per tunnel, the longest gap between consecutive \
         packets received of the voice-like stream (50 packets/s of 172 bytes), minus its \
         20&nbsp;ms spacing.</li>\n\
         <li><strong>TCP stall</strong>: per tunnel, the longest time the bulk transfer made no \
         progress.</li>\n\
         <li><strong>Box plots</strong>: box from the 25th to the 75th percentile, line at the \
         median, whiskers from the 5th to the 95th percentile, every sample outside them drawn as \
         a circle; percentiles by nearest rank; log scale.</li>\n\
         <li><strong>Timelines</strong>: downstream ESP packets each node sent to clients, \
         counted per bin on the nodes.</li>\n\
         <li><strong>Call quality</strong>: ITU-T G.107 (06/2015) E-model, R mapped to MOS by its \
         Annex B.</li>\n\
         <li><strong>Paper</strong>: Palomares, Migault, Laurent, “Elastic Virtual Private \
         Cloud”, Q2SWINET 2014 — TM: planned transfer, HA: failover, on two strongSwan \
         nodes.</li>\n</ul>\n</section>\n<footer>Generated by evpc-chaos. This page is \
         self-contained: it loads nothing.</footer>\n",
    );
}

#[cfg(test)]
mod tests {
    use super::super::emodel::{self, CallSample, EmodelInput};
    use super::super::{NodeSeries, StreamSeries, SummaryRow};
    use super::*;

    /// A small deterministic generator (xorshift64*), so that the sample report is the same on
    /// every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Roughly log-normal around `median`, with a long right tail.
        fn around(&mut self, median: f64, spread: f64) -> f64 {
            let u: f64 = (0..4).map(|_| self.next()).sum::<f64>() - 2.0;
            median * (u * spread).exp()
        }
    }

    const KINDS: [(&str, f64, f64); 10] = [
        ("kill-owner", 180.0, 420.0),
        ("kill-leader", 25.0, 60.0),
        ("pause", 210.0, 480.0),
        ("partition", 260.0, 610.0),
        ("transfer", 22.0, 48.0),
        ("drain", 24.0, 55.0),
        ("add-node", 3.0, 9.0),
        ("remove-node", 30.0, 70.0),
        ("bounce", 150.0, 380.0),
        ("cluster-restart", 900.0, 1800.0),
    ];

    fn call(n: usize, lost: impl Fn(usize) -> bool) -> Vec<CallSample> {
        (0..n)
            .map(|i| {
                let sent = i as f64 * 20.0;
                CallSample {
                    sent_at_ms: sent,
                    received_at_ms: (!lost(i)).then_some(sent + 0.4 + (i % 7) as f64 * 0.1),
                }
            })
            .collect()
    }

    /// A synthetic but realistic report: a 3-node lab, every section filled.
    fn sample_report() -> TunnelsReport {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut interruptions = Vec::new();
        let mut per_fault = Vec::new();
        for (kind, udp, tcp) in KINDS {
            let runs = 12;
            let udp_samples: Vec<f64> = (0..runs * 40).map(|_| rng.around(udp, 0.35)).collect();
            let tcp_samples: Vec<f64> = (0..runs * 40).map(|_| rng.around(tcp, 0.4)).collect();
            let target = matches!(kind, "kill-owner" | "transfer")
                .then_some(if kind == "transfer" { 100.0 } else { 500.0 });
            per_fault.push(FaultTableRow {
                kind: kind.to_owned(),
                count: runs,
                udp: Spread::of(&udp_samples),
                tcp: Spread::of(&tcp_samples),
                packets_lost: (udp_samples.iter().sum::<f64>() / 20.0) as u64,
                zero_loss_pct: matches!(kind, "transfer" | "drain").then_some(97.5),
            });
            interruptions.push(FaultSeries {
                kind: kind.to_owned(),
                protocol: Protocol::Udp,
                samples_ms: udp_samples,
                target_p99_ms: target,
            });
            interruptions.push(FaultSeries {
                kind: kind.to_owned(),
                protocol: Protocol::Tcp,
                samples_ms: tcp_samples,
                target_p99_ms: target.map(|t| t * 2.0),
            });
        }
        let paper = vec![
            PaperFigure {
                kind: "transfer".into(),
                protocol: Protocol::Udp,
                ms: 1330.0,
                label: "paper TM".into(),
            },
            PaperFigure {
                kind: "transfer".into(),
                protocol: Protocol::Tcp,
                ms: 1700.0,
                label: "paper TM".into(),
            },
            PaperFigure {
                kind: "kill-owner".into(),
                protocol: Protocol::Udp,
                ms: 1510.0,
                label: "paper HA".into(),
            },
            PaperFigure {
                kind: "kill-owner".into(),
                protocol: Protocol::Tcp,
                ms: 2370.0,
                label: "paper HA".into(),
            },
        ];
        let timelines = KINDS
            .iter()
            .map(|&(kind, udp, _)| timeline_of(kind, udp, &mut rng))
            .collect();
        let calls = vec![
            CallRow {
                label: "2-min call, no fault".into(),
                fault: None,
                quality: emodel::assess(&EmodelInput::g711(call(6000, |_| false))),
            },
            CallRow {
                label: "2-min call, kill-owner at 60 s (400 ms gap)".into(),
                fault: Some("kill-owner".into()),
                quality: emodel::assess(&EmodelInput::g711(call(6000, |i| {
                    (3000..3020).contains(&i)
                }))),
            },
            CallRow {
                label: "2-min call, transfer at 60 s".into(),
                fault: Some("transfer".into()),
                quality: emodel::assess(&EmodelInput::g711(call(6000, |i| i == 3000))),
            },
            CallRow {
                label: "2-min call, cluster-restart at 60 s (2 s gap)".into(),
                fault: Some("cluster-restart".into()),
                quality: emodel::assess(&EmodelInput::g711(call(6000, |i| {
                    (3000..3100).contains(&i)
                }))),
            },
        ];
        TunnelsReport {
            title: "evpc tunnels — 3 nodes, 1,200 clients <lab> & \"quotes\"".into(),
            date: "2025-01-17T14:03:22Z".into(),
            command: "evpc-chaos tunnels --nodes 3 --clients 1200 --faults all --seed 7 \
                      --report 'out/report.json'"
                .into(),
            machine: "2 × vCPU (x86_64), Linux 6.1, 8 GiB".into(),
            topology: "3 gateway nodes behind one ClusterIP address; 600 strongSwan clients and \
                       600 evpc clients, each with one voice-like UDP stream and one TCP bulk \
                       transfer in its tunnel."
                .into(),
            summary: vec![
                SummaryRow {
                    label: "nodes".into(),
                    value: "3".into(),
                },
                SummaryRow {
                    label: "clients (strongSwan / evpc)".into(),
                    value: "600 / 600".into(),
                },
                SummaryRow {
                    label: "faults run".into(),
                    value: "120 (12 of each of 10 kinds)".into(),
                },
                SummaryRow {
                    label: "duration".into(),
                    value: "41 min 12 s".into(),
                },
            ],
            invariants: vec![
                InvariantRow {
                    name: "nonce reuse on the wire".into(),
                    value: "0 of 48 213 004 packets".into(),
                    passed: true,
                    detail: String::new(),
                },
                InvariantRow {
                    name: "anti-replay drops at clients".into(),
                    value: "3".into(),
                    passed: false,
                    detail: "first: SA 0x1f2e3d4c seq 88123 dropped by client-17 at 812.330 s\n\
                             sent by node-2 at 812.101 s <after> node-3 at 811.998 s & resent"
                        .into(),
                },
                InvariantRow {
                    name: "re-authentications".into(),
                    value: "0".into(),
                    passed: true,
                    detail: String::new(),
                },
                InvariantRow {
                    name: "failed DPDs".into(),
                    value: "0".into(),
                    passed: true,
                    detail: String::new(),
                },
                InvariantRow {
                    name: "inner addresses kept".into(),
                    value: "1200 of 1200".into(),
                    passed: true,
                    detail: String::new(),
                },
            ],
            interruptions,
            paper,
            timelines,
            calls,
            per_fault,
        }
    }

    /// 6 s around a fault of `kind`, 10 ms bins: node-2 owned a third of the tunnels and loses
    /// them; node-1 and node-3 take them over after the interruption.
    fn timeline_of(kind: &str, gap_ms: f64, rng: &mut Rng) -> Timeline {
        let bins = 600;
        let fault_bin = 200;
        let recovered_bin = fault_bin + (gap_ms / 10.0).ceil() as usize;
        let base = |rng: &mut Rng| 200 + (rng.next() * 12.0) as u32;
        let mut nodes = vec![Vec::new(), Vec::new(), Vec::new()];
        for i in 0..bins {
            for (n, series) in nodes.iter_mut().enumerate() {
                let v = match (n, i) {
                    (1, i) if i >= fault_bin => 0,
                    (_, i) if i >= recovered_bin => base(rng) * 3 / 2,
                    _ => base(rng),
                };
                series.push(v);
            }
        }
        let streams = (0..3)
            .map(|s| StreamSeries {
                label: format!("client-{} udp", s * 7 + 3),
                received: (0..bins)
                    .map(|i| {
                        if s == 1 && i >= fault_bin && i < recovered_bin {
                            0
                        } else {
                            u32::from(i % 2 == 0)
                        }
                    })
                    .collect(),
            })
            .collect();
        Timeline {
            label: format!("{kind}: node-2 <owner> of 400 SAs, at 32.00 s"),
            kind: kind.to_owned(),
            bin_ms: 10.0,
            start_ms: 30_000.0,
            fault_at_ms: 32_000.0,
            recovered_at_ms: Some(32_000.0 + (recovered_bin - fault_bin) as f64 * 10.0),
            nodes: nodes
                .into_iter()
                .enumerate()
                .map(|(n, packets)| NodeSeries {
                    node: format!("node-{}", n + 1),
                    packets,
                })
                .collect(),
            streams,
        }
    }

    /// A report with empty series everywhere something can be empty.
    fn empty_report() -> TunnelsReport {
        TunnelsReport {
            title: String::new(),
            interruptions: vec![
                FaultSeries {
                    kind: "kill-owner".into(),
                    protocol: Protocol::Udp,
                    samples_ms: Vec::new(),
                    target_p99_ms: Some(500.0),
                },
                FaultSeries {
                    kind: "pause".into(),
                    protocol: Protocol::Udp,
                    samples_ms: vec![0.0, 0.0, 12.0, f64::NAN, f64::INFINITY],
                    target_p99_ms: None,
                },
            ],
            timelines: vec![
                Timeline {
                    label: "kill-owner (no counts)".into(),
                    kind: "kill-owner".into(),
                    bin_ms: 10.0,
                    ..Timeline::default()
                },
                Timeline {
                    label: "never recovered, all zero".into(),
                    kind: "partition".into(),
                    bin_ms: 10.0,
                    start_ms: 0.0,
                    fault_at_ms: 50.0,
                    recovered_at_ms: None,
                    nodes: vec![NodeSeries {
                        node: "node-1".into(),
                        packets: vec![0; 30],
                    }],
                    streams: Vec::new(),
                },
            ],
            per_fault: vec![FaultTableRow {
                kind: "kill-owner".into(),
                ..FaultTableRow::default()
            }],
            ..TunnelsReport::default()
        }
    }

    /// Checks that the tags in `doc` nest properly (HTML void elements excepted) and returns the
    /// SVG fragments it contains; panics on the first problem.
    fn check_well_formed(doc: &str) -> Vec<&str> {
        const VOID: [&str; 6] = ["meta", "br", "hr", "img", "link", "input"];
        let mut stack: Vec<&str> = Vec::new();
        let mut svgs = Vec::new();
        let mut svg_start = None;
        let mut rest = doc;
        let mut offset = 0;
        while let Some(lt) = rest.find('<') {
            let start = offset + lt;
            let tail = &rest[lt..];
            let gt = tail
                .find('>')
                .unwrap_or_else(|| panic!("unclosed tag at {start}"));
            let tag = &tail[1..gt];
            offset = start + gt + 1;
            rest = &doc[offset..];
            if tag.starts_with('!') {
                continue;
            }
            // Inside <style>, skip to its end (CSS has no tags).
            if let Some(name) = tag.strip_prefix('/') {
                let name = name.trim();
                let open = stack
                    .pop()
                    .unwrap_or_else(|| panic!("</{name}> closes nothing at {start}"));
                assert_eq!(open, name, "<{open}> closed by </{name}> at {start}");
                if name == "svg" && !stack.contains(&"svg") {
                    svgs.push(&doc[svg_start.take().unwrap()..offset]);
                }
                continue;
            }
            let name = tag
                .split(|c: char| c.is_whitespace() || c == '/')
                .next()
                .unwrap();
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "bad tag {tag:?} at {start}"
            );
            // Attribute values must be quoted and must not hide markup.
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag:?}"
            );
            if tag.ends_with('/') || VOID.contains(&name) {
                continue;
            }
            if name == "svg" && !stack.contains(&"svg") {
                svg_start = Some(start);
            }
            if name == "style" {
                let end = rest.find("</style>").expect("</style>");
                offset += end;
                rest = &doc[offset..];
            }
            stack.push(name);
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        svgs
    }

    /// Every number in the coordinate attributes of `svg` is finite.
    fn check_coordinates(svg: &str) {
        const ATTRS: [&str; 14] = [
            "x",
            "y",
            "x1",
            "y1",
            "x2",
            "y2",
            "cx",
            "cy",
            "r",
            "width",
            "height",
            "d",
            "viewBox",
            "transform",
        ];
        for attr in ATTRS {
            let needle = format!(" {attr}=\"");
            for (at, _) in svg.match_indices(&needle) {
                let value = &svg[at + needle.len()..];
                let value = &value[..value.find('"').unwrap()];
                let lower = value.to_ascii_lowercase();
                assert!(
                    !lower.contains("nan") && !lower.contains("inf"),
                    "{attr}=\"{value}\""
                );
                for token in value
                    .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e'))
                    .filter(|t| !t.is_empty() && *t != "-" && *t != "e")
                {
                    let n: f64 = token
                        .parse()
                        .unwrap_or_else(|_| panic!("{attr}=\"{value}\": {token:?}"));
                    assert!(n.is_finite() && n.abs() < 1e6, "{attr}=\"{value}\"");
                }
            }
        }
    }

    fn check_self_contained(html: &str) {
        let lower = html.to_ascii_lowercase();
        for bad in [
            "http://", "https://", "src=", "url(", "@import", "<script", "<link", "//cdn",
        ] {
            assert!(!lower.contains(bad), "external reference {bad:?}");
        }
        assert_eq!(lower.matches("<html").count(), 1);
        assert_eq!(lower.matches("</html>").count(), 1);
        assert!(lower.starts_with("<!doctype html>"));
    }

    #[test]
    fn renders_a_full_report() {
        let report = sample_report();
        let html = render_html(&report);
        check_self_contained(&html);
        let svgs = check_well_formed(&html);
        // Two box panels, and per timeline one chart of nodes and one of streams.
        // Two small ones in the legend too.
        assert_eq!(svgs.len(), 4 + 2 * KINDS.len(), "{}", svgs.len());
        for svg in &svgs {
            check_coordinates(svg);
        }
        // Sections in order.
        let order = [
            "id=\"summary\"",
            "id=\"invariants\"",
            "id=\"interruptions\"",
            "id=\"per-fault\"",
            "id=\"timelines\"",
            "id=\"calls\"",
        ];
        let positions: Vec<usize> = order.iter().map(|s| html.find(s).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        // Text is escaped wherever it lands.
        assert!(html.contains("&lt;lab&gt; &amp; &quot;quotes&quot;"));
        assert!(!html.contains("<lab>"));
        assert!(!html.contains("<owner>"));
        assert!(html.contains("node-2 &lt;owner&gt; of 400 SAs"));
        assert!(html.contains("&lt;after&gt; node-3 at 811.998 s &amp; resent"));
        assert!(html.contains("&#39;out/report.json&#39;"));
        // The paper's figures and every fault kind appear.
        for label in [
            "paper TM 1\u{2009}330 ms",
            "paper HA 1\u{2009}510 ms",
            "paper TM 1\u{2009}700 ms",
            "paper HA 2\u{2009}370 ms",
        ] {
            assert!(html.contains(label), "{label}");
        }
        assert!(html.contains("Q2SWINET 2014"));
        for (kind, _, _) in KINDS {
            // Two panels, the per-fault table, a timeline.
            assert!(html.matches(kind).count() >= 4, "{kind}");
        }
        // The failed invariant is flagged.
        assert!(html.contains("1 of 5 invariants FAILED"));
        assert_eq!(html.matches("class=\"badge fail\"").count(), 1);
        // Call quality: the baseline and a negative difference.
        assert!(html.contains("baseline"));
        assert!(html.contains("−0.03"), "the 400 ms gap's ΔMOS");
        assert!(html.contains("recovered +"));
        // For a human to look at.
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/report-sample.html");
        let _ = std::fs::write(path, &html);
    }

    #[test]
    fn renders_empty_series() {
        let html = render_html(&empty_report());
        check_self_contained(&html);
        for svg in check_well_formed(&html) {
            check_coordinates(svg);
        }
        assert!(html.contains("<title>evpc tunnels report</title>"));
        assert!(html.contains("No invariants were checked"));
        assert!(html.contains("no samples"));
        assert!(html.contains("No TCP samples in this report."));
        assert!(html.contains("No packet counts were recorded for this fault."));
        assert!(html.contains("not recovered within the window"));
        assert!(html.contains("Interruptions of 0&nbsp;ms are drawn on the bottom line"));
        assert!(html.contains("No call was rated."));
        let _ = std::fs::write(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/report-sample-empty.html"),
            &html,
        );
        // Nothing at all.
        let html = render_html(&TunnelsReport::default());
        check_self_contained(&html);
        check_well_formed(&html);
        assert!(html.contains("No fault was measured in this run."));
    }

    #[test]
    fn a_large_run_stays_small() {
        // 10,000 samples per kind and protocol: the circles that would coincide are drawn once.
        let mut report = sample_report();
        let mut rng = Rng(7);
        for series in &mut report.interruptions {
            let median = series.samples_ms[0];
            series.samples_ms = (0..10_000).map(|_| rng.around(median, 0.35)).collect();
        }
        let html = render_html(&report);
        check_well_formed(&html);
        assert!(html.len() < 2_000_000, "{} bytes", html.len());
    }

    #[test]
    fn box_stats() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = BoxStats::of(&samples).unwrap();
        assert_eq!(
            (s.p5, s.p25, s.p50, s.p75, s.p95),
            (5.0, 25.0, 50.0, 75.0, 95.0)
        );
        assert_eq!((s.min, s.max, s.n), (1.0, 100.0, 100));
        assert_eq!(s.outliers.len(), 9);
        assert!(BoxStats::of(&[f64::NAN]).is_none());
        assert!(BoxStats::of(&[]).is_none());
    }

    #[test]
    fn g109() {
        assert_eq!(g109_category(93.2), "best");
        assert_eq!(g109_category(85.0), "high");
        assert_eq!(g109_category(10.0), "not recommended");
    }

    #[test]
    fn loads_what_it_renders() {
        let report = sample_report();
        let json = serde_json::to_string(&report).unwrap();
        let back: TunnelsReport = serde_json::from_str(&json).unwrap();
        assert_eq!(render_html(&back), render_html(&report));
    }
}
