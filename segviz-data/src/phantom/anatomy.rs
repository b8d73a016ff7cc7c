//! A synthetic trunk: one random subject's anatomy as implicit shapes in world millimetres
//! (RAS+: `x` to the patient's right, `y` anterior, `z` superior; origin in front of the
//! upper lumbar spine, near the renal hila).
//!
//! The trunk runs from the upper chest to the hips, so a site can scan the abdomen only or
//! the chest, abdomen and pelvis. It holds what makes intensity and position useless on
//! their own:
//! - *neighbours in every target organ's HU range*: diaphragm, psoas, paraspinal and
//!   abdominal-wall muscle; stomach, duodenum, small bowel and colon (walls enhancing like
//!   parenchyma, collapsed loops, fluid, stool, gas, oral contrast); aorta, IVC, portal,
//!   splenic, mesenteric, renal and hepatic veins; gallbladder, adrenals, heart, vertebrae
//!   (with a per-subject bone density), ribs, pelvis and femoral heads; fat planes that blur
//!   into the organ edges;
//! - *organ texture*: hepatic and portal vessels inside the liver, cysts and tumours, fatty
//!   liver, a lobulated and fatty pancreas, a moiré spleen in the arterial phase, renal
//!   cortex, medullary pyramids, sinus fat and collecting system;
//! - *per-subject pose*: every organ has its own size, elongation, rotation (three axes),
//!   smooth deformation and translation, on top of a frame size, a visceral-fat spread and
//!   a breath-hold shift of the whole upper abdomen.

use rand::Rng;

use super::shapes::{bezier, DisplacementField, Ellipsoid, Point, Tube};
pub use super::tissue::{ContrastPhase, OralContrast, Tissue};
use crate::labels::Organ;

/// BTCV label numbers used for the ground truth (the phantom's internal numbering).
pub mod btcv {
    /// Spleen.
    pub const SPLEEN: u8 = 1;
    /// Right kidney.
    pub const RIGHT_KIDNEY: u8 = 2;
    /// Left kidney.
    pub const LEFT_KIDNEY: u8 = 3;
    /// Gallbladder.
    pub const GALLBLADDER: u8 = 4;
    /// Oesophagus.
    pub const ESOPHAGUS: u8 = 5;
    /// Liver.
    pub const LIVER: u8 = 6;
    /// Stomach.
    pub const STOMACH: u8 = 7;
    /// Aorta.
    pub const AORTA: u8 = 8;
    /// Inferior vena cava.
    pub const IVC: u8 = 9;
    /// Portal and splenic veins.
    pub const PORTAL_SPLENIC_VEIN: u8 = 10;
    /// Pancreas.
    pub const PANCREAS: u8 = 11;
    /// Right adrenal gland.
    pub const RIGHT_ADRENAL: u8 = 12;
    /// Left adrenal gland.
    pub const LEFT_ADRENAL: u8 = 13;
}

/// What the phantom holds at one point: tissue, BTCV ground-truth label, tumour flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Voxel {
    /// Tissue class.
    pub tissue: Tissue,
    /// BTCV label number (0 for unlabelled structures).
    pub label: u8,
    /// Whether this point belongs to a tumour (of the organ in `label`).
    pub tumour: bool,
}

impl Voxel {
    fn plain(tissue: Tissue) -> Self {
        Voxel {
            tissue,
            label: 0,
            tumour: false,
        }
    }

    fn labelled(tissue: Tissue, label: u8) -> Self {
        Voxel {
            tissue,
            label,
            tumour: false,
        }
    }
}

/// Body outline: an ellipse cross-section whose semi-axes change along z (narrower chest,
/// wider hips) and wave a little.
#[derive(Debug, Clone)]
struct Body {
    semi_x: f64,
    semi_y: f64,
    centre_y: f64,
    /// Subcutaneous fat thickness, mm.
    fat: f64,
    /// Abdominal-wall muscle thickness, mm.
    muscle: f64,
    /// Relative change of the semi-axes along z: `amp · sin(k z + phase)`.
    z_wave: (f64, f64, f64),
}

impl Body {
    /// Squared normalised radius of `p` against the outline shrunk by `inset` mm.
    #[inline]
    fn level(&self, p: Point, inset: f64) -> f64 {
        let z = p[2];
        let wave = 1.0 + self.z_wave.0 * (self.z_wave.1 * z + self.z_wave.2).sin();
        // Hips below -150 mm widen the outline by up to 10%, the chest above 150 mm
        // narrows it by 6% and deepens it by 4%.
        let hips = smoothstep(-150.0, -230.0, z);
        let chest = smoothstep(130.0, 220.0, z);
        let fx = wave * (1.0 + 0.10 * hips - 0.06 * chest);
        let fy = wave * (1.0 - 0.03 * hips + 0.04 * chest);
        let ax = (self.semi_x * fx - inset).max(1.0);
        let ay = (self.semi_y * fy - inset).max(1.0);
        (p[0] / ax).powi(2) + ((p[1] - self.centre_y) / ay).powi(2)
    }
}

/// 0 at `a`, 1 at `b`, smooth in between (either order).
fn smoothstep(a: f64, b: f64, x: f64) -> f64 {
    let t = ((x - a) / (b - a)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Spine, spinal canal, posterior elements and paraspinal muscles.
#[derive(Debug, Clone)]
struct Spine {
    x: f64,
    y: f64,
    radius: [f64; 2],
    canal_radius: f64,
    period: f64,
    disc: f64,
    phase: f64,
}

/// Ribs: bone arcs in the outer band of the trunk above `z_min`.
#[derive(Debug, Clone)]
struct Ribs {
    period: f64,
    thickness: f64,
    phase: f64,
    z_min: f64,
}

/// The diaphragm: two domes; the chest lies above the surface.
#[derive(Debug, Clone)]
struct Diaphragm {
    /// `(x, y, top z)` of the right and left domes.
    domes: [[f64; 3]; 2],
    /// Radius of curvature of the domes, mm.
    curvature: f64,
}

impl Diaphragm {
    /// Height of the diaphragm surface above `(x, y)`.
    #[inline]
    fn height(&self, x: f64, y: f64) -> f64 {
        self.domes
            .iter()
            .map(|d| {
                let r2 = (x - d[0]).powi(2) + (y - d[1]).powi(2);
                // The posterior recesses reach lower than a sphere would.
                d[2] - r2 / (2.0 * self.curvature) - 0.6 * (d[1] - 30.0 - y).max(0.0)
            })
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

#[derive(Debug, Clone)]
struct Kidney {
    shape: Ellipsoid,
    sinus: Ellipsoid,
    pelvis: Ellipsoid,
    /// Angular frequency and phase of the medullary pyramids.
    pyramids: (f64, f64),
    label: u8,
}

/// A loop of gut: a tube with a wall and a content.
#[derive(Debug, Clone)]
struct GutLoop {
    tube: Tube,
    /// Level above which the tube is wall (1 − wall thickness / radius).
    wall_level: f64,
    content: Tissue,
    label: u8,
}

#[derive(Debug, Clone)]
struct Lesion {
    host: Organ,
    shape: Ellipsoid,
    /// Tumour (true) or simple cyst (false).
    tumour: bool,
}

/// Metal in the body (a hip prosthesis, spinal screws or surgical clips) and the streaks it
/// throws on the slices it lies in.
#[derive(Debug, Clone)]
pub struct MetalImplant {
    /// Centre of the implant (mm).
    pub centre: Point,
    /// Radius of the implant (mm).
    pub radius: f64,
    /// Extent of the implant along z (mm from the centre).
    pub half_length: f64,
}

/// Physiology of one subject: how it takes up contrast and what it drank.
#[derive(Debug, Clone)]
struct Physiology {
    /// Scales every contrast uptake (cardiac output, dose, timing): `native + u · (phase −
    /// native)`.
    uptake: f64,
    /// Per-subject HU offset of each target organ, in [`Organ::ALL`] order.
    organ_offset: [f64; 4],
    /// Fatty liver: HU removed from the liver in every phase.
    liver_fat: f64,
    /// Fraction of pancreas replaced by fat lobules (0–0.3 on average, up to 0.6 locally).
    pancreas_fat: f64,
    /// Cancellous bone HU (osteoporotic ~110, young ~260).
    bone_density: f64,
    oral: OralContrast,
}

/// One synthetic subject.
#[derive(Debug, Clone)]
pub struct Subject {
    body: Body,
    body_field: DisplacementField,
    spine: Spine,
    ribs: Ribs,
    diaphragm: Diaphragm,
    heart: Ellipsoid,
    lungs_field: DisplacementField,
    aorta: Tube,
    ivc: Tube,
    portal: Tube,
    splenic_vein: Tube,
    mesenteric_vein: Tube,
    renal_veins: [Tube; 2],
    liver_vessels: Vec<(Tube, Tissue)>,
    liver: [Ellipsoid; 3],
    liver_field: DisplacementField,
    gallbladder: Ellipsoid,
    spleen: Ellipsoid,
    spleen_field: DisplacementField,
    kidneys: [Kidney; 2],
    kidney_field: DisplacementField,
    adrenals: [(Ellipsoid, u8); 2],
    pancreas: Tube,
    pancreas_field: DisplacementField,
    stomach: Ellipsoid,
    stomach_field: DisplacementField,
    stomach_gas: f64,
    esophagus: Tube,
    gut: Vec<GutLoop>,
    psoas: [Tube; 2],
    iliac: [Ellipsoid; 2],
    femoral_heads: [Ellipsoid; 2],
    gluteal: [Ellipsoid; 2],
    bladder: Ellipsoid,
    lesions: Vec<Lesion>,
    /// Low-frequency parenchyma texture (x displacement read as HU).
    texture: DisplacementField,
    /// Finer texture: pancreas lobules, spleen moiré, heterogeneous enhancement.
    fine_texture: DisplacementField,
    physiology: Physiology,
    metal: Option<MetalImplant>,
}

/// `value · U(1 − spread, 1 + spread)`.
fn vary<R: Rng>(rng: &mut R, value: f64, spread: f64) -> f64 {
    value * rng.random_range(1.0 - spread..=1.0 + spread)
}

/// `value + U(−spread, spread)`.
fn jitter<R: Rng>(rng: &mut R, value: f64, spread: f64) -> f64 {
    value + rng.random_range(-spread..=spread)
}

fn jitter_point<R: Rng>(rng: &mut R, p: Point, spread: [f64; 3]) -> Point {
    std::array::from_fn(|a| jitter(rng, p[a], spread[a]))
}

fn add(p: Point, q: Point) -> Point {
    std::array::from_fn(|a| p[a] + q[a])
}

/// An organ ellipsoid with a random size, elongation and three-axis orientation.
fn organ_shape<R: Rng>(
    centre: Point,
    radii: [f64; 3],
    scale: f64,
    yaw: (f64, f64),
    tilt: f64,
    rng: &mut R,
) -> Ellipsoid {
    // Elongation: stretch one axis and squeeze the others, keeping the volume.
    let stretch: f64 = rng.random_range(0.82..=1.22);
    let axis = rng.random_range(0..3);
    let radii: [f64; 3] = std::array::from_fn(|a| {
        let f = if a == axis {
            stretch
        } else {
            1.0 / stretch.sqrt()
        };
        vary(rng, radii[a], 0.06) * scale * f
    });
    Ellipsoid::new(centre, radii).oriented(
        jitter(rng, yaw.0, yaw.1),
        jitter(rng, 0.0, tilt),
        jitter(rng, 0.0, tilt),
    )
}

impl Subject {
    /// Draws a subject. `tumour_in` gives the organ that carries tumours (as in the dataset
    /// the subject is written for); `None` for a subject without them (it may still have
    /// cysts).
    pub fn generate<R: Rng>(rng: &mut R, tumour_in: Option<Organ>) -> Subject {
        // Skeleton size, and the fat that comes on top of it.
        let frame = rng.random_range(0.88..=1.12);
        let obesity: f64 = rng.random_range(0.0..=1.0);
        let body = Body {
            semi_x: vary(rng, 135.0, 0.05) * frame,
            semi_y: vary(rng, 92.0, 0.06) * frame,
            centre_y: jitter(rng, 8.0, 5.0),
            fat: 8.0 + 42.0 * obesity * obesity + rng.random_range(0.0..=8.0),
            muscle: rng.random_range(7.0..=13.0),
            z_wave: (
                rng.random_range(0.01..=0.04),
                2.0 * std::f64::consts::PI / rng.random_range(250.0..=450.0),
                rng.random_range(0.0..std::f64::consts::TAU),
            ),
        };
        let mut body = body;
        body.semi_x += body.fat;
        body.semi_y += body.fat * 0.8;
        // Visceral fat pushes the organs apart; a breath hold moves the upper abdomen.
        let spread = 1.0 + 0.1 * obesity + rng.random_range(-0.03..=0.03);
        let s = frame * spread;
        let breath = [
            jitter(rng, 0.0, 10.0),
            jitter(rng, 0.0, 10.0),
            jitter(rng, 0.0, 22.0),
        ];
        let body_field = DisplacementField::random(rng, 5.0, (150.0, 300.0), 2);

        let spine_y = -42.0 * frame + jitter(rng, 0.0, 3.0);
        let spine = Spine {
            x: jitter(rng, 0.0, 3.0),
            y: spine_y,
            radius: [vary(rng, 22.0, 0.08), vary(rng, 17.0, 0.08)],
            canal_radius: vary(rng, 8.0, 0.1),
            period: vary(rng, 33.0, 0.06),
            disc: vary(rng, 8.0, 0.15),
            phase: rng.random_range(0.0..33.0),
        };
        let ribs = Ribs {
            period: vary(rng, 27.0, 0.08),
            thickness: vary(rng, 10.0, 0.15),
            phase: rng.random_range(0.0..27.0),
            z_min: jitter(rng, -15.0, 15.0) + breath[2],
        };

        // --- Liver, gallbladder, spleen: below the domes, moving with the breath.
        let liver_scale = rng.random_range(0.8..=1.22);
        let liver_c = add(
            jitter_point(rng, [62.0 * s, 8.0, 42.0], [14.0, 12.0, 14.0]),
            breath,
        );
        let right_lobe = organ_shape(
            liver_c,
            [68.0, 82.0, 72.0],
            liver_scale,
            (0.0, 0.3),
            0.22,
            rng,
        );
        let left_lobe = organ_shape(
            add(
                liver_c,
                jitter_point(rng, [-72.0, 35.0, 15.0], [12.0, 10.0, 12.0]),
            ),
            [48.0, 32.0, 30.0],
            liver_scale * rng.random_range(0.75..=1.3),
            (-0.2, 0.35),
            0.25,
            rng,
        );
        let caudate = organ_shape(
            add(
                liver_c,
                jitter_point(rng, [-40.0, -25.0, 5.0], [6.0, 6.0, 8.0]),
            ),
            [22.0, 20.0, 32.0],
            liver_scale,
            (0.0, 0.3),
            0.2,
            rng,
        );
        let liver = [right_lobe, left_lobe, caudate];
        let liver_top = liver
            .iter()
            .map(|l| l.centre[2] + 0.8 * l.radii[2])
            .fold(f64::NEG_INFINITY, f64::max);
        let gallbladder = organ_shape(
            add(
                liver_c,
                jitter_point(rng, [-15.0, 38.0, -38.0], [10.0, 8.0, 10.0]),
            ),
            [14.0, 14.0, 32.0],
            rng.random_range(0.6..=1.3),
            (0.3, 0.4),
            0.5,
            rng,
        );

        let spleen_scale = rng.random_range(0.75..=1.3);
        let spleen = organ_shape(
            add(
                jitter_point(rng, [-80.0 * s, -30.0, 48.0], [12.0, 14.0, 16.0]),
                breath,
            ),
            [26.0, 48.0, 50.0],
            spleen_scale,
            (0.6, 0.35),
            0.3,
            rng,
        );

        let stomach = organ_shape(
            add(
                jitter_point(rng, [-45.0 * s, 30.0, 40.0], [12.0, 12.0, 15.0]),
                breath,
            ),
            [38.0, 30.0, 48.0],
            rng.random_range(0.7..=1.3),
            (0.4, 0.4),
            0.35,
            rng,
        );
        let stomach_gas = rng.random_range(0.0..=0.6);

        let diaphragm = Diaphragm {
            domes: [
                [
                    liver_c[0] * 0.6,
                    jitter(rng, 5.0, 10.0),
                    liver_top + rng.random_range(0.0..=8.0),
                ],
                [
                    -55.0 * s,
                    jitter(rng, 0.0, 10.0),
                    (spleen.centre[2] + 0.8 * spleen.radii[2])
                        .max(stomach.centre[2] + 0.7 * stomach.radii[2])
                        + rng.random_range(0.0..=8.0),
                ],
            ],
            curvature: vary(rng, 120.0, 0.15),
        };
        let heart_z = diaphragm.domes[1][2].max(diaphragm.domes[0][2] - 15.0);
        let heart = organ_shape(
            [
                jitter(rng, -22.0, 8.0),
                jitter(rng, 38.0, 8.0),
                heart_z + 58.0,
            ],
            [62.0, 50.0, 58.0],
            rng.random_range(0.85..=1.2),
            (0.5, 0.2),
            0.2,
            rng,
        );

        // --- Retroperitoneum: vessels, kidneys, adrenals, pancreas.
        let aorta_xy = [jitter(rng, -14.0, 4.0), spine_y + jitter(rng, 30.0, 4.0)];
        let aorta_r = vary(rng, 11.0, 0.15);
        let bifurcation_z = jitter(rng, -125.0, 15.0);
        let aorta = Tube::new(
            vec![
                [aorta_xy[0] - 8.0, aorta_xy[1] - 8.0, 330.0],
                [aorta_xy[0], aorta_xy[1], 60.0],
                [aorta_xy[0] + 2.0, aorta_xy[1] + 4.0, bifurcation_z],
            ],
            vec![aorta_r * 1.15, aorta_r, aorta_r * 0.85],
        );
        let ivc_xy = [jitter(rng, 24.0, 4.0), spine_y + jitter(rng, 32.0, 4.0)];
        let ivc_r = vary(rng, 11.0, 0.2);
        let ivc = Tube::new(
            vec![
                [ivc_xy[0], ivc_xy[1], bifurcation_z - 10.0],
                [ivc_xy[0] + 2.0, ivc_xy[1] + 4.0, 40.0],
                [ivc_xy[0] - 4.0, ivc_xy[1] + 12.0, liver_top - 5.0],
            ],
            vec![ivc_r, ivc_r * 1.1, ivc_r * 1.2],
        );

        let kidney_scale = rng.random_range(0.82..=1.18);
        let kidney = |rng: &mut R, side: f64, z: f64, label: u8| {
            let centre = jitter_point(rng, [side * 68.0 * s, spine_y + 8.0, z], [10.0, 8.0, 18.0]);
            // The hilum faces antero-medially; the lower pole lies more lateral and anterior.
            let yaw = side * jitter(rng, -0.5, 0.25);
            let shape = Ellipsoid::new(
                centre,
                [25.0, 30.0, 55.0].map(|r| vary(rng, r, 0.08) * kidney_scale),
            )
            .oriented(yaw, jitter(rng, 0.2, 0.15), side * jitter(rng, 0.15, 0.12));
            let sinus_c = shape.point_at([-side * 0.55, 0.0, 0.0]);
            let sinus = shape.with_orientation_of(sinus_c, shape.radii.map(|r| r * 0.45));
            let pelvis = shape.with_orientation_of(
                shape.point_at([-side * 0.75, 0.0, -0.1]),
                [
                    shape.radii[0] * 0.22,
                    shape.radii[1] * 0.25,
                    shape.radii[2] * rng.random_range(0.12..=0.3),
                ],
            );
            Kidney {
                shape,
                sinus,
                pelvis,
                pyramids: (rng.random_range(5.0..=8.0), rng.random_range(0.0..=6.3)),
                label,
            }
        };
        let right_z = jitter(rng, -40.0, 12.0);
        let right = kidney(rng, 1.0, right_z, btcv::RIGHT_KIDNEY);
        let left_z = jitter(rng, -25.0, 12.0);
        let left = kidney(rng, -1.0, left_z, btcv::LEFT_KIDNEY);
        let renal_veins = [&right, &left].map(|k| {
            let hilum = k
                .shape
                .point_at([-k.shape.axis(0)[0].signum() * 0.9, 0.0, 0.0]);
            let hilum = [hilum[0] - hilum[0].signum() * 5.0, hilum[1] + 4.0, hilum[2]];
            // The left renal vein crosses in front of the aorta.
            let mid = if hilum[0] < 0.0 {
                [aorta_xy[0], aorta_xy[1] + aorta_r + 5.0, hilum[2] + 5.0]
            } else {
                [(hilum[0] + ivc_xy[0]) / 2.0, ivc_xy[1], hilum[2] + 5.0]
            };
            Tube::new(
                vec![hilum, mid, [ivc_xy[0], ivc_xy[1], hilum[2] + 10.0]],
                vec![vary(rng, 5.0, 0.2); 3],
            )
        });
        let kidneys = [right, left];
        let adrenals =
            [(1.0, btcv::RIGHT_ADRENAL), (-1.0, btcv::LEFT_ADRENAL)].map(|(side, label)| {
                let k = &kidneys[if side > 0.0 { 0 } else { 1 }].shape;
                let top = k.centre[2] + k.radii[2] * 0.85;
                (
                    Ellipsoid::new(
                        [k.centre[0] - side * 18.0, k.centre[1] + 10.0, top + 14.0],
                        [
                            vary(rng, 4.0, 0.2),
                            vary(rng, 16.0, 0.2),
                            vary(rng, 18.0, 0.2),
                        ],
                    )
                    .oriented(side * jitter(rng, 0.6, 0.3), 0.0, 0.0),
                    label,
                )
            });

        let pancreas_scale = rng.random_range(0.75..=1.2);
        let pancreas_shift = [
            jitter(rng, 0.0, 10.0),
            jitter(rng, 0.0, 8.0),
            jitter(rng, 0.0, 12.0) + breath[2] * 0.5,
        ];
        let head = add(
            jitter_point(rng, [34.0 * s, spine_y + 62.0, -22.0], [6.0, 6.0, 8.0]),
            pancreas_shift,
        );
        let neck = add(
            jitter_point(rng, [2.0, spine_y + 74.0, -8.0], [6.0, 6.0, 8.0]),
            pancreas_shift,
        );
        let tail = add(
            jitter_point(rng, [-75.0 * s, spine_y + 30.0, 14.0], [10.0, 10.0, 14.0]),
            pancreas_shift,
        );
        let body_ctrl = add(
            jitter_point(rng, [-35.0, spine_y + 66.0, 2.0], [8.0, 8.0, 8.0]),
            pancreas_shift,
        );
        let mut points = bezier(head, neck, neck, 4);
        points.extend(bezier(neck, body_ctrl, tail, 7).into_iter().skip(1));
        let radii: Vec<f64> = (0..points.len())
            .map(|i| {
                let t = i as f64 / (points.len() - 1) as f64;
                (15.0 - 8.0 * t) * pancreas_scale * rng.random_range(0.85..=1.15)
            })
            .collect();
        let pancreas = Tube::new(points.clone(), radii);

        // Portal confluence behind the pancreatic neck; portal vein up to the hilum.
        let confluence = [neck[0] + 4.0, neck[1] - 14.0, neck[2] + 2.0];
        let porta = liver_c.map(|_| 0.0);
        let porta = [
            porta[0] + liver_c[0] - 25.0,
            liver_c[1] + 12.0,
            liver_c[2] - 18.0,
        ];
        let portal = Tube::new(vec![confluence, porta], vec![vary(rng, 7.0, 0.2); 2]);
        let hilum = spleen.point_at([0.5, 0.3, 0.0]);
        let splenic_vein = Tube::new(
            points
                .iter()
                .skip(3)
                .map(|p| [p[0], p[1] - 10.0, p[2] + 2.0])
                .chain(std::iter::once(hilum))
                .collect(),
            vec![vary(rng, 4.5, 0.2); 9],
        );
        let mesenteric_vein = Tube::new(
            vec![
                confluence,
                [
                    confluence[0] + 6.0,
                    confluence[1] + 12.0,
                    confluence[2] - 50.0,
                ],
                [
                    confluence[0] + 10.0,
                    confluence[1] + 20.0,
                    confluence[2] - 110.0,
                ],
            ],
            vec![vary(rng, 5.5, 0.2), 4.5, 3.5],
        );
        // Intrahepatic vessels: hepatic veins fanning from the IVC, portal branches from
        // the hilum, and smaller random branches (all part of the liver label).
        let mut liver_vessels = Vec::new();
        let ivc_top = [ivc_xy[0] - 4.0, ivc_xy[1] + 12.0, liver_top - 12.0];
        for target in [[1.0, -0.2, -0.2], [0.1, 0.9, -0.3], [-0.9, 0.6, -0.2]] {
            let end = right_lobe.point_at(target.map(|t| t * 0.9));
            let end = if target[0] < 0.0 {
                left_lobe.point_at([0.2, 0.4, -0.2])
            } else {
                end
            };
            let mid = jitter_point(
                rng,
                std::array::from_fn(|a| (ivc_top[a] + end[a]) / 2.0),
                [12.0; 3],
            );
            liver_vessels.push((
                Tube::new(bezier(ivc_top, mid, end, 5), vec![7.0, 5.5, 4.0, 3.0, 2.2]),
                Tissue::Vein,
            ));
        }
        for _ in 0..rng.random_range(6..=12) {
            let lobe = if rng.random_bool(0.7) {
                right_lobe
            } else {
                left_lobe
            };
            let end = lobe.point_at(std::array::from_fn(|_| rng.random_range(-0.75..=0.75)));
            let mid = jitter_point(
                rng,
                std::array::from_fn(|a| (porta[a] + end[a]) / 2.0),
                [15.0; 3],
            );
            let r0 = rng.random_range(3.0..=5.5);
            liver_vessels.push((
                Tube::new(
                    bezier(porta, mid, end, 4),
                    vec![r0, r0 * 0.8, r0 * 0.6, r0 * 0.45],
                ),
                Tissue::PortalVein,
            ));
        }

        // --- Gut: oesophagus, duodenum around the pancreatic head, colon frame, small bowel.
        let esophagus = Tube::new(
            vec![
                [aorta_xy[0] + 12.0, spine_y + 30.0, 330.0],
                [
                    aorta_xy[0] + 10.0,
                    aorta_xy[1] + 18.0,
                    diaphragm.domes[1][2],
                ],
                stomach.point_at([0.4, 0.0, 0.75]),
            ],
            vec![vary(rng, 8.0, 0.15); 3],
        );
        let mut gut = Vec::new();
        let pylorus = stomach.point_at([0.9, 0.3, -0.5]);
        let duodenum_pts = vec![
            pylorus,
            [head[0] + 25.0, head[1] + 5.0, head[2] + 25.0],
            [head[0] + 30.0, head[1] - 5.0, head[2] - 10.0],
            [head[0] + 15.0, head[1] - 10.0, head[2] - 38.0],
            [head[0] - 20.0, head[1] - 15.0, head[2] - 42.0],
            [head[0] - 55.0, head[1] - 10.0, head[2] - 25.0],
        ];
        let content = |rng: &mut R, fluid_odds: f64| {
            let r: f64 = rng.random_range(0.0..=1.0);
            if r < 0.2 {
                Tissue::Gas
            } else if r < 0.2 + fluid_odds {
                Tissue::GutFluid
            } else {
                Tissue::GutSolid
            }
        };
        gut.push(GutLoop {
            tube: Tube::new(duodenum_pts, vec![vary(rng, 11.0, 0.2); 6]),
            wall_level: rng.random_range(0.35..=0.75),
            content: content(rng, 0.6),
            label: 0,
        });
        // Colon frame: ascending, transverse (sagging), descending, sigmoid.
        let colon_r = vary(rng, 20.0, 0.2);
        let asc_x = 95.0 * s;
        let colon = [
            vec![
                [asc_x, jitter(rng, 5.0, 15.0), -140.0],
                [asc_x, jitter(rng, 10.0, 15.0), -30.0],
                [asc_x - 10.0, 25.0, jitter(rng, 0.0, 15.0)],
            ],
            vec![
                [asc_x - 10.0, 25.0, jitter(rng, 0.0, 15.0)],
                [0.0, jitter(rng, 60.0, 10.0), jitter(rng, -40.0, 35.0)],
                [-asc_x + 5.0, 20.0, jitter(rng, 30.0, 15.0)],
            ],
            vec![
                [-asc_x + 5.0, 20.0, jitter(rng, 30.0, 15.0)],
                [-asc_x, jitter(rng, -10.0, 10.0), -60.0],
                [-asc_x + 15.0, jitter(rng, 0.0, 10.0), -170.0],
            ],
            vec![
                [-asc_x + 15.0, jitter(rng, 0.0, 10.0), -170.0],
                [-20.0, jitter(rng, 30.0, 15.0), -230.0],
                [0.0, -60.0, -270.0],
                [0.0, -65.0, -380.0],
            ],
        ];
        for points in colon {
            let n = points.len();
            let pts = if n == 3 {
                bezier(points[0], points[1], points[2], 6)
            } else {
                points
            };
            let m = pts.len();
            gut.push(GutLoop {
                tube: Tube::new(pts, vec![colon_r * rng.random_range(0.7..=1.2); m]),
                wall_level: rng.random_range(0.7..=0.85),
                content: content(rng, 0.1),
                label: 0,
            });
        }
        // Small bowel: many loops in the mid and lower abdomen and the pelvis; some
        // collapsed (all wall, enhancing like parenchyma).
        for _ in 0..rng.random_range(14..=22) {
            let a = [
                rng.random_range(-85.0..=85.0) * s,
                rng.random_range(-5.0..=70.0),
                rng.random_range(-240.0..=-20.0),
            ];
            let b = jitter_point(rng, a, [35.0, 20.0, 35.0]);
            let c = jitter_point(rng, a, [45.0, 25.0, 45.0]);
            let collapsed = rng.random_bool(0.4);
            gut.push(GutLoop {
                tube: Tube::new(bezier(a, b, c, 5), vec![rng.random_range(8.0..=14.0); 5]),
                wall_level: if collapsed {
                    rng.random_range(0.0..=0.15)
                } else {
                    rng.random_range(0.55..=0.8)
                },
                content: content(rng, 0.5),
                label: 0,
            });
        }

        // --- Muscles and bones of the lower trunk.
        let psoas = [1.0, -1.0].map(|side: f64| {
            Tube::new(
                vec![
                    [side * 28.0 * frame, spine_y + 2.0, 30.0],
                    [side * 45.0 * frame, spine_y + 10.0, -100.0],
                    [side * 65.0 * frame, spine_y + 35.0, -230.0],
                    [side * 75.0 * frame, spine_y + 60.0, -320.0],
                ],
                vec![
                    6.0,
                    vary(rng, 20.0, 0.2),
                    vary(rng, 24.0, 0.2),
                    vary(rng, 18.0, 0.2),
                ],
            )
        });
        let iliac = [1.0, -1.0].map(|side: f64| {
            Ellipsoid::new(
                [side * 85.0 * frame, spine_y - 5.0, -200.0],
                [
                    vary(rng, 14.0, 0.1),
                    vary(rng, 60.0, 0.1),
                    vary(rng, 65.0, 0.1),
                ],
            )
            .oriented(side * jitter(rng, 0.5, 0.1), 0.0, side * 0.25)
        });
        let femoral_heads = [1.0, -1.0].map(|side: f64| {
            Ellipsoid::new(
                [side * 92.0 * frame, spine_y + 45.0, -330.0],
                [vary(rng, 24.0, 0.08); 3],
            )
        });
        let gluteal = [1.0, -1.0].map(|side: f64| {
            Ellipsoid::new(
                [side * 80.0 * frame, spine_y - 50.0, -290.0],
                [
                    vary(rng, 55.0, 0.1),
                    vary(rng, 40.0, 0.1),
                    vary(rng, 90.0, 0.1),
                ],
            )
        });
        let bladder_fill = rng.random_range(0.5..=1.2);
        let bladder = Ellipsoid::new(
            jitter_point(rng, [0.0, spine_y + 95.0, -300.0], [8.0, 8.0, 10.0]),
            [45.0, 35.0, 35.0].map(|r| r * bladder_fill),
        );

        // --- Lesions: tumours in the site's organ, cysts anywhere.
        let mut lesions = Vec::new();
        let lesion = |rng: &mut R, host: Organ, shape: &Ellipsoid, r: (f64, f64), tumour| {
            let centre = shape.point_at(std::array::from_fn(|_| rng.random_range(-0.6..=0.6)));
            let r = rng.random_range(r.0..=r.1);
            Lesion {
                host,
                shape: Ellipsoid::new(centre, [r, vary(rng, r, 0.25), vary(rng, r, 0.25)]),
                tumour,
            }
        };
        match tumour_in {
            Some(Organ::Liver) => {
                for _ in 0..rng.random_range(1..=4) {
                    lesions.push(lesion(rng, Organ::Liver, &right_lobe, (7.0, 28.0), true));
                }
            }
            Some(Organ::Kidney) => {
                let k = kidneys[rng.random_range(0..2)].shape;
                lesions.push(lesion(rng, Organ::Kidney, &k, (10.0, 30.0), true));
            }
            Some(Organ::Pancreas) => {
                let i = rng.random_range(0..pancreas.points.len());
                let r = rng.random_range(8.0..=16.0);
                lesions.push(Lesion {
                    host: Organ::Pancreas,
                    shape: Ellipsoid::new(pancreas.points[i], [r, vary(rng, r, 0.2), r]),
                    tumour: true,
                });
            }
            Some(Organ::Spleen) | None => {}
        }
        for _ in 0..rng.random_range(0..=3) {
            lesions.push(lesion(rng, Organ::Liver, &right_lobe, (4.0, 14.0), false));
        }
        if rng.random_bool(0.35) {
            let k = kidneys[rng.random_range(0..2)].shape;
            lesions.push(lesion(rng, Organ::Kidney, &k, (5.0, 18.0), false));
        }

        let physiology = Physiology {
            uptake: rng.random_range(0.7..=1.3),
            organ_offset: std::array::from_fn(|_| rng.random_range(-10.0..=10.0)),
            liver_fat: if rng.random_bool(0.3) {
                rng.random_range(12.0..=45.0)
            } else {
                0.0
            },
            pancreas_fat: rng.random_range(0.0..=0.3),
            bone_density: rng.random_range(110.0..=280.0),
            oral: match rng.random_range(0..10) {
                0..=3 => OralContrast::None,
                4..=5 => OralContrast::Water,
                _ => OralContrast::Positive(rng.random_range(130.0..=380.0)),
            },
        };
        let metal = rng.random_bool(0.12).then(|| {
            let side = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            match rng.random_range(0..3) {
                0 => MetalImplant {
                    centre: femoral_heads[usize::from(side < 0.0)].centre,
                    radius: 16.0,
                    half_length: 40.0,
                },
                1 => MetalImplant {
                    centre: [side * 15.0, spine_y - 5.0, jitter(rng, -80.0, 40.0)],
                    radius: 4.0,
                    half_length: 35.0,
                },
                _ => MetalImplant {
                    centre: add(gallbladder.centre, [0.0, 0.0, 10.0]),
                    radius: 3.0,
                    half_length: 4.0,
                },
            }
        });

        Subject {
            body,
            body_field,
            spine,
            ribs,
            diaphragm,
            heart,
            lungs_field: DisplacementField::random(rng, 40.0, (15.0, 40.0), 2),
            aorta,
            ivc,
            portal,
            splenic_vein,
            mesenteric_vein,
            renal_veins,
            liver_vessels,
            liver,
            liver_field: DisplacementField::random(rng, 14.0, (90.0, 220.0), 3),
            gallbladder,
            spleen,
            spleen_field: DisplacementField::random(rng, 9.0, (60.0, 150.0), 3),
            kidneys,
            kidney_field: DisplacementField::random(rng, 5.0, (70.0, 150.0), 2),
            adrenals,
            pancreas,
            pancreas_field: DisplacementField::random(rng, 7.0, (40.0, 110.0), 3),
            stomach,
            stomach_field: DisplacementField::random(rng, 12.0, (70.0, 170.0), 3),
            stomach_gas,
            esophagus,
            gut,
            psoas,
            iliac,
            femoral_heads,
            gluteal,
            bladder,
            lesions,
            texture: DisplacementField::random(rng, 12.0, (25.0, 80.0), 3),
            fine_texture: DisplacementField::random(rng, 1.0, (8.0, 16.0), 3),
            physiology,
            metal,
        }
    }

    /// The subject's metal implant, if it has one.
    pub fn metal(&self) -> Option<&MetalImplant> {
        self.metal.as_ref()
    }

    /// The highest and lowest z (mm) of the liver dome and of the femoral heads: scan ranges
    /// are planned from these landmarks.
    pub fn landmarks(&self) -> Landmarks {
        let dome = self.diaphragm.domes[0][2].max(self.diaphragm.domes[1][2]);
        let kidney_low = self
            .kidneys
            .iter()
            .map(|k| k.shape.centre[2] - k.shape.radii[2])
            .fold(f64::INFINITY, f64::min);
        Landmarks {
            diaphragm_top: dome,
            kidney_bottom: kidney_low,
            femoral_heads: self.femoral_heads[0].centre[2],
            body_semi_axes: [self.body.semi_x, self.body.semi_y],
            body_centre_y: self.body.centre_y,
        }
    }

    /// Whether `p` lies in a lesion of `host`: `Some(true)` tumour, `Some(false)` cyst.
    fn lesion_at(&self, host: Organ, p: Point) -> Option<bool> {
        self.lesions
            .iter()
            .find(|l| l.host == host && l.shape.level(p) < 1.0)
            .map(|l| l.tumour)
    }

    /// What the subject holds at world point `p`.
    pub fn sample(&self, p: Point) -> Voxel {
        let q = self.body_field.warp(p);
        let body = &self.body;
        if body.level(q, 0.0) > 1.0 {
            return Voxel::plain(Tissue::Air);
        }
        if let Some(m) = &self.metal {
            let d = (p[0] - m.centre[0]).powi(2) + (p[1] - m.centre[1]).powi(2);
            if d < m.radius * m.radius && (p[2] - m.centre[2]).abs() < m.half_length {
                return Voxel::plain(Tissue::Metal);
            }
        }
        if let Some(t) = self.spine_at(p) {
            return Voxel::plain(t);
        }
        let sp = &self.spine;
        for side in [1.0, -1.0] {
            let dx = p[0] - (sp.x + side * 32.0);
            let dy = p[1] - (sp.y - 38.0);
            if (dx / 24.0).powi(2) + (dy / 21.0).powi(2) < 1.0 {
                return Voxel::plain(Tissue::Muscle);
            }
        }
        if body.level(q, body.fat) > 1.0 {
            return Voxel::plain(Tissue::SubcutaneousFat);
        }
        if p[2] < -150.0 {
            if let Some(v) = self.pelvis_at(p) {
                return v;
            }
        }
        let wall = body.fat + body.muscle;
        if body.level(q, wall) > 1.0 {
            return Voxel::plain(Tissue::Muscle);
        }
        if self.in_rib(p, q, wall) {
            return Voxel::plain(Tissue::CorticalBone);
        }
        let dome = self.diaphragm.height(p[0], p[1]);
        if p[2] > dome {
            return self.chest_at(p);
        }
        if p[2] > dome - 5.0 && body.level(q, wall + 25.0) < 1.0 {
            return Voxel::plain(Tissue::Muscle);
        }
        self.abdomen_at(p)
    }

    /// Vertebral body, disc, canal and posterior elements.
    fn spine_at(&self, p: Point) -> Option<Tissue> {
        let sp = &self.spine;
        let dx = p[0] - sp.x;
        let dy = p[1] - sp.y;
        if dx.abs() > 40.0 || dy > sp.radius[1] + 1.0 || dy < -70.0 {
            return None;
        }
        let in_disc = (p[2] - sp.phase).rem_euclid(sp.period) < sp.disc;
        let level = (dx / sp.radius[0]).powi(2) + (dy / sp.radius[1]).powi(2);
        if level < 1.0 {
            let rim = ((sp.radius[1] - 3.0) / sp.radius[1]).powi(2);
            return Some(if in_disc {
                Tissue::Disc
            } else if level > rim {
                Tissue::CorticalBone
            } else {
                Tissue::CancellousBone
            });
        }
        let canal_y = sp.y - sp.radius[1] - sp.canal_radius;
        let canal_d = (dx * dx + (p[1] - canal_y).powi(2)).sqrt();
        if canal_d < sp.canal_radius {
            return Some(Tissue::SpinalCanal);
        }
        if !in_disc {
            let arch = canal_d < sp.canal_radius + 5.0 && p[1] < sp.y - sp.radius[1];
            let spinous =
                dx.abs() < 4.5 && p[1] < canal_y && p[1] > canal_y - sp.canal_radius - 26.0;
            let transverse = dx.abs() < 38.0
                && (p[1] - (canal_y + 2.0)).abs() < 5.0
                && (p[2] - sp.phase).rem_euclid(sp.period) < sp.disc + 12.0;
            if arch || spinous || transverse {
                return Some(Tissue::CorticalBone);
            }
        }
        None
    }

    /// Rib arcs in the outer band of the cavity (away from the anterior midline low down).
    fn in_rib(&self, p: Point, q: Point, wall: f64) -> bool {
        let r = &self.ribs;
        // Ribs slope down towards the front, so a slice cuts a few arcs, not a ring.
        let z = p[2] + 0.45 * (q[1] - self.body.centre_y) + 0.2 * q[0].abs();
        if p[2] < r.z_min || (z - r.phase).rem_euclid(r.period) >= r.thickness {
            return false;
        }
        let anterior_gap = q[1] > self.body.centre_y
            && q[0].abs() < 0.35 * self.body.semi_x
            && p[2] < r.z_min + 120.0;
        !anterior_gap && self.body.level(q, wall + 10.0) > 1.0
    }

    /// Hip bones, femoral heads, gluteal muscles (below the iliac crests).
    fn pelvis_at(&self, p: Point) -> Option<Voxel> {
        for bone in self.iliac.iter().chain(&self.femoral_heads) {
            if bone.near(p, 0.0) {
                let level = bone.level(p);
                if level < 1.0 {
                    let t = if level > 0.7 {
                        Tissue::CorticalBone
                    } else {
                        Tissue::CancellousBone
                    };
                    return Some(Voxel::plain(t));
                }
            }
        }
        for m in &self.gluteal {
            if m.near(p, 0.0) && m.level(p) < 1.0 {
                return Some(Voxel::plain(Tissue::Muscle));
            }
        }
        None
    }

    /// Above the diaphragm: heart, aorta, oesophagus, mediastinal fat, lungs.
    fn chest_at(&self, p: Point) -> Voxel {
        if self.aorta.near(p, 0.0) && self.aorta.level(p) < 1.0 {
            return Voxel::labelled(Tissue::Artery, btcv::AORTA);
        }
        if self.esophagus.near(p, 0.0) && self.esophagus.level(p) < 1.0 {
            return Voxel::labelled(Tissue::GutWall, btcv::ESOPHAGUS);
        }
        if self.ivc.near(p, 0.0) && self.ivc.level(p) < 1.0 {
            return Voxel::labelled(Tissue::Vein, btcv::IVC);
        }
        if self.heart.near(p, 8.0) {
            let level = self.heart.level(p);
            if level < 0.55 {
                return Voxel::plain(Tissue::HeartBlood);
            }
            if level < 1.0 {
                return Voxel::plain(Tissue::Myocardium);
            }
            if level < 1.25 {
                return Voxel::plain(Tissue::VisceralFat);
            }
        }
        // Mediastinum: in front of the spine, between the lungs.
        let mx = p[0] - self.heart.centre[0] * 0.3;
        if mx.abs() < 28.0 && p[1] > self.spine.y - 5.0 {
            return Voxel::plain(Tissue::VisceralFat);
        }
        Voxel::plain(Tissue::Lung)
    }

    /// Below the diaphragm, in order of precedence.
    fn abdomen_at(&self, p: Point) -> Voxel {
        if self.aorta.near(p, 0.0) && self.aorta.level(p) < 1.0 {
            return Voxel::labelled(Tissue::Artery, btcv::AORTA);
        }
        if p[2] < self.aorta.points[2][2] {
            // Common iliac arteries and veins, diverging below the bifurcation.
            let below = self.aorta.points[2][2] - p[2];
            for side in [1.0, -1.0] {
                let x = self.aorta.points[2][0] + side * (5.0 + 0.45 * below);
                let y = self.aorta.points[2][1] - 0.1 * below;
                if (p[0] - x).powi(2) + (p[1] - y).powi(2) < 49.0 {
                    return Voxel::plain(Tissue::Artery);
                }
                if (p[0] - x - side * 4.0).powi(2) + (p[1] - y + 14.0).powi(2) < 64.0 {
                    return Voxel::plain(Tissue::Vein);
                }
            }
        }
        if self.ivc.near(p, 0.0) && self.ivc.level(p) < 1.0 {
            return Voxel::labelled(Tissue::Vein, btcv::IVC);
        }
        if self.portal.near(p, 0.0) && self.portal.level(p) < 1.0 {
            return Voxel::labelled(Tissue::PortalVein, btcv::PORTAL_SPLENIC_VEIN);
        }
        if self.splenic_vein.near(p, 0.0) && self.splenic_vein.level(p) < 1.0 {
            return Voxel::labelled(Tissue::PortalVein, btcv::PORTAL_SPLENIC_VEIN);
        }
        if self.mesenteric_vein.near(p, 0.0) && self.mesenteric_vein.level(p) < 1.0 {
            return Voxel::plain(Tissue::PortalVein);
        }
        for v in &self.renal_veins {
            if v.near(p, 0.0) && v.level(p) < 1.0 {
                return Voxel::plain(Tissue::Vein);
            }
        }
        for (a, label) in &self.adrenals {
            if a.near(p, 0.0) && a.level(p) < 1.0 {
                return Voxel::labelled(Tissue::Adrenal, *label);
            }
        }
        for psoas in &self.psoas {
            if psoas.near(p, 0.0) && psoas.level(p) < 1.0 {
                return Voxel::plain(Tissue::Muscle);
            }
        }
        if let Some(v) = self.kidney_at(p) {
            return v;
        }
        if self.gallbladder.near(p, self.liver_field.bound()) {
            let w = self.liver_field.warp(p);
            let level = self.gallbladder.level(w);
            if level < 1.0 {
                let t = if level > 0.8 {
                    Tissue::GutWall
                } else {
                    Tissue::Bile
                };
                return Voxel::labelled(t, btcv::GALLBLADDER);
            }
        }
        if self.spleen.near(p, self.spleen_field.bound()) {
            let w = self.spleen_field.warp(p);
            if self.spleen.level(w) < 1.0 {
                return Voxel::labelled(Tissue::Spleen, btcv::SPLEEN);
            }
        }
        if self.pancreas.near(p, self.pancreas_field.bound()) {
            let w = self.pancreas_field.warp(p);
            if self.pancreas.level(w) < 1.0 {
                return match self.lesion_at(Organ::Pancreas, w) {
                    Some(true) => Voxel {
                        tissue: Tissue::Tumour(Organ::Pancreas),
                        label: btcv::PANCREAS,
                        tumour: true,
                    },
                    _ => Voxel::labelled(Tissue::Pancreas, btcv::PANCREAS),
                };
            }
        }
        let liver_bound = self.liver_field.bound();
        if self.liver.iter().any(|l| l.near(p, liver_bound)) {
            let w = self.liver_field.warp(p);
            if self.liver.iter().any(|l| l.level(w) < 1.0) {
                return self.liver_at(p, w);
            }
        }
        if self.stomach.near(p, self.stomach_field.bound()) {
            let w = self.stomach_field.warp(p);
            let level = self.stomach.level(w);
            if level < 1.0 {
                let own_z = (w[2] - self.stomach.centre[2]) / self.stomach.radii[2];
                let tissue = if level > 0.72 {
                    Tissue::GutWall
                } else if own_z > 1.0 - 2.0 * self.stomach_gas {
                    // Gas rises to the fundus in a supine patient.
                    Tissue::Gas
                } else {
                    Tissue::GutFluid
                };
                return Voxel::labelled(tissue, btcv::STOMACH);
            }
        }
        if self.esophagus.near(p, 0.0) && self.esophagus.level(p) < 1.0 {
            return Voxel::labelled(Tissue::GutWall, btcv::ESOPHAGUS);
        }
        if p[2] < -200.0 && self.bladder.near(p, 0.0) {
            let level = self.bladder.level(p);
            if level < 1.0 {
                let t = if level > 0.85 {
                    Tissue::Muscle
                } else {
                    Tissue::Urine
                };
                return Voxel::plain(t);
            }
        }
        for g in &self.gut {
            if g.tube.near(p, 0.0) {
                let level = g.tube.level(p);
                if level < 1.0 {
                    let t = if level > g.wall_level {
                        Tissue::GutWall
                    } else {
                        g.content
                    };
                    return Voxel::labelled(t, g.label);
                }
            }
        }
        Voxel::plain(Tissue::VisceralFat)
    }

    /// Kidney cortex, medullary pyramids, sinus fat, collecting system, cysts, tumours.
    fn kidney_at(&self, p: Point) -> Option<Voxel> {
        for kidney in &self.kidneys {
            if !kidney.shape.near(p, self.kidney_field.bound()) {
                continue;
            }
            let w = self.kidney_field.warp(p);
            let level = kidney.shape.level(w);
            if level >= 1.0 {
                continue;
            }
            match self.lesion_at(Organ::Kidney, w) {
                Some(true) => {
                    return Some(Voxel {
                        tissue: Tissue::Tumour(Organ::Kidney),
                        label: kidney.label,
                        tumour: true,
                    })
                }
                Some(false) => return Some(Voxel::labelled(Tissue::Cyst, kidney.label)),
                None => {}
            }
            if kidney.pelvis.level(w) < 1.0 {
                return Some(Voxel::plain(Tissue::Urine));
            }
            if kidney.sinus.level(w) < 1.0 {
                return Some(Voxel::plain(Tissue::RenalSinus));
            }
            // Pyramids: a band under the cortex, interrupted by the columns of Bertin.
            let d = [
                w[0] - kidney.shape.centre[0],
                w[1] - kidney.shape.centre[1],
                w[2] - kidney.shape.centre[2],
            ];
            let ax = kidney.shape.axis(2);
            let along = (d[0] * ax[0] + d[1] * ax[1] + d[2] * ax[2]) / kidney.shape.radii[2];
            let column = (kidney.pyramids.0 * along * 1.6 + kidney.pyramids.1).sin() > 0.55;
            let tissue = if level > 0.62 || column {
                Tissue::KidneyCortex
            } else {
                Tissue::KidneyMedulla
            };
            return Some(Voxel::labelled(tissue, kidney.label));
        }
        None
    }

    /// Inside the liver outline: vessels, lesions, parenchyma (all labelled liver).
    fn liver_at(&self, p: Point, w: Point) -> Voxel {
        match self.lesion_at(Organ::Liver, w) {
            Some(true) => {
                return Voxel {
                    tissue: Tissue::Tumour(Organ::Liver),
                    label: btcv::LIVER,
                    tumour: true,
                }
            }
            Some(false) => return Voxel::labelled(Tissue::Cyst, btcv::LIVER),
            None => {}
        }
        for (vessel, tissue) in &self.liver_vessels {
            if vessel.near(p, 0.0) && vessel.level(p) < 1.0 {
                return Voxel::labelled(*tissue, btcv::LIVER);
            }
        }
        Voxel::labelled(Tissue::Liver, btcv::LIVER)
    }

    /// Mean attenuation (HU, before noise) of `tissue` at `p` in `phase`.
    pub fn hu(&self, tissue: Tissue, p: Point, phase: ContrastPhase) -> f64 {
        let ph = &self.physiology;
        let table = tissue.hu_table();
        let native = table[0];
        let mut hu = native + ph.uptake * (table[phase.index()] - native);
        match tissue {
            Tissue::CancellousBone => hu += ph.bone_density - table[0],
            Tissue::GutFluid => {
                hu = match ph.oral {
                    OralContrast::None => hu + 8.0,
                    OralContrast::Water => hu,
                    // Positive contrast mixes unevenly with the bowel content.
                    OralContrast::Positive(v) => {
                        v * (0.75 + 0.5 * (self.fine_texture.warp(p)[1] - p[1]))
                    }
                }
            }
            Tissue::Lung => hu += 30.0 * (self.lungs_field.warp(p)[0] - p[0]) / 40.0,
            _ => {}
        }
        if let Some(organ) = tissue.organ() {
            hu += ph.organ_offset[organ.index()];
            // Low-frequency heterogeneity (perfusion, iron, fat), stronger with contrast.
            let amplitude = if phase == ContrastPhase::Native {
                0.6
            } else {
                1.0
            };
            hu += amplitude * (self.texture.warp(p)[0] - p[0]);
            let fine = self.fine_texture.warp(p)[0] - p[0];
            match tissue {
                Tissue::Liver => hu -= ph.liver_fat,
                Tissue::Pancreas => {
                    // Fat lobules between the acini.
                    let fat = (ph.pancreas_fat * (1.0 + fine)).clamp(0.0, 0.6);
                    hu = hu * (1.0 - fat) + Tissue::VisceralFat.hu_table()[0] * fat;
                }
                Tissue::Spleen if phase == ContrastPhase::LateArterial => {
                    // Arciform ("moiré") enhancement of the red pulp.
                    hu += 45.0 * ph.uptake * fine;
                }
                _ => {}
            }
        }
        hu
    }
}

/// Landmarks a radiographer plans a scan range from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Landmarks {
    /// Top of the higher diaphragm dome (mm).
    pub diaphragm_top: f64,
    /// Lower pole of the lower kidney (mm).
    pub kidney_bottom: f64,
    /// Centre height of the femoral heads (mm).
    pub femoral_heads: f64,
    /// Semi-axes of the body outline at the kidneys (mm).
    pub body_semi_axes: [f64; 2],
    /// Antero-posterior centre of the body outline (mm).
    pub body_centre_y: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn landmarks_hold_the_expected_tissue() {
        for seed in 0..5 {
            let s = Subject::generate(&mut ChaCha8Rng::seed_from_u64(seed), Some(Organ::Liver));
            // The trunk is a cylinder along z: beside it is air, inside it is not.
            assert_eq!(s.sample([300.0, 0.0, 0.0]).tissue, Tissue::Air);
            assert_eq!(s.sample([0.0, 250.0, 0.0]).tissue, Tissue::Air);
            let vertebra = s.sample([s.spine.x, s.spine.y, 0.0]).tissue;
            assert!(
                matches!(vertebra, Tissue::CancellousBone | Tissue::Disc),
                "{vertebra:?}"
            );
            // Lung high in the chest beside the heart, bladder low in the pelvis.
            let lung = s.sample([90.0, -40.0, 300.0]).tissue;
            assert_eq!(lung, Tissue::Lung, "seed {seed}");
            let l = s.sample(s.liver[0].centre);
            assert_eq!(l.label, btcv::LIVER, "seed {seed}");
        }
    }

    #[test]
    fn tumours_only_where_asked() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let none = Subject::generate(&mut rng, None);
        assert!(none.lesions.iter().all(|l| !l.tumour));
        for organ in [Organ::Liver, Organ::Kidney, Organ::Pancreas] {
            let s = Subject::generate(&mut rng, Some(organ));
            let tumours: Vec<_> = s.lesions.iter().filter(|l| l.tumour).collect();
            assert!(!tumours.is_empty());
            assert!(tumours.iter().all(|t| t.host == organ));
        }
    }

    #[test]
    fn enhancement_follows_the_phase() {
        let s = Subject::generate(&mut ChaCha8Rng::seed_from_u64(1), None);
        let p = [0.0; 3];
        let hu = |t, phase| s.hu(t, p, phase);
        for t in [
            Tissue::Liver,
            Tissue::Spleen,
            Tissue::KidneyCortex,
            Tissue::Artery,
        ] {
            assert!(
                hu(t, ContrastPhase::PortalVenous) > hu(t, ContrastPhase::Native) + 30.0,
                "{t:?}"
            );
        }
        assert!(
            hu(Tissue::KidneyCortex, ContrastPhase::LateArterial)
                > hu(Tissue::KidneyMedulla, ContrastPhase::LateArterial) + 50.0
        );
        assert_eq!(hu(Tissue::Air, ContrastPhase::PortalVenous), -1000.0);
    }
}
