//! Data pipeline benchmarks: preprocessing one full CT volume (512×512×100 int16 read from
//! `.nii.gz`, reoriented, resampled to 1.5×1.5×2 mm, windowed, padded) and training patches
//! per second from a cached volume with augmentation.
//!
//! `cargo bench --bench data_pipeline`. The scan and its labels are kept in the system's
//! temporary folder (`segviz-data-pipeline/`, printed), so that
//! `python3 benches/monai_reference.py --preprocess IMAGE LABEL` times MONAI's transforms on the
//! same files with the same settings.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segviz::data::nifti_io::{write_labels, write_volume, VoxelType};
#[path = "common/ct.rs"]
mod ct;

use ct::ct_pair;
use segviz::data::{
    preprocess_files, AugmentConfig, Augmenter, PatchSampler, PatchSamplerConfig, PreprocessCache,
    PreprocessConfig,
};

fn preprocessing(c: &mut Criterion) {
    let dir = std::env::temp_dir().join("segviz-data-pipeline");
    let _ = std::fs::remove_dir_all(dir.join("cache"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (image, label) = ct_pair();
    let image_path = dir.join("ct.nii.gz");
    let label_path = dir.join("ct_label.nii.gz");
    write_volume(&image_path, &image, VoxelType::Int16).expect("write image");
    write_labels(&label_path, &label).expect("write label");
    println!(
        "scan: {} {} (for benches/monai_reference.py --preprocess)",
        image_path.display(),
        label_path.display()
    );
    let config = PreprocessConfig::default();
    let mut group = c.benchmark_group("preprocess");
    group.sample_size(10);
    group.bench_function("512x512x100_int16_nii_gz", |b| {
        b.iter(|| preprocess_files(&image_path, &label_path, &config).expect("preprocess"))
    });
    group.finish();

    // What a training epoch does per case: read the preprocessed volume back from the
    // cache, draw 4 patches and augment them.
    let cache = PreprocessCache::new(dir.join("cache")).expect("cache");
    cache
        .load_or_preprocess(&image_path, &label_path, &config)
        .expect("fill cache");
    let mut sampler = PatchSampler::new(PatchSamplerConfig::default()).expect("sampler");
    let mut augmenter = Augmenter::new(AugmentConfig::default(), 0).expect("augmenter");
    let mut group = c.benchmark_group("cached_volume");
    group.sample_size(10);
    group.throughput(Throughput::Elements(4));
    group.bench_function("read_and_4x128x128x32_augmented", |b| {
        b.iter(|| {
            let (image, label, _) = cache
                .load_or_preprocess(&image_path, &label_path, &config)
                .expect("cache hit");
            let patches = sampler.sample(&image, &label).expect("patches");
            patches
                .iter()
                .map(|p| augmenter.augment(p).expect("augment"))
                .count()
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(dir.join("cache"));
}

fn patches(c: &mut Criterion) {
    let (image, label) = ct_pair();
    let (image, label) =
        segviz::data::preprocess_pair(&image, &label, &PreprocessConfig::default())
            .expect("preprocess");
    let mut group = c.benchmark_group("patches");
    for (name, size) in [("128x128x32", [128, 128, 32]), ("48x48x16", [48, 48, 16])] {
        let mut sampler = PatchSampler::new(PatchSamplerConfig {
            patch_size: size,
            ..PatchSamplerConfig::default()
        })
        .expect("sampler");
        let mut augmenter = Augmenter::new(AugmentConfig::default(), 0).expect("augmenter");
        group.throughput(Throughput::Elements(4));
        group.bench_function(format!("sample_and_augment_4x{name}"), |b| {
            b.iter(|| {
                let patches = sampler.sample(&image, &label).expect("patches");
                patches
                    .iter()
                    .map(|p| augmenter.augment(p).expect("augment"))
                    .count()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, preprocessing, patches);
criterion_main!(benches);
