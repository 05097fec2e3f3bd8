//! `--plot out.svg`: reserved bytes over each trace for every policy, live bytes beneath, OOMs
//! marked with crosses; one panel per trace.

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;
use tessera::replay::{Policy, TraceReport};

const GIB: f64 = (1u64 << 30) as f64;

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
) -> Result<(), Box<dyn std::error::Error>> {
    let height = 420 * traces.len() as u32;
    let root = SVGBackend::new(file, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, (name, report)) in root.split_evenly((traces.len(), 1)).iter().zip(traces) {
        panel(area, name, report)?;
    }
    root.present()?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    name: &str,
    report: &TraceReport,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let events = report
        .outcomes
        .iter()
        .map(|o| o.events as f64)
        .fold(1.0, f64::max);
    let top = report
        .outcomes
        .iter()
        .flat_map(|o| o.samples.iter().map(|s| s.reserved.max(s.live)))
        .chain(report.recorded.iter().map(|s| s.reserved))
        .max()
        .unwrap_or(0) as f64
        / GIB;
    let mut chart = ChartBuilder::on(area)
        .caption(name, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..events, 0.0..(top * 1.08).max(1e-3))?;
    chart
        .configure_mesh()
        .x_desc("event")
        .y_desc("GiB")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE)
        .draw()?;

    // Live bytes: the same for every policy that had no OOM; take the one with the fewest.
    if let Some(o) = report.outcomes.iter().min_by_key(|o| o.ooms) {
        let live = o
            .samples
            .iter()
            .map(|s| (s.event as f64, s.live as f64 / GIB));
        line(&mut chart, live, BLACK, "live".into())?;
    }
    if !report.recorded.is_empty() {
        let grey = RGBColor(120, 120, 120);
        let mut steps = Vec::new();
        let mut last = 0.0;
        for s in &report.recorded {
            let y = s.reserved as f64 / GIB;
            steps.push((s.event as f64, last));
            steps.push((s.event as f64, y));
            last = y;
        }
        steps.push((events, last));
        line(&mut chart, steps, grey, "recorded (PyTorch)".into())?;
    }
    for o in &report.outcomes {
        let c = color(o.policy);
        let reserved = o
            .samples
            .iter()
            .map(|s| (s.event as f64, s.reserved as f64 / GIB));
        line(&mut chart, reserved, c, format!("{} reserved", o.policy))?;
        // OOMs: a cross at the reserved level of the window they fell in.
        let at = |event: usize| {
            let i = o.samples.partition_point(|s| s.event <= event);
            o.samples
                .get(i.min(o.samples.len().saturating_sub(1)))
                .map_or(0.0, |s| s.reserved as f64 / GIB)
        };
        chart.draw_series(
            o.oom_events
                .iter()
                .map(|&e| Cross::new((e as f64, at(e)), 5, c.stroke_width(2))),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One labelled line of the chart.
fn line<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    points: impl IntoIterator<Item = (f64, f64)>,
    color: RGBColor,
    label: String,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(())
}
