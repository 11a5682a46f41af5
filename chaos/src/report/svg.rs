//! Small pieces to draw plots as inline SVG: escaping, number formatting, scales and ticks.
//!
//! Every coordinate written goes through [`num`], which never writes a non-finite number.

use std::fmt::Write;

/// Okabe & Ito's palette (2008), distinguishable with the common colour-vision deficiencies, in
/// the order series take it (black last: it also marks faults).
pub const PALETTE: [&str; 8] = [
    "#0072B2", // blue
    "#E69F00", // orange
    "#009E73", // bluish green
    "#CC79A7", // reddish purple
    "#56B4E9", // sky blue
    "#D55E00", // vermillion
    "#B39B00", // yellow, darkened to read on white
    "#000000", // black
];

/// `s` with the characters HTML and XML give a meaning to escaped, for text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A coordinate: one decimal at most, never NaN or infinite (those become 0: callers keep
/// non-finite data out, this only makes sure a slip cannot break the document).
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "0".to_owned();
    }
    let rounded = (x * 10.0).round() / 10.0;
    if rounded == rounded.trunc() {
        format!("{}", rounded as i64)
    } else {
        format!("{rounded:.1}")
    }
}

/// A value for people: `decimals` decimals, thousands separated by a thin space, a true minus.
pub fn human(x: f64, decimals: usize) -> String {
    if !x.is_finite() {
        return "—".to_owned();
    }
    let s = format!("{:.*}", decimals, x.abs());
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(i, f)| (i, f));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push('\u{2009}');
        }
        grouped.push(c);
    }
    let negative = x < 0.0 && s.chars().any(|c| c.is_ascii_digit() && c != '0');
    let mut out = String::new();
    if negative {
        out.push('−');
    }
    out.push_str(&grouped);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

/// Milliseconds for people, with a precision that suits their size.
pub fn ms(x: f64) -> String {
    let decimals = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    human(x, decimals)
}

/// A linear map from a data interval onto a pixel interval.
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub d0: f64,
    pub d1: f64,
    pub r0: f64,
    pub r1: f64,
}

impl Linear {
    pub fn map(&self, v: f64) -> f64 {
        let span = self.d1 - self.d0;
        if span == 0.0 || !span.is_finite() {
            return self.r0;
        }
        self.r0 + (v - self.d0) / span * (self.r1 - self.r0)
    }
}

/// A logarithmic map from a positive data interval onto a pixel interval; values at or below
/// the interval's bottom (0 included) map onto its bottom.
#[derive(Clone, Copy, Debug)]
pub struct Log {
    pub d0: f64,
    pub d1: f64,
    pub r0: f64,
    pub r1: f64,
}

impl Log {
    pub fn map(&self, v: f64) -> f64 {
        let v = v.clamp(self.d0, self.d1);
        let span = (self.d1 / self.d0).log10();
        if span <= 0.0 || !span.is_finite() {
            return self.r0;
        }
        self.r0 + (v / self.d0).log10() / span * (self.r1 - self.r0)
    }
}

/// The "nice" step (1, 2 or 5 times a power of ten) that cuts `span` into about `count` parts.
pub fn nice_step(span: f64, count: usize) -> f64 {
    if span.is_nan() || span <= 0.0 || span.is_infinite() {
        return 1.0;
    }
    let raw = span / count.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// Ticks every `step` from the multiple of `step` at or below `lo` to the one at or above `hi`:
/// (first, last, ticks).
pub fn linear_ticks(lo: f64, hi: f64, step: f64) -> (f64, f64, Vec<f64>) {
    let first = (lo / step).floor() * step;
    let last = ((hi / step).ceil() * step).max(first + step);
    let n = ((last - first) / step).round() as usize;
    let ticks = (0..=n).map(|i| first + i as f64 * step).collect();
    (first, last, ticks)
}

/// The largest of 1, 2, 5 times a power of ten at or below `v` (`v` > 0).
pub fn step125_below(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    let f = v / magnitude;
    let m = if f >= 5.0 {
        5.0
    } else if f >= 2.0 {
        2.0
    } else {
        1.0
    };
    m * magnitude
}

/// The smallest of 1, 2, 5 times a power of ten at or above `v` (`v` > 0).
pub fn step125_above(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    let f = v / magnitude;
    let m = if f <= 1.0 + 1e-9 {
        1.0
    } else if f <= 2.0 + 1e-9 {
        2.0
    } else if f <= 5.0 + 1e-9 {
        5.0
    } else {
        10.0
    };
    m * magnitude
}

/// Ticks of a log axis over [`lo`, `hi`] (both 1-2-5 values): every 1, 2, 5 value, labelled
/// (`true`) unless the axis spans more than three decades, when only powers of ten are.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, bool)> {
    let decades = (hi / lo).log10();
    let mut ticks = Vec::new();
    let mut magnitude = 10f64.powf(lo.log10().floor());
    while magnitude <= hi * (1.0 + 1e-9) {
        for m in [1.0, 2.0, 5.0] {
            let v = m * magnitude;
            if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                ticks.push((v, decades <= 3.0 || m == 1.0));
            }
        }
        magnitude *= 10.0;
    }
    ticks
}

/// A tick label: `v` with the decimals `step` needs.
pub fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    human(v, decimals)
}

/// A step path through bins: bin `i` spans `x(i)`..`x(i + 1)` at height `y(values[i])`. Runs of
/// equal values make one segment.
pub fn step_path(values: &[u32], x: impl Fn(usize) -> f64, y: impl Fn(f64) -> f64) -> String {
    let mut d = String::new();
    let mut last: Option<u32> = None;
    for (i, &v) in values.iter().enumerate() {
        match last {
            None => {
                let _ = write!(d, "M{} {}", num(x(i)), num(y(f64::from(v))));
            }
            Some(l) if l != v => {
                let _ = write!(d, "H{}V{}", num(x(i)), num(y(f64::from(v))));
            }
            Some(_) => {}
        }
        last = Some(v);
    }
    if last.is_some() {
        let _ = write!(d, "H{}", num(x(values.len())));
    }
    d
}

/// `<text>` at (`x`, `y`) with extra attributes `attrs` (already escaped) and escaped `content`.
pub fn text(x: f64, y: f64, attrs: &str, content: &str) -> String {
    format!(
        "<text x=\"{}\" y=\"{}\" {attrs}>{}</text>",
        num(x),
        num(y),
        escape(content)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            escape(r#"<a href="x">&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(num(f64::NAN), "0");
        assert_eq!(num(f64::INFINITY), "0");
        assert_eq!(num(12.04), "12");
        assert_eq!(num(-3.26), "-3.3");
        assert_eq!(human(1234567.891, 1), "1\u{2009}234\u{2009}567.9");
        assert_eq!(human(-1500.0, 0), "−1\u{2009}500");
        assert_eq!(human(-0.01, 1), "0.0");
        assert_eq!(human(f64::NAN, 1), "—");
        assert_eq!(ms(1330.0), "1\u{2009}330");
        assert_eq!(ms(4.567), "4.57");
    }

    #[test]
    fn ticks() {
        assert_eq!(nice_step(100.0, 5), 20.0);
        assert_eq!(nice_step(7.0, 5), 2.0);
        assert_eq!(nice_step(0.0, 5), 1.0);
        let (first, last, t) = linear_ticks(0.0, 37.0, 10.0);
        assert_eq!((first, last, t.len()), (0.0, 40.0, 5));
        assert_eq!(step125_below(37.0), 20.0);
        assert_eq!(step125_above(37.0), 50.0);
        assert_eq!(step125_above(100.0), 100.0);
        assert_eq!(step125_below(1.0), 1.0);
        let labelled: Vec<f64> = log_ticks(1.0, 1000.0)
            .into_iter()
            .filter(|t| t.1)
            .map(|t| t.0)
            .collect();
        assert_eq!(labelled.len(), 10);
        let sparse: Vec<f64> = log_ticks(0.1, 10000.0)
            .into_iter()
            .filter(|t| t.1)
            .map(|t| t.0)
            .collect();
        assert_eq!(sparse.len(), 6);
        assert_eq!(tick_label(0.5, 0.1), "0.5");
        assert_eq!(tick_label(2000.0, 500.0), "2\u{2009}000");
    }

    #[test]
    fn scales() {
        let log = Log {
            d0: 1.0,
            d1: 1000.0,
            r0: 300.0,
            r1: 0.0,
        };
        assert_eq!(log.map(1.0), 300.0);
        assert_eq!(log.map(0.0), 300.0);
        assert_eq!(log.map(1000.0), 0.0);
        assert!((log.map(10.0) - 200.0).abs() < 1e-9);
        let lin = Linear {
            d0: 0.0,
            d1: 0.0,
            r0: 5.0,
            r1: 10.0,
        };
        assert_eq!(lin.map(3.0), 5.0);
    }

    #[test]
    fn steps() {
        let d = step_path(&[1, 1, 2, 2, 0], |i| i as f64 * 10.0, |v| 100.0 - v);
        assert_eq!(d, "M0 99H20V98H40V100H50");
        assert_eq!(step_path(&[], |i| i as f64, |v| v), "");
    }
}
