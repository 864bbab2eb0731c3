//! The comparison chart of a run (`report.png`): one panel per segment (all users, cold-start
//! users), grouped bars per metric, one colour per model.
//!
//! Text needs a TrueType font. It is looked up in `RECFUSE_FONT`, then in common system
//! locations (DejaVu Sans, Liberation Sans); without one the chart is skipped with a warning,
//! and the JSON and Markdown reports are unaffected.

use crate::eval::Report;
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a font with plotters once per process; the error says where we looked.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = std::env::var_os("RECFUSE_FONT").map(PathBuf::from).into_iter().collect();
        candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            format!("no TrueType font found (set RECFUSE_FONT; looked in {})", FONT_CANDIDATES.join(", "))
        })?;
        let bytes: &'static [u8] = Box::leak(std::fs::read(path).map_err(|e| e.to_string())?.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One panel of a grouped bar chart: categories along x, one bar per series in each.
pub struct Panel {
    pub title: String,
    pub categories: Vec<String>,
    /// (name, one value per category)
    pub series: Vec<(String, Vec<f64>)>,
    pub y_label: String,
}

/// Draws panels stacked vertically into a PNG at `path`.
type Chart<'a> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>;

/// The series legend every chart of ours has: upper right, on a translucent box.
fn draw_legend(chart: &mut Chart<'_>) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

/// The top of a value axis starting at 0 and the decimals its tick labels need: a panel whose
/// figures are all zero gets 0..1 (not an axis on which every tick reads 0.00), and small
/// figures get enough decimals to tell the ticks apart.
fn value_axis(max: f64) -> (f64, usize) {
    let top = if max > 0.0 { max * 1.15 } else { 1.0 };
    let decimals = if top >= 10.0 { 0 } else { ((-(top / 10.0).log10()).ceil() as i64).max(2) as usize };
    (top, decimals)
}

pub fn grouped_bars(panels: &[Panel], path: &Path) -> Result<()> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (1100, 420 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        let n = panel.categories.len();
        let (top, decimals) = value_axis(panel.series.iter().flat_map(|s| s.1.iter().copied()).fold(0.0, f64::max));
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
            .map_err(|e| anyhow!("{e}"))?;
        let names = panel.categories.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&move |x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 { names.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
            })
            .y_label_formatter(&move |y| format!("{y:.decimals$}"))
            .y_desc(&panel.y_label)
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let width = 0.8 / panel.series.len().max(1) as f64;
        for (k, (name, values)) in panel.series.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let bars = values.iter().enumerate().map(|(i, &v)| {
                let x0 = i as f64 - 0.4 + k as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], color.filled())
            });
            chart
                .draw_series(bars)
                .map_err(|e| anyhow!("{e}"))?
                .label(name.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        }
        draw_legend(&mut chart)?;
    }
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Draws the models of a run side by side into a PNG at `path`: one panel per segment with
/// users (all, cold-start), ranking metrics along x, one colour per model.
pub fn comparison_chart(all: &[Report], path: &Path) -> Result<()> {
    let reports: Vec<&Report> = all.iter().filter(|r| r.error.is_none()).collect();
    if reports.is_empty() {
        bail!("no reports to draw");
    }
    // Ranking metrics only: AUC lives on another scale (0.5 = chance).
    let metrics: Vec<String> = reports[0].metric_names().into_iter().filter(|m| m.contains('@')).collect();
    let panels: Vec<Panel> = ["all", "cold"]
        .into_iter()
        .filter_map(|segment| {
            let users = reports[0].segments.get(segment).map(|s| s.users).filter(|&u| u > 0)?;
            let value = |r: &&Report, m: &str| r.segments.get(segment).and_then(|s| s.metrics.get(m)).copied().unwrap_or(0.0);
            Some(Panel {
                title: format!("{segment} users ({users})"),
                categories: metrics.clone(),
                series: reports.iter().map(|r| (r.model.clone(), metrics.iter().map(|m| value(r, m)).collect())).collect(),
                y_label: String::new(),
            })
        })
        .collect();
    if panels.is_empty() {
        bail!("no evaluated users");
    }
    grouped_bars(&panels, path)
}

/// Draws a training loss curve (`(step, loss)` points) into a PNG at `path`, with the mean of
/// a moving window over it (one batch's loss is noisy).
pub fn loss_curve(title: &str, points: &[(f64, f64)], path: &Path) -> Result<()> {
    if points.is_empty() {
        bail!("no loss values to draw");
    }
    ensure_font()?;
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max.max(1e-6))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss (mean per answer token)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(points.iter().copied(), PALETTE[0].mix(0.35)))
        .map_err(|e| anyhow!("{e}"))?
        .label("batch")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], PALETTE[0].mix(0.35)));
    let window = (points.len() / 20).max(1);
    let smooth: Vec<(f64, f64)> = (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            (points[i].0, points[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64)
        })
        .collect();
    chart
        .draw_series(LineSeries::new(smooth, PALETTE[1].stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?
        .label(format!("mean of {window}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], PALETTE[1].stroke_width(2)));
    draw_legend(&mut chart)?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::value_axis;

    #[test]
    fn value_axis_is_sane_for_zero_and_small_figures() {
        assert_eq!(value_axis(0.0), (1.0, 2));
        let (top, decimals) = value_axis(0.0004);
        assert!(top > 0.0004 && decimals >= 4, "{top} {decimals}");
        assert_eq!(value_axis(0.5).1, 2);
        assert_eq!(value_axis(40.0).1, 0);
    }
}
