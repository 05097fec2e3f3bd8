//! `--plot out.svg`: for each trace, a title row and then one panel per policy, stacked, all of a
//! trace's panels on the same axes. Each panel shows that policy's reserved bytes (in its colour,
//! lightly filled), the live bytes the trace asks for (black), the reserved bytes PyTorch recorded
//! (grey, when the trace has them) and the device's capacity (dashed, with `--capacity`), and marks
//! where the policy first ran out of memory. Beside each panel, its key: the policy, its peak and
//! its OOM count.

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::series::DashedLineSeries;
use std::path::Path;
use tessera::bytes::format_bytes;
use tessera::replay::report::{oom_place, thousands};
use tessera::replay::{Outcome, Policy, Sample, TraceReport};

/// Width of the whole picture, in pixels.
const WIDTH: u32 = 1100;
/// Height of a trace's title row.
const HEADER: u32 = 36;
/// Height of one policy's panel.
const PANEL: u32 = 200;
/// Width of the key to the right of each panel.
const KEY: u32 = 190;

const LIVE: RGBColor = RGBColor(0, 0, 0);
const RECORDED: RGBColor = RGBColor(150, 150, 150);
const CAPACITY: RGBColor = RGBColor(70, 70, 70);

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type Error = Box<dyn std::error::Error>;

fn color(policy: Policy) -> RGBColor {
    match policy {
        Policy::Tessera => RGBColor(31, 119, 180),
        Policy::Legacy => RGBColor(255, 127, 14),
        Policy::Native => RGBColor(214, 39, 40),
        Policy::Expandable => RGBColor(44, 160, 44),
    }
}

/// Draws every trace's report into one SVG file.
pub(crate) fn draw(
    file: &Path,
    traces: &[(String, TraceReport)],
    capacity: Option<u64>,
) -> Result<(), Error> {
    let heights: Vec<u32> = traces
        .iter()
        .map(|(_, r)| HEADER + PANEL * r.outcomes.len().max(1) as u32)
        .collect();
    let height = heights.iter().sum::<u32>().max(HEADER);
    let root = SVGBackend::new(file, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    if traces.is_empty() {
        root.draw_text(
            "no traces",
            &("sans-serif", 16).into_text_style(&root),
            (12, 10),
        )?;
    }
    // The top of every trace's block but the first.
    let breaks: Vec<u32> = heights
        .iter()
        .scan(0, |top, h| {
            *top += h;
            Some(*top)
        })
        .take(traces.len().saturating_sub(1))
        .collect();
    for (area, (name, report)) in root
        .split_by_breakpoints([0u32; 0], breaks)
        .iter()
        .zip(traces)
    {
        trace(area, name, report, capacity)?;
    }
    root.present()?;
    Ok(())
}

/// The shared axes of one trace's panels: events along x, bytes (in `unit`s) up y.
struct Axes {
    events: f64,
    top: f64,
    unit: (&'static str, f64),
}

impl Axes {
    fn of(report: &TraceReport, capacity: Option<u64>) -> Axes {
        let samples = report.outcomes.iter().flat_map(|o| &o.samples);
        let events = report
            .outcomes
            .iter()
            .map(|o| o.events as usize)
            .chain(samples.clone().map(|s| s.event))
            .chain(report.recorded.iter().map(|s| s.event))
            .chain(
                report
                    .outcomes
                    .iter()
                    .flat_map(|o| o.first_oom)
                    .map(|f| f.event + 1),
            )
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let top = samples
            .map(|s| s.reserved.max(s.live))
            .chain(report.recorded.iter().map(|s| s.reserved))
            .chain(
                report
                    .outcomes
                    .iter()
                    .flat_map(|o| o.first_oom)
                    .map(|f| f.reserved_bytes),
            )
            .chain(capacity)
            .max()
            .unwrap_or(0);
        let unit = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
            .into_iter()
            .find(|&(_, u)| top >= u)
            .unwrap_or(("MiB", 1 << 20));
        let unit = (unit.0, unit.1 as f64);
        let top = if top == 0 {
            1.0
        } else {
            top as f64 / unit.1 * 1.15
        };
        Axes { events, top, unit }
    }

    fn y(&self, bytes: u64) -> f64 {
        bytes as f64 / self.unit.1
    }
}

/// One trace: its title row, then one panel per policy.
fn trace<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    name: &str,
    report: &TraceReport,
    capacity: Option<u64>,
) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let (header, body) = area.split_vertically(HEADER);
    title(&header, name, report, capacity)?;
    let axes = Axes::of(report, capacity);
    // The live bytes the trace asks for: the same for every policy until one has an OOM (its
    // failed allocations are never live), so take them from the replay with the fewest.
    let live: Vec<(f64, f64)> = report
        .outcomes
        .iter()
        .filter(|o| !o.samples.is_empty())
        .min_by_key(|o| o.ooms)
        .map(|o| {
            o.samples
                .iter()
                .map(|s| (s.event as f64, axes.y(s.live)))
                .collect()
        })
        .unwrap_or_default();
    let recorded = steps(&report.recorded, &axes);
    let n = report.outcomes.len();
    if n == 0 {
        body.draw_text(
            "no policy was replayed",
            &("sans-serif", 15).into_text_style(&body),
            (12, 10),
        )?;
        return Ok(());
    }
    for (i, (row, outcome)) in body
        .split_evenly((n, 1))
        .iter()
        .zip(&report.outcomes)
        .enumerate()
    {
        let (plot, key_area) = row.split_horizontally(WIDTH - KEY);
        let mut chart = ChartBuilder::on(&plot)
            .margin_top(10)
            .margin_bottom(2)
            .margin_left(8)
            .margin_right(10)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..axes.events, 0.0..axes.top)?;
        let events = |x: &f64| thousands(x.max(0.0).round() as u64);
        let mut mesh = chart.configure_mesh();
        mesh.x_labels(10)
            .y_labels(5)
            .x_label_formatter(&events)
            .y_desc(axes.unit.0)
            .bold_line_style(RGBColor(225, 225, 225))
            .light_line_style(WHITE)
            .label_style(("sans-serif", 12));
        if i + 1 == n {
            mesh.x_desc("events replayed");
        }
        mesh.draw()?;
        // A snapshot's first OOMs are named by entry, a CSV trace's by line (as in the table).
        let snapshot = report.rows.iter().any(|r| r.device.is_some());
        policy_panel(
            &mut chart, outcome, &axes, &live, &recorded, capacity, snapshot,
        )?;
        key(&key_area, outcome)?;
    }
    Ok(())
}

/// The title row: the trace's name, and a key to the lines every panel shares.
fn title<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    name: &str,
    report: &TraceReport,
    capacity: Option<u64>,
) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let style = ("sans-serif", 18).into_font().style(FontStyle::Bold);
    area.draw_text(name, &style.into_text_style(area), (12, 12))?;
    let mut shared: Vec<(String, RGBColor, bool)> =
        vec![("live (requested) bytes".into(), LIVE, false)];
    if !report.recorded.is_empty() {
        shared.push(("reserved as recorded by PyTorch".into(), RECORDED, false));
    }
    if let Some(c) = capacity {
        shared.push((format!("capacity {}", format_bytes(c)), CAPACITY, true));
    }
    let text = ("sans-serif", 13).into_text_style(area);
    let widths: Vec<i32> = shared
        .iter()
        .map(|(l, ..)| 28 + text_width(l, 13.0) + 22)
        .collect();
    // Right-aligned over the panels, or after the name when that is long.
    let right = WIDTH as i32 - KEY as i32 - 10 - widths.iter().sum::<i32>();
    let mut x = right.max(12 + text_width(name, 18.0) + 30);
    let y = 20;
    for ((label, color, dashed), w) in shared.iter().zip(widths) {
        let style = color.stroke_width(2);
        if *dashed {
            area.draw(&DashedPathElement::new(
                vec![(x, y), (x + 22, y)],
                5,
                3,
                style,
            ))?;
        } else {
            area.draw(&PathElement::new(vec![(x, y), (x + 22, y)], style))?;
        }
        area.draw_text(label, &text, (x + 28, y - 7))?;
        x += w;
    }
    Ok(())
}

/// One policy's panel: the shared lines, its reserved bytes, and its first OOM.
fn policy_panel<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    outcome: &Outcome,
    axes: &Axes,
    live: &[(f64, f64)],
    recorded: &[(f64, f64)],
    capacity: Option<u64>,
    snapshot: bool,
) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let c = color(outcome.policy);
    let reserved: Vec<(f64, f64)> = outcome
        .samples
        .iter()
        .map(|s| (s.event as f64, axes.y(s.reserved)))
        .collect();
    if let (Some(first), Some(last)) = (reserved.first(), reserved.last()) {
        let mut area = vec![(first.0, 0.0)];
        area.extend(&reserved);
        area.push((last.0, 0.0));
        chart.draw_series(std::iter::once(Polygon::new(area, c.mix(0.12).filled())))?;
    }
    if !recorded.is_empty() {
        chart.draw_series(LineSeries::new(
            recorded.iter().copied(),
            RECORDED.stroke_width(2),
        ))?;
    }
    if !live.is_empty() {
        chart.draw_series(LineSeries::new(live.iter().copied(), LIVE.stroke_width(1)))?;
    }
    if let Some(cap) = capacity {
        let y = axes.y(cap);
        chart.draw_series(DashedLineSeries::new(
            [(0.0, y), (axes.events, y)],
            6,
            4,
            CAPACITY.stroke_width(2),
        ))?;
        let label = format!("capacity {}", format_bytes(cap));
        let w = text_width(&label, 12.0);
        chart.draw_series(std::iter::once(
            EmptyElement::at((axes.events, y))
                + Text::new(
                    label,
                    (-w - 6, -16),
                    ("sans-serif", 12).into_font().color(&CAPACITY),
                ),
        ))?;
    }
    chart.draw_series(LineSeries::new(reserved.iter().copied(), c.stroke_width(2)))?;
    if reserved.is_empty() {
        let (x, y) = (axes.events / 2.0, axes.top / 2.0);
        chart.draw_series(std::iter::once(
            EmptyElement::at((x, y))
                + Text::new(
                    format!("{}: no samples", outcome.policy),
                    (-60, -7),
                    ("sans-serif", 14).into_font().color(&c),
                ),
        ))?;
    }
    if let Some(oom) = outcome.first_oom {
        let at = (oom.event as f64, axes.y(oom.reserved_bytes));
        let place = oom_place(oom.line, snapshot);
        let label = format!(
            "{}: first OOM {place} ({})",
            outcome.policy,
            format_bytes(oom.size)
        );
        let w = text_width(&label, 13.0);
        // Beside the marker, on the side with room, and below it unless it sits near the floor.
        let (px, py) = chart.backend_coord(&at);
        let (xs, ys) = chart.plotting_area().get_pixel_range();
        let dx = if px + 12 + w + 4 <= xs.end {
            12
        } else {
            -12 - w
        };
        let dy = if py + 30 <= ys.end { 8 } else { -26 };
        let font = ("sans-serif", 13)
            .into_font()
            .style(FontStyle::Bold)
            .color(&c);
        chart.draw_series(std::iter::once(
            EmptyElement::at(at)
                + Rectangle::new(
                    [(dx - 4, dy - 3), (dx + w + 4, dy + 16)],
                    WHITE.mix(0.7).filled(),
                )
                + Circle::new((0, 0), 6, WHITE.filled())
                + Circle::new((0, 0), 6, c.stroke_width(2))
                + Cross::new((0, 0), 3, c.stroke_width(2))
                + Text::new(label, (dx, dy), font),
        ))?;
    }
    Ok(())
}

/// The key beside a panel: the policy's name and line, its peak reserved bytes and its OOMs.
fn key<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, outcome: &Outcome) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let c = color(outcome.policy);
    let name = ("sans-serif", 17)
        .into_font()
        .style(FontStyle::Bold)
        .color(&c);
    let text = ("sans-serif", 13).into_text_style(area);
    let x = 8;
    area.draw_text(
        &outcome.policy.to_string(),
        &name.into_text_style(area),
        (x, 18),
    )?;
    area.draw(&PathElement::new(
        vec![(x, 49), (x + 22, 49)],
        c.stroke_width(3),
    ))?;
    area.draw_text("reserved", &text, (x + 28, 42))?;
    let ooms = match outcome.ooms {
        0 => "no OOM".to_string(),
        1 => "1 OOM".to_string(),
        n => format!("{} OOMs", thousands(n)),
    };
    let peak = format!("peak {}", format_bytes(outcome.peak_reserved_bytes));
    area.draw_text(&peak, &text, (x + 28, 60))?;
    area.draw_text(&ooms, &text, (x + 28, 78))?;
    Ok(())
}

/// A recorded series as a step function: each value holds until the next sample.
fn steps(recorded: &[Sample], axes: &Axes) -> Vec<(f64, f64)> {
    let mut steps = Vec::with_capacity(2 * recorded.len() + 1);
    let mut last = 0.0;
    for s in recorded {
        let y = axes.y(s.reserved);
        steps.push((s.event as f64, last));
        steps.push((s.event as f64, y));
        last = y;
    }
    if !steps.is_empty() {
        steps.push((axes.events, last));
    }
    steps
}

/// A guess at the width in pixels of `text` in a sans-serif font of `size` (the SVG backend cannot
/// measure text; the viewer lays it out).
fn text_width(text: &str, size: f64) -> i32 {
    (text.chars().count() as f64 * size * 0.52).ceil() as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera::replay::trace::parse_csv;
    use tessera::replay::ReplayOptions;

    /// Replays `csv` through `policies` on a device of `capacity` bytes, sampled.
    fn replayed(csv: &str, capacity: u64, policies: &[Policy]) -> TraceReport {
        let trace = parse_csv("t.csv", csv.as_bytes()).unwrap();
        let opts = ReplayOptions {
            capacity,
            samples: 100,
            ..ReplayOptions::default()
        };
        tessera::replay::run(
            &trace,
            policies,
            &opts,
            tessera::replay::Measures::default(),
            &mut |_, _| {},
        )
    }

    /// Ten allocations of 256 MiB, then their frees: the fifth runs out of 1 GiB.
    fn big() -> String {
        let mut csv: String = (1..=10)
            .map(|i| format!("a,{i},{},0\n", 256 << 20))
            .collect();
        csv.extend((1..=10).map(|i| format!("f,{i}\n")));
        csv
    }

    fn svg(name: &str, traces: &[(String, TraceReport)], capacity: Option<u64>) -> String {
        let file =
            std::env::temp_dir().join(format!("tessera-plot-{}-{name}.svg", std::process::id()));
        draw(&file, traces, capacity).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(text.starts_with("<svg"), "{text}");
        text
    }

    #[test]
    fn thousands_separates() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(11412), "11,412");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn panels_mark_the_first_oom_once_and_label_capacity() {
        let gib = 1 << 30;
        let mut one = replayed(&big(), gib, &[Policy::Native, Policy::Tessera]);
        assert!(one
            .outcomes
            .iter()
            .all(|o| o.ooms > 1 && o.first_oom.is_some()));
        one.outcomes[0].first_oom.as_mut().unwrap().line = 11_412;
        let two = replayed(&big(), 4 * gib, &[Policy::Expandable]);
        let text = svg("oom", &[("a".into(), one), ("b".into(), two)], Some(gib));
        assert_eq!(text.matches("first OOM").count(), 2, "{text}");
        assert!(text.contains("native: first OOM at line 11,412 (256.00 MiB)"));
        assert!(text.contains("tessera: first OOM at line 5 (256.00 MiB)"));
        assert!(text.contains("6 OOMs"));
        assert!(text.contains("capacity 1.00 GiB"));
        // Three panels and two title rows.
        assert!(text.contains(&format!("height=\"{}\"", 2 * HEADER + 3 * PANEL)));
    }

    #[test]
    fn degenerate_reports_draw() {
        svg("none", &[], None);
        let empty = replayed("", 1 << 30, &[Policy::Tessera, Policy::Native]);
        let mut traces = vec![("t".to_string(), empty)];
        svg("zero-events", &traces, Some(1 << 30));
        // A policy with no samples, one whose first OOM is before the first entry.
        let mut oom = replayed(&big(), 1 << 30, &[Policy::Native])
            .outcomes
            .remove(0);
        oom.first_oom.as_mut().unwrap().line = 0;
        oom.samples.clear();
        let report = &mut traces[0].1;
        report.outcomes.push(oom);
        report.outcomes[0].samples.clear();
        let text = svg("no-samples", &traces, None);
        assert!(text.contains("native: first OOM before the first entry (256.00 MiB)"));
        svg("zero-capacity", &traces, Some(0));
        svg("huge-capacity", &traces, Some(u64::MAX));
        let report = &mut traces[0].1;
        report.outcomes.clear();
        report.recorded = vec![Sample {
            event: 3,
            reserved: 5 << 20,
            live: 0,
        }];
        svg("no-outcomes", &traces, None);
    }
}
