//! A synthetic abdomen: one random subject's anatomy as implicit shapes in world
//! millimetres (RAS+: `x` to the patient's right, `y` anterior, `z` superior; origin near
//! the body centre at the level of the upper lumbar spine).
//!
//! The layout follows textbook anatomy closely enough that a network has to learn shape and
//! context, not intensity: the liver fills the right upper abdomen, the spleen sits left
//! and posterior, the kidneys lie beside the spine (the right one lower), the pancreas is a
//! thin curved tube across the midline in front of the aorta, and stomach and bowel (with
//! gas) fill the rest. Every organ is deformed by its own smooth random displacement field,
//! and sizes, positions and enhancement vary per subject.

use rand::Rng;

use super::shapes::{bezier, DisplacementField, Ellipsoid, Point, Tube};
use crate::labels::Organ;

/// BTCV label numbers used for the ground truth (the phantom's internal numbering).
pub mod btcv {
    /// Spleen.
    pub const SPLEEN: u8 = 1;
    /// Right kidney.
    pub const RIGHT_KIDNEY: u8 = 2;
    /// Left kidney.
    pub const LEFT_KIDNEY: u8 = 3;
    /// Liver.
    pub const LIVER: u8 = 6;
    /// Stomach.
    pub const STOMACH: u8 = 7;
    /// Aorta.
    pub const AORTA: u8 = 8;
    /// Inferior vena cava.
    pub const IVC: u8 = 9;
    /// Pancreas.
    pub const PANCREAS: u8 = 11;
}

/// The tissue classes the phantom renders, each with its own attenuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tissue {
    /// Outside the body.
    Air,
    /// Subcutaneous fat.
    SubcutaneousFat,
    /// Abdominal wall and paraspinal muscle.
    Muscle,
    /// Fat between the abdominal organs.
    VisceralFat,
    /// Cortical bone (vertebral rim, posterior elements).
    CorticalBone,
    /// Cancellous bone (vertebral body interior).
    CancellousBone,
    /// Intervertebral disc.
    Disc,
    /// Spinal canal (CSF and cord).
    SpinalCanal,
    /// Rib.
    Rib,
    /// Aorta (blood pool).
    Aorta,
    /// Inferior vena cava.
    Ivc,
    /// Liver parenchyma.
    Liver,
    /// Spleen.
    Spleen,
    /// Renal cortex.
    KidneyCortex,
    /// Renal medulla.
    KidneyMedulla,
    /// Renal sinus fat (not part of the kidney label).
    RenalSinus,
    /// Pancreas.
    Pancreas,
    /// Stomach wall.
    StomachWall,
    /// Fluid in the stomach.
    StomachFluid,
    /// Gas in stomach or bowel.
    Gas,
    /// Bowel wall.
    BowelWall,
    /// Fluid bowel content.
    BowelFluid,
    /// Solid bowel content (stool).
    BowelSoft,
    /// A tumour inside the given organ.
    Tumour(Organ),
}

/// Contrast phase of an acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastPhase {
    /// No contrast agent.
    Native,
    /// Portal venous phase (~70 s): parenchyma and veins enhanced.
    PortalVenous,
}

impl Tissue {
    /// Mean attenuation in HU: `(native, portal venous)`.
    fn hu_pair(self) -> (f64, f64) {
        match self {
            Tissue::Air => (-1000.0, -1000.0),
            Tissue::SubcutaneousFat => (-100.0, -100.0),
            Tissue::Muscle => (45.0, 60.0),
            Tissue::VisceralFat => (-90.0, -90.0),
            Tissue::CorticalBone => (800.0, 800.0),
            Tissue::CancellousBone => (260.0, 270.0),
            Tissue::Disc => (80.0, 85.0),
            Tissue::SpinalCanal => (15.0, 20.0),
            Tissue::Rib => (550.0, 550.0),
            Tissue::Aorta => (40.0, 180.0),
            Tissue::Ivc => (40.0, 135.0),
            Tissue::Liver => (60.0, 110.0),
            Tissue::Spleen => (48.0, 120.0),
            Tissue::KidneyCortex => (32.0, 175.0),
            Tissue::KidneyMedulla => (30.0, 105.0),
            Tissue::RenalSinus => (-60.0, -55.0),
            Tissue::Pancreas => (45.0, 100.0),
            Tissue::StomachWall => (40.0, 90.0),
            Tissue::StomachFluid => (10.0, 12.0),
            Tissue::Gas => (-1000.0, -1000.0),
            Tissue::BowelWall => (40.0, 90.0),
            Tissue::BowelFluid => (15.0, 18.0),
            Tissue::BowelSoft => (35.0, 40.0),
            Tissue::Tumour(Organ::Liver) => (35.0, 60.0),
            Tissue::Tumour(Organ::Kidney) => (35.0, 95.0),
            Tissue::Tumour(Organ::Pancreas) => (35.0, 55.0),
            Tissue::Tumour(Organ::Spleen) => (40.0, 70.0),
        }
    }

    /// Whether the subject's organ texture and HU jitter apply (soft-tissue organs).
    fn is_parenchyma(self) -> bool {
        matches!(
            self,
            Tissue::Liver
                | Tissue::Spleen
                | Tissue::KidneyCortex
                | Tissue::KidneyMedulla
                | Tissue::Pancreas
                | Tissue::Tumour(_)
        )
    }
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

/// Body outline: an ellipse cross-section that varies smoothly along z.
#[derive(Debug, Clone)]
struct Body {
    semi_x: f64,
    semi_y: f64,
    centre_y: f64,
    fat: f64,
    muscle: f64,
    /// Relative change of the semi-axes along z: `amp · sin(k z + phase)`.
    z_wave: (f64, f64, f64),
}

impl Body {
    /// Semi-axes of the outline at height `z`, shrunk by `inset` mm.
    #[inline]
    fn level(&self, p: Point, inset: f64) -> f64 {
        let f = 1.0 + self.z_wave.0 * (self.z_wave.1 * p[2] + self.z_wave.2).sin();
        let ax = (self.semi_x * f - inset).max(1.0);
        let ay = (self.semi_y * f - inset).max(1.0);
        (p[0] / ax).powi(2) + ((p[1] - self.centre_y) / ay).powi(2)
    }
}

/// Lumbar spine and paraspinal muscles.
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

/// Ribs: bone arcs in the outer band of the abdominal cavity on some slices.
#[derive(Debug, Clone)]
struct Ribs {
    period: f64,
    thickness: f64,
    phase: f64,
    z_min: f64,
}

#[derive(Debug, Clone)]
struct Kidney {
    shape: Ellipsoid,
    sinus: Ellipsoid,
    label: u8,
}

#[derive(Debug, Clone)]
struct BowelLoop {
    tube: Tube,
    content: Tissue,
}

#[derive(Debug, Clone)]
struct Tumour {
    host: Organ,
    shape: Ellipsoid,
}

/// One synthetic subject.
#[derive(Debug, Clone)]
pub struct Subject {
    body: Body,
    body_field: DisplacementField,
    spine: Spine,
    ribs: Ribs,
    aorta: Tube,
    ivc: Tube,
    liver: [Ellipsoid; 2],
    liver_field: DisplacementField,
    spleen: Ellipsoid,
    spleen_field: DisplacementField,
    kidneys: [Kidney; 2],
    kidney_field: DisplacementField,
    pancreas: Tube,
    pancreas_field: DisplacementField,
    stomach: Ellipsoid,
    stomach_field: DisplacementField,
    bowel: Vec<BowelLoop>,
    tumours: Vec<Tumour>,
    /// Texture field (its x displacement, in HU) for parenchyma.
    texture: DisplacementField,
    /// Scales the contrast uptake (portal − native).
    enhancement: f64,
    /// Per-subject HU offset of each organ, in [`Organ::ALL`] order.
    organ_offset: [f64; 4],
}

/// `value · U(1 − spread, 1 + spread)`.
fn vary<R: Rng>(rng: &mut R, value: f64, spread: f64) -> f64 {
    value * rng.random_range(1.0 - spread..=1.0 + spread)
}

/// `value + U(−spread, spread)`.
fn jitter<R: Rng>(rng: &mut R, value: f64, spread: f64) -> f64 {
    value + rng.random_range(-spread..=spread)
}

fn jitter_point<R: Rng>(rng: &mut R, p: Point, spread: f64) -> Point {
    p.map(|v| jitter(rng, v, spread))
}

impl Subject {
    /// Draws a subject. `tumour_in` gives the organ that carries tumours (as in the dataset
    /// the subject is written for); `None` for a tumour-free subject.
    pub fn generate<R: Rng>(rng: &mut R, tumour_in: Option<Organ>) -> Subject {
        let size = rng.random_range(0.9..=1.08);
        let body = Body {
            semi_x: vary(rng, 158.0, 0.05) * size,
            semi_y: vary(rng, 112.0, 0.06) * size,
            centre_y: jitter(rng, 0.0, 4.0),
            fat: rng.random_range(10.0..=28.0),
            muscle: rng.random_range(8.0..=13.0),
            z_wave: (
                rng.random_range(0.02..=0.05),
                2.0 * std::f64::consts::PI / rng.random_range(250.0..=400.0),
                rng.random_range(0.0..std::f64::consts::TAU),
            ),
        };
        let body_field = DisplacementField::random(rng, 4.0, (150.0, 300.0), 2);
        let spine_y = -55.0 * size + jitter(rng, 0.0, 3.0);
        let spine = Spine {
            x: jitter(rng, 0.0, 2.0),
            y: spine_y,
            radius: [vary(rng, 21.0, 0.08), vary(rng, 16.0, 0.08)],
            canal_radius: vary(rng, 8.0, 0.1),
            period: vary(rng, 32.0, 0.06),
            disc: vary(rng, 7.0, 0.15),
            phase: rng.random_range(0.0..32.0),
        };
        let ribs = Ribs {
            period: vary(rng, 26.0, 0.08),
            thickness: vary(rng, 9.0, 0.15),
            phase: rng.random_range(0.0..26.0),
            z_min: jitter(rng, -25.0, 10.0),
        };
        let aorta_xy = [jitter(rng, -16.0, 3.0), spine_y + jitter(rng, 28.0, 3.0)];
        let aorta_r = vary(rng, 11.0, 0.12);
        let aorta = Tube::new(
            vec![
                [aorta_xy[0], aorta_xy[1], 200.0],
                [aorta_xy[0] + 3.0, aorta_xy[1], -200.0],
            ],
            vec![aorta_r, aorta_r * 0.9],
        );
        let ivc_xy = [jitter(rng, 23.0, 3.0), spine_y + jitter(rng, 32.0, 3.0)];
        let ivc = Tube::new(
            vec![
                [ivc_xy[0], ivc_xy[1], 200.0],
                [ivc_xy[0], ivc_xy[1], -200.0],
            ],
            vec![vary(rng, 12.0, 0.15); 2],
        );

        let liver_scale = rng.random_range(0.88..=1.12);
        let liver = [
            Ellipsoid::new(
                jitter_point(rng, [70.0, 0.0, 40.0], 7.0),
                [72.0, 80.0, 75.0].map(|r| vary(rng, r, 0.06) * liver_scale),
            )
            .rotated(jitter(rng, 0.0, 0.12)),
            Ellipsoid::new(
                jitter_point(rng, [0.0, 40.0, 58.0], 6.0),
                [46.0, 30.0, 30.0].map(|r| vary(rng, r, 0.1) * liver_scale),
            )
            .rotated(jitter(rng, -0.2, 0.15)),
        ];
        let spleen_scale = rng.random_range(0.8..=1.2);
        let spleen = Ellipsoid::new(
            jitter_point(rng, [-82.0, -36.0, 50.0], 6.0),
            [26.0, 48.0, 50.0].map(|r| vary(rng, r, 0.08) * spleen_scale),
        )
        .rotated(jitter(rng, 0.6, 0.15));

        let kidney_scale = rng.random_range(0.88..=1.12);
        let kidney = |rng: &mut R, side: f64, z: f64, label: u8| {
            let centre = jitter_point(rng, [side * 70.0, spine_y + 10.0, z], 5.0);
            let radii = [25.0, 30.0, 55.0].map(|r| vary(rng, r, 0.06) * kidney_scale);
            // The hilum faces antero-medially.
            let angle = side * jitter(rng, -0.45, 0.15);
            let shape = Ellipsoid::new(centre, radii).rotated(angle);
            let (s, c) = angle.sin_cos();
            let inward = [-side * c * radii[0] * 0.75, -side * s * radii[0] * 0.75];
            let sinus = Ellipsoid::new(
                [centre[0] + inward[0], centre[1] + inward[1], centre[2]],
                [radii[0] * 0.45, radii[1] * 0.45, radii[2] * 0.45],
            )
            .rotated(angle);
            Kidney {
                shape,
                sinus,
                label,
            }
        };
        // The right kidney lies lower, under the liver.
        let right_z = jitter(rng, -38.0, 8.0);
        let right = kidney(rng, 1.0, right_z, btcv::RIGHT_KIDNEY);
        let left_z = jitter(rng, -22.0, 8.0);
        let left = kidney(rng, -1.0, left_z, btcv::LEFT_KIDNEY);
        let kidneys = [right, left];

        let pancreas_scale = rng.random_range(0.85..=1.15);
        let head = jitter_point(rng, [36.0, spine_y + 62.0, -22.0], 5.0);
        let neck = jitter_point(rng, [2.0, spine_y + 72.0, -8.0], 5.0);
        let tail = jitter_point(rng, [-72.0, spine_y + 30.0, 12.0], 6.0);
        let mut points = bezier(head, neck, neck, 4);
        points.extend(
            bezier(neck, [-35.0, spine_y + 64.0, 2.0], tail, 6)
                .into_iter()
                .skip(1),
        );
        let radii: Vec<f64> = (0..points.len())
            .map(|i| {
                let t = i as f64 / (points.len() - 1) as f64;
                // Thick head, thinner body, tapering tail.
                (15.0 - 7.0 * t) * pancreas_scale
            })
            .collect();
        let pancreas = Tube::new(points, radii);

        let stomach = Ellipsoid::new(
            jitter_point(rng, [-55.0, 30.0, 30.0], 6.0),
            [36.0, 30.0, 40.0].map(|r| vary(rng, r, 0.12)),
        )
        .rotated(jitter(rng, 0.3, 0.2));

        let mut bowel = Vec::new();
        for side in [1.0, -1.0] {
            // Ascending (right) and descending (left) colon along the flanks.
            let x = side * jitter(rng, 95.0, 6.0);
            bowel.push(BowelLoop {
                tube: Tube::new(
                    vec![
                        [x, jitter(rng, 0.0, 8.0), -200.0],
                        [x, jitter(rng, 0.0, 8.0), -20.0],
                    ],
                    vec![vary(rng, 18.0, 0.15); 2],
                ),
                content: if rng.random_bool(0.5) {
                    Tissue::Gas
                } else {
                    Tissue::BowelSoft
                },
            });
        }
        for _ in 0..rng.random_range(5..=8) {
            let a = [
                rng.random_range(-80.0..=80.0),
                rng.random_range(5.0..=65.0),
                rng.random_range(-115.0..=-35.0),
            ];
            let b = jitter_point(rng, a, 30.0);
            let c = jitter_point(rng, a, 40.0);
            let content = match rng.random_range(0..10) {
                0..=2 => Tissue::Gas,
                3..=6 => Tissue::BowelFluid,
                _ => Tissue::BowelSoft,
            };
            bowel.push(BowelLoop {
                tube: Tube::new(bezier(a, b, c, 6), vec![rng.random_range(9.0..=15.0); 6]),
                content,
            });
        }

        let mut tumours = Vec::new();
        match tumour_in {
            Some(Organ::Liver) => {
                for _ in 0..rng.random_range(1..=3) {
                    let host = liver[0];
                    let centre: Point = std::array::from_fn(|a| {
                        host.centre[a] + host.radii[a] * rng.random_range(-0.45..=0.45)
                    });
                    let r = rng.random_range(8.0..=22.0);
                    tumours.push(Tumour {
                        host: Organ::Liver,
                        shape: Ellipsoid::new(centre, [r, vary(rng, r, 0.2), vary(rng, r, 0.2)]),
                    });
                }
            }
            Some(Organ::Kidney) => {
                let host = kidneys[rng.random_range(0..2)].shape;
                let pole = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
                let centre = [
                    host.centre[0],
                    host.centre[1],
                    host.centre[2] + pole * host.radii[2] * rng.random_range(0.2..=0.55),
                ];
                let r = rng.random_range(10.0..=20.0);
                tumours.push(Tumour {
                    host: Organ::Kidney,
                    shape: Ellipsoid::new(centre, [r, vary(rng, r, 0.2), vary(rng, r, 0.2)]),
                });
            }
            Some(Organ::Pancreas) => {
                let i = rng.random_range(0..pancreas.points.len());
                let r = rng.random_range(8.0..=13.0);
                tumours.push(Tumour {
                    host: Organ::Pancreas,
                    shape: Ellipsoid::new(pancreas.points[i], [r, vary(rng, r, 0.2), r]),
                });
            }
            Some(Organ::Spleen) | None => {}
        }

        Subject {
            body,
            body_field,
            spine,
            ribs,
            aorta,
            ivc,
            liver,
            liver_field: DisplacementField::random(rng, 9.0, (90.0, 220.0), 3),
            spleen,
            spleen_field: DisplacementField::random(rng, 6.0, (70.0, 160.0), 3),
            kidneys,
            kidney_field: DisplacementField::random(rng, 4.0, (80.0, 160.0), 2),
            pancreas,
            pancreas_field: DisplacementField::random(rng, 5.0, (50.0, 120.0), 3),
            stomach,
            stomach_field: DisplacementField::random(rng, 8.0, (80.0, 180.0), 3),
            bowel,
            tumours,
            texture: DisplacementField::random(rng, 7.0, (25.0, 70.0), 3),
            enhancement: rng.random_range(0.85..=1.15),
            organ_offset: std::array::from_fn(|_| rng.random_range(-6.0..=6.0)),
        }
    }

    /// Whether `p` lies in a tumour of `host`.
    fn in_tumour(&self, host: Organ, p: Point) -> bool {
        self.tumours
            .iter()
            .any(|t| t.host == host && t.shape.level(p) < 1.0)
    }

    /// What the subject holds at world point `p`.
    pub fn sample(&self, p: Point) -> Voxel {
        let q = self.body_field.warp(p);
        let body = &self.body;
        if body.level(q, 0.0) > 1.0 {
            return Voxel::plain(Tissue::Air);
        }
        if let Some(t) = self.spine_at(p) {
            return Voxel::plain(t);
        }
        let sp = &self.spine;
        for side in [1.0, -1.0] {
            let dx = p[0] - (sp.x + side * 32.0);
            let dy = p[1] - (sp.y - 30.0);
            if (dx / 22.0).powi(2) + (dy / 19.0).powi(2) < 1.0 {
                return Voxel::plain(Tissue::Muscle);
            }
        }
        if body.level(q, body.fat) > 1.0 {
            return Voxel::plain(Tissue::SubcutaneousFat);
        }
        let wall = body.fat + body.muscle;
        if body.level(q, wall) > 1.0 {
            return Voxel::plain(Tissue::Muscle);
        }
        if self.in_rib(p, q, wall) {
            return Voxel::plain(Tissue::Rib);
        }
        self.cavity_at(p)
    }

    /// Vertebral body, disc, canal and posterior elements.
    fn spine_at(&self, p: Point) -> Option<Tissue> {
        let sp = &self.spine;
        let dx = p[0] - sp.x;
        let dy = p[1] - sp.y;
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
                dx.abs() < 4.5 && p[1] < canal_y && p[1] > canal_y - sp.canal_radius - 24.0;
            if arch || spinous {
                return Some(Tissue::CorticalBone);
            }
        }
        None
    }

    /// Rib arcs in the outer band of the cavity, away from the anterior midline.
    fn in_rib(&self, p: Point, q: Point, wall: f64) -> bool {
        let r = &self.ribs;
        if p[2] < r.z_min || (p[2] - r.phase).rem_euclid(r.period) >= r.thickness {
            return false;
        }
        let anterior_gap = q[1] > self.body.centre_y && q[0].abs() < 0.35 * self.body.semi_x;
        !anterior_gap && self.body.level(q, wall + 8.0) > 1.0
    }

    /// Contents of the abdominal cavity, in order of precedence.
    fn cavity_at(&self, p: Point) -> Voxel {
        if self.aorta.near(p, 0.0) && self.aorta.level(p) < 1.0 {
            return Voxel::labelled(Tissue::Aorta, btcv::AORTA);
        }
        if self.ivc.near(p, 0.0) && self.ivc.level(p) < 1.0 {
            return Voxel::labelled(Tissue::Ivc, btcv::IVC);
        }
        for kidney in &self.kidneys {
            if !kidney.shape.near(p, self.kidney_field.bound()) {
                continue;
            }
            let w = self.kidney_field.warp(p);
            let level = kidney.shape.level(w);
            if level < 1.0 {
                if self.in_tumour(Organ::Kidney, w) {
                    return Voxel {
                        tissue: Tissue::Tumour(Organ::Kidney),
                        label: kidney.label,
                        tumour: true,
                    };
                }
                if kidney.sinus.level(w) < 1.0 {
                    return Voxel::plain(Tissue::RenalSinus);
                }
                let tissue = if level > 0.5 {
                    Tissue::KidneyCortex
                } else {
                    Tissue::KidneyMedulla
                };
                return Voxel::labelled(tissue, kidney.label);
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
                return if self.in_tumour(Organ::Pancreas, w) {
                    Voxel {
                        tissue: Tissue::Tumour(Organ::Pancreas),
                        label: btcv::PANCREAS,
                        tumour: true,
                    }
                } else {
                    Voxel::labelled(Tissue::Pancreas, btcv::PANCREAS)
                };
            }
        }
        let liver_bound = self.liver_field.bound();
        if self.liver.iter().any(|l| l.near(p, liver_bound)) {
            let w = self.liver_field.warp(p);
            if self.liver.iter().any(|l| l.level(w) < 1.0) {
                return if self.in_tumour(Organ::Liver, w) {
                    Voxel {
                        tissue: Tissue::Tumour(Organ::Liver),
                        label: btcv::LIVER,
                        tumour: true,
                    }
                } else {
                    Voxel::labelled(Tissue::Liver, btcv::LIVER)
                };
            }
        }
        if self.stomach.near(p, self.stomach_field.bound()) {
            let w = self.stomach_field.warp(p);
            let level = self.stomach.level(w);
            if level < 1.0 {
                let c = self.stomach.centre;
                let tissue = if level > 0.8 {
                    Tissue::StomachWall
                } else if w[1] > c[1] + 8.0 && w[2] > c[2] {
                    // Gas rises to the anterior, upper part in a supine patient.
                    Tissue::Gas
                } else {
                    Tissue::StomachFluid
                };
                return Voxel::labelled(tissue, btcv::STOMACH);
            }
        }
        for loop_ in &self.bowel {
            if loop_.tube.near(p, 0.0) {
                let level = loop_.tube.level(p);
                if level < 1.0 {
                    let tissue = if level > 0.75 {
                        Tissue::BowelWall
                    } else {
                        loop_.content
                    };
                    return Voxel::plain(tissue);
                }
            }
        }
        Voxel::plain(Tissue::VisceralFat)
    }

    /// Mean attenuation (HU, before noise) of `tissue` at `p` in `phase`.
    pub fn hu(&self, tissue: Tissue, p: Point, phase: ContrastPhase) -> f64 {
        let (native, portal) = tissue.hu_pair();
        let mut hu = match phase {
            ContrastPhase::Native => native,
            ContrastPhase::PortalVenous => native + self.enhancement * (portal - native),
        };
        if tissue.is_parenchyma() {
            let organ = match tissue {
                Tissue::Liver => Some(Organ::Liver),
                Tissue::Spleen => Some(Organ::Spleen),
                Tissue::Pancreas => Some(Organ::Pancreas),
                Tissue::KidneyCortex | Tissue::KidneyMedulla => Some(Organ::Kidney),
                _ => None,
            };
            if let Some(o) = organ {
                hu += self.organ_offset[o.index()];
            }
            hu += self.texture.warp(p)[0] - p[0];
        }
        hu
    }
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
            // The trunk is a cylinder along z: beside it is air, above it is not.
            assert_eq!(s.sample([0.0, 200.0, 400.0]).tissue, Tissue::Air);
            assert_eq!(s.sample([300.0, 0.0, 0.0]).tissue, Tissue::Air);
            let vertebra = s.sample([s.spine.x, s.spine.y, 0.0]).tissue;
            assert!(
                matches!(vertebra, Tissue::CancellousBone | Tissue::Disc),
                "{vertebra:?}"
            );
            let l = s.sample(s.liver[0].centre);
            assert_eq!(l.label, btcv::LIVER, "seed {seed}");
        }
    }

    #[test]
    fn tumours_only_where_asked() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        assert!(Subject::generate(&mut rng, None).tumours.is_empty());
        for organ in [Organ::Liver, Organ::Kidney, Organ::Pancreas] {
            let s = Subject::generate(&mut rng, Some(organ));
            assert!(!s.tumours.is_empty());
            assert!(s.tumours.iter().all(|t| t.host == organ));
        }
    }

    #[test]
    fn enhancement_raises_organs_in_portal_phase() {
        let s = Subject::generate(&mut ChaCha8Rng::seed_from_u64(1), None);
        let p = [0.0; 3];
        for t in [
            Tissue::Liver,
            Tissue::Spleen,
            Tissue::KidneyCortex,
            Tissue::Aorta,
        ] {
            assert!(
                s.hu(t, p, ContrastPhase::PortalVenous) > s.hu(t, p, ContrastPhase::Native) + 30.0
            );
        }
        assert_eq!(s.hu(Tissue::Air, p, ContrastPhase::PortalVenous), -1000.0);
    }
}
