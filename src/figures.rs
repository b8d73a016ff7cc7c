//! PNG figures of an experiment: the paper's Fig. 3 (ground truth vs baseline vs central vs
//! SegViz on one axial slice per organ) and validation Dice per round.
//!
//! Drawn pixel by pixel with the `image` crate and a built-in 3×5 pixel font, so no system
//! font or plotting backend is needed on a headless machine.

use std::path::Path;

use image::{Rgb, RgbImage};
use segviz_core::checkpoint::write_atomically;
use segviz_data::{Organ, Volume};

/// Colour of each organ's overlay (liver, spleen, pancreas, kidney).
pub fn organ_colour(organ: Organ) -> Rgb<u8> {
    match organ {
        Organ::Liver => Rgb([230, 80, 60]),
        Organ::Spleen => Rgb([70, 140, 240]),
        Organ::Pancreas => Rgb([240, 200, 40]),
        Organ::Kidney => Rgb([80, 200, 100]),
    }
}

/// Glyphs of the 3×5 font: five rows of three bits, most significant bit on the left.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        ':' => [0, 2, 0, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        _ => [0, 0, 0, 0, 0],
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel `scale` pixels wide.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, colour: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let g = glyph(c);
        let x0 = x + i as u32 * 4 * scale;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3u32 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (px, py) = (x0 + col * scale + dx, y + row as u32 * scale + dy);
                            if px < img.width() && py < img.height() {
                                img.put_pixel(px, py, colour);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn fill_rect(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, colour: Rgb<u8>) {
    for py in y..(y + h).min(img.height()) {
        for px in x..(x + w).min(img.width()) {
            img.put_pixel(px, py, colour);
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), colour: Rgb<u8>) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()) * 2.0).ceil().max(1.0) as usize;
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, colour);
            }
        }
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
            fill_rect(&mut img, x * zoom, y * zoom, zoom, zoom, px);
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
/// map (`columns[0]` is usually the ground truth), titles on top.
pub fn comparison_figure(
    image: &Volume<f32>,
    truth: &Volume<u8>,
    columns: &[(&str, &[u8])],
    organs: &[Organ],
    zoom: u32,
) -> RgbImage {
    let [ni, nj, _] = image.geometry.shape;
    let (pw, ph) = (ni as u32 * zoom, nj as u32 * zoom);
    let (gap, title) = (6u32, 20u32);
    let width = columns.len() as u32 * (pw + gap) + gap;
    let height = title + organs.len() as u32 * (ph + gap) + gap;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (c, (name, _)) in columns.iter().enumerate() {
        draw_text(
            &mut img,
            gap + c as u32 * (pw + gap),
            6,
            name,
            2,
            Rgb([0, 0, 0]),
        );
    }
    for (r, organ) in organs.iter().enumerate() {
        let k = best_slice(truth, *organ);
        for (c, (_, labels)) in columns.iter().enumerate() {
            let p = panel(image, labels, *organ, k, zoom);
            image::imageops::overlay(
                &mut img,
                &p,
                (gap + c as u32 * (pw + gap)) as i64,
                (title + gap + r as u32 * (ph + gap)) as i64,
            );
        }
    }
    img
}

/// One panel of [`dice_per_round_figure`]: a title and, per organ, the Dice of each round.
pub type DiceSeries = (String, Vec<(Organ, Vec<f64>)>);

/// A line plot of validation Dice per round: one panel per series, one line per organ, y
/// from 0 to 1.
pub fn dice_per_round_figure(series: &[DiceSeries]) -> RgbImage {
    let panels = series.len().max(1) as u32;
    let (pw, ph, margin) = (360u32, 240u32, 40u32);
    let width = panels * (pw + margin) + margin;
    let height = ph + 2 * margin + 30;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (p, (name, organs)) in series.iter().enumerate() {
        let x0 = margin + p as u32 * (pw + margin);
        let y0 = margin;
        draw_text(
            &mut img,
            x0,
            10,
            &format!("{name}: VAL DICE PER ROUND"),
            2,
            Rgb([0, 0, 0]),
        );
        // Axes and grid at 0.2 steps.
        for g in 0..=5 {
            let y = y0 + ph - g * ph / 5;
            let shade = if g == 0 {
                Rgb([0, 0, 0])
            } else {
                Rgb([220, 220, 220])
            };
            line(
                &mut img,
                (x0 as f64, y as f64),
                ((x0 + pw) as f64, y as f64),
                shade,
            );
            draw_text(
                &mut img,
                x0.saturating_sub(26),
                y.saturating_sub(2),
                &format!("{:.1}", g as f64 / 5.0),
                1,
                Rgb([0, 0, 0]),
            );
        }
        line(
            &mut img,
            (x0 as f64, y0 as f64),
            (x0 as f64, (y0 + ph) as f64),
            Rgb([0, 0, 0]),
        );
        let rounds = organs.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        draw_text(
            &mut img,
            x0 + pw - 60,
            y0 + ph + 8,
            &format!("ROUNDS 1-{rounds}"),
            1,
            Rgb([0, 0, 0]),
        );
        for (o, (organ, values)) in organs.iter().enumerate() {
            let colour = organ_colour(*organ);
            let to_xy = |r: usize, v: f64| {
                let x = x0 as f64
                    + if rounds > 1 {
                        r as f64 * pw as f64 / (rounds - 1) as f64
                    } else {
                        0.0
                    };
                (x, y0 as f64 + ph as f64 * (1.0 - v.clamp(0.0, 1.0)))
            };
            for r in 1..values.len() {
                line(
                    &mut img,
                    to_xy(r - 1, values[r - 1]),
                    to_xy(r, values[r]),
                    colour,
                );
            }
            // Legend.
            let ly = y0 + ph + 20;
            let lx = x0 + o as u32 * 90;
            fill_rect(&mut img, lx, ly, 10, 10, colour);
            draw_text(&mut img, lx + 14, ly + 2, organ.name(), 1, Rgb([0, 0, 0]));
        }
    }
    img
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
        let img = comparison_figure(&image, &truth, &cols, &[Organ::Liver, Organ::Spleen], 2);
        assert_eq!(img.width(), 2 * (16 + 6) + 6);
        assert_eq!(img.height(), 20 + 2 * (12 + 6) + 6);
        assert_eq!(best_slice(&truth, Organ::Liver), 1);
        // The liver voxel is coloured, not grey.
        let (x, y) = (6 + (8 - 1 - 2) * 2, 20 + 6 + (6 - 1 - 3) * 2);
        let px = img.get_pixel(x, y);
        assert!(px[0] != px[1], "{px:?}");
    }

    #[test]
    fn dice_plot_draws_lines_in_organ_colours() {
        let img =
            dice_per_round_figure(&[("FEDBN".into(), vec![(Organ::Spleen, vec![0.1, 0.5, 0.9])])]);
        let blue = organ_colour(Organ::Spleen);
        assert!(img.pixels().filter(|p| **p == blue).count() > 100);
    }
}
