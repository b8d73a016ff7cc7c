//! Data pipeline benchmarks: preprocessing one full CT volume (512×512×100 int16 read from
//! `.nii.gz`, reoriented, resampled to 1.5×1.5×2 mm, windowed, padded) and training patches
//! per second from a cached volume with augmentation.
//!
//! `cargo bench --bench data_pipeline`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segviz::data::nifti_io::{write_labels, write_volume, VoxelType};
use segviz::data::{
    preprocess_files, AugmentConfig, Augmenter, Geometry, PatchSampler, PatchSamplerConfig,
    PreprocessCache, PreprocessConfig, Volume,
};

/// A CT-like 512×512×100 volume at 0.8×0.8×2.5 mm: a body ellipse of soft tissue with a
/// brighter "organ" (label 1) inside, in air.
fn ct_pair() -> (Volume<f32>, Volume<u8>) {
    let shape = [512, 512, 100];
    let geometry = Geometry::from_spacing(shape, [0.8, 0.8, 2.5]);
    let mut image = Volume::filled(geometry.clone(), -1000.0f32);
    let mut label = Volume::filled(geometry, 0u8);
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            let (x, y) = (i as f32 / 256.0 - 1.0, j as f32 / 256.0 - 1.0);
            let body = (x / 0.9).powi(2) + (y / 0.7).powi(2) < 1.0;
            let organ = ((x + 0.3) / 0.35).powi(2) + (y / 0.3).powi(2) < 1.0;
            for k in 0..shape[2] {
                let idx = image.geometry.index(i, j, k);
                let noise = (((i * 7 + j * 13 + k * 31) % 97) as f32 - 48.0) * 0.5;
                if organ && (20..80).contains(&k) {
                    image.data[idx] = 110.0 + noise;
                    label.data[idx] = 1;
                } else if body {
                    image.data[idx] = 40.0 + noise;
                }
            }
        }
    }
    (image, label)
}

fn preprocessing(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("segviz-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (image, label) = ct_pair();
    let image_path = dir.join("ct.nii.gz");
    let label_path = dir.join("ct_label.nii.gz");
    write_volume(&image_path, &image, VoxelType::Int16).expect("write image");
    write_labels(&label_path, &label).expect("write label");
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
    let _ = std::fs::remove_dir_all(&dir);
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
