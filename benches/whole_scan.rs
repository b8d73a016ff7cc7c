//! End-to-end segmentation of one whole CT scan, as `predict` does it: read a 512×512×100
//! int16 `.nii.gz`, preprocess it as the quick preset trains (4×4×5 mm, window −200…250 HU),
//! slide a 96×96×48 window over it (overlap 0.25, Gaussian blending, 4 windows a batch; the
//! ROI of benches/monai_reference.py) through the quick preset's U-Net (channels 8–64, four
//! organ heads), fuse the heads and resample the label map back onto the scan's grid. A second
//! function does the same with one window a batch.
//!
//! `cargo bench --bench whole_scan`. The scan is kept in the system's temporary folder
//! (`segviz-whole-scan/ct_512x512x100.nii.gz`, printed), so that
//! `python3 benches/monai_reference.py --predict THAT_FILE` times MONAI's
//! `sliding_window_inference` on the same file with the same settings.

#[path = "common/ct.rs"]
mod ct;

use criterion::{criterion_group, criterion_main, Criterion};
use segviz::core::sliding_window::SlidingWindowConfig;
use segviz::core::SegVizConfig;
use segviz::data::nifti_io::{write_volume, VoxelType};
use segviz::fed::evaluate::{segment_file, Segmenter};
use segviz::fed::experiment::ExperimentConfig;

fn whole_scan(c: &mut Criterion) {
    let dir = std::env::temp_dir().join("segviz-whole-scan");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("ct_512x512x100.nii.gz");
    let (image, _) = ct::ct_pair();
    write_volume(&path, &image, VoxelType::Int16).expect("write the scan");
    println!(
        "scan: {} (for benches/monai_reference.py --predict)",
        path.display()
    );

    let preset = ExperimentConfig::quick();
    // The same windows as benches/monai_reference.py.
    let window = SlidingWindowConfig::new([96, 96, 48]);
    let device = segviz::default_device();
    let organs = ["liver", "spleen", "pancreas", "kidney"];
    let model = SegVizConfig::new(
        preset.representation.clone(),
        organs.iter().map(|o| o.to_string()).collect(),
    )
    .init(&device, 0)
    .expect("model");
    let segmenter = Segmenter::Single(Box::new(model));

    let mut group = c.benchmark_group("whole_scan");
    group.sample_size(10);
    // 4 windows a batch as MONAI users set it, and 1 as the quick preset scores its volumes.
    for (name, batch) in [
        ("predict_512x512x100_quick", 4),
        ("predict_512x512x100_quick_sw_batch_1", 1),
    ] {
        let window = window.clone().with_sw_batch_size(batch);
        group.bench_function(name, |b| {
            b.iter(|| {
                segment_file(&segmenter, &path, &preset.preprocess, &window, &device)
                    .expect("segment")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, whole_scan);
criterion_main!(benches);
