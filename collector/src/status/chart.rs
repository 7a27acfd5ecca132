//! A tenant's last day as a small inline SVG, drawn on the server: its
//! power per bin as a step line, its contract as a dashed step line, and
//! the bins without data as grey bands, the line broken there (a gap is
//! never drawn as 0 W). No script, no external reference.
//!
//! Bounded: at most [`MAX_BINS`] bins are drawn (more are cut off), so a
//! chart is a few kilobytes whatever the input.

use std::fmt::Write as _;

use super::escape;

/// Most bins one chart draws (a day in 5-minute bins).
pub const MAX_BINS: usize = 288;

/// What a chart shows: bins of equal length from `from`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Start of the first bin (Unix seconds).
    pub from: i64,
    /// Bin length, seconds.
    pub bin_seconds: i64,
    /// Average power per bin (W); `None`: no data.
    pub watts: Vec<Option<f64>>,
    /// The contract per bin (W); `None`: none. Same length as `watts`.
    pub contract_watts: Vec<Option<f64>>,
}

/// The drawing's size in CSS pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

/// The small chart of the overview.
pub const SMALL: Size = Size {
    width: 240,
    height: 48,
};
/// The chart of a tenant's page.
pub const LARGE: Size = Size {
    width: 720,
    height: 180,
};

/// Space below the plot for the time labels, and above it for the scale.
const MARGIN_BOTTOM: f64 = 12.0;
const MARGIN_TOP: f64 = 12.0;

/// The SVG element for `series`, labelled `label` (escaped here).
pub fn svg(series: &Series, size: Size, label: &str) -> String {
    let bins = series.watts.len().min(MAX_BINS);
    let watts = &series.watts[..bins];
    let contract = &series.contract_watts[..series.contract_watts.len().min(bins)];
    let finite = |v: &&f64| v.is_finite() && **v >= 0.0;
    let top = watts
        .iter()
        .chain(contract)
        .flatten()
        .filter(finite)
        .fold(0.0f64, |a, b| a.max(*b));
    // Headroom above the highest value; a flat 0 W day still has a scale.
    let scale = if top > 0.0 { top * 1.15 } else { 1000.0 };
    let (w, h) = (f64::from(size.width), f64::from(size.height));
    let plot_h = (h - MARGIN_TOP - MARGIN_BOTTOM).max(1.0);
    let step = if bins == 0 { w } else { w / bins as f64 };
    let x = |i: usize| i as f64 * step;
    let y = |v: f64| MARGIN_TOP + plot_h - (v.clamp(0.0, scale) / scale) * plot_h;

    let label = escape(label);
    let mut s = String::with_capacity(512 + bins * 24);
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" \
         viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"{label}\"><title>{label}</title>\
         <rect class=\"plot\" x=\"0\" y=\"{MARGIN_TOP}\" width=\"{w}\" height=\"{plot_h:.1}\"/>",
        size.width, size.height, size.width, size.height
    );
    // Gaps: one band per run of bins without data.
    let mut i = 0;
    while i < bins {
        if watts[i].is_some_and(|v| finite(&&v)) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bins && !watts[i].is_some_and(|v| finite(&&v)) {
            i += 1;
        }
        let _ = write!(
            s,
            "<rect class=\"gap\" x=\"{:.1}\" y=\"{MARGIN_TOP}\" width=\"{:.1}\" height=\"{plot_h:.1}\"/>",
            x(start),
            x(i) - x(start)
        );
    }
    let contract_d = steps(contract, &x, &y);
    if !contract_d.is_empty() {
        let _ = write!(s, "<path class=\"contract\" d=\"{contract_d}\"/>");
    }
    let power_d = steps(watts, &x, &y);
    if !power_d.is_empty() {
        let _ = write!(s, "<path class=\"power\" d=\"{power_d}\"/>");
    }
    let _ = write!(
        s,
        "<text class=\"axis\" x=\"2\" y=\"10\">{}</text>\
         <text class=\"axis\" x=\"2\" y=\"{:.0}\">−24 h</text>\
         <text class=\"axis\" x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">now</text></svg>",
        kw_label(scale),
        h - 1.0,
        w - 2.0,
        h - 1.0
    );
    s
}

/// A step line through the bins with a value, broken at each bin
/// without one.
fn steps(values: &[Option<f64>], x: &impl Fn(usize) -> f64, y: &impl Fn(f64) -> f64) -> String {
    let mut d = String::new();
    let mut drawing = false;
    for (i, v) in values.iter().enumerate() {
        match v.filter(|v| v.is_finite() && *v >= 0.0) {
            Some(v) => {
                let cmd = if drawing { 'V' } else { 'M' };
                if drawing {
                    let _ = write!(d, "{cmd}{:.1}H{:.1}", y(v), x(i + 1));
                } else {
                    let _ = write!(d, "{cmd}{:.1},{:.1}H{:.1}", x(i), y(v), x(i + 1));
                }
                drawing = true;
            }
            None => drawing = false,
        }
    }
    d
}

/// The scale's top, in kW or MW.
fn kw_label(watts: f64) -> String {
    if watts >= 1e6 {
        format!("{:.1} MW", watts / 1e6)
    } else {
        format!("{:.1} kW", watts / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(watts: Vec<Option<f64>>, contract: Option<f64>) -> Series {
        Series {
            from: 0,
            bin_seconds: 900,
            contract_watts: vec![contract; watts.len()],
            watts,
        }
    }

    fn path<'a>(svg: &'a str, class: &str) -> Option<&'a str> {
        let at = svg.find(&format!("<path class=\"{class}\" d=\""))?;
        let rest = &svg[at + class.len() + 18..];
        rest.split('"').next()
    }

    #[test]
    fn power_is_a_step_line_and_the_contract_a_line_at_its_height() {
        let s = series(
            vec![Some(0.0), Some(500.0), Some(1000.0), Some(250.0)],
            Some(800.0),
        );
        let svg = svg(
            &s,
            Size {
                width: 400,
                height: 124,
            },
            "lab-a",
        );
        // Scale top: 1000 W × 1.15; plot 100 px high from y 12.
        let y = |v: f64| 12.0 + 100.0 - v / 1150.0 * 100.0;
        assert_eq!(
            path(&svg, "power"),
            Some(
                format!(
                    "M0.0,{:.1}H100.0V{:.1}H200.0V{:.1}H300.0V{:.1}H400.0",
                    y(0.0),
                    y(500.0),
                    y(1000.0),
                    y(250.0)
                )
                .as_str()
            ),
            "{svg}"
        );
        assert_eq!(
            path(&svg, "contract"),
            Some(
                format!(
                    "M0.0,{0:.1}H100.0V{0:.1}H200.0V{0:.1}H300.0V{0:.1}H400.0",
                    y(800.0)
                )
                .as_str()
            )
        );
        assert!(!svg.contains("class=\"gap\""), "{svg}");
        assert!(svg.contains(">1.1 kW<"), "scale label: {svg}");
        assert!(!svg.contains("<script"));
    }

    #[test]
    fn gaps_break_the_line_and_are_marked_never_drawn_as_zero() {
        let s = series(
            vec![
                Some(100.0),
                None,
                None,
                Some(100.0),
                Some(f64::NAN),
                Some(100.0),
            ],
            None,
        );
        let svg = svg(
            &s,
            Size {
                width: 600,
                height: 124,
            },
            "t",
        );
        let d = path(&svg, "power").unwrap();
        // Three runs, each its own move: nothing is drawn over a gap.
        assert_eq!(d.matches('M').count(), 3, "{d}");
        assert!(d.starts_with("M0.0,"), "{d}");
        assert!(d.contains("M300.0,"), "{d}");
        assert!(d.contains("M500.0,"), "{d}");
        // No point at the bottom of the plot (0 W): y 112.
        assert!(!d.contains("112.0"), "{d}");
        // The gaps as bands: bins 1-2 and bin 4.
        assert!(
            svg.contains("<rect class=\"gap\" x=\"100.0\" y=\"12\" width=\"200.0\""),
            "{svg}"
        );
        assert!(
            svg.contains("<rect class=\"gap\" x=\"400.0\" y=\"12\" width=\"100.0\""),
            "{svg}"
        );
        // No contract: no contract line.
        assert_eq!(path(&svg, "contract"), None);
        // A day without any data: all gap, no line, still a scale.
        let svg = super::svg(&series(vec![None; 96], Some(1000.0)), SMALL, "t");
        assert_eq!(path(&svg, "power"), None);
        assert_eq!(svg.matches("class=\"gap\"").count(), 1);
        assert!(path(&svg, "contract").is_some());
    }

    #[test]
    fn the_label_is_escaped() {
        let svg = svg(&series(vec![Some(1.0)], None), SMALL, "<b>\"x\" & 'y'</b>");
        assert!(
            svg.contains("<title>&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;</title>"),
            "{svg}"
        );
        assert!(svg.contains("aria-label=\"&lt;b&gt;&quot;x&quot;"), "{svg}");
        assert!(!svg.contains("<b>"));
    }

    #[test]
    fn a_chart_is_bounded_whatever_its_input() {
        // The worst case: alternating data and gaps, far more bins than
        // drawn, huge values.
        let watts: Vec<Option<f64>> = (0..100_000)
            .map(|i| (i % 2 == 0).then_some(1e9 + i as f64))
            .collect();
        let s = Series {
            from: 0,
            bin_seconds: 60,
            contract_watts: vec![Some(1e9); watts.len()],
            watts,
        };
        let svg = svg(&s, LARGE, "t");
        assert_eq!(
            svg.matches("class=\"gap\"").count(),
            MAX_BINS / 2,
            "bins cut off"
        );
        assert!(svg.len() < 32 * 1024, "{} bytes", svg.len());
        assert!(svg.contains(">1150.0 MW<"), "{svg}");
        // A contract series shorter than the power one is drawn as far as it goes.
        let short = Series {
            contract_watts: vec![Some(1.0)],
            ..series(vec![Some(1.0); 4], None)
        };
        let svg = super::svg(&short, SMALL, "t");
        assert_eq!(path(&svg, "contract").unwrap().matches('H').count(), 1);
    }
}
