//! The SVG plot of a run (plotters' SVG backend only: no bitmap code, no font files): the
//! corrected p50 and p99 latency of the requests intended in each second, above the
//! answers (and settlements) per second.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{Report, SecondPoint};
use crate::Error;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 640;

/// Renders the plot of `report` as SVG text.
pub fn render_svg(report: &Report) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (upper, lower) = root.split_vertically(HEIGHT / 2);
        let run = &report.run;
        let title = format!(
            "{} against the {} at {} req/s: corrected latency",
            run.scenario, run.target, run.rate_per_second
        );
        latency_chart(&upper, &title, &report.series).map_err(|e| e.to_string())?;
        throughput_chart(&lower, &report.series, run.rate_per_second).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Writes the plot of `report` to `path`.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), Error> {
    let svg = render_svg(report).map_err(|message| Error::Plot {
        path: path.to_owned(),
        message,
    })?;
    std::fs::write(path, svg).map_err(|source| Error::Output {
        path: path.to_owned(),
        source,
    })
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
/// What a line shows of each second.
type Value = fn(&SecondPoint) -> Option<f64>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

/// Consecutive seconds that have a value, as separate lines (a second with no answer is a
/// gap, not a zero).
fn segments(
    series: &[SecondPoint],
    value: impl Fn(&SecondPoint) -> Option<f64>,
) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for point in series {
        match value(point) {
            Some(v) => current.push((f64::from(point.second) + 0.5, v)),
            None if !current.is_empty() => out.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn x_range(series: &[SecondPoint]) -> std::ops::Range<f64> {
    0.0..(series.len().max(1) as f64)
}

fn ms(us: Option<u64>) -> Option<f64> {
    us.map(|v| v as f64 / 1_000.0)
}

fn latency_chart(area: &Area<'_>, title: &str, series: &[SecondPoint]) -> DrawResult {
    let top = series
        .iter()
        .filter_map(|p| ms(p.p99_us))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(x_range(series), 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("second of the measured window")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("ms")
        .draw()?;
    let lines: [(&str, RGBColor, Value); 2] = [
        ("p50", BLUE, |p| ms(p.p50_us)),
        ("p99", RED, |p| ms(p.p99_us)),
    ];
    for (name, color, value) in lines {
        let mut labelled = false;
        for segment in segments(series, value) {
            let drawn = chart.draw_series(LineSeries::new(segment, color.stroke_width(2)))?;
            if !labelled {
                drawn.label(name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
                labelled = true;
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn throughput_chart(area: &Area<'_>, series: &[SecondPoint], rate: f64) -> DrawResult {
    let top = series
        .iter()
        .map(|p| (p.answered as f64).max(p.settled.unwrap_or(0.0)))
        .fold(rate, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("per second", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(x_range(series), 0.0..top.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("second of the measured window")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("per second")
        .draw()?;
    let lines: [(&str, RGBColor, Value); 3] = [
        ("answered", GREEN, |p| Some(p.answered as f64)),
        ("settled", MAGENTA, |p| p.settled),
        ("errors", BLACK, |p| Some(p.errors as f64)),
    ];
    for (name, color, value) in lines {
        let mut labelled = false;
        for segment in segments(series, value) {
            let drawn = chart.draw_series(LineSeries::new(segment, color.stroke_width(2)))?;
            if !labelled {
                drawn.label(name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
                labelled = true;
            }
        }
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, rate), (series.len().max(1) as f64, rate)],
            BLACK.mix(0.4),
        ))?
        .label("intended rate")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(second: u32, answered: u64, p50_us: Option<u64>) -> SecondPoint {
        SecondPoint {
            second,
            answered,
            errors: 0,
            settled: None,
            p50_us,
            p99_us: p50_us.map(|v| v * 3),
            rss_mib: Default::default(),
            settlement_queue_depth: None,
            webhook_backlog: None,
        }
    }

    #[test]
    fn gaps_split_lines() {
        let series = [
            point(0, 10, Some(1_000)),
            point(1, 0, None),
            point(2, 10, Some(2_000)),
            point(3, 10, Some(3_000)),
        ];
        let lines = segments(&series, |p| p.p50_us.map(|v| v as f64));
        assert_eq!(
            lines,
            vec![vec![(0.5, 1_000.0)], vec![(2.5, 2_000.0), (3.5, 3_000.0)]]
        );
        assert!(segments(&[], |p| Some(p.answered as f64)).is_empty());
    }
}
