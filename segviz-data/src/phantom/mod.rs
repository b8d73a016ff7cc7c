//! Synthetic abdominal CT phantoms, written in the layouts of SegViz's five datasets.
//!
//! No real CT can be downloaded here, so experiments run on phantoms that keep what makes
//! the real problem hard: organs of realistic size and place whose Hounsfield units overlap
//! each other and their neighbours (thresholding cannot segment them), a thin and variable
//! pancreas, per-subject anatomy, and per-site differences in noise, contrast phase,
//! spacing, field of view, intensity calibration and axis order ([`SiteStyle`]).
//!
//! Each site is like its real dataset: every subject has all organs, but the site writes
//! only its own annotation — MSD liver (liver and tumour), MSD spleen, MSD pancreas
//! (pancreas and tumour), KiTS19 (kidneys and tumour, stored slice-first), and BTCV with
//! all structures in BTCV numbering (the external test set). [`write_sites`] is deterministic in the seed
//! and reuses an existing output written with the same configuration.

pub mod anatomy;
pub mod render;
pub mod report;
pub mod shapes;
mod sites;
pub mod tissue;

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

pub use anatomy::Subject;
pub use render::{
    render_case, Acquisition, AxisLayout, PhantomCase, PhantomSize, ScanRange, SiteStyle,
};
pub use report::{measure, PhantomReport};
pub use sites::site_style;
pub use tissue::ContrastPhase;

use crate::atomic_write;
use crate::datasets::Layout;
use crate::error::{DataError, Result};
use crate::labels::{Organ, OrganSet};
use crate::nifti_io::{write_labels, write_volume, VoxelType};
use crate::volume::Volume;

/// Bumped whenever the generator's output changes, so old outputs are not reused.
pub const GENERATOR_VERSION: u32 = 2;

/// The manifest file written at the root of the output folder.
pub const MANIFEST_FILE: &str = "phantom_manifest.json";

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhantomConfig {
    /// Output folder; the five site folders are created inside it.
    pub out: PathBuf,
    /// Training cases for each of the four training sites.
    pub cases_per_site: usize,
    /// Cases of the BTCV-style test site.
    pub btcv_cases: usize,
    /// Volume size preset.
    pub size: PhantomSize,
    /// Seed of everything random.
    pub seed: u64,
}

impl PhantomConfig {
    /// Defaults: 6 cases per training site, 4 BTCV cases, [`PhantomSize::Small`], seed 0.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        PhantomConfig {
            out: out.into(),
            cases_per_site: 6,
            btcv_cases: 4,
            size: PhantomSize::Small,
            seed: 0,
        }
    }

    /// The test preset: [`PhantomSize::Tiny`], 2 cases per site, 1 BTCV case.
    pub fn tiny(out: impl Into<PathBuf>) -> Self {
        PhantomConfig {
            cases_per_site: 2,
            btcv_cases: 1,
            size: PhantomSize::Tiny,
            ..PhantomConfig::new(out)
        }
    }

    /// Errors on zero cases or an unusable size.
    pub fn validate(&self) -> Result<()> {
        if self.cases_per_site == 0 || self.btcv_cases == 0 {
            return Err(DataError::Config(format!(
                "phantoms need at least one case per site (got {} per training site, {} BTCV)",
                self.cases_per_site, self.btcv_cases
            )));
        }
        self.size.validate()
    }

    /// Hash of everything that determines the output (not the output folder).
    pub fn hash(&self) -> String {
        let canonical = json!({
            "generator_version": GENERATOR_VERSION,
            "cases_per_site": self.cases_per_site,
            "btcv_cases": self.btcv_cases,
            "size": self.size,
            "seed": self.seed,
        });
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One written site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhantomSite {
    /// Folder name inside the output folder (`Task03_Liver`, `kits19`, ...).
    pub name: String,
    /// Layout it is written in.
    pub layout: Layout,
    /// Organs its labels annotate.
    pub annotated: OrganSet,
    /// Case ids, in order.
    pub cases: Vec<String>,
    /// Every file written, relative to the output folder.
    pub files: Vec<PathBuf>,
    /// How each case was scanned, in case order.
    #[serde(default)]
    pub acquisitions: Vec<Acquisition>,
}

/// What [`write_sites`] wrote (also saved as [`MANIFEST_FILE`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhantomManifest {
    /// [`GENERATOR_VERSION`] of the writer.
    pub generator_version: u32,
    /// [`PhantomConfig::hash`] of the configuration.
    pub config_hash: String,
    /// Cases per training site.
    pub cases_per_site: usize,
    /// BTCV cases.
    pub btcv_cases: usize,
    /// Size preset.
    pub size: PhantomSize,
    /// Seed.
    pub seed: u64,
    /// False while writing: an interrupted run is never reused.
    pub complete: bool,
    /// The sites.
    pub sites: Vec<PhantomSite>,
    /// Whether this call reused an existing output instead of writing (not saved).
    #[serde(skip)]
    pub reused: bool,
}

impl PhantomManifest {
    /// The site folder called `name`, inside `out`.
    pub fn site_dir(&self, out: &Path, name: &str) -> Option<PathBuf> {
        self.sites
            .iter()
            .find(|s| s.name == name)
            .map(|_| out.join(name))
    }
}

use sites::{site_specs, SiteKind, SiteSpec};

/// Seed for one (site, case): the configuration seed mixed with both indices (SplitMix64),
/// so each case is reproducible on its own.
fn case_seed(seed: u64, site: usize, case: usize) -> u64 {
    let mut z = seed
        ^ (site as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (case as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Generates case `case` of the site with index `site_index`: a subject with tumours in the
/// site's organ, scanned as the site's style draws it.
fn generate_case(config: &PhantomConfig, site_index: usize, case: usize) -> Result<PhantomCase> {
    let specs = site_specs();
    let spec = specs
        .get(site_index)
        .ok_or_else(|| DataError::Config(format!("no phantom site with index {site_index}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(case_seed(config.seed, site_index, case));
    let subject = Subject::generate(&mut rng, spec.organ);
    let acquisition = spec
        .style
        .draw(&config.size, &subject.landmarks(), &mut rng);
    render_case(&subject, &acquisition, &mut rng)
}

/// `f(index, spec)` for every site, sites spread over the available cores; results in site
/// order, the first error (in site order) wins.
fn map_sites<T: Send>(f: impl Fn(usize, &SiteSpec) -> Result<T> + Sync) -> Result<Vec<T>> {
    let specs = site_specs();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(specs.len());
    let mut results: Vec<Option<Result<T>>> = (0..specs.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (f, specs) = (&f, &specs);
                scope.spawn(move || {
                    (w..specs.len())
                        .step_by(workers)
                        .map(|i| (i, f(i, &specs[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            match handle.join() {
                Ok(done) => {
                    for (i, r) in done {
                        results[i] = Some(r);
                    }
                }
                Err(_) => {
                    return Err(DataError::Config(
                        "a phantom generator thread panicked".into(),
                    ))
                }
            }
        }
        Ok(())
    })?;
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(DataError::Config("a phantom site was skipped".into()))))
        .collect()
}

/// The five site folders, in the order [`write_sites`] writes them.
pub fn site_names() -> Vec<&'static str> {
    site_specs().iter().map(|s| s.folder).collect()
}

/// The site's own annotation from the full ground truth.
fn site_labels(spec: &SiteSpec, case: &PhantomCase) -> Volume<u8> {
    use anatomy::btcv;
    let data = case
        .labels
        .data
        .iter()
        .zip(&case.tumour.data)
        .map(|(&l, &t)| {
            let organ_hit = match spec.organ {
                Some(Organ::Liver) => l == btcv::LIVER,
                Some(Organ::Spleen) => l == btcv::SPLEEN,
                Some(Organ::Pancreas) => l == btcv::PANCREAS,
                Some(Organ::Kidney) => l == btcv::RIGHT_KIDNEY || l == btcv::LEFT_KIDNEY,
                None => return l,
            };
            match (organ_hit, t != 0) {
                (false, _) => 0,
                // Spleen has no tumour label; a spleen tumour never occurs anyway.
                (true, true) if spec.organ != Some(Organ::Spleen) => 2,
                (true, _) => 1,
            }
        })
        .collect();
    Volume {
        data,
        geometry: case.labels.geometry.clone(),
    }
}

/// Generates the phantom case `case` of site `folder` (as written by [`write_sites`]),
/// without writing anything. Useful for tests and for inspecting the ground truth.
pub fn generate(config: &PhantomConfig, folder: &str, case: usize) -> Result<PhantomCase> {
    let index = site_specs()
        .iter()
        .position(|s| s.folder == folder)
        .ok_or_else(|| DataError::Config(format!("no phantom site called {folder}")))?;
    generate_case(config, index, case)
}

/// Writes the five phantom sites into `config.out`, or reuses them.
///
/// If `out` holds a complete manifest with the same configuration hash and every listed
/// file exists, nothing is written and the manifest comes back with `reused = true`.
/// Otherwise the site folders of an earlier phantom run (known from its manifest) are
/// removed and everything is written again, each file atomically, the manifest last. A
/// site folder that exists without any manifest is not ours: that is an error rather than
/// a deletion.
pub fn write_sites(config: &PhantomConfig) -> Result<PhantomManifest> {
    config.validate()?;
    let out = &config.out;
    let manifest_path = out.join(MANIFEST_FILE);
    let hash = config.hash();
    let specs = site_specs();

    let previous = read_manifest(&manifest_path)?;
    if let Some(previous) = &previous {
        let files_present = previous
            .sites
            .iter()
            .flat_map(|s| &s.files)
            .all(|f| out.join(f).is_file());
        if previous.complete && previous.config_hash == hash && files_present {
            return Ok(PhantomManifest {
                reused: true,
                ..previous.clone()
            });
        }
        for spec in &specs {
            let dir = out.join(spec.folder);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
            }
        }
    } else if let Some(spec) = specs.iter().find(|s| out.join(s.folder).exists()) {
        return Err(DataError::Config(format!(
            "{} exists but {} has no {MANIFEST_FILE}: it was not written by the phantom \
             generator; choose an empty output folder",
            out.join(spec.folder).display(),
            out.display()
        )));
    }

    let mut manifest = PhantomManifest {
        generator_version: GENERATOR_VERSION,
        config_hash: hash,
        cases_per_site: config.cases_per_site,
        btcv_cases: config.btcv_cases,
        size: config.size,
        seed: config.seed,
        complete: false,
        sites: Vec::new(),
        reused: false,
    };
    save_manifest(&manifest_path, &manifest)?;
    manifest.sites = map_sites(|index, spec| write_site(config, index, spec))?;
    manifest.complete = true;
    save_manifest(&manifest_path, &manifest)?;
    Ok(manifest)
}

/// Writes one site and returns its manifest entry.
fn write_site(config: &PhantomConfig, index: usize, spec: &SiteSpec) -> Result<PhantomSite> {
    let out = &config.out;
    let n = match spec.kind {
        SiteKind::Btcv => config.btcv_cases,
        _ => config.cases_per_site,
    };
    let mut cases = Vec::with_capacity(n);
    let mut files = Vec::with_capacity(2 * n + 1);
    let mut training = Vec::with_capacity(n);
    let mut acquisitions = Vec::with_capacity(n);
    for case in 0..n {
        let (id, image_rel, label_rel) = match spec.kind {
            SiteKind::Msd { prefix, .. } => {
                let id = format!("{prefix}_{case}");
                (
                    id.clone(),
                    PathBuf::from(format!("imagesTr/{id}.nii.gz")),
                    PathBuf::from(format!("labelsTr/{id}.nii.gz")),
                )
            }
            SiteKind::Kits => {
                let id = format!("case_{case:05}");
                (
                    id.clone(),
                    PathBuf::from(format!("data/{id}/imaging.nii.gz")),
                    PathBuf::from(format!("data/{id}/segmentation.nii.gz")),
                )
            }
            SiteKind::Btcv => {
                let id = format!("{:04}", case + 1);
                (
                    id.clone(),
                    PathBuf::from(format!("img/img{id}.nii.gz")),
                    PathBuf::from(format!("label/label{id}.nii.gz")),
                )
            }
        };
        let rendered = generate_case(config, index, case)?;
        let labels = site_labels(spec, &rendered);
        let site_dir = out.join(spec.folder);
        for rel in [&image_rel, &label_rel] {
            if let Some(parent) = site_dir.join(rel).parent() {
                std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
            }
        }
        write_volume(site_dir.join(&image_rel), &rendered.image, VoxelType::Int16)?;
        write_labels(site_dir.join(&label_rel), &labels)?;
        training.push(json!({
            "image": format!("./{}", image_rel.display()),
            "label": format!("./{}", label_rel.display()),
        }));
        files.push(Path::new(spec.folder).join(&image_rel));
        files.push(Path::new(spec.folder).join(&label_rel));
        cases.push(id);
        acquisitions.push(rendered.acquisition);
    }
    let (layout, annotated) = match spec.kind {
        SiteKind::Msd { task, labels, .. } => {
            let labels: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), json!(v)))
                .collect();
            let dataset = json!({
                "name": task,
                "description": "SegViz synthetic abdominal CT phantom",
                "reference": "generated by segviz-data",
                "licence": "CC0",
                "tensorImageSize": "3D",
                "modality": {"0": "CT"},
                "labels": labels,
                "numTraining": n,
                "numTest": 0,
                "training": training,
                "test": [],
            });
            let path = out
                .join(spec.folder)
                .join(crate::datasets::msd::DATASET_JSON);
            let text = serde_json::to_vec_pretty(&dataset)
                .map_err(|e| DataError::invalid(&path, format!("cannot serialise: {e}")))?;
            atomic_write::write_bytes(&path, &text)?;
            files.push(Path::new(spec.folder).join(crate::datasets::msd::DATASET_JSON));
            let organ = spec.organ.map(OrganSet::single).unwrap_or_default();
            (Layout::Msd, organ)
        }
        SiteKind::Kits => (Layout::Kits19, OrganSet::single(Organ::Kidney)),
        SiteKind::Btcv => (Layout::Btcv, OrganSet::ALL),
    };
    Ok(PhantomSite {
        name: spec.folder.to_owned(),
        layout,
        annotated,
        cases,
        files,
        acquisitions,
    })
}

/// Reads a manifest if there is one; an unreadable one counts as absent-but-ours (it will
/// be rewritten) only if it is at least JSON of the right shape — otherwise an error.
fn read_manifest(path: &Path) -> Result<Option<PhantomManifest>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DataError::invalid(path, format!("not a phantom manifest: {e}")))
}

fn save_manifest(path: &Path, manifest: &PhantomManifest) -> Result<()> {
    let text = serde_json::to_vec_pretty(manifest)
        .map_err(|e| DataError::invalid(path, format!("cannot serialise manifest: {e}")))?;
    atomic_write::write_bytes(path, &text)
}

#[cfg(test)]
mod tests;
