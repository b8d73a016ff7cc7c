//! PNG figures of an experiment: the paper's Fig. 3 (ground truth vs baseline vs central vs
//! SegViz on one axial slice per organ) and validation Dice per round.
//!
//! Plots, axes, tick labels, legends and titles are drawn by `plotters` into an in-memory
//! bitmap, with the DejaVu Sans font bundled in `assets/fonts/` (no system font or font
//! library is needed on a headless machine); PNG encoding is the `image` crate's.

use std::path::Path;
use std::sync::OnceLock;

use image::{Rgb, RgbImage};
use plotters::prelude::*;
use plotters::style::FontStyle;
use segviz_core::checkpoint::write_atomically;
use segviz_data::{Organ, Volume};

/// DejaVu Sans (Bitstream Vera licence, see `assets/fonts/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
/// The family name the bundled font is registered under.
const FAMILY: &str = "sans-serif";

/// An error drawing a figure.
fn figure_error(e: impl std::fmt::Display) -> segviz_core::CoreError {
    segviz_core::CoreError::Config(format!("cannot draw the figure: {e}"))
}

/// Registers the bundled font with plotters, once.
fn register_font() -> segviz_core::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok()
            && plotters::style::register_font(FAMILY, FontStyle::Bold, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(figure_error("the bundled font does not load"))
    }
}

fn rgb(c: Rgb<u8>) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// Colour of each organ's overlay (liver, spleen, pancreas, kidney).
pub fn organ_colour(organ: Organ) -> Rgb<u8> {
    match organ {
        Organ::Liver => Rgb([230, 80, 60]),
        Organ::Spleen => Rgb([70, 140, 240]),
        Organ::Pancreas => Rgb([240, 200, 40]),
        Organ::Kidney => Rgb([80, 200, 100]),
    }
}

/// Saves a PNG atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> segviz_core::Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| segviz_core::CoreError::File {
        path: path.to_path_buf(),
        reason: format!("cannot encode PNG: {e}"),
    })?;
    write_atomically(path, &bytes)
}

/// One axial slice (fixed `k`) of a windowed image as grey, with `labels` of `organ`
/// overlaid, `zoom` pixels per voxel, anterior at the top and the patient's right on the
/// left of the picture (radiological convention).
fn panel(image: &Volume<f32>, labels: &[u8], organ: Organ, k: usize, zoom: u32) -> RgbImage {
    let [ni, nj, _] = image.geometry.shape;
    let mut img = RgbImage::new(ni as u32 * zoom, nj as u32 * zoom);
    let colour = organ_colour(organ);
    for i in 0..ni {
        for j in 0..nj {
            let idx = image.geometry.index(i, j, k);
            let g = (image.data[idx].clamp(0.0, 1.0) * 255.0) as u8;
            let mut px = Rgb([g, g, g]);
            if labels[idx] == organ.label() {
                px = Rgb([
                    ((g as u16 + 2 * colour[0] as u16) / 3) as u8,
                    ((g as u16 + 2 * colour[1] as u16) / 3) as u8,
                    ((g as u16 + 2 * colour[2] as u16) / 3) as u8,
                ]);
            }
            // RAS: i grows towards the patient's right, shown on the left of the
            // picture; j grows anteriorly, shown upwards.
            let (x, y) = ((ni - 1 - i) as u32, (nj - 1 - j) as u32);
            for (dx, dy) in (0..zoom).flat_map(|dx| (0..zoom).map(move |dy| (dx, dy))) {
                img.put_pixel(x * zoom + dx, y * zoom + dy, px);
            }
        }
    }
    img
}

/// The axial slice with the most voxels of `organ` in `labels`.
pub fn best_slice(labels: &Volume<u8>, organ: Organ) -> usize {
    let [ni, nj, nk] = labels.geometry.shape;
    (0..nk)
        .max_by_key(|&k| {
            let mut n = 0usize;
            for i in 0..ni {
                for j in 0..nj {
                    n += usize::from(labels.at(i, j, k) == organ.label());
                }
            }
            (n, usize::MAX - k)
        })
        .unwrap_or(0)
}

/// Fig. 3: one row per organ (its best slice in the ground truth), one column per label
/// map (`columns[0]` is usually the ground truth), column titles on top, the organ's name and
/// overlay colour on the left of each row.
///
/// # Errors
/// When the bundled font cannot be loaded or plotters fails to draw.
pub fn comparison_figure(
    image: &Volume<f32>,
    truth: &Volume<u8>,
    columns: &[(&str, &[u8])],
    organs: &[Organ],
    zoom: u32,
) -> segviz_core::Result<RgbImage> {
    register_font()?;
    let [ni, nj, _] = image.geometry.shape;
    let (pw, ph) = (ni as u32 * zoom, nj as u32 * zoom);
    let (gap, title, side) = (6u32, 28u32, 90u32);
    let width = side + columns.len() as u32 * (pw + gap) + gap;
    let height = title + organs.len() as u32 * (ph + gap) + gap;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (r, organ) in organs.iter().enumerate() {
        let k = best_slice(truth, *organ);
        for (c, (_, labels)) in columns.iter().enumerate() {
            let p = panel(image, labels, *organ, k, zoom);
            image::imageops::overlay(
                &mut img,
                &p,
                (side + gap + c as u32 * (pw + gap)) as i64,
                (title + gap + r as u32 * (ph + gap)) as i64,
            );
        }
    }
    let mut buf = img.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        for (c, (name, _)) in columns.iter().enumerate() {
            // The largest size (16 down to 8 px) at which the title fits over its panel,
            // centred.
            let fits = |size: u32| {
                let font = (FAMILY, size)
                    .into_font()
                    .style(FontStyle::Bold)
                    .color(&BLACK);
                root.estimate_text_size(name, &font)
                    .map(|(w, _)| (w, font))
                    .ok()
                    .filter(|(w, _)| *w <= pw + gap / 2 || size == 8)
            };
            let (w, font) = (8..=16)
                .rev()
                .find_map(fits)
                .ok_or_else(|| figure_error("font"))?;
            let x = (side + gap + c as u32 * (pw + gap)) as i32 + (pw as i32 - w as i32) / 2;
            root.draw_text(name, &font, (x.max(0), 8))
                .map_err(figure_error)?;
        }
        let label = (FAMILY, 14).into_font().color(&BLACK);
        for (r, organ) in organs.iter().enumerate() {
            let y = (title + gap + r as u32 * (ph + gap) + ph / 2) as i32;
            root.draw(&Rectangle::new(
                [(gap as i32, y - 6), (gap as i32 + 12, y + 6)],
                rgb(organ_colour(*organ)).filled(),
            ))
            .map_err(figure_error)?;
            root.draw_text(organ.name(), &label, (gap as i32 + 18, y - 7))
                .map_err(figure_error)?;
        }
        root.present().map_err(figure_error)?;
    }
    RgbImage::from_raw(width, height, buf).ok_or_else(|| figure_error("buffer size"))
}

/// One panel of [`dice_per_round_figure`]: a title and, per organ, the Dice of each round.
pub type DiceSeries = (String, Vec<(Organ, Vec<f64>)>);

/// A line plot of validation Dice per round: one panel per series (titled with its name),
/// one line per organ in its overlay colour, rounds on x from 1, Dice on y from 0 to 1, with
/// axis labels, tick labels, a grid and a legend.
///
/// # Errors
/// When the bundled font cannot be loaded or plotters fails to draw.
pub fn dice_per_round_figure(series: &[DiceSeries]) -> segviz_core::Result<RgbImage> {
    register_font()?;
    let panels = series.len().max(1) as u32;
    let (pw, ph) = (480u32, 340u32);
    let (width, height) = (panels * pw, ph);
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(figure_error)?;
        let areas = root.split_evenly((1, panels as usize));
        for (area, (name, organs)) in areas.iter().zip(series) {
            let rounds = organs.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("{name}: validation Dice per round"),
                    (FAMILY, 17).into_font().style(FontStyle::Bold),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(48)
                .build_cartesian_2d(1i32..rounds.max(2) as i32, 0f64..1f64)
                .map_err(figure_error)?;
            chart
                .configure_mesh()
                .x_desc("round")
                .y_desc("Dice")
                .label_style((FAMILY, 13))
                .axis_desc_style((FAMILY, 14))
                .x_labels(rounds.clamp(2, 10))
                .y_label_formatter(&|y| format!("{y:.1}"))
                .light_line_style(RGBColor(238, 238, 238))
                .draw()
                .map_err(figure_error)?;
            for (organ, values) in organs {
                let colour = rgb(organ_colour(*organ));
                chart
                    .draw_series(LineSeries::new(
                        values
                            .iter()
                            .enumerate()
                            .map(|(r, v)| (r as i32 + 1, v.clamp(0.0, 1.0))),
                        colour.stroke_width(2),
                    ))
                    .map_err(figure_error)?
                    .label(organ.name())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3))
                    });
            }
            chart
                .configure_series_labels()
                .label_font((FAMILY, 13))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(figure_error)?;
        }
        root.present().map_err(figure_error)?;
    }
    RgbImage::from_raw(width, height, buf).ok_or_else(|| figure_error("buffer size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use segviz_data::Geometry;

    #[test]
    fn comparison_figure_has_one_panel_per_column_and_organ() {
        let g = Geometry::from_spacing([8, 6, 4], [1.0; 3]);
        let image = Volume::filled(g.clone(), 0.5f32);
        let mut truth = Volume::filled(g, 0u8);
        truth.data[truth.geometry.index(2, 3, 1)] = Organ::Liver.label();
        let cols: Vec<(&str, &[u8])> = vec![("GT", &truth.data), ("B", &truth.data)];
        let img =
            comparison_figure(&image, &truth, &cols, &[Organ::Liver, Organ::Spleen], 2).unwrap();
        assert_eq!(img.width(), 90 + 2 * (16 + 6) + 6);
        assert_eq!(img.height(), 28 + 2 * (12 + 6) + 6);
        assert_eq!(best_slice(&truth, Organ::Liver), 1);
        // The liver voxel is coloured, not grey.
        let (x, y) = (90 + 6 + (8 - 1 - 2) * 2, 28 + 6 + (6 - 1 - 3) * 2);
        let px = img.get_pixel(x, y);
        assert!(px[0] != px[1], "{px:?}");
        // Titles and row names are text: dark pixels above the panels and left of them.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (x0..x1)
                .flat_map(|x| (y0..y1).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y)[0] < 100)
                .count()
        };
        assert!(dark(96, img.width(), 0, 28) > 20, "no column titles");
        assert!(dark(24, 90, 28, img.height()) > 20, "no organ names");
    }

    #[test]
    fn dice_plot_draws_lines_in_organ_colours() {
        let img = dice_per_round_figure(&[
            ("FedBN".into(), vec![(Organ::Spleen, vec![0.1, 0.5, 0.9])]),
            ("FedBN + PL".into(), vec![(Organ::Liver, vec![0.2, 0.4])]),
        ])
        .unwrap();
        assert_eq!((img.width(), img.height()), (960, 340));
        let blue = organ_colour(Organ::Spleen);
        let red = organ_colour(Organ::Liver);
        let left = |p: &Rgb<u8>, x: u32| x < 480 && p == &blue;
        assert!(
            img.enumerate_pixels()
                .filter(|(x, _, p)| left(p, *x))
                .count()
                > 100
        );
        assert!(
            img.enumerate_pixels()
                .filter(|(x, _, p)| *x >= 480 && **p == red)
                .count()
                > 100
        );
        // Text (title, tick labels, axis names, legend) is drawn in black antialiased glyphs.
        let black = img
            .pixels()
            .filter(|p| p[0] < 60 && p[1] < 60 && p[2] < 60)
            .count();
        assert!(black > 1000, "{black} dark pixels");
    }
}
