//! The closure size of a host over time, as inline SVG.
//!
//! Builds are spaced evenly from the oldest (left) to the newest (right),
//! whatever the time between them: the chart shows how each build moved
//! the size, which matters more than when it happened.

use super::html::{short_rev, size, text, time_text};
use crate::history::HostHistoryEntry;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
/// Room for the size labels on the left and the dates below.
const LEFT: f64 = 76.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 30.0;
/// Horizontal grid lines, the bottom and top included.
const TICKS: u32 = 4;

const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Display only: bytes as a float, where the rounding does not matter.
#[allow(clippy::cast_precision_loss)]
fn float(bytes: u64) -> f64 {
    bytes as f64
}

/// An axis label: `bytes` in `unit` (an index into [`UNITS`]) with
/// `decimals` digits, e.g. `1.25 GiB`.
fn label(bytes: f64, unit: usize, decimals: usize) -> String {
    let scaled = bytes / 1024f64.powi(i32::try_from(unit).unwrap_or(0));
    format!("{scaled:.decimals$} {}", UNITS[unit])
}

/// The unit of the largest value, and enough decimals that labels `step`
/// apart differ.
fn label_format(top: f64, step: f64) -> (usize, usize) {
    let mut unit = 0;
    while unit + 1 < UNITS.len() && top >= 1024f64.powi(i32::try_from(unit + 1).unwrap_or(0)) {
        unit += 1;
    }
    let step = step / 1024f64.powi(i32::try_from(unit).unwrap_or(0));
    if unit == 0 || step >= 1.0 {
        return (unit, 0);
    }
    // Down to the digit where the labels differ: 0.3 → 1, 0.04 → 2, ….
    let mut decimals = 1;
    while decimals < 6 && step * 10f64.powi(i32::try_from(decimals).unwrap_or(6)) < 1.0 {
        decimals += 1;
    }
    (unit, decimals)
}

/// The date of an RFC 3339 time.
fn date(rfc3339: &str) -> &str {
    rfc3339.get(..10).unwrap_or(rfc3339)
}

/// An SVG line chart of `entries`' closure sizes (newest first, as the
/// host page lists them); `None` when none has a size.
pub fn closure_size_chart(entries: &[HostHistoryEntry]) -> Option<String> {
    // Oldest first: left to right.
    let sized: Vec<(&HostHistoryEntry, u64)> = entries
        .iter()
        .rev()
        .filter_map(|entry| entry.closure_size.map(|bytes| (entry, bytes)))
        .collect();
    let (first, _) = sized.first()?;
    let (last, _) = sized.last()?;
    let smallest = sized.iter().map(|&(_, bytes)| bytes).min()?;
    let largest = sized.iter().map(|&(_, bytes)| bytes).max()?;

    // The value range, with a margin so no point sits on the frame.
    let spread = float(largest - smallest);
    let pad = if spread > 0.0 {
        spread / 8.0
    } else {
        (float(largest) / 20.0).max(1024.0)
    };
    let low = (float(smallest) - pad).max(0.0);
    let high = float(largest) + pad;
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let y = |bytes: f64| TOP + plot_height * (1.0 - (bytes - low) / (high - low));
    let count = sized.len();
    let x = |index: usize| {
        if count == 1 {
            LEFT + plot_width / 2.0
        } else {
            LEFT + plot_width * float(index as u64) / float(count as u64 - 1)
        }
    };

    let title = if count == 1 {
        format!(
            "Closure size of 1 build, {}",
            text(&time_text(&first.finished_at))
        )
    } else {
        format!(
            "Closure size over {count} builds, {} to {}",
            text(date(&first.finished_at)),
            text(date(&last.finished_at))
        )
    };
    let mut svg = format!(
        "<svg class=\"closure-chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" \
         aria-labelledby=\"closure-chart-title\" font-size=\"11\" fill=\"currentColor\">\
         <title id=\"closure-chart-title\">{title}</title>\n"
    );

    // Grid lines and size labels.
    let step = (high - low) / f64::from(TICKS - 1);
    let (unit, decimals) = label_format(high, step);
    svg.push_str("<g class=\"grid\" stroke=\"currentColor\" stroke-opacity=\"0.15\">");
    for tick in 0..TICKS {
        let tick_y = y(low + step * f64::from(tick));
        svg.push_str(&format!(
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{tick_y:.1}\" y2=\"{tick_y:.1}\"/>",
            WIDTH - RIGHT
        ));
    }
    svg.push_str("</g>\n<g class=\"axis\" text-anchor=\"end\">");
    for tick in 0..TICKS {
        let value = low + step * f64::from(tick);
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LEFT - 6.0,
            y(value) + 4.0,
            label(value, unit, decimals)
        ));
    }
    svg.push_str("</g>\n");
    // The first and last dates below the plot.
    let bottom = HEIGHT - 8.0;
    if count == 1 {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{bottom}\" text-anchor=\"middle\">{}</text>\n",
            x(0),
            text(date(&first.finished_at))
        ));
    } else {
        svg.push_str(&format!(
            "<text x=\"{LEFT}\" y=\"{bottom}\">{}</text>\
             <text x=\"{:.1}\" y=\"{bottom}\" text-anchor=\"end\">{}</text>\n",
            text(date(&first.finished_at)),
            WIDTH - RIGHT,
            text(date(&last.finished_at))
        ));
    }

    // The line, then a point per build with its tooltip.
    let points: Vec<String> = sized
        .iter()
        .enumerate()
        .map(|(index, &(_, bytes))| format!("{:.1},{:.1}", x(index), y(float(bytes))))
        .collect();
    svg.push_str(&format!(
        "<polyline class=\"line\" fill=\"none\" stroke=\"currentColor\" stroke-width=\"2\" \
         points=\"{}\"/>\n",
        points.join(" ")
    ));
    for (index, &(entry, bytes)) in sized.iter().enumerate() {
        svg.push_str(&format!(
            "<circle class=\"point\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\">\
             <title>{} · {} · {}</title></circle>\n",
            x(index),
            y(float(bytes)),
            short_rev(entry.rev.as_deref()),
            size(bytes),
            text(&time_text(&entry.finished_at))
        ));
    }
    svg.push_str("</svg>");
    Some(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HostStatus;

    fn entry(n: u32, closure_size: Option<u64>) -> HostHistoryEntry {
        HostHistoryEntry {
            build_id: format!("b{n:015}"),
            rev: Some(format!("rev{n}{}", "0".repeat(36))),
            status: HostStatus::Success,
            finished_at: format!("2026-12-{:02}T02:00:00Z", n + 1),
            duration_ms: 60_000,
            out_path: None,
            closure_size,
            changes: None,
            error: None,
        }
    }

    /// The value of `attribute` in each `<circle` of `svg`, in order.
    fn circle_attribute(svg: &str, attribute: &str) -> Vec<f64> {
        svg.split("<circle")
            .skip(1)
            .map(|circle| {
                let start = circle.find(&format!(" {attribute}=\"")).unwrap() + attribute.len() + 3;
                let end = start + circle[start..].find('"').unwrap();
                circle[start..end].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn one_point_per_sized_build_oldest_on_the_left() {
        const GIB: u64 = 1024 * 1024 * 1024;
        // Newest first, as the host page has them.
        let entries = vec![
            entry(4, Some(2 * GIB)),
            entry(3, None),
            entry(2, Some(GIB + GIB / 2)),
            entry(1, Some(GIB)),
            entry(0, None),
        ];
        let svg = closure_size_chart(&entries).unwrap();
        assert!(svg.starts_with("<svg class=\"closure-chart\""), "{svg}");
        assert_eq!(svg.matches("<circle class=\"point\"").count(), 3);
        let xs = circle_attribute(&svg, "cx");
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "{xs:?}");
        // Growing sizes climb: y falls.
        let ys = circle_attribute(&svg, "cy");
        assert!(ys.windows(2).all(|w| w[0] > w[1]), "{ys:?}");
        // The tooltips follow the same order: the oldest sized build first.
        let first = svg.find("<title>rev1000").unwrap();
        let last = svg.find("<title>rev4000").unwrap();
        assert!(first < last);
        assert!(svg.contains("<title id=\"closure-chart-title\">"));
        assert!(svg.contains("1.0 GiB"), "{svg}");
        assert!(svg.contains("GiB</text>"), "{svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn no_chart_without_sizes() {
        assert!(closure_size_chart(&[]).is_none());
        assert!(closure_size_chart(&[entry(0, None), entry(1, None)]).is_none());
    }

    #[test]
    fn a_single_or_constant_size_still_draws() {
        let one = closure_size_chart(&[entry(0, Some(5_000_000))]).unwrap();
        assert_eq!(one.matches("<circle class=\"point\"").count(), 1);
        let flat = closure_size_chart(&[entry(1, Some(0)), entry(0, Some(0))]).unwrap();
        assert_eq!(flat.matches("<circle class=\"point\"").count(), 2);
        for svg in [one, flat] {
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
        // Labels close together still differ.
        let close =
            closure_size_chart(&[entry(1, Some(1_300_000_000)), entry(0, Some(1_300_100_000))])
                .unwrap();
        let labels: Vec<&str> = close
            .split("<g class=\"axis\"")
            .nth(1)
            .unwrap()
            .split("</g>")
            .next()
            .unwrap()
            .split("<text")
            .skip(1)
            .collect();
        let mut unique = labels.clone();
        unique.dedup_by(|a, b| a.split('>').nth(1) == b.split('>').nth(1));
        assert_eq!(labels.len(), unique.len(), "{close}");
    }
}
