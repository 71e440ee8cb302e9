//! The PNG: throughput ratios per workload against the fastest pg_recvlogical baseline
//! (the server on wal2json and on pgoutput, target lines at 0.8 and 0.9) and live latency
//! p50/p99 per rate (target line at 5 ms), with the machine underneath.

use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::combinators::IntoLogRange;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::Result;
use crate::report::{Results, TARGET_P99_MS, TARGET_RATIO, TARGET_RATIO_PGOUTPUT, TARGET_RSS_MIB};

const FONT: &str = "sans-serif";
const W: u32 = 1500;
const H: u32 = 720;
const GOOD: RGBColor = RGBColor(46, 139, 87);
const BAD: RGBColor = RGBColor(214, 96, 40);
const P50: RGBColor = RGBColor(120, 170, 220);
const P99: RGBColor = RGBColor(30, 80, 160);
const TARGET: RGBColor = RGBColor(200, 30, 30);
const GREY: RGBColor = RGBColor(90, 90, 90);

fn err<E: std::fmt::Debug>(e: E) -> Box<dyn std::error::Error + Send + Sync> {
    format!("chart: {e:?}").into()
}

pub fn draw(r: &Results, font: Vec<u8>, path: &Path) -> Result<()> {
    // plotters keeps the font for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, font).map_err(|_| "chart: the font is not a TTF")?;

    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, rest) = root.split_vertically(56);
    let (body, footer) = rest.split_vertically(H - 56 - 44);
    let title = if r.setup.quick {
        "pgdeltastream bench (QUICK smoke run: workloads 100x smaller)"
    } else {
        "pgdeltastream bench: server vs pg_recvlogical, and live latency"
    };
    top.draw(&Text::new(title, (24, 16), (FONT, 26).into_font())).map_err(err)?;
    let footer_style = TextStyle::from((FONT, 14).into_font()).color(&GREY);
    footer.draw(&Text::new(r.machine_line(), (24, 4), footer_style.clone())).map_err(err)?;
    footer
        .draw(&Text::new(
            format!(
                "Best of {} drain(s) per tool. RSS = server VmHWM per workload (target ≤ {TARGET_RSS_MIB:.0} MiB). \
                 Latency = client receipt − commit completion, synchronous_commit=on.",
                r.setup.runs_per_tool
            ),
            (24, 22),
            footer_style,
        ))
        .map_err(err)?;
    let (left, right) = body.split_horizontally(W * 47 / 100);
    ratios(r, &left)?;
    latency(r, &right)?;
    root.present().map_err(err)?;
    Ok(())
}

fn short(name: &str, description: &str) -> String {
    match name {
        "one_big_tx" | "tx_of_100" | "tx_of_1" | "wide_rows" => {}
        _ => return description.to_string(),
    }
    // "10,000 tx of 100 rows" -> "10k tx × 100 rows"
    let compact = |n: &str| {
        let v: u64 = n.replace(',', "").parse().unwrap_or(0);
        match v {
            v if v >= 1_000_000 && v % 1_000_000 == 0 => format!("{}M", v / 1_000_000),
            v if v >= 1_000 && v % 1_000 == 0 => format!("{}k", v / 1_000),
            v => v.to_string(),
        }
    };
    let words: Vec<&str> = description.split_whitespace().collect();
    match words.as_slice() {
        [tx, "tx", "of", rows, rest @ ..] => {
            let what = match rest.first() {
                Some(&"wide") => "wide rows",
                Some(&"row") => "row",
                _ => "rows",
            };
            format!("{} tx × {} {what}", compact(tx), compact(rows))
        }
        _ => description.to_string(),
    }
}

fn ratios(r: &Results, area: &DrawingArea<BitMapBackend, Shift>) -> Result<()> {
    let n = r.workloads.len().max(1);
    let top = r
        .workloads
        .iter()
        .flat_map(|w| [w.ratio_to_fastest, w.pgoutput_ratio_to_fastest])
        .flatten()
        .fold(1.2f64, |a, b| a.max(b * 1.15));
    let labels: Vec<String> = r.workloads.iter().map(|w| short(&w.name, &w.description)).collect();
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput ÷ the fastest pg_recvlogical (left wal2json, right pgoutput)", (FONT, 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_style((FONT, 14))
        .y_desc("ratio")
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)?;
    category_labels(area, &labels, |i| chart.backend_coord(&(i as f64 + 0.5, 0.0)))?;
    let center = TextStyle::from((FONT, 17).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let inside = TextStyle::from((FONT, 14).into_font()).color(&WHITE).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, w) in r.workloads.iter().enumerate() {
        let bars = [(0.1, w.ratio_to_fastest, TARGET_RATIO), (0.5, w.pgoutput_ratio_to_fastest, TARGET_RATIO_PGOUTPUT)];
        for (left, ratio, target) in bars {
            let x = i as f64 + left;
            let Some(v) = ratio else {
                chart.draw_series([Text::new("–".to_string(), (x + 0.2, top * 0.05), center.clone())]).map_err(err)?;
                continue;
            };
            let color = if v >= target { GOOD } else { BAD };
            chart.draw_series([Rectangle::new([(x, 0.0), (x + 0.4, v)], color.filled())]).map_err(err)?;
            chart
                .draw_series([Text::new(format!("{v:.2}"), (x + 0.2, v + top * 0.012), center.clone())])
                .map_err(err)?;
        }
        if let Some(rss) = w.server_peak_rss_mib {
            let at = (i as f64 + 0.5, top * 0.03);
            chart.draw_series([Text::new(format!("RSS {rss:.0} MiB"), at, inside.clone())]).map_err(err)?;
        }
    }
    chart
        .draw_series([DashedPathElement::new(
            vec![(0.0, TARGET_RATIO_PGOUTPUT), (n as f64, TARGET_RATIO_PGOUTPUT)],
            8,
            5,
            P99.stroke_width(2),
        )])
        .map_err(err)?
        .label(format!("pgoutput target ≥ {TARGET_RATIO_PGOUTPUT}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], P99.stroke_width(2)));
    chart
        .draw_series([DashedPathElement::new(
            vec![(0.0, TARGET_RATIO), (n as f64, TARGET_RATIO)],
            8,
            5,
            TARGET.stroke_width(2),
        )])
        .map_err(err)?
        .label(format!("wal2json target ≥ {TARGET_RATIO}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TARGET.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(GREY)
        .label_font((FONT, 15))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn latency(r: &Results, area: &DrawingArea<BitMapBackend, Shift>) -> Result<()> {
    let n = r.latency.len().max(1);
    let values: Vec<f64> = r
        .latency
        .iter()
        .filter_map(|l| l.commit_to_receipt.as_ref())
        .flat_map(|p| [p.p50_ms, p.p99_ms, p.max_ms])
        .filter(|v| *v > 0.0)
        .collect();
    let lo = values.iter().copied().fold(0.1f64, f64::min) / 2.0;
    // A decade of headroom above the highest value keeps the legend clear of the bars.
    let hi = values.iter().copied().fold(TARGET_P99_MS * 4.0, f64::max) * 12.0;
    let labels: Vec<String> = r
        .latency
        .iter()
        .map(|l| {
            format!(
                "{} tx/s\n{}{}",
                crate::workload::thousands(l.rate),
                l.via.label(),
                if l.kept_up { "" } else { "\nfell behind" }
            )
        })
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption("Live latency, commit → client (ms, log scale)", (FONT, 20))
        .margin(16)
        .x_label_area_size(64)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..n as f64, (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&|y| if *y >= 1.0 { format!("{y:.0}") } else { format!("{y}") })
        .y_label_style((FONT, 14))
        .y_desc("ms")
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)?;
    category_labels(area, &labels, |i| chart.backend_coord(&(i as f64 + 0.5, lo)))?;
    let label = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let inside = TextStyle::from((FONT, 14).into_font()).color(&WHITE).pos(Pos::new(HPos::Center, VPos::Top));
    let small = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let mut legend_done = false;
    for (i, l) in r.latency.iter().enumerate() {
        let x = i as f64;
        let Some(p) = &l.commit_to_receipt else {
            chart.draw_series([Text::new("failed".to_string(), (x + 0.5, lo * 2.0), label.clone())]).map_err(err)?;
            continue;
        };
        let bars = [(x + 0.12, x + 0.48, p.p50_ms, P50, "p50"), (x + 0.52, x + 0.88, p.p99_ms, P99, "p99")];
        for (x0, x1, v, color, name) in bars {
            let v = v.max(lo);
            let s = chart.draw_series([Rectangle::new([(x0, lo), (x1, v)], color.filled())]).map_err(err)?;
            if !legend_done {
                s.label(name).legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
            }
            // Inside the bar's top (the max tick sits just above p99), above a short bar.
            let (at, style) = if v > lo * 4.0 { (v / 1.15, inside.clone()) } else { (v * 1.06, label.clone()) };
            chart.draw_series([Text::new(ms(v), ((x0 + x1) / 2.0, at), style)]).map_err(err)?;
        }
        // max: a black tick over the p99 bar.
        let s = chart
            .draw_series([PathElement::new(vec![(x + 0.56, p.max_ms), (x + 0.84, p.max_ms)], BLACK.stroke_width(3))])
            .map_err(err)?;
        if !legend_done {
            s.label("max").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(3)));
        }
        chart
            .draw_series([Text::new(format!("max {}", ms(p.max_ms)), (x + 0.7, p.max_ms * 1.05), small.clone())])
            .map_err(err)?;
        legend_done = true;
    }
    chart
        .draw_series([DashedPathElement::new(
            vec![(0.0, TARGET_P99_MS), (n as f64, TARGET_P99_MS)],
            8,
            5,
            TARGET.stroke_width(2),
        )])
        .map_err(err)?
        .label(format!("target p99 ≤ {TARGET_P99_MS:.0} ms (1,000 tx/s)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TARGET.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(GREY)
        .label_font((FONT, 15))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Names under the x axis, one per bar group: plotters' key-point axes cannot format
/// labels, so they are drawn at the pixel of each group's center.
fn category_labels(
    area: &DrawingArea<BitMapBackend, Shift>,
    labels: &[String],
    pixel: impl Fn(usize) -> (i32, i32),
) -> Result<()> {
    let (bx, by) = area.get_base_pixel();
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, l) in labels.iter().enumerate() {
        let (x, y) = pixel(i);
        for (k, line) in l.lines().enumerate() {
            area.draw(&Text::new(line.to_string(), (x - bx, y - by + 8 + 18 * k as i32), style.clone()))
                .map_err(err)?;
        }
    }
    Ok(())
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
